"""What block detection returns: candidates (``Block``), merges seen but not removable (``NotRemovable``), and
the report over a whole model (``BlockReport``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Block:
    """A removable residual block. ``id`` is its exit tensor's name in the original graph.

    nodes: keys (first output names) of the block's nodes in topological order, merge and post-merge ops
    included. side_inputs: non-constant tensors the branch reads from outside the block (masks, tables).
    shape: the exit's shape, symbolic dims as strings. macs: multiply-accumulates per sample (None if unknown).
    stage: index of the run of consecutive same-shaped blocks it belongs to. position: the merge node's
    topological position.
    """

    id: str
    entry: str
    exit: str
    merge: str
    nodes: tuple[str, ...]
    side_inputs: tuple[str, ...] = ()
    shape: tuple | None = None
    dtype: str | None = None
    macs: int | None = None
    stage: int = 0
    position: int = 0

    def to_json(self) -> dict:
        d = asdict(self)
        d["n_nodes"] = len(self.nodes)
        d["shape"] = list(self.shape) if self.shape is not None else None
        d["nodes"] = list(self.nodes)
        d["side_inputs"] = list(self.side_inputs)
        return d


@dataclass(frozen=True)
class NotRemovable:
    """A residual merge that was seen but cannot become an identity, with the reason."""

    merge: str
    operands: tuple[str, ...]
    reason: str

    def to_json(self) -> dict:
        return {"merge": self.merge, "operands": list(self.operands), "reason": self.reason}


@dataclass
class BlockReport:
    """blocks: the candidates; not_removable: merges seen but not removable, with reasons; notes: things
    seen about the model as a whole (fused ops, KV cache); refusal: set when the model is left alone as a
    whole (e.g. KV-cache inputs/outputs), then ``blocks`` is empty."""

    blocks: list[Block] = field(default_factory=list)
    not_removable: list[NotRemovable] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    refusal: str | None = None
    unit: str = "block"

    def by_id(self) -> dict[str, Block]:
        return {b.id: b for b in self.blocks}
