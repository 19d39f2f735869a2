"""`python -m onnx_consensus.cli ...` (kept for scripts; `python -m onnx_consensus` is the short form)."""
import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
