"""PyTorch definitions of the reference networks and their ONNX export (not part of the installed package)."""
