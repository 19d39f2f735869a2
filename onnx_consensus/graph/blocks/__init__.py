"""Finding removable residual blocks on the ONNX graph itself, whatever exported it.

A removable block is a single-entry, single-exit region whose exit tensor has the entry's shape and dtype
and which holds a residual merge: an ``Add`` (or two-input ``Sum``) whose one operand is the entry (the skip
path) and whose other operand is computed from it by a branch holding at least one op with learned weights.
Replacing every use of the exit by the entry removes the block.

Detection reads op types, shapes, dtypes and which tensors depend on the graph's inputs; it never reads node
names, and reads tensor names in one place only: the KV-cache refusal falls back to past/present names when no
structural test finds the cache, and logs a warning when it does (``refusals.kv_cache``). Block ids are exit
tensor names, as identities, not as clues.

Modules: ``core`` (merge matching, branch, single exit), ``post_merge`` (the registry of rules for ops after the
merge: ReLU, single-op norm, decomposed norm), ``norms`` (norm recognition by a walk over consumers),
``refusals`` (KV cache, fused Skip*Norm merges, control-flow subgraphs), ``units`` (innermost, layer pairing,
stages), ``find`` (``find_blocks``, composing them).
"""
from .find import find_blocks
from .post_merge import POST_MERGE_RULES, Claim, MergeContext, post_merge_rule, sole_consumer
from .records import Block, BlockReport, NotRemovable
from .shapes import same_shape
from .units import UNITS

__all__ = ["find_blocks", "Block", "BlockReport", "NotRemovable", "same_shape", "UNITS", "POST_MERGE_RULES",
           "MergeContext", "Claim", "post_merge_rule", "sole_consumer"]
