"""Command-line flags generated from config dataclasses whose fields are `option()`s.

`add_options(parser, Config)` adds one flag per field (name, type, default and help from the
field), in the argument group the field names; `from_args(Config, args)` builds the config back
from the parsed flags. Adding an option is adding one field.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing


def _plain_type(hint):
    """int | None -> int; anything else unchanged."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return hint


def cli_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli")]


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _shown(value) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def add_options(parser, cls, groups: dict | None = None, choices: dict[str, tuple] | None = None,
                only_given: bool = False, taken: set[str] | None = None) -> None:
    """One flag per CLI field of `cls`, on `parser` (a parser or an argument group). `groups`:
    group title -> argument group (created on first use); `choices`: field -> allowed values
    (overriding the field's); `only_given`: a flag left out is absent from the parsed namespace
    (so a config built from it keeps its own defaults); `taken`: fields already added by another
    class sharing the flag (updated)."""
    groups = {} if groups is None else groups
    taken = set() if taken is None else taken
    hints = typing.get_type_hints(cls)
    for f in cli_fields(cls):
        if f.name in taken:  # a flag shared by several classes is added once
            continue
        taken.add(f.name)
        meta = f.metadata
        title = meta.get("group")
        target = parser if title is None else groups.setdefault(title, parser.add_argument_group(title))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        allowed = (choices or {}).get(f.name, meta.get("choices"))
        kind = _plain_type(hints[f.name])
        help_text = meta.get("help") or f.name.replace("_", " ")
        if default is not None and not (kind is bool and default is False):
            help_text += f" (default: {_shown(default)})"
        kwargs: dict = {"dest": f.name, "help": help_text}
        if only_given:
            kwargs["default"] = argparse.SUPPRESS
        else:
            kwargs["default"] = default
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
        else:
            kwargs["type"] = meta.get("parse") or kind
            if allowed:
                kwargs["choices"] = allowed
            if meta.get("metavar"):
                kwargs["metavar"] = meta["metavar"]
        target.add_argument(flag_of(f), **kwargs)


def given(cls, args: argparse.Namespace) -> dict:
    """The CLI fields of `cls` present in `args` (all of them, unless added with only_given)."""
    return {f.name: getattr(args, f.name) for f in cli_fields(cls) if hasattr(args, f.name)}


def from_args(cls, args: argparse.Namespace, **extra):
    return cls(**given(cls, args), **extra)
