"""`onnx-cprune`: prune (default), inspect, bench.

Exit codes: 0 done (also when there is no removable block); 2 bad usage or bad input; 3 target cannot be
met (nothing written); 4 fine-tuning failed (pruned model kept); 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time

from . import __version__
from .errors import ConsensusError, InputError

COMMANDS = ("prune", "inspect", "bench")
log = logging.getLogger("onnx_consensus")


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _ints(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in _csv(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def _floats(value: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in _csv(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {value!r}") from None


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, only the summary")


def _add_shape(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:1x3x224x224",
                   help="fix an input's dynamic dimensions for MAC counting (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnx-cprune",
        description="Depth-prune an ONNX model: remove whole residual blocks chosen by the Consensus criterion.",
        epilog="`onnx-cprune in.onnx out.onnx --calib data/` is short for `onnx-cprune prune ...`.")
    parser.add_argument("--version", action="version", version=f"onnx-consensus {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{prune,inspect,bench}")

    p = sub.add_parser("prune", help="score and remove residual blocks, write the pruned model")
    p.add_argument("input", help="the ONNX model to prune (never modified)")
    p.add_argument("output", help="where to write the pruned model")
    g = p.add_argument_group("input data")
    g.add_argument("--calib", required=True, metavar="DIR", help="calibration data: .npy/.npz files or images")
    g.add_argument("--labels", metavar="FILE", help="class ids (.npy) in the data's sorted sample order "
                   "(default: labels.npy in the calibration directory, if present)")
    g.add_argument("--batch-size", type=int, default=64, help="inference batch size (default 64)")
    g.add_argument("--holdout", type=float, default=0.2,
                   help="fraction of the calibration data kept back for the fidelity check (default 0.2)")
    g.add_argument("--max-samples", type=int, help="use at most this many calibration samples")
    g.add_argument("--image-size", metavar="HxW", help="resize images to HxW (default: the model's input size)")
    g.add_argument("--mean", type=_floats, help="per-channel mean subtracted from images scaled to [0,1]")
    g.add_argument("--std", type=_floats, help="per-channel std dividing images")
    g.add_argument("--layout", choices=("NCHW", "NHWC"), default="NCHW", help="image tensor layout")
    g.add_argument("--strict", action="store_true", help="fail on a corrupt data file instead of skipping it")
    g = p.add_argument_group("target")
    g.add_argument("--remove", type=int, metavar="N", help="remove N blocks")
    g.add_argument("--target-flops", type=float, metavar="F",
                   help="remove blocks until at least the fraction F of MACs is gone (e.g. 0.5)")
    g.add_argument("--min-agreement", type=float, default=0.99,
                   help="with no target: keep removing while hold-out top-1 agreement stays >= this "
                        "(relative output error <= 1-this for non-classifiers; default 0.99)")
    g.add_argument("--keep-per-stage", type=int, default=1,
                   help="keep at least K blocks in each run of same-shaped blocks (default 1)")
    g.add_argument("--only", type=_csv, default=(), metavar="ID,...", help="consider only these blocks")
    g.add_argument("--exclude", type=_csv, default=(), metavar="ID,...", help="never remove these blocks")
    g.add_argument("--plan", metavar="REPORT.json", help="replay the removals of an earlier report, no scoring")
    g = p.add_argument_group("criterion")
    g.add_argument("--metrics", type=_csv, help="comma-separated metric names (default: the eight of the Consensus)")
    g.add_argument("--scope", choices=("global", "local"), default="global",
                   help="global: feature tensor with vs without the block (default); local: block entry vs exit")
    g.add_argument("--schedule", choices=("iterative", "one-shot"), default="iterative",
                   help="iterative: re-score after each removal (default); one-shot: score once")
    g.add_argument("--feature", metavar="TENSOR", help="feature tensor (default: the final classifier's input)")
    g.add_argument("--unit", choices=("block", "layer"), default="block",
                   help="candidate unit: every residual sub-block (default), or whole transformer layers "
                        "(attention + MLP sub-blocks paired)")
    g.add_argument("--token-mask", type=_csv, default=(), metavar="NAME:keep|pad,...",
                   help="input NAME masks tokens for feature averaging: keep = nonzero marks a real token, pad = "
                        "nonzero marks padding (default: read from the graph, else guessed from the name)")
    g.add_argument("--pca-dim", type=int, default=256, help="principal-component cap for alignment metrics")
    g.add_argument("--seed", type=int, default=0, help="seed for the hold-out split, random metric, k-means")
    g = p.add_argument_group("fine-tuning (needs torch: pip install 'onnx-consensus[torch]')")
    g.add_argument("--finetune-epochs", type=int, default=0, metavar="E",
                   help="fine-tune the pruned model for E epochs (default 0: no fine-tuning)")
    g.add_argument("--lr", type=float, help="peak learning rate (default: 0.01 with BN nodes, 0.002 BN-folded)")
    g.add_argument("--ft-batch-size", type=int, default=64, help="training batch size (default 64)")
    g.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd", help="default sgd (momentum 0.9)")
    g.add_argument("--train", metavar="DIR", help="training data (default: the calibration data; with "
                   "labels.npy: supervised, else distillation from the original model)")
    g.add_argument("--eval", metavar="DIR", help="evaluation data: accuracy with labels.npy, else agreement; "
                   "the best epoch on it is the one written")
    g.add_argument("--augment", action="store_true", help="random crop and flip for image inputs")
    g.add_argument("--temperature", type=float, default=4.0, help="distillation temperature (default 4)")
    g.add_argument("--feature-mse", type=float, default=0.0, help="weight of the feature-tensor MSE in distillation")
    g.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    g.add_argument("--finetune-between", type=int, default=0, metavar="N",
                   help="fine-tune N steps after each removal, before re-scoring (iterative schedule)")
    g = p.add_argument_group("output")
    g.add_argument("--report", metavar="FILE", help="write the JSON report here")
    g.add_argument("--force-write", action="store_true", help="write the output even when nothing was removed")
    g.add_argument("--keep-partial", action="store_true",
                   help="if a run fails midway (onnxruntime error, interrupt), still write the model with the "
                        "removals done so far and the report with the scores computed so far (exit code stays "
                        "non-zero)")
    g.add_argument("--no-latency", action="store_true", help="skip the before/after latency measurement")
    g.add_argument("--latency-runs", type=int, default=20, help="timed runs per model for latency (default 20)")
    g.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    _add_shape(p)
    _add_common(p)

    p = sub.add_parser("inspect", help="list the removable blocks without running the model")
    p.add_argument("input")
    p.add_argument("--unit", choices=("block", "layer"), default="block",
                   help="residual sub-blocks (default) or whole transformer layers")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_shape(p)
    _add_common(p)

    p = sub.add_parser("bench", help="onnxruntime latency of one or more models")
    p.add_argument("models", nargs="+")
    p.add_argument("--batch-sizes", type=_ints, default=(1, 32), help="comma-separated (default 1,32)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads, pinned (default 1)")
    p.add_argument("--runs", type=int, default=30, help="timed runs per model and batch size (default 30)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--spin-wait", action="store_true",
                   help="keep onnxruntime's spin-waiting intra-op threads when alternating several models "
                        "(by default they are off then: an idle session's spinning threads take cores from the "
                        "one being timed)")
    p.add_argument("--data", metavar="DIR", help="take inputs from this data directory (default: random data)")
    p.add_argument("--eval", metavar="DIR", help="also evaluate on this data: top-1 accuracy with labels.npy, "
                   "and agreement with the first model")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_shape(p)
    _add_common(p)
    return parser


def _input_shapes(specs) -> dict[str, tuple[int, ...]]:
    from .graph.flops import parse_input_shape

    return dict(parse_input_shape(s) for s in specs)


def _image_options(args):
    from .data import ImageOptions

    kw = {"layout": args.layout}
    if args.image_size:
        try:
            h, w = (int(v) for v in args.image_size.lower().split("x"))
        except ValueError:
            raise InputError(f"--image-size must look like 224x224, got {args.image_size!r}") from None
        kw["size"] = (h, w)
    if args.mean:
        kw["mean"] = args.mean
    if args.std:
        kw["std"] = args.std
    return ImageOptions(**kw)


def cmd_inspect(args) -> int:
    from .graph.blocks import find_blocks
    from .graph.flops import count_cost
    from .graph.ir import load_model

    model = load_model(args.input)
    cost = count_cost(model, _input_shapes(args.input_shape))
    report = find_blocks(model, macs_per_node=cost.macs_per_node, unit=args.unit)
    total = cost.total_macs
    blocks = []
    for b in report.blocks:
        d = b.to_json()
        d["macs_share"] = (b.macs / total) if (b.macs is not None and total) else None
        blocks.append(d)
    out = {"model": args.input, "macs": total, "params": cost.params, "unit": args.unit, "blocks": blocks,
           "not_removable": [n.to_json() for n in report.not_removable], "notes": cost.notes + list(report.notes)}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{args.input}: {len(blocks)} removable block(s); MACs {total:,}" if total is not None
          else f"{args.input}: {len(blocks)} removable block(s); MACs unknown (use --input-shape)")
    print(f"{'#':>3}  {'stage':>5}  {'nodes':>5}  {'MACs':>12}  {'share':>6}  id (entry -> exit)")
    for k, d in enumerate(blocks):
        macs = f"{d['macs']:,}" if d["macs"] is not None else "unknown"
        share = f"{d['macs_share']:.2%}" if d["macs_share"] is not None else "-"
        print(f"{k:>3}  {d['stage']:>5}  {d['n_nodes']:>5}  {macs:>12}  {share:>6}  {d['id']}  ({d['entry']} -> {d['exit']})")
    if report.not_removable:
        print("\nResidual merges seen but not removable:")
        for n in report.not_removable:
            print(f"  {n.merge}: {n.reason}")
    for note in out["notes"]:
        print(f"\nNote: {note}")
    return 0


def cmd_prune(args) -> int:
    from .bench import measure_latency
    from .data import load_calibration
    from .graph.ir import load_model_and_layout
    from .graph.precision import float32_shadow, is_bfloat16
    from .io import check_output_path
    from .metrics import DEFAULT_METRICS, get_metric
    from .pruner import CriterionOptions, RunOptions, TargetOptions, prune
    from .report import build_report, sha256_file, stamp, summary_table

    t_start = time.perf_counter()
    out_path = check_output_path(args.output, args.input)
    if args.finetune_epochs:
        from .recover import require_torch

        require_torch()
    model, external = load_model_and_layout(args.input)
    if external:
        _check_data_file_free(out_path, model)
    input_sha = sha256_file(args.input)
    metrics = args.metrics or DEFAULT_METRICS
    for m in metrics:
        get_metric(m)
    original = model  # what is written: removals found on a float32 shadow are applied to a bfloat16 original
    if is_bfloat16(model):
        if args.finetune_epochs or args.finetune_between:
            raise InputError("fine-tuning a bfloat16 model is not supported (onnxruntime's CPU provider cannot "
                             "run it as the teacher): prune without fine-tuning, or convert it to float32 first")
        log.warning("bfloat16 model: onnxruntime's CPU provider cannot run it, so a float32 copy is scored and "
                    "pruned; the output is written in bfloat16 (checked by onnx.checker only; no latency)")
        model = float32_shadow(model)
        args.no_latency = True
    data = load_calibration(args.calib, model, labels=args.labels, image_options=_image_options(args),
                            strict=args.strict, max_samples=args.max_samples)
    plan = ()
    if args.plan:
        try:
            with open(args.plan) as f:
                plan = tuple(json.load(f)["removed_ids"])
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f"--plan {args.plan}: not a report written by --report ({exc})") from None
    if args.batch_size < 1:
        raise InputError("--batch-size must be >= 1")
    criterion = CriterionOptions(metrics=tuple(metrics), scope=args.scope, schedule=args.schedule,
                                 feature=args.feature, pca_dim=args.pca_dim, seed=args.seed, unit=args.unit,
                                 token_mask=tuple(args.token_mask))
    target = TargetOptions(remove=args.remove, target_flops=args.target_flops, min_agreement=args.min_agreement,
                           keep_per_stage=args.keep_per_stage, only=args.only, exclude=args.exclude, plan=plan)
    run = RunOptions(batch_size=args.batch_size, holdout=args.holdout, threads=args.threads,
                     progress=not args.quiet, input_shapes=_input_shapes(args.input_shape))
    between = None
    if args.finetune_between:
        from .recover import between_removals, require_torch

        require_torch()
        train = load_calibration(args.train, model, strict=args.strict) if args.train else data
        between = between_removals(model, train, config=_finetune_config(args, epochs=1), steps=args.finetune_between)
    try:
        result = prune(model, data, criterion=criterion, target=target, run=run, between=between)
    except (Exception, KeyboardInterrupt) as exc:
        partial = getattr(exc, "partial_result", None)
        if args.keep_partial and partial is not None:
            _write_partial(args, partial, exc, original, model, data, out_path, external, input_sha, t_start)
        raise
    if original is not model:
        result.model = _apply_to_original(original, result)

    sample = next(data.batches(args.batch_size))
    latency = None
    if result.removals and not args.no_latency:
        from .bench import random_feed

        latency = {}
        for bs in sorted({1, args.batch_size}):
            feed = random_feed(model, bs, sample)
            before, after = measure_latency([model, result.model], feed, runs=args.latency_runs,
                                            threads=args.threads or os.cpu_count())
            latency[str(bs)] = {"before_ms": before.median_ms, "after_ms": after.median_ms,
                                "before_p90_ms": before.p90_ms, "after_p90_ms": after.p90_ms,
                                "threads": before.threads, "opt_level": before.opt_level, "runs": before.runs,
                                "spinning": before.spinning}
    finetune_info, exit_code = None, 0
    if args.finetune_epochs and result.removals:
        finetune_info, exit_code = _finetune(args, model, result, data)
    report = build_report(result, options=_options(args), input_path=os.path.abspath(args.input),
                          input_sha256=input_sha, latency=latency, finetune=finetune_info)
    report["seconds"] = round(time.perf_counter() - t_start, 2)
    print(summary_table(report))
    wrote = False
    if result.removals or args.force_write:
        stamp(result.model, report)
        _save(result.model, out_path, sample if original is model else None, args.threads, external)
        wrote = True
        print(f"\nWrote {out_path}")
    else:
        print("\nNo block removed: nothing written (use --force-write to write the model anyway).")
    if args.report:
        report["output"] = out_path if wrote else None
        _write_report(report, args.report)
    if exit_code:
        print(f"onnx-cprune: error: {finetune_info['error']}; the pruned model (not fine-tuned) was written",
              file=sys.stderr)
    return exit_code


def _options(args) -> dict:
    """The command's options as the report records them."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
            if k not in ("debug", "quiet", "func")}


