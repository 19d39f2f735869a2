"""onnx-consensus: depth pruning of ONNX models by the Consensus criterion."""

__version__ = "0.1.0"
