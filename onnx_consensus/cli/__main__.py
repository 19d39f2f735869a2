"""`python -m onnx_consensus.cli ...` (kept for scripts; `python -m onnx_consensus` is the short form)."""
import sys

from . import main, settle

if __name__ == "__main__":
    sys.exit(settle(main()))
