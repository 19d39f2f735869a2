"""PyTorch bridge: run, train and write back an ONNX graph with torch ops.

    from onnx_consensus.bridge import to_torch, write_back, finetune, FinetuneConfig, FinetuneResult
    from onnx_consensus.bridge import OnnxModule, check_supported

to_torch(model) -> OnnxModule; write_back(module, model) -> a copy of model holding the module's
weights; finetune(student, train_batches, teacher=..., config=...) -> (model, FinetuneResult);
check_supported(model) raises UnsupportedOperatorError naming every unsupported operator.
"""
from . import ops_math, ops_nn, ops_tensor  # noqa: F401  (register the converters)
from . import ops_rnn  # noqa: F401  (LSTM, GRU, RNN)
from .finetune import FinetuneConfig, FinetuneResult, finetune
from .ops import check_supported, register_op
from .torch_graph import OnnxModule, to_torch, write_back

__all__ = ["to_torch", "write_back", "finetune", "FinetuneConfig", "FinetuneResult", "OnnxModule",
           "check_supported", "register_op"]
