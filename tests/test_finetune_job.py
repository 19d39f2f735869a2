"""The one fine-tuning job (finetune/): the best-of rule, the same for `prune --finetune-*`, the `finetune` command
and decoder distillation; the report entries as dataclasses; failures turned into exit codes."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnx_consensus as oc
from onnx_consensus.errors import FinetuneError, InputError
from onnx_consensus.finetune.best import BestOf
from onnx_consensus.finetune.job import guarded
from onnx_consensus.finetune.results import DistillReport, FinetuneReport, PruneFinetuneReport
from tests.helpers import residual_mlp

torch = pytest.importorskip("torch")


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_best_of_keeps_the_model_given_unless_an_epoch_is_strictly_better():
    given, a, b, c = (onnx.ModelProto() for _ in range(4))
    best = BestOf(given, 0.5)
    assert not best.offer(1, a, 0.4) and not best.offer(2, b, 0.5)  # worse, then a tie: the model given stays
    assert best.model is given and best.epoch == 0 and not best.improved
    assert best.offer(3, c, 0.6) and best.model is c and best.epoch == 3 and best.metric == 0.6 and best.improved
    unmeasured = BestOf(given, None)  # no evaluation data: the last epoch
    assert unmeasured.offer(1, a, None) and unmeasured.offer(2, b, None) and unmeasured.model is b
    empty = BestOf()  # the training loop on its own: the first epoch, then strictly better ones
    assert empty.offer(1, a, 0.3) and not empty.offer(2, b, 0.3) and empty.epoch == 1


@pytest.fixture
def offers(monkeypatch):
    """Every (epoch, metric) offered to the best-of rule, whoever runs it."""
    seen = []
    real = BestOf.offer

    def spy(self, epoch, model, metric):
        seen.append((epoch, metric))
        return real(self, epoch, model, metric)
    monkeypatch.setattr(BestOf, "offer", spy)
    return seen


def _mlp_files(tmp_path):
    model = residual_mlp(4, 16, seed=0)
    onnx.save(model, tmp_path / "m.onnx")
    (tmp_path / "c").mkdir()
    np.save(tmp_path / "c" / "x.npy", np.random.default_rng(1).standard_normal((40, 16)).astype(np.float32))
    return model


def test_prune_keeps_the_pruned_model_when_no_epoch_beats_it(tmp_path, offers):
    """lr 0: every epoch is the pruned model again, a tie on the hold-out, so the pruned model is kept."""
    model = _mlp_files(tmp_path)
    out = oc.prune(model, str(tmp_path / "c"), criterion=oc.CriterionOptions(metrics=("cka",)),
                   target=oc.TargetOptions(remove=1), finetune=oc.FinetuneConfig(epochs=2, lr=0.0, batch_size=8),
                   output=oc.OutputOptions(latency=False), run=oc.RunOptions(progress=False))
    ft = out.report["finetune"]
    assert [e for e, _ in offers] == [1, 2] and all(m == ft["metric_before"] for _, m in offers)
    assert ft["best_epoch"] == 0 and ft["kept"] == "pruned" and ft["metric_after"] == ft["metric_before"]
    assert any("fine-tuning did not improve" in w for w in out.warnings)
    pruned = oc.remove_blocks(model, [out.result.removals[0].block])
    assert all(np.array_equal(v, _weights(pruned)[k]) for k, v in _weights(out.model).items())


def test_finetune_command_keeps_the_model_given_on_a_tie(tmp_path, offers):
    from onnx_consensus.cli import main

    model = _mlp_files(tmp_path)
    np.save(tmp_path / "c" / "labels.npy", np.random.default_rng(2).integers(0, 10, 40))
    rep = tmp_path / "r.json"
    assert main(["finetune", str(tmp_path / "m.onnx"), str(tmp_path / "o.onnx"), "--train", str(tmp_path / "c"),
                 "--eval", str(tmp_path / "c"), "--teacher", str(tmp_path / "m.onnx"), "--finetune-epochs", "2",
                 "--lr", "0", "-q", "--report", str(rep)]) == 0
    r = json.loads(rep.read_text())
    assert [e for e, _ in offers] == [1, 2] and r["best_epoch"] == 0 and r["kept"] == "pruned"
    assert r["metric_after"] == r["metric_before"] is not None
    written = _weights(onnx.load(tmp_path / "o.onnx"))
    assert written.keys() == _weights(model).keys()
    assert all(np.array_equal(v, _weights(model)[k]) for k, v in written.items())


def test_decoder_distillation_keeps_the_model_given_on_a_tie(offers):
    """The same rule for a decoder, by held-out perplexity: an epoch that does not lower it is not kept."""
    from onnx_consensus.finetune.decoder import distill
    from onnx_consensus.llm.perplexity import perplexity
    from tests.test_decoder_llm import V, synthetic_decoder

    model = synthetic_decoder("plain")
    rng = np.random.default_rng(0)
    train, held = rng.integers(0, V, (8, 8)), rng.integers(0, V, (4, 8))
    config = oc.FinetuneConfig(epochs=2, lr=0.0, batch_size=4, threads=1)
    tuned, info = distill(model, model, train, held, config, threads=1)
    assert [e for e, _ in offers] == [1, 2] and tuned is model
    assert info.best_epoch == 0 and info.to_json()["kept"].startswith("not fine-tuned")
    assert info.perplexity_after == info.perplexity_before == pytest.approx(perplexity(model, held, threads=1))
    assert [-h["metric"] for h in info.history] == pytest.approx([info.perplexity_before] * 2)


def test_report_entries_keep_their_keys():
    base = ["mode", "epochs", "train_samples", "eval", "processes", "metric_original", "metric_before",
            "metric_after", "best_epoch", "images_seen", "seconds", "history", "metric", "best_finetuned", "kept",
            "bn_stats", "losses"]
    assert list(FinetuneReport("supervised", 1, 10).to_json()) == base
    assert list(FinetuneReport("supervised", 1, 10, eval_samples=5).to_json()) == base + ["eval_samples"]
    tuned = PruneFinetuneReport("distillation", 2, 10, best_epoch=2, eval_samples=4, bn_stats="frozen",
                                bn_stats_reason="10 training samples < 1000")
    assert list(tuned.to_json()) == base + ["eval_samples", "holdout_fidelity_pruned", "bn_stats_reason"]
    assert tuned.to_json()["kept"] == "fine-tuned"
    failed = PruneFinetuneReport("distillation", 2, 10, eval="hold-out", error="fine-tuning failed: X")
    assert failed.to_json() == {"mode": "distillation", "epochs": 2, "train_samples": 10, "eval": "hold-out",
                                "holdout_fidelity_pruned": None, "error": "fine-tuning failed: X"}
    assert list(DistillReport(epochs=1, best_epoch=1).to_json()) == [
        "kept", "mode", "epochs", "train_windows", "optimizer", "lr", "max_steps", "perplexity_before",
        "perplexity_after", "best_epoch", "seconds", "history"]
    assert DistillReport(epochs=3, error="e").to_json() == {"mode": "distillation", "epochs": 3, "error": "e"}


def test_guarded_turns_failures_into_exit_codes():
    def raising(exc):
        def run():
            raise exc
        return run
    assert guarded(lambda: 7, keep_partial=False) == (7, None, 0)
    assert guarded(raising(FinetuneError("fine-tuning failed: boom")), keep_partial=False) == (
        None, "fine-tuning failed: boom", 4)
    value, error, code = guarded(raising(RuntimeError("onnxruntime\nsecond line")), keep_partial=False)
    assert value is None and code == 4 and error.startswith("fine-tuning failed: RuntimeError: onnxruntime")
    assert guarded(raising(KeyboardInterrupt()), keep_partial=True) == (
        None, "fine-tuning interrupted (--keep-partial)", 130)
    with pytest.raises(KeyboardInterrupt):
        guarded(raising(KeyboardInterrupt()), keep_partial=False)
    with pytest.raises(InputError):  # bad input is said as such (exit 2), not as a failed fine-tune
        guarded(raising(InputError("bad")), keep_partial=True)


def _fixed_batch_data(tmp_path, n: int, batch: int = 4):
    """A model whose input has a fixed batch of ``batch`` and ``n`` labelled samples: (data, x, labels)."""
    from onnx_consensus.data import load_calibration

    model = residual_mlp(2, 16, seed=0)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = batch
    folder = tmp_path / f"fixed{n}"
    folder.mkdir()
    x = np.random.default_rng(n).standard_normal((n, 16)).astype(np.float32)
    y = np.arange(n) % 10
    np.save(folder / "x.npy", x)
    np.save(folder / "labels.npy", y)
    data = load_calibration(str(folder), model)
    assert data.fixed_batch == batch
    return data, x, y


def test_fixed_batch_epochs_train_on_full_batches_only(tmp_path):
    """One process and every rank: batches of the model's batch, the short last one left out (never padding),
    unless it is the only one (its labels padded like its inputs)."""
    from onnx_consensus.finetune.epochs import training_batches

    data, x, y = _fixed_batch_data(tmp_path, 10)
    epoch = training_batches(data, 32, seed=5)()  # --ft-batch-size does not apply: the model's batch does
    perm = np.random.default_rng(5 * 1_000_003 + 1).permutation(10)
    got = list(epoch)
    assert len(epoch) == len(got) == 2 and epoch.n_samples == 10
    for k, (feeds, labels) in enumerate(got):
        np.testing.assert_array_equal(feeds["x"], x[perm[4 * k:4 * k + 4]])
        np.testing.assert_array_equal(labels, y[perm[4 * k:4 * k + 4]])

    class Rank:
        def __init__(self, rank):
            self.rank, self.world_size = rank, 2
    shards = [list(training_batches(data, 2, seed=5, dist=Rank(r))()) for r in range(2)]
    assert [len(s) for s in shards] == [1, 1]  # 5 samples a rank: one batch of 4, the last sample left out
    assert all(f["x"].shape == (4, 16) and len(lab) == 4 for s in shards for f, lab in s)

    small, xs, ys = _fixed_batch_data(tmp_path, 3)
    (feeds, labels), = list(training_batches(small, 32, seed=0)())
    order = np.random.default_rng(1).permutation(3)
    np.testing.assert_array_equal(feeds["x"], np.concatenate([xs[order], xs[order[-1:]]]))
    np.testing.assert_array_equal(labels, np.concatenate([ys[order], ys[order[-1:]]]))
