"""Compressed payloads end to end (issue 17 item 2): 4 agents on MNIST Dirichlet 0.5 reach 97%
over the real broker with q8, q4 and top-k updates and averages (FedBuff with q8 too), and the
byte ledger counts the compressed sizes both ways."""

from __future__ import annotations

import time

import pytest
from test_integration import finish, make_fleet

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DENSE = 61706 * 4  # LeNet-5: the bytes of one dense float32 delta
# array bytes per message against a dense one: q8 one byte a value, q4 half, top-k 8 bytes a
# kept value (plus, for each, a few hundred bytes of header and scales)
SHARE = {"q8": 0.25, "q4": 0.125, "topk": 0.01 * 2}


@pytest.mark.parametrize("algo, compress, extra", [
    ("fedavg", "q8", []), ("fedavg", "q4", []),
    ("fedavg", "topk", ["--topk-density", "0.01"]),
    # a buffer's average goes out compressed over all N values too (README "FedBuff")
    ("fedbuff", "q8", ["--period", "20"])])
def test_mnist_dirichlet_four_agents_reach_97(broker, tmp_path, shared_data_dir, algo,
                                              compress, extra):
    args = ["--algo", algo, "--compress", compress, *extra, "--dataset", "mnist",
            "--partition", "dirichlet", "--alpha", "0.5", "--min-agents", "4",
            "--target-accuracy", "0.97", "--max-versions", "300"]
    start = time.monotonic()
    with make_fleet(broker, tmp_path, f"mnist-{algo}-{compress}", args,
                    data_dir=str(shared_data_dir)) as fleet:
        fleet.start_coordinator()
        fleet.start_agents(4)
        events = finish(fleet, timeout=600)
    accuracies = [e["accuracy"] for e in events if e["accuracy"] is not None]
    last = events[-1]
    print(f"{algo} {compress} mnist: {len(events)} versions, best {max(accuracies):.4f}, "
          f"{time.monotonic() - start:.1f} s, up {last['up_model'] / last['version']:.0f} B "
          f"and down {last['down_model'] / last['version']:.0f} B a version")
    assert max(accuracies) >= 0.97
    assert accuracies[0] < 0.9 < accuracies[-1]
    assert last["rejected"] == {}
    # the ledger counts encoded messages: 4 compressed updates up, and 4 copies of one
    # compressed average down, per version (fedbuff: B = min_agents = 4 a buffer, and a few
    # more updates up, waiting in the open buffers when the run stops: at most 2 x B)
    share, versions = SHARE[compress], last["version"]
    waiting = 8 if algo == "fedbuff" else 0
    for got, extra in ((last["up_model"], waiting), (last["down_model"], 0)):
        assert 4 * share * DENSE < got / versions \
            < (4 + extra / versions) * (share * DENSE + 1024)
