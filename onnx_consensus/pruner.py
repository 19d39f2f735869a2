"""The removal schedule: compose block detection, scoring and surgery until the target is met.

- iterative (default, as published): score, remove the least important block, re-score the rest on the
  pruned model, repeat;
- one-shot: score once, remove in that order.
Targets: a number of blocks, a MACs-reduction fraction, or (no target) as many blocks as keep the pruned
model's fidelity to the original at or above ``min_agreement`` on a held-back part of the data that
scoring never sees, in the task's own terms (the output plan, ``kinds.output_plan``: detections kept, top-1
agreement, mask IoU, ...; ``criterion.task`` / ``output_kind`` / ``fidelity`` override).
``keep_per_stage`` keeps at least that many blocks in every run of same-shaped blocks. Every pruned model is
built from the original graph, so block ids stay the original exit names. With no target the blocks go in
the cost-aware order (``cost_aware_order``: damage per unit of compute saved), and removals that save less
than ``MIN_MACS_SAVING`` of the MACs are flagged (``PruneResult.small_saving``: the run does not write them).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from .errors import InputError, PruneFailed, TargetError
from .evaluate import Fidelity, fidelity, reference_outputs
from .graph.blocks import Block, BlockReport, find_blocks
from .graph.flops import count_cost
from .graph.masks import token_masks
from .graph.surgery import remove_blocks
from .options import CriterionOptions, RunOptions, TargetOptions
from .metrics import get_metric, resolve_metrics
from .kinds import blind_spots, output_plan
from .schedule import allowed_ids, check_schedule, eligible_now, rounds
from .scoring import SCOPES, ScoreRound, ScoreSettings, has_class_scores, original_outputs, score_blocks

__all__ = ["CriterionOptions", "TargetOptions", "RunOptions", "PruneResult", "Removal", "prune"]
log = logging.getLogger("onnx_consensus")


@dataclass
class Removal:
    """One removed block: its round, the MACs it took, and the hold-out fidelity right after."""

    block: Block
    round: int
    fidelity: Fidelity | None = None


@dataclass
class PruneResult:
    model: onnx.ModelProto
    original_blocks: BlockReport
    removals: list[Removal] = field(default_factory=list)
    rounds: list[ScoreRound] = field(default_factory=list)
    fidelity: Fidelity | None = None
    macs_before: int | None = None
    macs_after: int | None = None
    params_before: int = 0
    params_after: int = 0
    weight_bytes_before: int = 0  # initializers as stored (int8: 1 byte a value, int4: 1/2)
    weight_bytes_after: int = 0
    stop_reason: str = ""
    collapse: str | None = None
    notes: list[str] = field(default_factory=list)  # where the fidelity measure is blind on this data
    output_plan: dict | None = None  # how the outputs are judged (kinds.OutputPlan.to_json)
    holdout_samples: int = 0
    score_samples: int = 0
    # the calibration samples (indices) of the fidelity check and of scoring; the same array when the data
    # is too small to split
    holdout_indices: np.ndarray | None = None
    score_indices: np.ndarray | None = None
    # set when the removals save under MIN_MACS_SAVING of the MACs: the sentence that says so
    small_saving: str | None = None

    @property
    def removed_ids(self) -> list[str]:
        return [r.block.id for r in self.removals]


def check_feature_used(feature: str | None, metrics) -> None:
    """InputError when ``--feature`` is named but no metric of ``metrics`` reads it (only output-level
    metrics, which compare the graph outputs): it would be ignored while the summary names it."""
    if feature and metrics and all(get_metric(m).output for m in metrics):
        raise InputError(f"--feature {feature} is read only by representation metrics (paper, cka, cosine, ...); "
                         f"--metrics {'+'.join(metrics)} compares the graph outputs and would ignore it: add one "
                         "(e.g. --metrics paper+output) or drop --feature")


MIN_MACS_SAVING = 0.01
"""Removals saving less than this fraction of the MACs are not worth a model: with no target the run does not
write them (unless --force-write), with a target it warns."""


def cost_aware_order(order: Sequence[str], macs: dict[str, int | None], total: int | None) -> list[str]:
    """The criterion's ``order`` (least important first) re-ranked by damage per unit of compute saved.

    The Consensus combines ranks only, so damage is a rank too: block i at position p_i (1 = least damage)
    gets the key p_i / s_i, s_i its share of the model's MACs (``macs[i] / total``); the smallest key goes
    first, ties and blocks of equal cost keep the criterion's order (so a network whose blocks all cost the
    same, such as the CIFAR ResNets, is pruned exactly as the criterion says). A block that saves no MACs goes
    last. When a block's MACs or the total are unknown the order is returned as it is."""
    if not total or any(macs.get(i) is None for i in order):
        return list(order)

    def key(item):
        p, i = item
        share = macs[i] / total
        return ((p + 1) / share if share > 0 else float("inf"), p)
    return [i for _, i in sorted(enumerate(order), key=key)]


