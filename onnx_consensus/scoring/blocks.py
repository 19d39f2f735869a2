"""Feature collection for the blocks of a model (``graph.blocks``): ``BlockCollector`` and ``collect_features``.

- global scope: the full model runs once per batch with every candidate's cut tensors exposed; then for each
  candidate only the suffix after its entry runs, fed the cached activations, one candidate at a time.
- local scope: block b's entry vs its exit, from the one instrumented pass.
Memory is bounded by one batch of activations plus the pooled features (n_samples x d per candidate).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx

from ..batching import counted_batches, per_sample
from ..errors import InputError
from ..evaluate import batch_rows
from ..graph.blocks import Block
from ..kinds.basic import CLASS_SCORES
from ..kinds.outputs import choose_feature, output_kinds, score_forms
from ..metrics.features import pool_output
from ..metrics.output import is_class_scores
from ..graph.instrument import expose, suffix_model
from ..graph.ir import GraphIndex, to_gs
from ..graph.masks import token_masks
from ..graph.weights import initializer_bytes, weightless
from ..kinds import output_plan
from ..metrics.features import pool_features
from ..metrics.output import OutputAccumulator
from ..runtime import SHARE_WEIGHTS_BYTES, SharedWeights, make_session
from .collector import SCOPES, FeatureCollector, Features, collect, token_keep
from .outputs import BatchOutputs, dependent_outputs

log = logging.getLogger("onnx_consensus")


def _predictions(out: np.ndarray) -> np.ndarray | None:
    return np.argmax(out, axis=-1) if is_class_scores(out.shape, None, sequence=False) else None


class BlockCollector(FeatureCollector):
    """The scoring pass of ``collect_features`` (see there for the arguments): ``setup`` builds the
    instrumented full model's session and, in the global scope, every candidate's suffix session;
    ``add_batch(k, feeds, n_real)`` runs batch k (``n_real`` real samples, the rest padding)."""

    def __init__(self, model: onnx.ModelProto, data, blocks: Sequence[Block], *, scope: str = "global",
                 feature: str | None = None, threads: int | None = None, share_weights: bool | None = None,
                 token_mask: Sequence[str] = (), task: str | None = None, output_metrics: Sequence[str] = (),
                 reference: list[dict[str, np.ndarray]] | None = None, plan=None):
        super().__init__([b.id for b in blocks], scope)
        self.model, self.blocks, self.named, self.threads, self.task = model, list(blocks), feature, threads, task
        self.masks = token_masks(model, token_mask)
        self.output0 = model.graph.output[0].name
        self.output_metrics = tuple(output_metrics)
        if plan is None and self.output_metrics:
            plan = output_plan(model, task)
        if self.output_metrics and scope != "global":
            raise InputError(f"output-level metrics ({', '.join(self.output_metrics)}) need --scope global; with "
                             "--scope local choose representation metrics, e.g. --metrics paper")
        self.plan, self.reference = plan, reference
        self.share = (share_weights if share_weights is not None
                      else initializer_bytes(model) > SHARE_WEIGHTS_BYTES)
        self.rows_of = batch_rows(data)
        self.deps: dict[str, list[str]] = {}  # block id -> the graph outputs its suffix computes (besides F)
        self.sessions: dict = {}
        self.accs = ({b.id: OutputAccumulator(self.output_metrics, plan) for b in blocks}
                     if self.output_metrics else {})
        self._mixed: set[str] = set()  # tensors whose rows mix samples (warned about once)
        self._n_real = 0
        self.choice = self.full = None
        self.feats: list[str] = []

    # ---------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        """Sessions: one shared copy of the weights when ``share`` (all graph work then happens on a
        weightless copy: suffix models cost no weights)."""
        # the sessions read the shared OrtValues: they must live as long as the collector
        self._weights = shared = SharedWeights(self.model) if self.share else None
        graph_model = weightless(self.model) if shared else self.model
        self.kinds = self.plan.kinds if self.plan is not None else output_kinds(graph_model, self.task)
        self.outs = list(self.kinds) if self.output_metrics else []
        # class scores written as probabilities (a Softmax output) are compared as their log: the softmax of
        # probabilities would flatten both distributions (``graph.heads.score_forms``)
        self.as_log = ({o for o, f in score_forms(graph_model, self.kinds).items() if f == "probabilities"}
                       if self.outs else set())
        if self.output_metrics and not self.outs:
            if shared:
                shared.close()
            raise InputError("output-level metrics need a floating-point graph output; choose e.g. --metrics paper")
        try:
            # the Gaussian metrics' conditions: the predicted class only when the first output is class scores
            self.classes = next(iter(self.kinds.values()), None) == CLASS_SCORES
            if self.scope == "global":
                needed = self._suffix_sessions(graph_model, shared)
            else:
                needed = [self.output0] + [n for b in self.blocks for n in (b.entry, b.exit)]
            self.full = self._session(shared, expose(graph_model, needed), "basic")
        finally:
            if shared:
                shared.close()
        self.full_names = [o.name for o in self.full.get_outputs()]

    def _session(self, shared: SharedWeights | None, m: onnx.ModelProto, level: str):
        # no arena: a run's tensors are freed when it ends
        if shared:
            return shared.session(m, level=level, threads=self.threads, arena=False)
        return make_session(m, level=level, threads=self.threads, arena=False)

    def _suffix_sessions(self, graph_model: onnx.ModelProto, shared: SharedWeights | None) -> list[str]:
        """Global scope: choose the feature, build each candidate's suffix session (one suffix model at a time:
        only its session is kept); return the tensors the full model must expose."""
        self.choice = choose_feature(graph_model, self.blocks, task=self.task, feature=self.named,
                                     kinds=self.plan.kinds if self.plan is not None else None)
        self.feature, self.feature_reason = self.choice.name, self.choice.reason
        self.feats = feats = list(self.choice.tensors)
        graph_inputs = {i.name for i in self.model.graph.input}
        cut: set[str] = set()
        index = GraphIndex(to_gs(graph_model)) if self.outs else None
        for b in self.blocks:
            self.deps[b.id] = [o for o in dependent_outputs(index, b, self.outs) if o not in feats]
            s = suffix_model(graph_model, b, feats + self.deps[b.id])
            cut.update(s.inputs)
            if not s.passthrough:
                self.sessions[b.id] = self._session(shared, s.model, "all")
        return list(dict.fromkeys(feats + [self.output0] + self.outs + sorted(cut - graph_inputs)))

    # ---------------------------------------------------------------------------------------------- rows
    def _pool(self, act: np.ndarray, feeds: dict[str, np.ndarray], name: str) -> np.ndarray:
        """(n_real, d): the sample axis first (``batching.per_sample``), padding dropped, then pooled."""
        fed = self.rows_of(feeds)
        try:
            act = per_sample(act, fed, name=f"tensor {name!r}")
        except InputError as exc:  # rows of several samples mixed: taken as rows, as given
            if name not in self._mixed:
                self._mixed.add(name)
                log.warning("%s; its rows are scored as samples", exc)
            return pool_features(act, token_keep(feeds, act, self.masks)).astype(np.float32)
        return pool_features(act, token_keep(feeds, act, self.masks)).astype(np.float32)[:self._n_real]

    def _pool_feature(self, acts: Sequence[np.ndarray], feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The global feature: one tensor pooled as ``_pool``, or graph outputs pooled and concatenated."""
        if self.choice.head or self.named:
            return self._pool(acts[0], feeds, self.feats[0])
        fed = self.rows_of(feeds)
        parts = []
        for name, a in zip(self.feats, acts):
            a = per_sample(a, fed, self._n_real, name=f"output {name!r}", strict=False)
            parts.append(pool_output(a, token_keep(feeds, a, self.masks)))
        return np.concatenate(parts, axis=1).astype(np.float32)

    # ---------------------------------------------------------------------------------------------- batches
    def add_batch(self, k: int, feeds: dict[str, np.ndarray], n_real: int) -> None:
        """Batch k: the instrumented full model, then (global scope) each candidate's suffix on its values."""
        self._n_real = n_real
        values = dict(zip(self.full_names, self.run(self.full, None, feeds)))
        values.update(feeds)
        fed = self.rows_of(feeds)
        batch_ref = self._batch_outputs(k, values, feeds, fed, n_real) if self.accs else None
        self.add_predictions(_predictions(per_sample(values[self.output0], fed, n_real, strict=False))
                             if self.classes else None)
        if self.scope == "local":
            for b in self.blocks:
                self.add_before(self._pool(values[b.entry], feeds, b.entry), b.id)
                self.add_after(b.id, self._pool(values[b.exit], feeds, b.exit))
            return
        self.add_before(self._pool_feature([values[f] for f in self.feats], feeds))
        for b in self.blocks:  # one candidate at a time: only its suffix's outputs are held
            got = None
            if b.id in self.sessions:
                sess, names = self.sessions[b.id], self.feats + self.deps[b.id]
                got = dict(zip(names, self.run(sess, names, {i.name: values[i.name] for i in sess.get_inputs()})))
            self.add_after(b.id, self._pool_feature([(got or values)[f] for f in self.feats], feeds))
            if batch_ref is not None:
                batch_ref.accumulate(self.accs[b.id], got)
            del got

    def _batch_outputs(self, k: int, values: dict, feeds: dict, fed: int, n_real: int) -> BatchOutputs:
        if self.reference is not None and k >= len(self.reference):
            raise InputError("the reference outputs cover fewer batches than the data")
        ref = (self.reference[k] if self.reference is not None else
               {o: per_sample(values[o], fed, n_real, name=f"output {o!r}", strict=False) for o in self.outs})
        return BatchOutputs(ref, values, self.outs, feeds, self.masks, self.kinds, fed, n_real, self.as_log)

    def output_scores(self) -> dict[str, dict[str, float]]:
        return {bid: acc.scores() for bid, acc in self.accs.items()}


