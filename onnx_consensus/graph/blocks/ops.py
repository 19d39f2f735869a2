"""Operator vocabularies block detection reasons with (op types, never node or tensor names)."""
from __future__ import annotations

# Residual merges: two-operand Add, or Sum in old opsets.
MERGE_OPS = ("Add", "Sum")
# Ops that carry learned weights when one of their operands is an initializer, a Constant or computed from
# constants only: a residual branch needs one of them (the `x + 0.044715*x^3` inside a tanh-GELU has none).
WEIGHTED_OPS = ("Conv", "ConvTranspose", "DeformConv", "Gemm", "MatMul", "Einsum", "LSTM", "GRU", "RNN",
                "Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention", "QAttention",
                # quantized variants (a dynamically quantized model's Conv is a ConvInteger on int8 weights)
                "ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "QGemm", "MatMulNBits",
                "DynamicQuantizeLSTM")
# Single-op normalisations (a post-LN layer's norm after the merge).
NORM_OPS = ("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization")
# Ops of a decomposed normalisation (ReduceMean/Sub/Pow/Sqrt/Div, RMS: Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul).
DECOMPOSED_NORM_OPS = ("ReduceMean", "Sub", "Pow", "Mul", "Add", "Sqrt", "Div", "Reciprocal", "Cast")
ATTENTION_OPS = ("Softmax", "Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                 "PackedMultiHeadAttention", "DecoderMaskedMultiHeadAttention")
# onnxruntime transformer-optimizer ops that hide a residual merge inside them: seen, not removed.
FUSED_MERGE_OPS = ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "SkipGroupNorm",
                   "EmbedLayerNormalization")
# Ops a tensor passes through unchanged in value (only its layout or type changes).
PASS_THROUGH_OPS = ("Identity", "Transpose", "Reshape", "Cast", "Unsqueeze", "Squeeze")