def saving_note(removed: Sequence[Block], total: int | None) -> str | None:
    """A sentence when ``removed`` save less than ``MIN_MACS_SAVING`` of ``total`` MACs, else None (also when
    nothing was removed or the MACs are unknown)."""
    if not removed or not total or any(b.macs is None for b in removed):
        return None
    got = _macs_fraction(removed, total)
    if got >= MIN_MACS_SAVING:
        return None
    return (f"the {len(removed)} removed block(s) save only {got:.2%} of the MACs (< {MIN_MACS_SAVING:.0%}): "
            "they cost almost no compute")


def _validate(criterion: CriterionOptions, target: TargetOptions, blocks: dict[str, Block]) -> None:
    if criterion.scope not in SCOPES:
        raise InputError(f"--scope must be one of {', '.join(SCOPES)}, got {criterion.scope!r}")
    check_schedule(criterion.schedule, criterion.rescore_top)
    if target.remove is not None and target.remove < 0:
        raise InputError("--remove must be >= 0")
    if target.target_flops is not None and not 0 < target.target_flops < 1:
        raise InputError("--target-flops must be a fraction between 0 and 1, e.g. 0.5")
    if not 0 < target.min_agreement <= 1:
        raise InputError("--min-agreement must be in (0, 1]")
    for name, ids in (("--only", target.only), ("--exclude", target.exclude), ("--plan", target.plan)):
        unknown = [i for i in ids if i not in blocks]
        if unknown:
            raise InputError(f"{name}: unknown block id(s) {', '.join(unknown[:5])} (see `onnx-cprune inspect`)")


def prune(model: onnx.ModelProto, data, *, criterion: CriterionOptions | None = None,
          target: TargetOptions | None = None, run: RunOptions | None = None,
          labels: np.ndarray | None = None,
          between: Callable[[onnx.ModelProto], onnx.ModelProto] | None = None, budget=None) -> PruneResult:
    """Remove residual blocks from ``model`` chosen by the criterion until the target is met.

    data: a CalibrationData (``load_calibration``). labels: optional (n,) class ids for the Gaussian metrics'
    conditions and for accuracy (default: ``data.labels``). between: called on the pruned model after each
    removal but the last (e.g. a short fine-tune), its result is scored next. Raises TargetError when a
    block count or MACs target cannot be met; a failure midway (onnxruntime, an interrupt, ``between``)
    raises PruneFailed, whose ``partial`` holds the removals and scores done so far and whose
    ``__cause__`` is the failure. budget: a ``latency_target.Budget`` (a latency target): the schedule stops
    when it is met and asks it which block goes next.
    """
    criterion, target, run = criterion or CriterionOptions(), target or TargetOptions(), run or RunOptions()
    labels = data.labels if labels is None else labels
    cost = count_cost(model, run.input_shapes or None)
    report = find_blocks(model, macs_per_node=cost.macs_per_node, unit=criterion.unit)
    if report.refusal:
        log.warning("%s", report.refusal)
    originals = report.by_id()
    _validate(criterion, target, originals)
    plan = output_plan(model, criterion.task, criterion.output_kind, criterion.fidelity)
    metrics = resolve_metrics(criterion.metrics, has_class_scores(model, criterion.task), plan)
    check_feature_used(criterion.feature, metrics)
    result = PruneResult(model=model, original_blocks=report, macs_before=cost.total_macs, params_before=cost.params,
                         weight_bytes_before=cost.weight_bytes, weight_bytes_after=cost.weight_bytes,
                         output_plan=plan.to_json())
    if not report.blocks and not target.plan:  # nothing to score: no inference at all, whatever the target
        result.stop_reason = f"no removable block: {report.refusal or 'none found'}"
        result.macs_after, result.params_after = cost.total_macs, cost.params
        return result
    job = _job(model, data, labels, criterion, target, run, metrics, plan, result, budget)
    job.total, job.originals = cost.total_macs, originals
    # On a failure midway, what was computed so far (the finished rounds' scores, the model with the
    # removals done) goes with PruneFailed, for callers that keep it (`--keep-partial`).
    try:
        removed, current = _replay(job, result) if target.plan else _scheduled(job, result, between)
    except (Exception, KeyboardInterrupt) as exc:
        result.stop_reason = f"stopped by {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise PruneFailed(result, exc) from exc
    if not target.plan and not job.auto and not _target_met(target, removed, job.total, budget):
        # not a failure midway: the schedule ran to its end (exit 3, nothing written, even with --keep-partial)
        got = _macs_fraction(removed, job.total)
        want = f"{target.remove} blocks" if target.remove is not None else f"{target.target_flops:.1%} of MACs" \
            if budget is None else f"latency ({budget.text(result.removed_ids)})"
        raise TargetError(report.refusal or f"target {want} cannot be met: only {len(removed)} block(s) removable "
                          f"({got:.1%} of MACs) with keep-per-stage={target.keep_per_stage} and the "
                          f"--only/--exclude choices")
    _finish(job, result, removed, current)
    return result


