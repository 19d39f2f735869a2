"""CIFAR-style ResNets (He et al. 2016, section 4.2): depth 6n+2, three stages of n basic blocks.

Stage widths 16/32/64; stage 1 keeps an identity shortcut on its first block; stages 2 and 3 open with
stride 2 and a 1x1-conv + BN projection shortcut. Input (N, 3, 32, 32) float32 -> logits (N, num_classes).
ResNet-56 costs 125,747,840 conv+gemm MACs per 32x32 image; each basic block of 16/32/64 channels at
32/16/8 pixels costs 4,718,592 MACs.
"""
from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 56, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=False)
        layers = []
        in_ch = 16
        for stage, width in enumerate((16, 32, 64)):
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                layers.append(BasicBlock(in_ch, width, stride))
                in_ch = width
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.blocks(x)
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


def resnet(depth: int = 56, num_classes: int = 10) -> CifarResNet:
    return CifarResNet(depth, num_classes)


def export_onnx(
    model: nn.Module,
    path: str,
    *,
    opset: int = 17,
    fold_bn: bool = True,
    dynamo: bool = False,
    input_shape: tuple[int, ...] = (1, 3, 32, 32),
    input_name: str = "input",
    output_name: str = "logits",
) -> str:
    """Export ``model`` (put in eval mode) to ONNX with a dynamic batch axis.

    fold_bn=True: the classic exporter's eval mode, BatchNormalization folded into Conv.
    fold_bn=False: BatchNormalization kept as nodes (TrainingMode.PRESERVE on an eval-mode model).
    dynamo=True: torch's dynamo exporter (needs onnxscript; opset >= 18); its optimiser folds BN into Conv.
    """
    model = model.eval()
    x = torch.randn(*input_shape)
    if dynamo:
        batch = torch.export.Dim("batch", min=1, max=4096)
        onnx_program = torch.onnx.export(
            model, (x,), dynamo=True, opset_version=max(opset, 18),
            input_names=[input_name], output_names=[output_name],
            dynamic_shapes={"x": {0: batch}},
        )
        onnx_program.save(path)
        return path
    training = torch.onnx.TrainingMode.EVAL if fold_bn else torch.onnx.TrainingMode.PRESERVE
    torch.onnx.export(
        model, (x,), path, dynamo=False, opset_version=opset, training=training,
        do_constant_folding=True, input_names=[input_name], output_names=[output_name],
        dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
    )
    return path
