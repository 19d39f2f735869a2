"""`onnx-cprune prune`: options -> ``pipeline.run`` -> ``pipeline.write``, and what to print."""
from __future__ import annotations

import sys

from .. import pipeline
from ..options import Options
from ..report import summary_table


def cmd_prune(args) -> int:
    options = Options.from_args(args)
    source = pipeline.open_model(args.input)
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
    else:
        print("\nNo block removed: nothing written (use --force-write to write the model anyway).")
    if written.report:
        print(f"Wrote report {written.report}")
    if outcome.exit_code:
        print(f"onnx-cprune: error: {outcome.finetune['error']}; the pruned model (not fine-tuned) was written",
              file=sys.stderr)
    return outcome.exit_code