@dataclass
class _Job:
    """What the rounds of one ``prune`` share: the inputs, the resolved criterion, the data split, the
    hold-out ``check`` and the original model's outputs for output-level metrics (None without them)."""

    model: onnx.ModelProto
    data: object
    criterion: CriterionOptions
    target: TargetOptions
    run: RunOptions
    metrics: list
    plan: object
    token_mask: tuple
    score_idx: np.ndarray
    score_labels: np.ndarray | None
    check: Callable[[onnx.ModelProto], Fidelity]
    auto: bool
    budget: object = None
    score_reference: list | None = None
    total: int | None = None
    originals: dict = field(default_factory=dict)


def _job(model, data, labels, criterion: CriterionOptions, target: TargetOptions, run: RunOptions, metrics,
         plan, result: PruneResult, budget) -> _Job:
    """Split the data (scoring / hold-out, recorded in ``result``), compute the hold-out reference and, for
    output-level metrics, the original model's outputs on the scoring samples."""
    # Token masks are resolved (and any guess logged) once, then passed to every round as overrides.
    token_mask = tuple(f"{m.name}:{m.polarity}" for m in token_masks(model, criterion.token_mask).values())
    if data.n_samples >= 10 and run.holdout > 0:
        score_idx, hold_idx = data.split(run.holdout, seed=criterion.seed)
    else:
        score_idx = hold_idx = np.arange(data.n_samples)
        log.warning("fewer than 10 calibration samples: scoring and the fidelity check use the same samples")
    result.score_samples, result.holdout_samples = len(score_idx), len(hold_idx)
    result.score_indices, result.holdout_indices = score_idx, hold_idx
    hold_labels = None if labels is None else np.asarray(labels)[hold_idx]
    score_labels = None if labels is None else np.asarray(labels)[score_idx]
    reference = reference_outputs(model, data, hold_idx, batch_size=run.batch_size, threads=run.threads,
                                  names=plan.outputs or None)
    kinds = plan if plan.outputs else None  # fidelity per head, in the task's own terms
    auto = target.remove is None and target.target_flops is None and budget is None
    result.notes = _blind_notes(model, plan, reference, target.min_agreement if auto and not target.plan else None)
    # Output-level metrics compare with the ORIGINAL model's outputs, computed once here for every round.
    score_reference = None
    if any(get_metric(m).output for m in metrics) and not target.plan:
        score_reference = original_outputs(model, data, score_idx, batch_size=run.batch_size, threads=run.threads)

    def check(m: onnx.ModelProto) -> Fidelity:
        return fidelity(m, reference, data, hold_idx, labels=hold_labels, batch_size=run.batch_size,
                        threads=run.threads, kinds=kinds)

    return _Job(model, data, criterion, target, run, metrics, plan, token_mask, score_idx, score_labels, check,
                auto, budget, score_reference)


def _replay(job: _Job, result: PruneResult) -> tuple[list[Block], onnx.ModelProto]:
    """``--plan``: remove the plan's blocks, no scoring."""
    removed = [job.originals[i] for i in job.target.plan]
    current = remove_blocks(job.model, removed)
    result.removals = [Removal(b, 0) for b in removed]
    result.stop_reason = f"replayed a plan of {len(removed)} removals"
    return removed, current


