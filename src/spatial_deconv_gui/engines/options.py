"""The options of a typed config, as the CLI, the GUI and the README show them.

Every config dataclass field carries its meaning in ``field(metadata={"help": ...})``; this module turns the
fields into argparse flags (``umi_min`` becomes ``--umi-min``), tooltips and documentation rows, so a new
option or a changed default shows up everywhere at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

DEVICE_HELP = "auto (CUDA when torch sees a GPU), cpu, cuda or cuda:N"
# the devices a flag offers where the engine takes no device index
DEVICE_CHOICES = ("auto", "cpu", "cuda")
DEVICE_CHOICES_HELP = "auto (CUDA when torch sees a GPU), cpu or cuda"


@dataclass(frozen=True)
class ConfigOption:
    """One config field a flag can express."""

    name: str
    type: type
    choices: tuple[str, ...] | None
    default: Any
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _flag_type(f: dataclasses.Field, hints: dict) -> tuple[type | None, tuple[str, ...] | None]:
    """(python type, choices) for a field a flag can express; (None, None) for structured ones (mappings)."""
    t = hints.get(f.name, str)
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        non_none = [a for a in typing.get_args(t) if a is not type(None)]
        if len(non_none) != 1:
            return None, None
        t = non_none[0]
    if typing.get_origin(t) is typing.Literal:
        return str, tuple(str(a) for a in typing.get_args(t))
    if t in (bool, int, float, str):
        choices = (f.metadata or {}).get("choices")
        return t, tuple(choices) if choices else None
    return None, None


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def field_help(config_cls, name: str) -> str:
    """The help text of one field ("" when it has none)."""
    f = next(f for f in dataclasses.fields(config_cls) if f.name == name)
    return str((f.metadata or {}).get("help", ""))


def config_options(config_cls, skip: Iterable[str] = ()) -> list[ConfigOption]:
    """The fields of ``config_cls`` a flag can express, in declaration order; private fields are left out."""
    hints = typing.get_type_hints(config_cls)
    skip = set(skip)
    out = []
    for f in dataclasses.fields(config_cls):
        if f.name in skip or f.name.startswith("_"):
            continue
        ftype, choices = _flag_type(f, hints)
        if ftype is None:
            continue
        out.append(ConfigOption(f.name, ftype, choices, field_default(f), str((f.metadata or {}).get("help", ""))))
    return out


def add_config_flags(parser: argparse.ArgumentParser, config_cls, skip: Iterable[str] = ()) -> list[str]:
    """Add one flag per option of ``config_cls``; returns their dest names.

    Every flag defaults to None so that :func:`given_options` passes on only what the user typed: the config's
    own default then applies, and runs record the options that were chosen.
    """
    dests = []
    for opt in config_options(config_cls, skip):
        # argparse %-formats help strings
        helptext = f"{opt.help} (default {opt.default})".strip().replace("%", "%%")
        if opt.type is bool:
            parser.add_argument(
                opt.flag, dest=opt.name, action=argparse.BooleanOptionalAction, default=None, help=helptext
            )
        else:
            parser.add_argument(
                opt.flag, dest=opt.name, type=opt.type, choices=opt.choices, default=None, help=helptext
            )
        dests.append(opt.name)
    return dests


def given_options(args: argparse.Namespace, config_cls, skip: Iterable[str] = ()) -> dict[str, Any]:
    """The config options set on the command line (flags added by :func:`add_config_flags`)."""
    return {
        o.name: getattr(args, o.name)
        for o in config_options(config_cls, skip)
        if getattr(args, o.name, None) is not None
    }


def add_scheduler_options(parser: argparse.ArgumentParser, what: str) -> None:
    """``--scheduler`` / ``--n-workers``: where ``what`` runs (see :mod:`.cluster`)."""
    parser.add_argument(
        "--scheduler",
        default=None,
        metavar="local|ADDRESS",
        help=f"run {what} on Dask: 'local' starts a cluster of worker processes on this machine, an address "
        "such as tcp://10.0.0.5:8786 uses a running Dask scheduler (dask-jobqueue, Kubernetes, cloud); "
        "default: in this process. The answer is the same",
    )
    parser.add_argument(
        "--n-workers",
        type=int,
        default=None,
        help="with --scheduler local: worker processes (default: one per core)",
    )
