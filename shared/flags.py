"""Command-line flags generated from the config dataclasses, so a key is declared once.

The rule (`add_config_flags`): every field of a config dataclass becomes `--kebab-case` with
the field's name as `dest` (a nested dataclass field, such as `RunConfig.job`, contributes its
own fields flat: `--lr` is `job.lr`, as `load_config` reads it):

- the type is the field's annotation: `int`, `float`, `str`; an Enum offers its values as
  `choices` (an empty value, e.g. `Payload.AUTO`, means "not given" and is not offered); a
  `bool` is `--flag` / `--no-flag`;
- the help is `metadata["help"]` (required), followed by "(default: D U)": D the dataclass
  default (or `metadata["shown"]` when the raw default would mislead, e.g. "" for "the
  algorithm's own"), U `metadata["unit"]` (seconds, bytes, steps, ...);
- `metadata["choices"]`: the allowed values of a `str` (or `int`) key;
- `metadata["aliases"]`: older spellings that still work (`--dataset` for `--task`);
  `metadata["flag"] = False`: no flag (a key only the program sets);
- argparse's default is None, so a flag not given stays distinguishable: `load_config` skips
  None values (defaults < YAML < flags);
- a field whose `dest` the parser already has (the TLS/credential and signing helpers) keeps
  that flag; only its default is added to its help when the help does not give one.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from enum import Enum
from typing import Any


def config_fields(cls: type) -> list[tuple[dataclasses.Field, type]]:
    """The fields of dataclass `cls` with their resolved types, a nested dataclass field
    replaced by its own fields."""
    hints = typing.get_type_hints(cls)  # the modules use `from __future__ import annotations`
    out = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        out += config_fields(kind) if dataclasses.is_dataclass(kind) else [(f, kind)]
    return out


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def shown_default(f: dataclasses.Field, default: Any = dataclasses.MISSING) -> str:
    """The default as the help shows it, with its unit."""
    if default is dataclasses.MISSING:
        if "shown" in f.metadata:
            return f.metadata["shown"]
        default = field_default(f)
    if isinstance(default, Enum):
        default = default.value
    if isinstance(default, bool):
        return "on" if default else "off"
    if default == "":
        return "none"
    unit = f.metadata.get("unit", "")
    return f"{default} {unit}".strip()


def choices(kind: type) -> list[str] | None:
    if isinstance(kind, type) and issubclass(kind, Enum):
        return [c.value for c in kind if c.value != ""]
    return None


def add_config_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                     only: typing.Iterable[str] | None = None,
                     exclude: typing.Iterable[str] = (),
                     defaults: dict[str, Any] | None = None,
                     shown: dict[str, str] | None = None) -> list[str]:
    """Add a flag per field of `cls` (see the module docstring); `only` / `exclude`: which
    keys; `defaults`: this program's own defaults (argparse default and help), e.g. fl-demo's;
    `shown`: a default the program fills in itself when the flag is not given (help only).
    Returns the keys this call added flags for."""
    only = set(only) if only is not None else None
    exclude, defaults, shown = set(exclude), defaults or {}, shown or {}
    existing = {a.dest: a for a in _actions(parser)}
    added = []
    for f, kind in config_fields(cls):
        if f.name in exclude or (only is not None and f.name not in only) \
                or f.metadata.get("flag") is False:
            continue
        if "help" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name}: no metadata['help'] to build its flag")
        default = defaults.get(f.name, dataclasses.MISSING)
        text = f"(default: {shown.get(f.name) or shown_default(f, default)})"
        if f.name in existing:  # declared by a helper (auth, signing): keep it, show the default
            action = existing[f.name]
            if action.help and not _says_default(action.help):
                action.help = f"{action.help} {_escape(text)}"
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "help": _escape(f"{f.metadata['help']} {text}"),
                                  "default": None if default is dataclasses.MISSING else default}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            options = f.metadata.get("choices") or choices(kind)
            kwargs["type"] = str if options and kind is not int else kind
            if options:
                kwargs["choices"] = options
        parser.add_argument(flag_name(f.name), *f.metadata.get("aliases", ()), **kwargs)
        added.append(f.name)
    return added


def given(args: argparse.Namespace, keys: typing.Iterable[str]) -> dict[str, Any]:
    """The values of `keys` that were given (not None)."""
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def to_argv(values: dict[str, Any]) -> list[str]:
    """`values` (key -> value) as the generated flags that give them (to pass on)."""
    out: list[str] = []
    for key, value in values.items():
        if isinstance(value, bool):
            out.append(flag_name(key) if value else "--no-" + key.replace("_", "-"))
        else:
            out += [flag_name(key), str(value.value if isinstance(value, Enum) else value)]
    return out


def refuse_renamed(parser: argparse.ArgumentParser, old: str, new: str, why: str) -> None:
    """`old` is no longer a flag: using it is an error that names `new` (hidden from help)."""

    class Refuse(argparse.Action):
        def __call__(self, p: argparse.ArgumentParser, *_: object) -> None:
            p.error(f"{old} is now {new} ({why})")

    parser.add_argument(old, action=Refuse, nargs="?", help=argparse.SUPPRESS)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default: the config flags say theirs; others get
    argparse's default (on/off for switches, none for None)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if not action.option_strings or text == argparse.SUPPRESS or _says_default(text) \
                or action.default is argparse.SUPPRESS:
            return text
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            return f"{text} (default: off)"
        if action.default is None:
            return f"{text} (default: none)"
        return f"{text} (default: %(default)s)"


def _says_default(help_text: str) -> bool:
    return re.search(r"\bdefault\b", help_text) is not None


def _escape(text: str) -> str:
    return text.replace("%", "%%")


def _actions(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> list[argparse.Action]:
    return list(parser._actions)  # a group shares its parser's list
