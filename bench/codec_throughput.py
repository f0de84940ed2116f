"""Codec throughput: encode + decode of an UPDATE message vs a plain numpy copy.

What is measured: for a float32 delta of N parameters, the time of one round trip through the
wire codec (``encode(msg)`` then ``decode(payload, ctx)``, i.e. what an agent and the
coordinator do for every update) next to the time of ``arr.copy()`` of the same array. Both are
timed in the same loop, interleaved, with ``time.perf_counter``; the medians are reported.

Why: model updates are the only large thing on the wire, and the codec touches every byte of
them on both sides. Ideally it costs about one memory copy (goal: numpy_copy_time / codec_time
>= 0.8). When a size falls short, the round trip is split into its parts (msgpack ``packb``,
``unpackb``, ``np.frombuffer``, the ``np.isfinite`` check, the remaining schema checks) so it is
clear where the time goes. The overhead column is the packed size minus the raw array bytes.

Run: ``.venv/bin/python bench/codec_throughput.py [--sizes 100000,1000000,11000000]``
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

import msgpack
import numpy as np
from timing import medians

from fleetfl.shared.core.messages import Kind, Message
from fleetfl.shared.wire.codec import HEADER_MAX, DecodeContext, decode, encode
from fleetfl.shared.wire.layout import PREFIX_BYTES, frame, placements, read_header

GOAL = 0.8
RUN = "bench"
DEFAULT_SIZES = (100_000, 1_000_000, 11_000_000)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Encode+decode of an UPDATE message vs numpy arr.copy() of the same "
                    "float32 delta (medians, interleaved repetitions).")
    p.add_argument("--sizes", default=",".join(str(s) for s in DEFAULT_SIZES),
                   help="comma-separated parameter counts (default %(default)s)")
    p.add_argument("--repeats", type=int, default=0,
                   help="timed repetitions per size (default: more for small sizes)")
    p.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                   help="print the per-part breakdown: auto = only for sizes below the goal")
    return p.parse_args(argv)


def default_repeats(n: int) -> int:
    """Enough repetitions for a stable median, about a second or two per size."""
    if n <= 200_000:
        return 300
    if n <= 2_000_000:
        return 60
    return 15


def update_message(delta: np.ndarray) -> Message:
    return Message(Kind.UPDATE, RUN, "agent0", 1, 0,
                   {"window": 1, "samples": 1000, "steps": 10}, {"delta": delta})


def round_trip(msg: Message, ctx: DecodeContext) -> Message:
    return decode(encode(msg), ctx)


def breakdown(delta: np.ndarray, repeats: int) -> dict[str, float]:
    """Median seconds of each part of encode/decode, timed the same interleaved way."""
    msg = update_message(delta)
    ctx = DecodeContext(RUN, delta.size)
    payload = encode(msg)
    header = {"proto": msg.proto, "kind": str(msg.kind), "run": msg.run, "sender": msg.sender,
              "seq": msg.seq, "base_version": msg.base_version, "fields": msg.fields,
              "arrays": {"delta": {"dtype": "<f4", "shape": list(delta.shape)}}}
    head = msgpack.packb(header, use_bin_type=True)
    (start,), _ = placements(msg.proto, PREFIX_BYTES + len(head), [delta.nbytes])
    view = np.frombuffer(memoryview(payload)[start:start + delta.nbytes], dtype="<f4")

    return medians({
        "encode (total)": lambda: encode(msg),
        "  msgpack.packb(header)": lambda: msgpack.packb(header, use_bin_type=True),
        "  join prefix + header + array (one copy)": lambda: b"".join(
            frame(msg.proto, head, [delta.data.cast("B")])),
        "decode (total)": lambda: decode(payload, ctx),
        "  read header (prefix + Unpacker)": lambda: read_header(payload, HEADER_MAX),
        "  np.isfinite(arr).all()": lambda: np.isfinite(view).all(),
        "ref: arr.tobytes() (one copy to bytes)": delta.tobytes,
        "ref: arr.copy()": delta.copy,
        **({"ref: arr.copy() without hugepage madvise": no_hugepage_copy(delta)}
           if _hugepage_switch() else {}),
    }, repeats)


def _hugepage_switch() -> tuple[Callable[[], bool], Callable[[bool], bool]] | None:
    """numpy's private get/set of madvise(MADV_HUGEPAGE) for large arrays, if present."""
    core = getattr(np, "_core", None)
    multiarray = getattr(core, "multiarray", None)
    get = getattr(multiarray, "_get_madvise_hugepage", None)
    set_ = getattr(multiarray, "_set_madvise_hugepage", None)
    return (get, set_) if get and set_ else None


