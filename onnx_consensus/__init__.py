"""onnx-consensus: depth pruning of ONNX models by the Consensus criterion.

Public API::

    from onnx_consensus import find_blocks, score_blocks, prune, load_calibration
    from onnx_consensus import CriterionOptions, TargetOptions, RunOptions, OutputOptions, FinetuneConfig

``prune`` is the run `onnx-cprune prune` does (``pipeline.run``): it returns an Outcome whose ``model`` is
the pruned model and ``result`` the PruneResult.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "find_blocks": "graph.blocks",
    "Block": "graph.blocks",
    "remove_blocks": "graph.surgery",
    "score_blocks": "scoring",
    "prune": "pipeline",
    "run": "pipeline",
    "Outcome": "pipeline",
    "Options": "options",
    "CriterionOptions": "options",
    "TargetOptions": "options",
    "RunOptions": "options",
    "DataOptions": "options",
    "OutputOptions": "options",
    "RecoveryOptions": "options",
    "FinetuneConfig": "options",
    "load_calibration": "data",
    "ImageOptions": "data",
    "count_cost": "graph.flops",
    "prune_decoder": "llm.run",
    "write_decoder": "llm.output",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):  # lazy: `import onnx_consensus` stays cheap, torch is never imported here
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)
