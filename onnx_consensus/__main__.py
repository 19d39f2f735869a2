"""`python -m onnx_consensus ...` is `onnx-cprune ...`."""
from .cli import exit_process, main

if __name__ == "__main__":
    exit_process(main())
