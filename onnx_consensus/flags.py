"""The machinery of the command-line options: ``option`` (a dataclass field with its flag, in its
``metadata``), ``Group`` (a dataclass of such fields <-> parsed arguments and report flags), ``add_arguments``
(argparse groups generated from the classes) and the converters flags use. The options themselves are in
``options.py``. torch-free."""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from dataclasses import MISSING, field, fields
from typing import Any, ClassVar

from .errors import InputError

FINETUNE_GROUP = "fine-tuning (needs torch: pip install 'onnx-consensus[torch]')"
GROUP_TITLES = ("input data", "target", "criterion", FINETUNE_GROUP, "output")
"""The help groups of `onnx-cprune prune`, in order."""


# --------------------------------------------------------------------------------------------------
# converters: argparse ``type`` (one token, ArgumentTypeError) and ``convert`` (the parsed value ->
# the field's value, in ``from_args``; InputError, so the CLI reports it in one line)

def csv_list(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def metric_weights(value: str) -> dict[str, float]:
    out = {}
    for item in csv_list(value):
        name, sep, w = item.partition("=")
        try:
            weight = float(w)
        except ValueError:
            weight = float("nan")
        if not sep or not name.strip() or not (weight >= 0) or weight == float("inf"):
            raise argparse.ArgumentTypeError(f"expected metric=weight,... with finite weights >= 0, got {item!r}")
        out[name.strip()] = weight
    return out


def floats(value: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in csv_list(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {value!r}") from None


def image_size_hw(value: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise InputError(f"--image-size must look like 224x224, got {value!r}") from None
    return h, w


def input_shapes(specs: list[str]) -> dict[str, tuple[int, ...]]:
    from .graph.flops import parse_input_shape

    return dict(parse_input_shape(s) for s in specs)


def memory_size(text: str) -> int:
    from .memory import parse_size

    return parse_size(text)


def plan_ids(path: str) -> tuple[str, ...]:
    """The removed block ids, in order, of a report written by ``--report``."""
    try:
        with open(path) as f:
            return tuple(json.load(f)["removed_ids"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"--plan {path}: not a report written by --report ({exc})") from None


def option(flag: str, help: str, *, default: Any = MISSING, default_factory: Any = MISSING, short: str | None = None,
           type: Callable | None = None, choices: tuple | None = None, metavar: str | None = None,
           negate: bool = False, append: bool = False, convert: Callable | None = None, group: str | None = None,
           same_as: str | None = None, cli_default: Any = MISSING, show_default: bool = True,
           decoder: str | None = None) -> Any:
    """A dataclass field with its command-line flag.

    flag / short: the option strings; its ``dest`` is the long flag without dashes. A bool field is a
    switch: present sets True, or False with ``negate`` (``--no-latency``, ``--quiet``). ``append``: the
    flag repeats, the values collected in a list. ``convert``: applied to the parsed value to get the
    field's value. ``group``: the help group, when not the class's ``GROUP``. ``same_as``: no flag of its
    own, the value of that other flag (one ``--seed`` for scoring and fine-tuning). ``cli_default``: the
    command's value when the flag is absent, where it differs on purpose from the API's default.
    ``decoder``: why a decoder LLM's run refuses the option (``llm.run.check_decoder_options``: one line naming
    the flag when it is set to anything but its default); None: decoder runs honour it.
    """
    meta = {"flag": flag, "short": short, "help": help, "type": type, "choices": choices, "metavar": metavar,
            "negate": negate, "append": append, "convert": convert, "group": group, "same_as": same_as,
            "cli_default": cli_default, "show_default": show_default, "decoder": decoder}
    return field(default=default, default_factory=default_factory, metadata={"cli": meta})


def dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


class Group:
    """Mixin: ``GROUP`` names the argparse group; ``from_args`` / ``to_flags`` map fields <-> flags."""

    GROUP: ClassVar[str] = ""

    @classmethod
    def cli_fields(cls) -> Iterator:
        for f in fields(cls):
            if "cli" in f.metadata:
                yield f, f.metadata["cli"]

    @classmethod
    def from_args(cls, ns: argparse.Namespace):
        """The dataclass from parsed arguments: given flags set their fields, the others keep defaults."""
        kw = {}
        for f, m in cls.cli_fields():
            name = dest(m["same_as"] or m["flag"])
            if hasattr(ns, name):
                value = getattr(ns, name)
                if m["same_as"] is None and m["negate"]:
                    value = not value
                if m["convert"] is not None:
                    value = m["convert"](value)
                kw[f.name] = value
            elif m["cli_default"] is not MISSING:
                kw[f.name] = m["cli_default"]
        return cls(**kw)

    def to_flags(self) -> dict:
        """{flag dest: value} of every field with a flag of its own, as the report records options."""
        out = {}
        for f, m in self.cli_fields():
            if m["same_as"] is None:
                value = getattr(self, f.name)
                out[dest(m["flag"])] = (not value) if m["negate"] else value
        return out


def _default_text(f, m) -> str | None:
    if not m["show_default"]:
        return None
    value = m["cli_default"] if m["cli_default"] is not MISSING else (
        f.default if f.default is not MISSING else f.default_factory())
    if value is None or value is False or value is True or value == () or value == {}:
        return None
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def add_arguments(parser: argparse.ArgumentParser, classes, groups: dict | None = None,
                  only: tuple[str, ...] | None = None) -> dict:
    """Add the flags of ``classes`` to ``parser``, one argument group per group name (in ``GROUP_TITLES``
    order). ``only``: just these field names. Returns the groups by name (to add more to them)."""
    groups = {} if groups is None else groups
    wanted = [(cls, f, m) for cls in classes for f, m in cls.cli_fields()
              if m["same_as"] is None and (only is None or f.name in only)]
    for name in sorted({m["group"] or cls.GROUP for cls, _, m in wanted}, key=GROUP_TITLES.index):
        if name not in groups:
            groups[name] = parser.add_argument_group(name)
    for cls, f, m in wanted:
        name = m["group"] or cls.GROUP
        help_text = m["help"]
        shown = _default_text(f, m)
        if shown is not None:
            help_text += f" (default {shown})"
        flags = [m["short"], m["flag"]] if m["short"] else [m["flag"]]
        kw: dict[str, Any] = {"help": help_text, "default": argparse.SUPPRESS, "dest": dest(m["flag"])}
        is_switch = m["type"] is None and m["choices"] is None and m["metavar"] is None and (
            m["negate"] or f.default is False)
        if is_switch:
            kw["action"] = "store_true"
        else:
            kw["action"] = "append" if m["append"] else "store"
            for key in ("type", "choices", "metavar"):
                if m[key] is not None:
                    kw[key] = m[key]
        groups[name].add_argument(*flags, **kw)
    return groups
