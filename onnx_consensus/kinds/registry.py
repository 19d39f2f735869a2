"""Output kinds: what each graph output is, so that fidelity is measured the way the output is used.

Two registries, both by name (``KINDS``, ``RECOGNISERS``):

- a kind (``register_kind``): its user-facing label, the ``Measure`` that compares the pruned model's
  outputs with the original's (``kinds.measures``), the distillation loss (``bridge.losses``), how its
  ``--output-kind NAME=KIND:ARGS`` arguments are read;
- a recogniser (``register_recogniser``, with a priority): reads the graph and the shapes and claims
  outputs as ``Head``s (one or more outputs measured together, e.g. SSD boxes + scores). Recognisers run
  in priority order (lowest first); each output is claimed once. ``recognise(..., skip=("name",))``
  switches one off, as onnxslim switches off fusion patterns.

``--output-kind`` overrides come first, then ``--task`` (``task_heads``), then the recognisers.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..errors import InputError

TASKS = ("detect", "segment", "ocr", "classify", "embed", "generic")


@dataclass(frozen=True)
class Head:
    """Graph outputs measured together: ``kind`` (a ``KINDS`` name), ``outputs`` (names, in the kind's
    order, e.g. (boxes, scores)), ``args`` (kind-specific, as (key, value) pairs: ``classes`` of a YOLO
    tensor, ``format`` of boxes, ``form`` of class scores, ...) and ``source`` (what recognised it)."""

    kind: str
    outputs: tuple[str, ...]
    args: tuple[tuple[str, object], ...] = ()
    source: str = "graph"

    def arg(self, key: str, default=None):
        return dict(self.args).get(key, default)

    def to_json(self) -> dict:
        return {"kind": self.kind, "outputs": list(self.outputs), "args": dict(self.args), "source": self.source}


@dataclass(frozen=True)
class KindSpec:
    """A registered kind: ``label`` in words, ``measure`` (Head -> a ``kinds.measures.Measure``), ``loss``
    (the distillation loss's name, ``bridge.losses``), ``parse`` (the ARGS text of --output-kind -> args
    pairs), ``outputs`` (how many graph outputs one head has), ``family`` (the --task it belongs to); the
    level under which the outputs "collapsed" is the measure's (``HeadResult.collapse``)."""

    name: str
    label: str
    family: str
    measure: Callable
    loss: str
    parse: Callable[[str], tuple] | None = None
    outputs: int = 1


KINDS: dict[str, KindSpec] = {}
ALIASES: dict[str, str] = {}
RECOGNISERS: dict[str, tuple[int, Callable]] = {}


def register_kind(spec: KindSpec, aliases: Sequence[str] = ()) -> KindSpec:
    """Add a kind (a name registered twice is an error, as in onnx2torch's converter registry)."""
    if spec.name in KINDS or spec.name in ALIASES:
        raise ValueError(f"output kind {spec.name!r} registered twice")
    KINDS[spec.name] = spec
    for a in aliases:
        ALIASES[a] = spec.name
    return spec


def register_recogniser(name: str, priority: int):
    """Decorator: ``fn(ctx: RecogniseContext) -> list[Head]`` recognises heads among ``ctx.free`` outputs."""
    def deco(fn: Callable) -> Callable:
        if name in RECOGNISERS:
            raise ValueError(f"output-kind recogniser {name!r} registered twice")
        RECOGNISERS[name] = (priority, fn)
        return fn
    return deco


def kind_spec(name: str) -> KindSpec:
    """The KindSpec of a kind name or alias (InputError naming the known ones)."""
    _load()
    key = ALIASES.get(name, name)
    if key not in KINDS:
        known = sorted(set(KINDS) | set(ALIASES))
        raise InputError(f"unknown output kind {name!r}; known: {', '.join(known)}")
    return KINDS[key]


@dataclass
class RecogniseContext:
    """What recognisers read: the gs ``graph``, its ``index`` (graph.ir.GraphIndex), the float output
    tensors by name (``outputs``, graph order), the ones not yet claimed (``free``) and the ``task``."""

    graph: object
    index: object
    outputs: dict
    task: str | None = None
    free: list[str] = field(default_factory=list)

    def shape(self, name: str):
        return getattr(self.outputs[name], "shape", None)


