"""`python -m onnx_consensus ...` is `onnx-cprune ...`."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
