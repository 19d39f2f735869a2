"""A CIFAR-style MobileNetV2 (Sandler et al. 2018) for (N, 3, 32, 32) float32 input -> (N, classes) logits.

Differences from the ImageNet model: a stride-1 stem and stride 1 in the first two stages (32x32
input), as usual for CIFAR. Inverted residual blocks: 1x1 expansion (factor t) -> 3x3 depthwise ->
1x1 linear projection, ReLU6 activations, identity shortcut when stride is 1 and widths match (those are
the residual blocks depth pruning can remove). ``width_mult`` scales every width (rounded to multiples
of 8, never below 8); ``stages`` truncates the (t, c, n, s) table for small test models.
"""
from __future__ import annotations

import torch
from torch import nn

from .cifar_resnet import export_onnx  # noqa: F401  (same export helper: folded / BN kept / dynamo)

# (expansion t, output channels c, repeats n, first stride s)
CIFAR_CONFIG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1)]


def _width(c: float) -> int:
    return max(8, int(c + 4) // 8 * 8)


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6(inplace=False))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn(cin, hidden, 1))
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden), _conv_bn(hidden, cout, 1, act=False)]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, width_mult: float = 1.0, stages: int | None = None,
                 last_channels: int = 1280, in_channels: int = 3):
        super().__init__()
        cin = _width(32 * width_mult)
        layers: list[nn.Module] = [_conv_bn(in_channels, cin, 3, 1)]
        for t, c, n, s in CIFAR_CONFIG[:stages]:
            cout = _width(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        last = _width(last_channels * max(1.0, width_mult)) if stages is None else _width(4 * cin)
        layers.append(_conv_bn(cin, last, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(x)


def mobilenet_v2(num_classes: int = 10, width_mult: float = 1.0, stages: int | None = None) -> MobileNetV2:
    return MobileNetV2(num_classes, width_mult, stages)