def parse_override(spec: str, outputs: Sequence[str]) -> tuple[str, KindSpec, tuple]:
    """``NAME=KIND[:ARGS]`` -> (output name, KindSpec, args); InputError naming the problem."""
    name, eq, rest = spec.partition("=")
    name, rest = name.strip(), rest.strip()
    if not eq or not name or not rest:
        raise InputError(f"--output-kind {spec!r}: expected NAME=KIND[:ARGS], e.g. output0=yolov8:80")
    if name not in outputs:
        raise InputError(f"--output-kind {spec!r}: the model has no float output {name!r} (its float outputs: "
                         f"{', '.join(outputs) or 'none'})")
    kind, _, args = rest.partition(":")
    ks = kind_spec(kind.strip())
    if args and ks.parse is None:
        raise InputError(f"--output-kind {spec!r}: kind {ks.name!r} takes no arguments")
    try:
        parsed = ks.parse(args.strip()) if ks.parse is not None else ()
    except (ValueError, TypeError) as exc:
        raise InputError(f"--output-kind {spec!r}: bad arguments for {ks.name}: {exc}") from None
    return name, ks, parsed


def _override_heads(overrides: Sequence[str], ctx: RecogniseContext) -> list[Head]:
    """Heads from --output-kind specs; "boxes" and "scores" pair up into one boxes+scores head."""
    outputs = list(ctx.outputs)
    heads: list[Head] = []
    pending: dict[str, tuple[str, tuple]] = {}
    seen: set[str] = set()
    for spec in overrides:
        name, ks, args = parse_override(spec, outputs)
        if name in seen:
            raise InputError(f"--output-kind names output {name!r} twice")
        seen.add(name)
        if ks.name in ("boxes", "scores"):
            pending[ks.name] = (name, args)
            continue
        if ks.name == "generic" and not args:  # the channel axis read from the graph still applies
            from .basic import generic_head

            args = generic_head(ctx, name, "--output-kind").args
        heads.append(Head(ks.name, (name,), args, "--output-kind"))
    if pending:
        if set(pending) != {"boxes", "scores"}:
            missing = ({"boxes", "scores"} - set(pending)).pop()
            raise InputError(f"--output-kind: a {next(iter(pending))} output needs its {missing} output too "
                             f"(NAME={missing})")
        (b, bargs), (s, sargs) = pending["boxes"], pending["scores"]
        heads.append(Head("boxes", (b, s), bargs + sargs, "--output-kind"))
    return heads


def _load() -> None:
    """Import the modules that register kinds and recognisers (once)."""
    from . import basic, detect, text  # noqa: F401


def recognise(graph, index, float_outputs: Sequence, *, task: str | None = None, overrides: Sequence[str] = (),
              skip: Sequence[str] = ()) -> list[Head]:
    """Heads covering every float output (``float_outputs``: gs tensors in graph order), in graph order of
    their first output: --output-kind ``overrides`` first, then ``task`` (``basic.task_heads``), then the
    recognisers by priority (those named in ``skip`` left out); what none claims is "generic"."""
    _load()
    if task is not None and task not in TASKS:
        raise InputError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    unknown = [s for s in skip if s not in RECOGNISERS]
    if unknown:
        raise InputError(f"unknown output-kind recogniser(s) {', '.join(unknown)}; known: {', '.join(RECOGNISERS)}")
    names = [t.name for t in float_outputs]
    ctx = RecogniseContext(graph, index, {t.name: t for t in float_outputs}, task, list(names))
    heads = _override_heads(overrides, ctx)
    _claim(ctx, heads)
    if task is not None:
        from .basic import task_heads

        found = task_heads(ctx)
        _claim(ctx, found)
        heads += found
    for name, (_, fn) in sorted(RECOGNISERS.items(), key=lambda kv: kv[1][0]):
        if name in skip or not ctx.free:
            continue
        found = fn(ctx)
        _claim(ctx, found)
        heads += found
    from .basic import generic_head

    heads += [generic_head(ctx, n, "default") for n in ctx.free]
    order = {n: i for i, n in enumerate(names)}
    return sorted(heads, key=lambda h: order[h.outputs[0]])


def _claim(ctx: RecogniseContext, heads: Sequence[Head]) -> None:
    for h in heads:
        for o in h.outputs:
            if o in ctx.free:
                ctx.free.remove(o)


def kinds_of(heads: Sequence[Head]) -> dict[str, str]:
    """{output name: kind} in graph order; a boxes+scores head's outputs are "boxes" and "scores"."""
    out = {}
    for h in heads:
        if h.kind == "boxes":
            out[h.outputs[0]], out[h.outputs[1]] = "boxes", "scores"
        else:
            for o in h.outputs:
                out[o] = h.kind
    return out