def _scheduled(job: _Job, result: PruneResult, between) -> tuple[list[Block], onnx.ModelProto]:
    """Drive ``schedule.rounds`` until the target is met, no block is eligible, or (no target) the next
    removal would break the fidelity budget. Each pruned model is the current one minus one block, so
    weights fine-tuned ``between`` removals carry over."""
    target, criterion, originals, total, budget = job.target, job.criterion, job.originals, job.total, job.budget
    allowed = allowed_ids(originals, target.only, target.exclude)
    stages = {i: b.stage for i, b in originals.items()}
    removed: list[Block] = []
    current = job.model

    def eligible() -> dict[str, Block]:
        blocks = [b for b in find_blocks(current, macs_per_node={}, unit=criterion.unit).blocks if b.id in originals]
        return eligible_now({b.id: b for b in blocks}, stages, {b.id for b in removed}, allowed,
                            target.keep_per_stage)

    def score(blocks: list[Block]):
        rnd = score_blocks(current, job.data, blocks=blocks, metrics=job.metrics, weights=criterion.weights,
                           settings=ScoreSettings.of(criterion, job.run, job.token_mask), indices=job.score_idx,
                           labels=job.score_labels, reference=job.score_reference, plan=job.plan)
        result.rounds.append(rnd)
        return rnd

    if _target_met(target, removed, total, budget):
        result.stop_reason = "target met"
        return removed, current
    result.stop_reason = "no eligible block left"
    for rnd in rounds(eligible, score, schedule=criterion.schedule, rescore_top=criterion.rescore_top):
        order = rnd.order
        ranked = cost_aware_order(order, {i: originals[i].macs for i in order}, total) if job.auto else order
        pick_id = budget.pick(ranked, set(rnd.eligible)) if budget else next(i for i in ranked if i in rnd.eligible)
        candidate = remove_blocks(current, [rnd.eligible[pick_id]])
        fid = job.check(candidate) if job.auto else None
        if job.auto and not fid.meets(target.min_agreement):
            result.stop_reason = (f"removing {pick_id} would bring hold-out fidelity below the budget "
                                  f"({fid.budget_text(target.min_agreement)})")
            break
        removed.append(originals[pick_id])
        result.removals.append(Removal(originals[pick_id], rnd.number, fid))
        current = result.model = candidate
        log.info("removed %s (round %d)", pick_id, rnd.number + 1)
        if _target_met(target, removed, total, budget):
            result.stop_reason = "target met"
            break
        if between is not None:
            current = result.model = between(current)
    return removed, current


def _finish(job: _Job, result: PruneResult, removed: list[Block], current: onnx.ModelProto) -> None:
    """The pruned model's MACs, parameters and hold-out fidelity; the small-saving and collapse notes."""
    result.model = current
    result.small_saving = saving_note(removed, job.total)
    after = count_cost(current, job.run.input_shapes or None)
    result.macs_after, result.params_after = after.total_macs, after.params
    result.weight_bytes_after = after.weight_bytes
    result.fidelity = job.check(current)
    if (job.target.plan or not job.auto) and result.removals:  # an explicit target may wreck the model: say so
        collapsed = result.fidelity.collapse()
        if collapsed:
            result.collapse = (f"the pruned model's outputs collapsed ({collapsed} on the hold-out): fine-tune it "
                               "(--finetune-epochs N; distillation from the original when there are no labels) or "
                               "remove fewer blocks")
            log.info("%s", result.collapse)  # the summary says it (report "collapse")


def nothing_removable(model: onnx.ModelProto, original: onnx.ModelProto | None = None, *, unit: str = "block",
                      input_shapes: dict | None = None) -> PruneResult | None:
    """When ``model`` has no removable block: the PruneResult saying why (``stop_reason``; its ``model`` the
    ``original``, e.g. a bfloat16 model whose float32 shadow is ``model``), found without any inference;
    None when it has one."""
    cost = count_cost(model, input_shapes or None)
    found = find_blocks(model, macs_per_node=cost.macs_per_node, unit=unit)
    if found.blocks:
        return None
    if found.refusal:
        why = found.refusal
    elif found.not_removable:
        reasons = sorted({n.reason for n in found.not_removable})
        why = (f"{len(found.not_removable)} residual merge(s) seen, none removable: " + "; ".join(reasons[:3])
               + ("; ..." if len(reasons) > 3 else ""))
    else:
        why = "no residual merge in the graph"
    log.info("no removable block: %s", why)
    return PruneResult(model=model if original is None else original, original_blocks=found,
                       macs_before=cost.total_macs, macs_after=cost.total_macs, params_before=cost.params,
                       params_after=cost.params, weight_bytes_before=cost.weight_bytes,
                       weight_bytes_after=cost.weight_bytes, stop_reason=f"no removable block: {why}")


def _blind_notes(model: onnx.ModelProto, plan, reference: list, budget: float | None) -> list[str]:
    """``kinds.blind_spots`` on the hold-out reference (the budget only when it is used), each logged."""
    if not plan.outputs:
        return []
    floats = set(plan.outputs)
    notes = blind_spots(plan, reference, budget=budget,
                        non_float=[o.name for o in model.graph.output if o.name not in floats])
    for note in notes:
        log.warning("%s", note)
    return notes


def _macs_fraction(removed: Sequence[Block], total: int | None) -> float:
    if not total:
        return 0.0
    return sum(b.macs or 0 for b in removed) / total


def _target_met(target: TargetOptions, removed: Sequence[Block], total: int | None, budget=None) -> bool:
    if budget is not None:
        return budget.met([b.id for b in removed])
    if target.remove is not None:
        return len(removed) >= target.remove
    if target.target_flops is not None:
        if not total:
            raise InputError("--target-flops needs known MACs: give static input shapes with --input-shape")
        return _macs_fraction(removed, total) >= target.target_flops
    return False
