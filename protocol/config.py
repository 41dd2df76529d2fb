"""Command-line configurations declared once.

Each tool's config is a frozen dataclass whose fields carry their option (flag, help,
parsing) through `option`; `add_options` builds the argparse options from those fields and
`from_namespace` the config from the parsed arguments, so a setting is named, defaulted
and documented in one place. Fields without `option` (derived or recorded values) are not
command-line options.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import MISSING, Field, field, fields
from typing import Any, TypeVar

C = TypeVar("C")


def option(default: Any = MISSING, help: str = "", *, flags: Sequence[str] = (),
           parse: Callable[[Any], Any] | None = None, **argparse_kw: Any) -> Any:
    """A dataclass field that is also a command-line option.

    `flags` default to `--field-name`; `parse` turns the parsed value into the field's (comma
    lists into tuples, ...); `default_arg` (in argparse_kw) is the default as typed on the
    command line when it differs from the field's; other keywords go to add_argument. A
    field without a default is a required option."""
    meta = {"cli": True, "help": help, "flags": tuple(flags), "parse": parse, "kw": argparse_kw}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda d=tuple(default): d, metadata=meta)
    return field(default=default, metadata=meta)


def csv_names(text: str) -> tuple[str, ...]:
    """'a, b,c' → ('a', 'b', 'c')."""
    return tuple(v.strip() for v in str(text).split(",") if v.strip())


def _default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def add_options(parser: argparse.ArgumentParser, cls: type) -> argparse.ArgumentParser:
    """Add one option per `option` field of the dataclass `cls`."""
    for f in fields(cls):
        if not f.metadata.get("cli"):
            continue
        kw = dict(f.metadata["kw"])
        default_arg = kw.pop("default_arg", None)
        if f.type == "bool" and "action" not in kw:
            kw["action"] = "store_true"
        required = f.default is MISSING and f.default_factory is MISSING  # type: ignore[misc]
        if required:
            kw.setdefault("required", True)
        flags = f.metadata["flags"] or ("--" + f.name.replace("_", "-"),)
        parser.add_argument(*flags, dest=f.name, help=f.metadata["help"],
                            default=default_arg if default_arg is not None else _default(f), **kw)
    return parser


def from_namespace(cls: type[C], ns: argparse.Namespace, **extra: Any) -> C:
    """The config of `cls` from parsed arguments (each option's `parse` applied)."""
    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if not f.metadata.get("cli"):
            continue
        v = getattr(ns, f.name)
        parse = f.metadata["parse"]
        values[f.name] = parse(v) if parse is not None and v is not None else v
    return cls(**values, **extra)
