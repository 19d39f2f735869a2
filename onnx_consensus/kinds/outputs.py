"""What a model's outputs are, and which tensor the global scope compares (the feature tensor): the one home of
both choices.

- ``output_kinds``: each float graph output's kind (the registry of recognisers in ``kinds``: detector heads,
  DB text maps, class scores, embeddings, generic values), which decides how fidelity is measured;
- ``choose_feature``: the classifier's input when the graph ends in a classifier head after the last
  candidate block, otherwise the graph's float outputs (pooled by ``metrics.features.pool_output``);
  ``find_feature_tensor``: the input of the last Gemm/MatMul/Conv (``--task classify``).

The graph tests these share are ``graph.heads``'s (what makes class scores, a classifier head).

When the graph "ends in a classifier head": the first output is class scores, the walk back from it
reached a weighted node H (the head), H dominates the output (every data path from a graph input to the
output goes through H; paths through Shape/Size, which carry no values, do not count), and H's data input
is downstream of every candidate block's exit. Then the feature is H's data input, as the published method
uses. In a post-LN encoder the last weighted node is inside the last layer's MLP, and the skip path goes
around it: its input is no feature (removing the last MLP would score ~0 there).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs

from ..errors import InputError
from ..graph.heads import dominates, float_output_tensors, score_form, walk_back
from ..graph.ir import GraphIndex, to_gs
from ..graph.quant import float_source
from .basic import CLASS_SCORES
from .registry import TASKS, kinds_of, recognise

#: The ops a classifier of ``--task classify`` may end in (``find_feature_tensor``).
CLASSIFIER_OPS = ("Gemm", "MatMul", "Conv")


@dataclass(frozen=True)
class FeatureChoice:
    """The global scope's feature: ``tensors`` (one, or the graph's float outputs), ``reason`` in words,
    ``head`` True when it is a classifier head's input."""

    tensors: tuple[str, ...]
    reason: str
    head: bool = False

    @property
    def name(self) -> str:
        return ",".join(self.tensors)

    def to_json(self) -> dict:
        return {"tensors": list(self.tensors), "reason": self.reason, "classifier_input": self.head}


def _check_task(task: str | None) -> None:
    if task is not None and task not in TASKS:
        raise InputError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")


def _kinds(graph: gs.Graph, index: GraphIndex, task: str | None, overrides: Sequence[str] = ()) -> dict[str, str]:
    return kinds_of(recognise(graph, index, float_output_tensors(graph, index), task=task, overrides=overrides))


def output_kinds(model: onnx.ModelProto, task: str | None = None, overrides: Sequence[str] = ()) -> dict[str, str]:
    """{output name: kind} for the model's float outputs, in graph order (the kinds of ``kinds.registry``:
    "class scores", "embedding", "generic", "yolov8", "yolov5", "yolov10", "boxes", "scores", "text map",
    "ctc"). ``task`` (``kinds.registry.TASKS``) and ``overrides`` (--output-kind NAME=KIND[:ARGS]) as in
    ``kinds.registry.recognise``."""
    _check_task(task)
    graph = to_gs(model)
    return _kinds(graph, GraphIndex(graph), task, overrides)


def score_forms(model: onnx.ModelProto, kinds: dict[str, str] | None = None) -> dict[str, str]:
    """{output name: "probabilities" | "log-probabilities" | "logits"} for the class-score outputs of
    ``kinds`` (default ``output_kinds(model)``): what a distillation loss must undo before tempering."""
    graph = to_gs(model)
    index = GraphIndex(graph)
    kinds = _kinds(graph, index, None) if kinds is None else kinds
    return {name: score_form(index, name) for name, kind in kinds.items() if kind == CLASS_SCORES}


def choose_feature(model: onnx.ModelProto, blocks: Sequence = (), *, task: str | None = None,
                   feature: str | None = None, kinds: dict[str, str] | None = None) -> FeatureChoice:
    """The feature tensor(s) for the global scope, with the reason (see the module docstring).

    blocks: the candidate blocks (their ``exit``), which the feature must be downstream of. task:
    "classify" keeps the input of the last Gemm/MatMul/Conv upstream of the first output (the tool's
    behaviour before the head test); "embed"/"generic" take the graph's float outputs. feature: a tensor
    the user named (taken as is). kinds: the outputs' kinds when already known (the output plan's, with the
    user's --output-kind), else recognised here."""
    _check_task(task)
    if feature:
        return FeatureChoice((feature,), "named with --feature")
    if task == "classify":
        return FeatureChoice((find_feature_tensor(model),), "--task classify: input of the last Gemm/MatMul/Conv",
                             True)
    graph = to_gs(model)
    index = GraphIndex(graph)
    kinds = _kinds(graph, index, task) if kinds is None else kinds
    if not kinds:
        raise InputError("the model has no float output to compare; name a feature tensor with --feature")
    first = next(iter(kinds))
    outputs = tuple(kinds)
    what = "graph outputs" if len(outputs) > 1 else "graph output"
    if task is not None:
        return FeatureChoice(outputs, f"{what}, as --task {task} says")
    if kinds[first] != CLASS_SCORES:
        return FeatureChoice(outputs, f"{what}; no classifier head: {first} is not class scores ({kinds[first]})")
    _, head = walk_back(index, first)
    if head is None:
        return FeatureChoice(outputs, f"{what}; no classifier head: no weighted layer makes the class scores {first}")
    x = float_source(index, next(t.name for t in head.inputs if index.is_data(t)))
    if not dominates(index, head, first):
        return FeatureChoice(outputs, f"{what}; {head.op} {head.name} is no classifier head: a skip path goes "
                                      f"around it to {first}")
    upstream, _ = index.ancestors(x)
    missed = [b.exit for b in blocks if b.exit not in upstream]
    if missed:
        return FeatureChoice(outputs, f"{what}; the classifier head's input {x} is not downstream of block "
                                      f"{missed[0]}")
    return FeatureChoice((x,), f"input of the classifier head {head.op} {head.name}, which makes the class "
                               f"scores {first}", True)




def find_feature_tensor(model: onnx.ModelProto) -> str:
    """The input of the final classifier: the data operand of the last Gemm/MatMul/Conv upstream of the
    first graph output. Raises InputError when there is none (then the user names one with --feature)."""
    graph = to_gs(model)
    index = GraphIndex(graph)
    first = graph.outputs[0].name
    _, up = index.ancestors(first)
    for node in reversed(index.nodes):
        if id(node) in up and node.op in CLASSIFIER_OPS:
            for t in node.inputs:
                if index.is_data(t):
                    return t.name
    raise InputError("no classifier (Gemm/MatMul/Conv) found before the first output; name a feature tensor with --feature")