def collect_features(model: onnx.ModelProto, data, blocks: Sequence[Block], *, scope: str = "global",
                     feature: str | None = None, indices=None, batch_size: int = 64,
                     threads: int | None = None, progress: bool = False, share_weights: bool | None = None,
                     token_mask: Sequence[str] = (), task: str | None = None, output_metrics: Sequence[str] = (),
                     reference: list[dict[str, np.ndarray]] | None = None, plan=None) -> Features:
    """Run the calibration data once and return the pooled ``Features`` of every block in ``blocks``.

    The global scope's feature: ``feature`` when named, else ``graph.heads.choose_feature`` (the classifier
    head's input, or the graph's float outputs, pooled by ``graph.heads.pool_output`` and concatenated);
    ``task`` (classify | embed | generic) overrides that choice.

    output_metrics (global scope): also run each suffix to the float graph outputs it changes and score them
    against ``reference`` (``original_outputs`` on the same data, indices and batch size; None: the current
    model's outputs) with these output-level metrics (``Features.outputs``); ``plan`` (``kinds.OutputPlan``,
    default ``kinds.output_plan(model, task)``) says what each output is and how ``output_fidelity`` measures it.

    Token tensors are averaged over the tokens a mask input keeps (``graph.masks.token_masks``;
    ``token_mask``: overrides ``NAME:keep|pad``). share_weights: give every session one shared copy of the
    initializers (default: for models whose weights exceed runtime.SHARE_WEIGHTS_BYTES), so memory stays
    near one copy of the weights."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}")
    collector = BlockCollector(model, data, blocks, scope=scope, feature=feature, threads=threads,
                               share_weights=share_weights, token_mask=token_mask, task=task,
                               output_metrics=output_metrics, reference=reference, plan=plan)
    batches = counted_batches(data, batch_size, indices)
    if progress:
        from tqdm import tqdm

        total = len(indices) if indices is not None else data.n_samples
        step = data.fixed_batch or batch_size
        batches = tqdm(batches, total=-(-total // step), desc=f"scoring {len(blocks)} blocks", unit="batch", leave=False)
    return collect(collector, ((k, feeds, n_real) for k, (feeds, n_real) in enumerate(batches)))
