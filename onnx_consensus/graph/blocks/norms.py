"""Recognising normalisations after a residual merge: single ops (LayerNormalization, RMSNormalization, ...)
and decomposed forms (ReduceMean/Sub/Pow/Add/Sqrt/Div [+ Mul/Add affine]; RMS: Pow/ReduceMean/Add/Sqrt/Div
or Reciprocal/Mul), each found from the tensor it normalises by a walk over that tensor's consumers."""
from __future__ import annotations

import heapq

import onnx_graphsurgeon as gs

from ..ir import GraphIndex, dtype_of, shape_of
from .ops import DECOMPOSED_NORM_OPS, NORM_OPS
from .shapes import same_shape

Norm = tuple[list[gs.Node], gs.Tensor]  # (nodes in topological order, normalised output)


class Norms:
    """Every normalisation of a graph, indexed by the tensor it normalises. ``outputs``: names of all norm
    outputs (single-op and decomposed)."""

    def __init__(self, index: GraphIndex):
        self.index = index
        self.decomposed: dict[str, Norm] = {}
        tried: set[str] = set()
        for n in index.nodes:
            if n.op != "ReduceMean" or not n.inputs or not index.is_data(n.inputs[0]):
                continue
            starts = [n.inputs[0]]
            # RMS / LN variants whose ReduceMean reads Pow(x) or Mul(x, x): the start is x
            p = index.producer.get(n.inputs[0].name)
            if p is not None and p.op in ("Pow", "Mul") and p.inputs:
                starts.append(p.inputs[0])
            for start in starts:
                if start.name in tried:
                    continue
                tried.add(start.name)
                found = self._decomposed_from(start)
                if found is not None:
                    self.decomposed[start.name] = found
        self.outputs = {t.name for n in index.nodes if n.op in NORM_OPS for t in n.outputs[:1]}
        self.outputs |= {end.name for _, end in self.decomposed.values()}

    def single_after(self, t: gs.Tensor) -> Norm | None:
        """The single-op normalisation applied to ``t`` when ``t`` feeds only that norm and only the norm's
        first output is used."""
        consumers = self.index.consumers(t.name)
        if len(consumers) != 1 or consumers[0].op not in NORM_OPS:
            return None
        node = consumers[0]
        live = [o for o in node.outputs if o.outputs or o.name in self.index.output_names]
        return ([node], node.outputs[0]) if len(live) == 1 and live[0] is node.outputs[0] else None

    def decomposed_after(self, t: gs.Tensor) -> Norm | None:
        """The decomposed normalisation of ``t``, when ``t`` feeds only that norm."""
        return self.decomposed.get(t.name)

    def _decomposed_from(self, t: gs.Tensor) -> Norm | None:
        """Walk ``t``'s consumers in topological order, taking every node whose data inputs all come from
        ``t`` or from nodes already taken, until exactly one tensor of the region is read outside it (the
        norm's output) and nothing outside reads ``t``. A taken-ready node that is not a norm op ends the walk
        with no result (something else reads the norm's intermediates). No window or size limit: the region
        only grows through norm ops fed by the region itself, whatever lies between them in the graph."""
        index = self.index
        if t.name in index.output_names:
            return None
        region: list[gs.Node] = []
        produced = {t.name}
        readers = {t.name: len(index.consumers(t.name))}  # per region tensor: readers not (yet) in the region
        open_: set[str] = {t.name} if readers[t.name] else set()
        heap: list[tuple[int, int, gs.Node]] = []
        queued: set[int] = set()

        def push_consumers(name: str) -> None:
            for c in index.consumers(name):
                if id(c) not in queued:
                    queued.add(id(c))
                    heapq.heappush(heap, (index.position[id(c)], id(c), c))

        push_consumers(t.name)
        # Pops come in increasing topological position (every push is a consumer of the node just taken),
        # so when a node is popped every region node that could feed it has already been taken.
        while heap:
            _, _, node = heapq.heappop(heap)
            data_in = {x.name for x in index.inputs_of(node) if index.is_data(x)}
            if not data_in <= produced:
                continue  # reads a tensor from outside: not part of this norm
            if node.op not in DECOMPOSED_NORM_OPS:
                return None
            region.append(node)
            for name in data_in:
                readers[name] -= 1
                if readers[name] == 0 and name not in index.output_names:
                    open_.discard(name)
            for o in node.outputs:
                produced.add(o.name)
                readers[o.name] = len(index.consumers(o.name))
                if readers[o.name] or o.name in index.output_names:
                    open_.add(o.name)
                push_consumers(o.name)
            ops = {n.op for n in region}
            if len(open_) == 1 and t.name not in open_ and "ReduceMean" in ops and ops & {"Sqrt", "Reciprocal"}:
                return self._with_affine(t, region, index.tensors[next(iter(open_))])
        return None

    def _with_affine(self, t: gs.Tensor, region: list[gs.Node], end: gs.Tensor) -> Norm | None:
        """Extend a decomposed norm by its trailing affine (Mul by a weight, Add of a bias) and Casts."""
        index = self.index
        while end.name not in index.output_names:
            consumers = index.consumers(end.name)
            if len(consumers) != 1:
                break
            nxt = consumers[0]
            if nxt.op not in ("Mul", "Add", "Cast") or sum(index.is_data(x) for x in nxt.inputs) != 1:
                break
            region.append(nxt)
            end = nxt.outputs[0]
        if shape_of(end) is not None and shape_of(t) is not None and not same_shape(end, t):
            return None
        if None not in (dtype_of(end), dtype_of(t)) and dtype_of(end) != dtype_of(t):
            return None
        return region, end
