"""`onnx-cprune prune`: options -> ``pipeline.run`` -> print the summary -> ``pipeline.write``, one path for block
models and decoder LLMs (a model file or an export folder)."""
from __future__ import annotations

import sys

from .. import pipeline
from ..options import Options


def cmd_prune(args) -> int:
    options = Options.from_args(args)
    source = pipeline.open_model(args.input, follow_symlinks=options.data.follow_symlinks)
    out_path = pipeline.check_output(args.output, source)
    progress = (lambda msg: print(msg, file=sys.stderr)) if options.run.progress else None
    outcome = pipeline.run(source, args.calib, options, progress=progress)
    if outcome.failure is not None:  # --keep-partial: write what was done, then fail as the run failed
        written = pipeline.write(outcome, out_path)
        if written.model:
            print(f"--keep-partial: wrote {out_path} with the {len(outcome.result.removals)} removal(s) done "
                  "before the failure", file=sys.stderr)
        if written.report:
            print(f"Wrote report {written.report}")
        raise outcome.failure.__cause__
    print(pipeline.summary(outcome.report))
    written = pipeline.write(outcome, out_path)
    unit = "layer" if outcome.decoder is not None else "block"
    if written.model:
        print(f"\nWrote {written.model}")
    elif outcome.result is not None and outcome.result.removals:
        print(f"\nNothing written: {outcome.result.small_saving} (use --force-write to write the model anyway).")
    else:
        print(f"\nNo {unit} removed: nothing written (use --force-write to write the model anyway).")
    if written.report:
        print(f"Wrote report {written.report}")
    if outcome.exit_code:
        print(f"onnx-cprune: error: {outcome.finetune['error']}; the pruned model (not fine-tuned) was written",
              file=sys.stderr)
    return outcome.exit_code