def _save(model, out_path: str, sample, threads, external: bool) -> None:
    """Atomic, checked write (one onnxruntime run of the first sample unless ``sample`` is None)."""
    from .io import save_model_atomic

    feed = None if sample is None else {k: v[:1] for k, v in sample.items()}
    try:
        save_model_atomic(model, out_path, feed, threads=threads, external_data=external)
    except OSError as exc:
        raise InputError(f"cannot write {out_path}: {exc.strerror or exc}") from None


def _write_report(report: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2, default=_jsonable)
    os.replace(tmp, path)
    print(f"Wrote report {path}")


def _check_data_file_free(out_path: str, model) -> None:
    """The output's external-data file (``<output>.data``) must not be one the input reads its weights from
    (``model`` as ``load_model_and_layout`` returns it: external locations are absolute)."""
    data_out = out_path + ".data"
    if not os.path.exists(data_out):
        return
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location" and os.path.exists(entry.value) and os.path.samefile(entry.value, data_out):
                raise InputError(f"the output's weights would go to {data_out}, which holds the input's weights; "
                                 "choose another output name")


def _apply_to_original(original, result):
    """The removals ``result`` found on the float32 shadow, applied to the (bfloat16) original."""
    from .graph.surgery import remove_blocks

    return remove_blocks(original, [r.block for r in result.removals]) if result.removals else original


