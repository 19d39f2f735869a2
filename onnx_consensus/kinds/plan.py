"""A model's output plan: its heads (``registry.recognise``) and an optional user measure (--fidelity), the
one description of "how the outputs are judged" that scoring, the budget, the collapse warning, the summary
and the distillation loss all read.

``--fidelity module:function``: ``function(original_outputs: dict[str, ndarray], pruned_outputs: dict[str,
ndarray]) -> float in [0, 1]`` (1 = the task unchanged), imported from ``module`` on sys.path or the current
directory. It is called per batch (arrays (samples, ...), padding dropped) and averaged weighted by samples;
it then decides the budget and the collapse warning (< 0.5), and ranks as 1 - its value.
"""
from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import InputError
from .measures import CustomMeasure, Measure
from .registry import Head, kind_spec, kinds_of, recognise


@dataclass(frozen=True)
class OutputPlan:
    """``heads`` (kinds.registry.Head, graph order) and the user's ``custom`` measure with its ``label``."""

    heads: tuple[Head, ...]
    custom: Callable | None = None
    label: str | None = None

    @property
    def outputs(self) -> list[str]:
        return [o for h in self.heads for o in h.outputs]

    @property
    def kinds(self) -> dict[str, str]:
        return kinds_of(self.heads)

    def measures(self) -> list[Measure]:
        """Fresh measures, one per head, the custom one first when given."""
        out = [kind_spec(h.kind).measure(h) for h in self.heads]
        if self.custom is not None:
            out.insert(0, CustomMeasure(Head("custom", tuple(self.outputs)), self.custom, self.label))
        return out

    def head_of(self, output: str) -> Head | None:
        return next((h for h in self.heads if output in h.outputs), None)

    def only_kinds(self, *kinds: str) -> bool:
        """Every head is one of ``kinds`` (and there is no custom measure)."""
        return self.custom is None and bool(self.heads) and all(h.kind in kinds for h in self.heads)

    def to_json(self) -> dict:
        return {"heads": [h.to_json() for h in self.heads], "fidelity": self.label}


def load_fidelity(spec: str) -> tuple[Callable, str]:
    """``module:function`` -> (the function, spec); the current directory is searched too. InputError when it
    cannot be imported or is not callable."""
    mod_name, colon, fn_name = spec.partition(":")
    if not colon or not mod_name or not fn_name:
        raise InputError(f"--fidelity {spec!r}: expected module:function")
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(mod_name)
    except Exception as exc:
        raise InputError(f"--fidelity {spec!r}: cannot import {mod_name}: {type(exc).__name__}: {exc}") from None
    finally:
        if added:
            sys.path.remove(os.getcwd())
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise InputError(f"--fidelity {spec!r}: {mod_name} has no function {fn_name}")
    return fn, spec


def output_plan(model: onnx.ModelProto, task: str | None = None, overrides: Sequence[str] = (),
                fidelity: str | Callable | None = None, skip: Sequence[str] = ()) -> OutputPlan:
    """The OutputPlan of ``model``: its float outputs' heads (``registry.recognise``) and the --fidelity
    function (a ``module:function`` spec or a callable)."""
    from ..graph.heads import float_output_tensors
    from ..graph.ir import GraphIndex, to_gs

    graph = to_gs(model)
    index = GraphIndex(graph)
    heads = recognise(graph, index, float_output_tensors(graph, index), task=task, overrides=overrides, skip=skip)
    fn, label = (None, None)
    if isinstance(fidelity, str):
        fn, label = load_fidelity(fidelity)
    elif fidelity is not None:
        fn, label = fidelity, getattr(fidelity, "__name__", "custom")
    return OutputPlan(tuple(heads), fn, label)


def plan_from_kinds(kinds: Mapping[str, str]) -> OutputPlan:
    """A plan from {output: kind} (each output its own head, default arguments; "boxes" and "scores" pair)."""
    heads, boxes, scores = [], None, None
    for name, kind in kinds.items():
        if kind == "boxes":
            boxes = name
        elif kind == "scores":
            scores = name
        else:
            heads.append(Head(kind_spec(kind).name, (name,)))
    if boxes and scores:
        heads.append(Head("boxes", (boxes, scores)))
    return OutputPlan(tuple(heads))


def blind_spots(plan: OutputPlan, reference: list, *, budget: float | None = None,
                non_float: Sequence[str] = ()) -> list[str]:
    """Warnings where the measure cannot see damage on this hold-out ``reference`` (per-batch {name: array}):
    one predicted class, too few samples for the ``budget`` to mean anything, outputs with no float content
    (``non_float``: the integer / bool outputs; float outputs constant over the data)."""
    notes = [f"output {n} has no float content (not compared): fidelity is judged on the float outputs only"
             for n in non_float]
    if not reference:
        return notes
    n = sum(len(next(iter(r.values()))) for r in reference)
    measures = plan.measures()
    for r in reference:
        for m in measures:
            if not isinstance(m, CustomMeasure):
                m.add({o: r[o] for o in m.head.outputs}, {o: r[o] for o in m.head.outputs})
    for m in measures:
        if isinstance(m, CustomMeasure):
            continue
        note = m.blind_note()
        if note:
            notes.append(f"{', '.join(m.head.outputs)}: {note}")
    for name in plan.outputs:
        values = [np.asarray(r[name]) for r in reference]
        if values and all(v.size and np.all(v == values[0].flat[0]) for v in values):
            notes.append(f"output {name} is constant on the hold-out ({values[0].flat[0]:g}): no measure can see "
                         "it change")
    for m in measures:  # detectors: the budget counts detections, not samples
        detect = not isinstance(m, CustomMeasure) and kind_spec(m.head.kind).family == "detect"
        total = getattr(m, "total", None) if detect else None
        if budget is not None and budget < 1 and total and total < 1.0 / (1.0 - budget):
            notes.append(f"{', '.join(m.head.outputs)}: only {total} original detections on the hold-out: one lost "
                         f"detection moves detections kept by {1 / total:.3f}, more than the budget's margin "
                         f"{1 - budget:.3g}")
    if budget is not None and budget < 1 and n < 1.0 / (1.0 - budget):
        notes.append(f"only {n} hold-out samples: one changed sample moves the fidelity by {1 / n:.3f}, more than "
                     f"the budget's margin {1 - budget:.3g}, so the budget {budget:g} allows no change at all; give "
                     f"at least {int(np.ceil(1 / (1 - budget)))} samples (more --calib data or --holdout)")
    return notes
