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
from .scoring import SCOPES, ScoreRound, ScoreSettings, has_class_scores, original_outputs, score_blocks

__all__ = ["CriterionOptions", "TargetOptions", "RunOptions", "PruneResult", "Removal", "prune"]
log = logging.getLogger("onnx_consensus")
SCHEDULES = ("iterative", "one-shot")


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
    if criterion.schedule not in SCHEDULES:
        raise InputError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {criterion.schedule!r}")
    if criterion.rescore_top is not None and criterion.rescore_top < 1:
        raise InputError("--rescore-top must be >= 1")
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
    # Token masks are resolved (and any guess logged) once, then passed to every round as overrides.
    token_mask = tuple(f"{m.name}:{m.polarity}" for m in token_masks(model, criterion.token_mask).values())
    result = PruneResult(model=model, original_blocks=report, macs_before=cost.total_macs, params_before=cost.params,
                         weight_bytes_before=cost.weight_bytes, weight_bytes_after=cost.weight_bytes,
                         output_plan=plan.to_json())
    if not report.blocks and not target.plan:  # nothing to score: no inference at all, whatever the target
        result.stop_reason = f"no removable block: {report.refusal or 'none found'}"
        result.macs_after, result.params_after = cost.total_macs, cost.params
        return result

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

    allowed = set(target.only or originals) - set(target.exclude)
    total = cost.total_macs
    removed: list[Block] = []
    current = model

    # On a failure midway, what was computed so far (the finished rounds' scores, the model with the
    # removals done) goes with PruneFailed, for callers that keep it (`--keep-partial`).
    try:
        if target.plan:
            removed = [originals[i] for i in target.plan]
            current = remove_blocks(model, removed)
            result.removals = [Removal(b, 0) for b in removed]
            result.stop_reason = f"replayed a plan of {len(removed)} removals"
        else:
            order: list[str] = []
            round_no = 0
            while True:
                if _target_met(target, removed, total, budget):
                    result.stop_reason = "target met"
                    break
                stage_left = _stage_counts(originals.values(), removed)
                current_blocks = {b.id: b for b in find_blocks(current, macs_per_node={}, unit=criterion.unit).blocks
                                  if b.id in originals}
                eligible = [current_blocks[i] for i in current_blocks
                            if i in allowed and stage_left[originals[i].stage] > target.keep_per_stage]
                if not eligible:
                    result.stop_reason = "no eligible block left"
                    break
                if criterion.schedule == "iterative" or not order:
                    scored = eligible
                    if criterion.rescore_top is not None and order:
                        # re-score only the K best of the previous order; the others keep their places behind
                        ids = {b.id for b in eligible}
                        top = [i for i in order if i in ids][:criterion.rescore_top]
                        scored = [current_blocks[i] for i in top] or eligible
                    rnd = score_blocks(current, data, blocks=scored, metrics=metrics, weights=criterion.weights,
                                       settings=ScoreSettings.of(criterion, run, token_mask), indices=score_idx,
                                       labels=score_labels, reference=score_reference, plan=plan)
                    result.rounds.append(rnd)
                    rescored = set(rnd.order)
                    order = rnd.order + [i for i in order if i not in rescored]
                eligible_ids = {b.id for b in eligible}
                ranked = cost_aware_order(order, {i: originals[i].macs for i in order}, total) if auto else order
                pick_id = (budget.pick(ranked, eligible_ids) if budget else
                           next(i for i in ranked if i in eligible_ids))
                # Remove from the current model (its blocks keep their original ids), so weights fine-tuned
                # between removals carry over.
                candidate = remove_blocks(current, [current_blocks[pick_id]])
                fid = check(candidate) if auto else None
                if auto and not fid.meets(target.min_agreement):
                    result.stop_reason = (f"removing {pick_id} would bring hold-out fidelity below the budget "
                                          f"({fid.budget_text(target.min_agreement)})")
                    break
                removed.append(originals[pick_id])
                result.removals.append(Removal(originals[pick_id], round_no, fid))
                current = candidate
                result.model = current
                round_no += 1
                log.info("removed %s (round %d)", pick_id, round_no)
                if between is not None and not _target_met(target, removed, total, budget):
                    current = between(current)
                    result.model = current
    except (Exception, KeyboardInterrupt) as exc:
        result.stop_reason = f"stopped by {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise PruneFailed(result, exc) from exc
    if not target.plan and not auto and not _target_met(target, removed, total, budget):
        # not a failure midway: the schedule ran to its end (exit 3, nothing written, even with --keep-partial)
        got = _macs_fraction(removed, total)
        want = f"{target.remove} blocks" if target.remove is not None else f"{target.target_flops:.1%} of MACs" \
            if budget is None else f"latency ({budget.text(result.removed_ids)})"
        raise TargetError(report.refusal or f"target {want} cannot be met: only {len(removed)} block(s) removable "
                          f"({got:.1%} of MACs) with keep-per-stage={target.keep_per_stage} and the "
                          f"--only/--exclude choices")
    result.model = current
    result.small_saving = saving_note(removed, total)
    after = count_cost(current, run.input_shapes or None)
    result.macs_after, result.params_after = after.total_macs, after.params
    result.weight_bytes_after = after.weight_bytes
    result.fidelity = check(current)
    if (target.plan or not auto) and result.removals:  # an explicit target may wreck the model: say so plainly
        collapsed = result.fidelity.collapse()
        if collapsed:
            result.collapse = (f"the pruned model's outputs collapsed ({collapsed} on the hold-out): fine-tune it "
                               "(--finetune-epochs N; distillation from the original when there are no labels) or "
                               "remove fewer blocks")
            log.info("%s", result.collapse)  # the summary says it (report "collapse")
    return result


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


def _stage_counts(blocks, removed: Sequence[Block]) -> dict[int, int]:
    gone = {b.id for b in removed}
    counts: dict[int, int] = {}
    for b in blocks:
        if b.id not in gone:
            counts[b.stage] = counts.get(b.stage, 0) + 1
    return counts
