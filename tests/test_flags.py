"""Flags generated from the config dataclasses (shared/flags.py): one declaration per key."""

from __future__ import annotations

import argparse
import dataclasses
import re
from enum import Enum

import pytest

from fleetfl.agent import cli as agent_cli
from fleetfl.coordinator import cli as coordinator_cli
from fleetfl.coordinator import demo, simulator
from fleetfl.shared.config import (
    AgentConfig,
    ConfigError,
    JobConfig,
    RunConfig,
    load_agent_config,
    load_config,
)
from fleetfl.shared.core.catalog import ALGORITHMS
from fleetfl.shared.flags import HelpFormatter, config_fields, given, shown_default, to_argv

PARSERS = {"fl-coordinator": coordinator_cli.build_parser, "fl-agent": agent_cli.build_parser,
           "fl-demo": demo.build_parser, "fl-sim": simulator.build_parser}


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings}


def help_of(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = HelpFormatter(parser.prog)
    return formatter._expand_help(action).replace("\n", " ")


def keys(cls: type) -> list[dataclasses.Field]:
    return [f for f, _ in config_fields(cls) if f.metadata.get("flag") is not False]


@pytest.mark.parametrize("cls", [RunConfig, JobConfig, AgentConfig])
def test_every_config_field_has_help_text(cls):
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no metadata help"


@pytest.mark.parametrize("prog, classes", [("fl-coordinator", (RunConfig,)),
                                           ("fl-agent", (AgentConfig,))])
def test_every_config_field_has_a_flag(prog, classes):
    flags = options(PARSERS[prog]())
    for cls in classes:
        for f in keys(cls):
            assert f.name in flags, f"{prog} has no flag for {f.name}"
    # the one key without a flag is set by the coordinator itself
    assert [f.name for f, _ in config_fields(RunConfig)
            if f.metadata.get("flag") is False] == ["task_fingerprint"]


@pytest.mark.parametrize("prog, classes", [("fl-coordinator", (RunConfig,)),
                                           ("fl-agent", (AgentConfig,)),
                                           ("fl-sim", (JobConfig,)), ("fl-demo", (JobConfig,))])
def test_the_default_shown_is_the_dataclass_default_and_none_reaches_argparse(prog, classes):
    parser = PARSERS[prog]()
    flags = options(parser)
    own = {"fl-demo": demo.DEMO_DEFAULTS}.get(prog, {})
    for cls in classes:
        for f, _ in config_fields(cls):
            if f.name not in flags or f.name in own:
                continue
            text = help_of(parser, flags[f.name])
            if f.name == "max_message_age":  # the signing helper's own wording
                assert f"(s, default {f.default:g})" in text
                continue
            # generated "(default: D)"; a flag declared by hand (--broker) may say "(default D)"
            assert re.search(rf"\(default:? {re.escape(shown_default(f))}\)", text), \
                (prog, f.name, text)
            default = f.default if f.default is not dataclasses.MISSING else None
            if "shown" not in f.metadata and not isinstance(default, bool | Enum) \
                    and default != "":
                assert str(default) in text
            if f.metadata.get("unit"):
                assert f.metadata["unit"] in text
            # not given stays None: load_config then keeps the YAML value or the default
            assert flags[f.name].default is None, (prog, f.name)


def test_a_program_default_is_shown_and_used():
    parser = demo.build_parser()
    args = parser.parse_args([])
    assert (args.algo, args.partition, args.max_versions) == ("dga", "dirichlet", 40)
    assert "(default: dga)" in help_of(parser, options(parser)["algo"])
    assert "(default: 40 versions)" in help_of(parser, options(parser)["max_versions"])


@pytest.mark.parametrize("prog", ["fl-coordinator", "fl-sim", "fl-demo", "fl-agent"])
def test_every_flag_has_help_with_its_default(prog):
    parser = PARSERS[prog]()
    for dest, action in options(parser).items():
        if isinstance(action, argparse._HelpAction | argparse._VersionAction) \
                or action.help == argparse.SUPPRESS:
            continue  # -h and --version print and exit: they have no default
        text = help_of(parser, action)
        assert len(text) > 20 and "default" in text, (prog, dest, text)


def test_times_are_given_in_seconds():
    parser = coordinator_cli.build_parser()
    flags = options(parser)
    for dest in ("window_timeout", "round_deadline", "max_message_age"):
        assert "seconds" in help_of(parser, flags[dest]) or "(s," in help_of(parser, flags[dest])
    for prog in ("fl-demo", "fl-sim"):
        parser = PARSERS[prog]()
        flags = options(parser)
        dest = {"fl-demo": "timeout", "fl-sim": "latency"}[prog]
        assert "seconds" in help_of(parser, flags[dest])


@pytest.mark.parametrize("prog", ["fl-coordinator", "fl-sim", "fl-demo"])
def test_enum_flags_list_their_choices(prog):
    parser = PARSERS[prog]()
    flags = options(parser)
    for f, kind in config_fields(JobConfig):
        if isinstance(kind, type) and issubclass(kind, Enum):
            assert flags[f.name].choices == [c.value for c in kind if c.value], f.name
    assert "{" + ",".join(ALGORITHMS) + "}" in parser.format_usage()  # fedavg,dga,...
    with pytest.raises(SystemExit):
        parser.parse_args(["--payload", "sparse"])


def test_old_spellings_still_work():
    args = coordinator_cli.parse_args(["--dataset", "mnist", "--rate-walk",
                                       "--allow-insecure-credentials"])
    assert (args.task, args.rate_walk, args.insecure_credentials) == ("mnist", True, True)
    assert coordinator_cli.parse_args(["--no-rate-walk"]).rate_walk is False


def test_agent_partition_flag_is_refused_naming_shard(capsys):
    with pytest.raises(SystemExit) as exc:
        agent_cli.parse_args(["--agent-id", "a", "--partition", "3/16"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--partition is now --shard" in err
    assert agent_cli.parse_args(["--shard", "3/16"]).shard == "3/16"


def test_agent_partition_key_is_refused_naming_shard(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text("agent_id: pi01\npartition: 3/16\n")
    with pytest.raises(ConfigError, match="'partition' is now 'shard'"):
        load_agent_config(path)
    path.write_text("agent_id: pi01\nshard: 3/16\n")
    assert load_agent_config(path).shard == "3/16"
    with pytest.raises(ConfigError, match="shard '16/16'"):
        load_agent_config(path, {"shard": "16/16"})


def coordinator_config(argv: list[str]) -> RunConfig:
    args = coordinator_cli.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in coordinator_cli.NOT_CONFIG}
    return load_config(args.config, overrides)


def test_a_given_flag_overrides_yaml_and_an_absent_one_does_not(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("max_versions: 7\nwindow_timeout: 5\njob:\n  lr: 0.2\n  rate_walk: true\n"
                    "  algo: dga\n")
    cfg = coordinator_config(["--config", str(path), "--max-versions", "9"])
    assert cfg.max_versions == 9  # flag over YAML
    assert (cfg.window_timeout, cfg.job.lr, cfg.job.rate_walk) == (5.0, 0.2, True)  # YAML kept
    assert cfg.min_agents == RunConfig().min_agents  # neither: the default
    cfg = coordinator_config(["--config", str(path), "--lr", "0.3", "--no-rate-walk",
                              "--algo", "fedavg"])
    assert (cfg.job.lr, cfg.job.rate_walk, cfg.job.algo) == (0.3, False, "fedavg")
    assert cfg.max_versions == 7


def test_agent_flag_overrides_yaml(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text("agent_id: pi01\nshard: 1/4\nthreads: 2\n")
    args = agent_cli.parse_args(["--config", str(path), "--shard", "2/4"])
    cfg = load_agent_config(args.config, {k: v for k, v in vars(args).items()
                                          if k not in ("config", "verbose")})
    assert (cfg.shard, cfg.threads, cfg.agent_id) == ("2/4", 2, "pi01")


def test_demo_passes_its_flags_to_the_coordinator_as_given():
    args = demo.parse_args(["--max-versions", "5", "--rate-walk", "--payload", "partial",
                            "--", "--lr", "0.1"])
    argv = to_argv(given(args, args.coordinator_keys))
    again = coordinator_cli.parse_args([*argv, *args.extra])
    assert (again.max_versions, again.rate_walk, again.payload, again.lr) == \
        (5, True, "partial", 0.1)
    assert (again.algo, again.partition) == ("dga", "dirichlet")  # the demo's defaults
    assert again.run is None and again.min_agents is None  # LocalFleet and the demo set them
