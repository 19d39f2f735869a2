"""Scoring candidate blocks on calibration data: activations from onnxruntime, scores from the metrics.

Two scopes:
- ``global`` (the published method): the feature tensor F of the current model vs F of the model without
  block b. The full model runs once per batch with every candidate's cut tensors exposed; then for each
  candidate only the suffix after its entry runs, fed the cached activations.
- ``local``: block b's entry vs its exit, from the one instrumented pass.

Modules: ``collector`` (``FeatureCollector``: the pass over the data as setup / per batch / finish, shared
with decoder layers, ``llm.scoring``; ``Features``), ``blocks`` (its block-model form, ``collect_features``),
``outputs`` (the graph outputs the output-level metrics compare), ``round`` (``score_table``: metrics on
collected features, shared with decoder layers; ``score_blocks``; ``ScoreSettings``; ``ScoreRound``).
"""
from .blocks import BlockCollector, collect_features
from .collector import SCOPES, FeatureCollector, Features, collect, token_keep
from .outputs import BatchOutputs, dependent_outputs, float_outputs, has_class_scores, original_outputs
from .round import ScoreRound, ScoreSettings, metric_scores, score_blocks, score_table

__all__ = ["SCOPES", "BatchOutputs", "BlockCollector", "FeatureCollector", "Features", "ScoreRound", "ScoreSettings",
           "collect", "collect_features", "dependent_outputs", "float_outputs", "has_class_scores", "metric_scores",
           "original_outputs", "score_blocks", "score_table", "token_keep"]
