"""`option()`: a dataclass field that also describes its command-line flag.

Config dataclasses declare each option once, with its default and help text; the CLI is
generated from them (cli_args.py), so adding an option is adding one field.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


def option(default: Any = dataclasses.MISSING, help: str = "", *, choices: tuple | None = None,
           group: str | None = None, flag: str | None = None, parse: Callable[[str], Any] | None = None,
           metavar: str | None = None, cli: bool = True, default_factory: Any = dataclasses.MISSING):
    """A field with CLI metadata: `group` names an argument group ("advanced", ...; None: the main
    one), `flag` overrides the flag name (default: --field-name), `parse` reads the flag's text,
    `cli=False` keeps the field out of the command line."""
    metadata = {"help": help, "choices": choices, "group": group, "flag": flag, "parse": parse, "metavar": metavar,
                "cli": cli}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """The options of a method that has none."""


def parse_size(text: str) -> int:
    """'5GB', '400MiB' or '123456789' -> bytes."""
    import argparse
    import re

    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in units:
        raise argparse.ArgumentTypeError(f"cannot read size {text!r}; write it like 5GB, 400MiB or 123456789")
    return int(float(match.group(1)) * units[match.group(2).upper()])


def int_list(text: str) -> tuple[int, ...]:
    """'512,2048' -> (512, 2048)."""
    import argparse

    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read {text!r}; write integers separated by commas, like 512,2048") from None


def unpack_versioned(data: dict, type_name: str, current: int) -> tuple[dict, int]:
    """A config's saved dict without its "type" and "version" keys, and that version; a dict of
    another type, or of a version newer than `current`, is refused."""
    from .errors import VaclmError

    data = dict(data)
    if data.pop("type", type_name) != type_name:
        raise VaclmError(f"not a {type_name} dictionary")
    version = data.pop("version", current)
    if version > current:
        raise VaclmError(f"{type_name} version {version} is newer than this vaclm ({current}); upgrade vaclm")
    return data, version


class Registry(dict):
    """name -> class, filled by the `register(name)` class decorator; `get_class` refuses an
    unknown name in one line that lists the known ones (in registration order)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str):
        def wrap(cls):
            cls.name = name
            self[name] = cls
            return cls

        return wrap

    def get_class(self, name: str):
        from .errors import VaclmError

        if name not in self:
            raise VaclmError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self)}")
        return self[name]
