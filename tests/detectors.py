"""Tiny detectors built here (torch export), with a block whose removal kills the class scores but not the boxes.

Backbone: a stride-4 stem (3 -> 8 channels), then two residual blocks ``x + conv(relu(conv(x)))``. Block
"mild" changes the features a little; block "evidence" writes 8 * relu(stem channel 0 - 0.3) into channel 7,
the only channel the class head reads (class logit = channel 7 - 3 + a class offset): without it every class
probability falls under 0.05, while the box head (channels 0-3) does not change at all. Boxes are decoded
as the exporters write it (grid + sigmoid offset) x stride, sizes exp(t) x stride, in pixels of a 128-pixel
image, so pixel boxes dominate any unweighted distance over the tensor.

Layouts: "yolov8" one output [N, 4 + C, A]; "yolov5" one output [N, A, 5 + C] (objectness = sigmoid of the
evidence channel); "boxes" two outputs boxes [N, A, 4] (xyxy pixels) and scores [N, A, C] (sigmoid).
"""
from __future__ import annotations

import io

import numpy as np
import onnx

C = 3
STRIDE = 32.0
SIDE = 4  # feature map side: A = 16 anchors


def build(layout: str = "yolov8") -> onnx.ModelProto:
    import torch
    from torch import nn

    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(8, 8, 1)
            self.b = nn.Conv2d(8, 8, 1)

        def forward(self, x):
            return x + self.b(torch.relu(self.a(x)))

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 4, stride=4)
            self.mild, self.evidence = Block(), Block()
            self.box = nn.Conv2d(8, 4, 1)
            self.cls = nn.Conv2d(8, C, 1)
            ys, xs = np.meshgrid(np.arange(SIDE), np.arange(SIDE), indexing="ij")
            self.register_buffer("grid", torch.tensor(np.stack([xs, ys]).reshape(1, 2, -1), dtype=torch.float32))
            with torch.no_grad():
                for blk, scale in ((self.mild, 0.02), (self.evidence, 0.0)):
                    for conv in (blk.a, blk.b):
                        conv.weight.mul_(scale)
                        conv.bias.zero_()
                e = self.evidence
                e.a.weight[0, 0, 0, 0], e.a.bias[0] = 1.0, -0.3
                e.b.weight[7, 0, 0, 0] = 8.0
                self.mild.b.weight[7].zero_()
                self.box.weight[:, 4:].zero_()
                self.cls.weight.zero_()
                self.cls.weight[:, 7, 0, 0] = 1.0
                self.cls.weight[:, 1, 0, 0] = torch.tensor([1.5, 0.0, -1.5])  # which class wins depends on the image
                self.cls.bias[:] = -3.0

        def forward(self, x):
            f = self.evidence(self.mild(self.stem(x)))
            t = self.box(f).flatten(2)  # (N, 4, A)
            xy = (torch.sigmoid(t[:, :2]) + self.grid) * STRIDE
            wh = torch.exp(t[:, 2:4]) * STRIDE
            scores = torch.sigmoid(self.cls(f).flatten(2))  # (N, C, A)
            if layout == "yolov8":
                return torch.cat([xy, wh, scores], 1)
            if layout == "yolov5":
                obj = torch.sigmoid(f[:, 7:8].flatten(2) - 3.0)
                return torch.cat([xy, wh, obj, scores], 1).permute(0, 2, 1)
            boxes = torch.cat([xy - wh / 2, xy + wh / 2], 1).permute(0, 2, 1)
            return boxes, scores.permute(0, 2, 1)

    names = ["output0"] if layout != "boxes" else ["boxes", "scores"]
    buf = io.BytesIO()
    torch.onnx.export(Tiny().eval(), torch.zeros(1, 3, 16, 16), buf, input_names=["images"], output_names=names,
                      dynamic_axes={"images": {0: "N"}, **{n: {0: "N"} for n in names}}, opset_version=17,
                      dynamo=False)
    return onnx.load_from_string(buf.getvalue())


def images(n: int = 50, seed: int = 0) -> np.ndarray:
    """(n, 3, 16, 16) float32 inputs: about half of the anchors of each image carry evidence."""
    return np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)


def evidence_block(model: onnx.ModelProto) -> str:
    """The id of the block whose removal kills the class scores (the second of the two)."""
    from onnx_consensus import find_blocks

    blocks = find_blocks(model).blocks
    assert len(blocks) == 2, [b.id for b in blocks]
    return blocks[1].id