def _write_partial(args, partial, exc, original, model, data, out_path, external, input_sha, t_start) -> None:
    """--keep-partial: write the model with the removals done so far and a report with the scores so far."""
    from .report import build_report, stamp

    report = build_report(partial, options=_options(args), input_path=os.path.abspath(args.input), input_sha256=input_sha)
    report.update(partial=True, error=f"{type(exc).__name__}: {exc}", seconds=round(time.perf_counter() - t_start, 2))
    report["output"] = None
    if partial.removals:
        pruned = _apply_to_original(original, partial) if original is not model else partial.model
        stamp(pruned, report)
        _save(pruned, out_path, next(data.batches(1)) if original is model else None, args.threads, external)
        report["output"] = out_path
        print(f"--keep-partial: wrote {out_path} with the {len(partial.removals)} removal(s) done before the failure",
              file=sys.stderr)
    if args.report:
        _write_report(report, args.report)


def _finetune_config(args, epochs: int):
    from .bridge import FinetuneConfig

    return FinetuneConfig(epochs=epochs, lr=args.lr, batch_size=args.ft_batch_size, optimizer=args.optimizer,
                          temperature=args.temperature, feature_mse=args.feature_mse, feature=args.feature,
                          augment=args.augment, seed=args.seed, device=args.device, threads=args.threads)