def no_hugepage_copy(delta: np.ndarray) -> Callable[[], np.ndarray]:
    """arr.copy() with numpy's hugepage hint off: page-faults in 4 KiB pages like bytes do."""
    switch = _hugepage_switch()
    assert switch is not None
    _, set_hugepage = switch

    def copy() -> np.ndarray:
        previous = set_hugepage(False)
        try:
            return delta.copy()
        finally:
            set_hugepage(previous)

    return copy


def transparent_hugepages() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "unknown"
    match = re.search(r"\[(\w+)\]", text)
    return match.group(1) if match else text.strip()


def print_breakdown(n: int, parts: dict[str, float]) -> None:
    codec = parts["encode (total)"] + parts["decode (total)"]
    print(f"\nBreakdown for {n:,} parameters ({n * 4 / 1e6:.1f} MB), medians:\n")
    print("| part | ms | % of codec round trip |")
    print("|---|---:|---:|")
    for name, sec in parts.items():
        share = "" if name.startswith("ref:") else f"{100 * max(sec, 0.0) / codec:.0f}%"
        print(f"| {name.replace('  ', '&nbsp;&nbsp;')} | {sec * 1e3:.3f} | {share} |")
    one_copy = parts["ref: arr.tobytes() (one copy to bytes)"]
    print(f"\nIn units of one copy into a new bytes object ({one_copy * 1e3:.3f} ms): "
          f"whole round trip {codec / one_copy:.1f}; arr.copy() "
          f"{parts['ref: arr.copy()'] / one_copy:.1f}.")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        delta = rng.standard_normal(n, dtype=np.float32)
        msg = update_message(delta)
        ctx = DecodeContext(RUN, n)
        payload = encode(msg)
        back = decode(payload, ctx)
        assert np.array_equal(back["delta"], delta), "codec round trip changed the data"
        overhead = len(payload) - delta.nbytes
        del payload, back
        repeats = args.repeats or default_repeats(n)
        med = medians({"codec": lambda m=msg, c=ctx: round_trip(m, c),
                           "copy": delta.copy}, repeats)
        rows.append((n, delta, overhead, repeats, med["codec"], med["copy"]))

    print(f"numpy {np.__version__}, msgpack {'.'.join(map(str, msgpack.version))}; "
          f"transparent hugepages: {transparent_hugepages()}; "
          "codec = encode + decode of one UPDATE message; MB = 10^6 bytes\n")
    print("| params | MB | codec ms | numpy copy ms | codec MB/s | copy MB/s | copy/codec "
          "| overhead B | reps |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, delta, overhead, repeats, codec, copy in rows:
        mb = delta.nbytes / 1e6
        print(f"| {n:,} | {mb:.1f} | {codec * 1e3:.3f} | {copy * 1e3:.3f} | {mb / codec:,.0f} "
              f"| {mb / copy:,.0f} | {copy / codec:.2f} | {overhead} | {repeats} |")
    print()
    for n, _, _, _, codec, copy in rows:
        ratio = copy / codec
        verdict = "PASS" if ratio >= GOAL else "SHORT"
        print(f"ratio numpy_copy_time / codec_time at {n:,} params: {ratio:.2f} "
              f"(goal >= {GOAL}) {verdict}")

    for n, delta, _, repeats, codec, copy in rows:
        short = copy / codec < GOAL
        if args.profile == "always" or (args.profile == "auto" and short):
            print_breakdown(n, breakdown(delta, repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
