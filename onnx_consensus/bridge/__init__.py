"""PyTorch bridge: run and write back an ONNX graph with torch ops.

    from onnx_consensus.bridge import to_torch, write_back, OnnxModule, check_supported

to_torch(model) -> OnnxModule; write_back(module, model) -> a copy of model holding the module's
weights; check_supported(model) raises UnsupportedOperatorError naming every unsupported operator.
Training it is ``finetune.train.finetune``; the distillation loss per output kind is ``losses``; data-parallel
training under torchrun is ``distributed``.
"""
from . import ops_math, ops_nn, ops_tensor  # noqa: F401  (register the converters)
from . import ops_rnn  # noqa: F401  (LSTM, GRU, RNN)
from .ops import check_supported, register_op
from .torch_graph import OnnxModule, to_torch, write_back

__all__ = ["to_torch", "write_back", "OnnxModule", "check_supported", "register_op"]