def _finetune(args, original, result, calib) -> tuple[dict, int]:
    """Fine-tune ``result.model`` in place of the pruned model; on failure keep the pruned model (exit 4)."""
    from .data import load_calibration
    from .errors import FinetuneError
    from .recover import finetune_pruned

    train = calib
    if args.train:
        train = load_calibration(args.train, original, strict=args.strict)
    else:
        log.warning("fine-tuning on the calibration data (%d samples): a few hundred samples will overfit; "
                    "give more with --train DIR", calib.n_samples)
    eval_data = load_calibration(args.eval, original, strict=args.strict) if args.eval else None
    config = _finetune_config(args, args.finetune_epochs)
    info = {"mode": "supervised" if train.labels is not None else "distillation", "epochs": args.finetune_epochs,
            "train_samples": train.n_samples, "eval": args.eval}
    try:
        tuned, res, before, after, original_metric = finetune_pruned(
            original, result.model, train, config=config, eval_data=eval_data, threads=args.threads,
            progress=not args.quiet)
    except FinetuneError as exc:
        info["error"] = str(exc)
        return info, exc.exit_code
    except Exception as exc:  # e.g. onnxruntime failing on the teacher or the evaluation midway
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        info["error"] = f"fine-tuning failed: {type(exc).__name__}: {first}"
        return info, FinetuneError.exit_code
    except KeyboardInterrupt:
        if not args.keep_partial:
            raise
        info["error"] = "fine-tuning interrupted (--keep-partial)"
        return info, 130
    result.model = tuned
    info.update(metric_original=original_metric, metric_before=before, metric_after=after, best_epoch=res.best_epoch,
                images_seen=res.images_seen, seconds=round(res.seconds, 2), history=res.history,
                metric="accuracy" if (eval_data is not None and eval_data.labels is not None) else "agreement")
    return info, 0


