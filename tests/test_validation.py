"""Issue 14, finding 7: settings and ids that passed validation and then broke the run.

NaN compares false with everything, so `max_message_age: nan` switched the freshness check
off; a negative seed crashed every agent in a restart loop; `run: ..` pointed the run
directory at its parent, which a fresh run then cleaned.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import yaml

from fleetfl.shared.config import (
    AgentConfig,
    ConfigError,
    JobConfig,
    RunConfig,
    load_agent_config,
    load_config,
)
from fleetfl.shared.core.job import job_from_dict
from fleetfl.shared.core.messages import Kind, Message, valid_id
from fleetfl.shared.wire.codec import CodecError, DecodeContext, decode, encode


def _float_keys(cls: type, prefix: str = "") -> list[str]:
    return [prefix + f.name for f in dataclasses.fields(cls) if isinstance(f.default, float)]


RUN_FLOATS = _float_keys(RunConfig) + _float_keys(JobConfig, "job.")
AGENT_FLOATS = _float_keys(AgentConfig)
NON_FINITE = [math.nan, math.inf, -math.inf]


def _nested(key: str, value: object) -> dict:
    if key.startswith("job."):
        return {"job": {key[4:]: value}}
    return {key: value}


@pytest.mark.parametrize("value", NON_FINITE, ids=str)
@pytest.mark.parametrize("key", RUN_FLOATS)
def test_every_run_and_job_float_refuses_nan_and_infinities(tmp_path, key, value) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_nested(key, value)))  # YAML's .nan / .inf
    with pytest.raises(ConfigError, match=f"^{key}: "):
        load_config(path)
    flat = key.removeprefix("job.")  # as a command-line flag (argparse type=float)
    with pytest.raises(ConfigError, match=f"^{key}: "):
        load_config(None, {flat: value})


@pytest.mark.parametrize("value", NON_FINITE, ids=str)
@pytest.mark.parametrize("key", AGENT_FLOATS)
def test_every_agent_float_refuses_nan_and_infinities(key, value) -> None:
    with pytest.raises(ConfigError, match=f"^{key}: "):
        load_agent_config(None, {"agent_id": "pi01", key: value})


def test_a_job_from_the_coordinator_with_nan_is_refused_by_the_agent() -> None:
    job = dataclasses.asdict(JobConfig())
    job["lr"] = math.nan
    with pytest.raises(ConfigError, match="^job.lr: "):
        job_from_dict(job)


@pytest.mark.parametrize("seed", [-1, -(2**40), 2**32])
def test_seed_out_of_range_is_refused(seed: int) -> None:
    with pytest.raises(ConfigError, match="seed"):
        load_config(None, {"seed": seed})
    job = dataclasses.asdict(JobConfig())
    job["seed"] = seed
    with pytest.raises(ConfigError, match="seed"):
        job_from_dict(job)


def test_seed_range_edges_are_accepted() -> None:
    assert load_config(None, {"seed": 0}).job.seed == 0
    assert load_config(None, {"seed": 2**32 - 1}).job.seed == 2**32 - 1


BAD_IDS = [".", "..", ".hidden", "", "a" * 65, "pi\u00e901", "\u03c0", "\u0663",  # é, pi, ٣
           "\uff41", "a b", "a/b", "a+b", "a#", "a\n", "a\x00"]
GOOD_IDS = ["pi01", "a.b", "a-b_c", "A9", "_x", "-x", "x.", "a" * 64]


@pytest.mark.parametrize("name", BAD_IDS, ids=repr)
def test_bad_ids_are_refused_naming_the_key(name: str) -> None:
    assert not valid_id(name)
    with pytest.raises(ConfigError, match="^run "):
        load_config(None, {"run": name})
    with pytest.raises(ConfigError, match="^agent_id "):
        load_agent_config(None, {"agent_id": name})
    with pytest.raises(ConfigError, match="^run "):
        load_agent_config(None, {"agent_id": "pi01", "run": name})


@pytest.mark.parametrize("name", GOOD_IDS)
def test_ascii_ids_are_accepted(name: str) -> None:
    assert valid_id(name)
    assert load_config(None, {"run": name}).run == name


def test_the_codec_refuses_a_dot_dot_sender() -> None:
    msg = Message(Kind.OFFLINE, "r", "..", 1, 0, {})
    with pytest.raises(CodecError) as err:
        decode(encode(msg), DecodeContext("r", 10, 1 << 20))
    assert err.value.reason == "bad_sender"
