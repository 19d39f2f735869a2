"""`python -m onnx_consensus ...` is `onnx-cprune ...`."""
import sys

from .cli import main, settle

if __name__ == "__main__":
    sys.exit(settle(main()))