def _jsonable(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def cmd_bench(args) -> int:
    from .bench import measure_latency, random_feed
    from .graph.flops import count_cost
    from .graph.ir import load_model

    models = [load_model(p) for p in args.models]
    shapes = _input_shapes(args.input_shape)
    costs = [count_cost(m, shapes) for m in models]
    sample = None
    if args.data:
        from .data import load_calibration

        data = load_calibration(args.data, models[0])
        sample = next(data.batches(max(args.batch_sizes)))
    rows = []
    for bs in args.batch_sizes:
        feed = random_feed(models[0], bs, sample)
        lats = measure_latency(models, feed, runs=args.runs, warmup=args.warmup, threads=args.threads,
                               spinning=True if args.spin_wait else None)
        for path, lat, cost in zip(args.models, lats, costs):
            rows.append({"model": path, "batch_size": bs, "median_ms": lat.median_ms, "p90_ms": lat.p90_ms,
                         "ratio": lat.median_ms / lats[0].median_ms, "macs": cost.total_macs,
                         "params": cost.params, "threads": lat.threads, "runs": lat.runs,
                         "opt_level": lat.opt_level, "spinning": lat.spinning})
    if args.eval:
        _bench_eval(args, models, rows)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if args.eval:
        for r in rows[:len(models)]:
            acc = f"accuracy {r['accuracy']:.4f}, " if r.get("accuracy") is not None else ""
            print(f"{r['model']}: {acc}top-1 agreement with the first model {r['agreement']:.4f} "
                  f"({r['eval_samples']} samples)")
    spin = "on" if rows[0]["spinning"] else "off"
    alternated = f"models alternated, intra-op spinning {spin}" if len(models) > 1 else f"intra-op spinning {spin}"
    print(f"onnxruntime CPU, {args.threads} intra-op thread(s), graph optimisation: all, "
          f"{args.runs} timed runs after {args.warmup} warm-up, {alternated}")
    print(f"{'batch':>5}  {'p50 ms':>9}  {'p90 ms':>9}  {'ratio':>6}  {'MACs':>13}  {'params':>10}  model")
    for r in rows:
        macs = f"{r['macs']:,}" if r["macs"] is not None else "unknown"
        print(f"{r['batch_size']:>5}  {r['median_ms']:>9.3f}  {r['p90_ms']:>9.3f}  {r['ratio']:>6.3f}  "
              f"{macs:>13}  {r['params']:>10,}  {r['model']}")
    return 0


def _bench_eval(args, models, rows) -> None:
    """Fill accuracy / agreement with the first model into ``rows`` (same values for every batch size)."""
    import numpy as np

    from .data import load_calibration
    from .evaluate import compare, reference_outputs

    data = load_calibration(args.eval, models[0])
    idx = np.arange(data.n_samples)
    outs = [reference_outputs(m, data, idx, threads=args.threads) for m in models]
    for k, out in enumerate(outs):
        f = compare(out, outs[0], data.labels)
        for r in rows:
            if r["model"] == args.models[k]:
                r.update(accuracy=f.accuracy, agreement=f.agreement, rel_error=f.rel_error, eval_samples=f.n)


def _terminate(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "prune")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="onnx-cprune: %(levelname)s: %(message)s")
    signal.signal(signal.SIGTERM, _terminate)
    handler = {"prune": cmd_prune, "inspect": cmd_inspect, "bench": cmd_bench}[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        kept = getattr(args, "keep_partial", False)
        print(f"onnx-cprune: interrupted{'' if kept else '; nothing written'}", file=sys.stderr)
        return 130
    except ConsensusError as exc:
        if args.debug:
            raise
        print(f"onnx-cprune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # an unexpected failure still gets one line; --debug shows the traceback
        if args.debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"onnx-cprune: error: {type(exc).__name__}: {first} (rerun with --debug for details)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
