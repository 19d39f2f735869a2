"""`onnx-cprune prune`: options -> ``pipeline.run`` -> ``pipeline.write``, and what to print."""
from __future__ import annotations

import os
import sys

from .. import pipeline
from ..options import Options
from ..report import summary_table


def cmd_prune(args) -> int:
    options = Options.from_args(args)
    if os.path.isdir(args.input):
        return _prune_decoder(args, options)
    source = pipeline.open_model(args.input)
    from ..llm.run import is_decoder

    if is_decoder(source.model):
        return _prune_decoder(args, options)
    out_path = pipeline.check_output(args.output, source)
    outcome = pipeline.run(source, args.calib, options)
    if outcome.failure is not None:  # --keep-partial: write what was done, then fail as the run failed
        written = pipeline.write(outcome, out_path)
        if written.model:
            print(f"--keep-partial: wrote {out_path} with the {len(outcome.result.removals)} removal(s) done "
                  "before the failure", file=sys.stderr)
        if written.report:
            print(f"Wrote report {written.report}")
        raise outcome.failure.__cause__
    print(summary_table(outcome.report))
    written = pipeline.write(outcome, out_path)
    if written.model:
        print(f"\nWrote {out_path}")
    elif outcome.result.removals:
        print(f"\nNothing written: {outcome.result.small_saving} (use --force-write to write the model anyway).")
    else:
        print("\nNo block removed: nothing written (use --force-write to write the model anyway).")
    if written.report:
        print(f"Wrote report {written.report}")
    if outcome.exit_code:
        print(f"onnx-cprune: error: {outcome.finetune['error']}; the pruned model (not fine-tuned) was written",
              file=sys.stderr)
    return outcome.exit_code


def _prune_decoder(args, options: Options) -> int:
    """A decoder LLM with a KV cache (a model file, or an export folder): ``llm.run``."""
    from ..errors import InputError
    from ..llm.run import prune_decoder, summary, write_decoder

    t = options.target
    if options.output.quantize or t.target_latency is not None or t.target_latency_ms is not None:
        raise InputError("--quantize and --target-latency are not supported for decoder LLMs with a KV cache yet: "
                         "prune with --remove N, then quantize with onnxruntime-genai's builder (-p int4)")

    out = os.path.abspath(args.output)
    if os.path.isdir(args.input):
        if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
            raise InputError(f"output folder exists and is not empty: {out}")
    elif not args.output.endswith(".onnx"):
        raise InputError("the input is a model file: give a .onnx output path (or prune the export folder)")
    progress = (lambda msg: print(msg, file=sys.stderr)) if options.run.progress else None
    outcome = prune_decoder(args.input, args.calib, options, progress=progress)
    for w in outcome.warnings:
        print(f"onnx-cprune: warning: {w}", file=sys.stderr)
    print(summary(outcome.report))
    written = write_decoder(outcome, out)
    print(f"\nWrote {written}" if written else "\nNo layer removed: nothing written (use --force-write).")
    if options.output.report:
        from ..pipeline import write_report

        print(f"Wrote report {write_report(outcome.report, options.output.report)}")
    return outcome.exit_code
