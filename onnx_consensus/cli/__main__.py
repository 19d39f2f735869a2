"""`python -m onnx_consensus.cli ...` (kept for scripts; `python -m onnx_consensus` is the short form)."""
from . import exit_process, main

if __name__ == "__main__":
    exit_process(main())
