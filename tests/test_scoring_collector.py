"""The scoring pass as an object (``scoring.FeatureCollector``) and the one metric side (``scoring.score_table``)
shared by block models and decoder layers."""
import numpy as np
import pytest

from onnx_consensus.data import load_calibration
from onnx_consensus.graph.blocks import find_blocks
from onnx_consensus.metrics import get_metric, resolve_metrics
from onnx_consensus.metrics.features import make_conditions
from onnx_consensus.options import CriterionOptions, RunOptions
from onnx_consensus.scoring import (FeatureCollector, Features, ScoreSettings, collect, collect_features,
                                    metric_scores, score_blocks, score_table)
from tests.helpers import resnet_onnx


class _Session:
    def __init__(self, out):
        self.out = out

    def run(self, names, feeds):
        return [self.out * feeds["x"]]


class _Fixed(FeatureCollector):
    """Hands over given rows: X = x, Y_b = x * factor_b, predictions None on batch 1 when asked."""

    def __init__(self, scope, factors, no_pred_batch=None):
        super().__init__(list(factors), scope)
        self.factors, self.no_pred_batch = factors, no_pred_batch

    def add_batch(self, k, x):
        self.add_predictions(None if k == self.no_pred_batch else np.full(len(x), k))
        for bid, f in self.factors.items():
            y = self.run(_Session(f), None, {"x": x})[0]
            if self.scope == "local":
                self.add_before(x, bid)
            self.add_after(bid, y)
        if self.scope == "global":
            self.add_before(x)


@pytest.mark.parametrize("scope", ["global", "local"])
def test_collector_concatenates_batches_in_order(scope):
    x0, x1 = np.arange(6.0).reshape(3, 2), -np.arange(4.0).reshape(2, 2)
    feats = collect(_Fixed(scope, {"a": 2.0, "b": 3.0}), [(0, x0), (1, x1)])
    assert feats.scope == scope and feats.n_samples == 5 and feats.ort_seconds > 0
    for bid, f in (("a", 2.0), ("b", 3.0)):
        x, y = feats.pair(bid)
        np.testing.assert_array_equal(x, np.concatenate([x0, x1]))
        np.testing.assert_array_equal(y, f * np.concatenate([x0, x1]))
    np.testing.assert_array_equal(feats.predictions, [0, 0, 0, 1, 1])
    if scope == "global":  # one array shared by every candidate
        assert feats.before["a"] is feats.before["b"]
    assert collect(_Fixed(scope, {"a": 1.0}, no_pred_batch=1), [(0, x0), (1, x1)]).predictions is None


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    d = tmp_path_factory.mktemp("collector")
    np.save(d / "x.npy", np.random.default_rng(3).standard_normal((40, 3, 32, 32)).astype(np.float32))
    model = resnet_onnx(20, "bn")
    return model, load_calibration(d, model)


def test_score_table_is_the_metrics_on_each_pair_whatever_the_threads(resnet):
    """score_table = metric_scores on each (X, Y) pair, by hand; scored in 2 threads, the same numbers."""
    model, data = resnet
    blocks = find_blocks(model).blocks[:5]
    feats = collect_features(model, data, blocks, batch_size=16, threads=1)
    specs = [get_metric(m) for m in resolve_metrics(("paper", "cosine"), True)]
    conditions = make_conditions(feats.predictions, feats.before[blocks[0].id], seed=0)
    one = score_table(feats, specs, conditions, workers=1)
    two = score_table(feats, specs, conditions, workers=2)
    assert list(one) == [b.id for b in blocks] == list(two)
    assert one == two
    for b in blocks[:3]:
        assert one[b.id] == metric_scores(specs, *feats.pair(b.id), conditions)


def test_score_table_carries_output_scores_and_refuses_missing_ones():
    x = np.random.default_rng(0).standard_normal((12, 4)).astype(np.float32)
    feats = Features("global", {"a": x}, {"a": x * 2}, None, "f", 0.0, outputs={"a": {"output_mse": 0.5}})
    table = score_table(feats, [get_metric("cka"), get_metric("output_mse")], np.zeros(12, int))
    assert table["a"]["output_mse"] == 0.5 and table["a"]["cka"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(Exception, match="output_kl needs a class-score output"):
        score_table(feats, [get_metric("output_kl")], np.zeros(12, int))


def test_settings_and_keywords_give_the_same_round(resnet):
    model, data = resnet
    crit, run = CriterionOptions(seed=2, pca_dim=8), RunOptions(batch_size=16, threads=1)
    st = ScoreSettings.of(crit, run)
    assert (st.seed, st.pca_dim, st.batch_size, st.threads, st.scope) == (2, 8, 16, 1, "global")
    by_settings = score_blocks(model, data, metrics=("cka", "linear_1"), settings=st)
    by_keywords = score_blocks(model, data, metrics=("cka", "linear_1"), seed=2, pca_dim=8, batch_size=16, threads=1)
    assert by_settings.order == by_keywords.order
    assert [b.scores for b in by_settings.blocks] == [b.scores for b in by_keywords.blocks]
    with pytest.raises(TypeError, match="unexpected scoring option"):
        score_blocks(model, data, metrics=("cka",), batchsize=16)


@pytest.mark.parametrize("form", ["plain", "fused"])
def test_decoder_layers_go_through_the_same_collector_and_metric_side(form):
    """Decoder layers (``llm.scoring.score_layers``, local scope) are collected by a FeatureCollector and scored
    by the same ``metric_scores`` as blocks: their scores equal the metrics applied here to each layer's entry
    and exit hidden states taken from one plain run of the model (token rows, float64)."""
    from onnx_consensus.graph.decoder import FUSED, PLAIN, expose_residual_sums, find_decoder_layers, prefill_feed
    from onnx_consensus.graph.instrument import with_outputs
    from onnx_consensus.llm.scoring import LayerCollector, score_layers
    from onnx_consensus.runtime import make_session
    from onnx_consensus.scoring import BlockCollector
    from tests.test_decoder_llm import V, synthetic_decoder

    assert issubclass(LayerCollector, FeatureCollector) and issubclass(BlockCollector, FeatureCollector)
    form = {"plain": PLAIN, "fused": FUSED}[form]
    model = synthetic_decoder(form)
    work = expose_residual_sums(model) if form == FUSED else model
    report = find_decoder_layers(work)
    ids = np.random.default_rng(4).integers(0, V, (4, 5))
    metrics = ("cosine", "cka", "gaussian_stochastic_1")
    rnd = score_layers(work, report, ids, metrics=metrics, scope="local")

    layers = [report.by_index()[i] for i in sorted(report.by_index())]
    entry = {layers[0].block.id: layers[0].block.entry}
    entry.update({b.block.id: a.block.exit for a, b in zip(layers, layers[1:])})
    names = sorted(set(entry.values()) | {lay.block.exit for lay in layers}) + ["logits"]
    exposed = with_outputs(work, names)
    values = dict(zip(names, make_session(exposed, level="basic").run(names, prefill_feed(exposed, ids))))
    rows = {n: v.reshape(-1, v.shape[-1]) for n, v in values.items()}
    conditions = make_conditions(rows["logits"].argmax(-1), rows[entry[layers[0].block.id]], seed=0)
    specs = [get_metric(m) for m in metrics]
    by_id = {b.id: b.scores for b in rnd.blocks}
    for lay in layers:
        want = metric_scores(specs, rows[entry[lay.block.id]].astype(np.float64),
                             rows[lay.block.exit].astype(np.float64), conditions)
        assert by_id[lay.block.id] == pytest.approx(want, rel=1e-9, abs=1e-12)
