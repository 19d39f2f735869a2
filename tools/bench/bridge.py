"""Training throughput of the PyTorch bridge vs the same network written natively in PyTorch.

One step = forward + cross-entropy + backward + SGD(momentum) step, at a fixed batch size and a pinned
torch thread count. Two graph forms of a CIFAR ResNet (default ResNet-56):

* bn:     BatchNormalization nodes kept (classic exporter, training=PRESERVE) vs the native model;
* folded: BN folded into Conv (classic exporter, eval mode) vs a native copy with BN folded into its
          convolutions (done here in torch), so both sides run the same arithmetic.

Native and bridge runs alternate in rounds (the machine may be shared); the median images/s over the
rounds is reported with the bridge/native ratio.

    python tools/bench/bridge.py [--depth 56] [--batch 64] [--threads 1] [--steps 5] [--rounds 3]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import onnx
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from models.cifar_resnet import BasicBlock, export_onnx, resnet  # noqa: E402
from onnx_consensus.bridge import to_torch  # noqa: E402


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, bias=True)
    with torch.no_grad():
        out.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
        b = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        out.bias.copy_((b - bn.running_mean) * scale + bn.bias)
    return out


def fold_bn(net: nn.Module) -> nn.Module:
    """A copy of a CifarResNet with every BatchNorm2d folded into the preceding convolution."""
    net = copy.deepcopy(net).eval()
    net.conv1, net.bn1 = _fold(net.conv1, net.bn1), nn.Identity()
    for m in net.modules():
        if isinstance(m, BasicBlock):
            m.conv1, m.bn1 = _fold(m.conv1, m.bn1), nn.Identity()
            m.conv2, m.bn2 = _fold(m.conv2, m.bn2), nn.Identity()
            if isinstance(m.shortcut, nn.Sequential):
                m.shortcut = nn.Sequential(_fold(m.shortcut[0], m.shortcut[1]))
    return net


def _time_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, opt) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=56)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--forms", default="bn,folded")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = resnet(args.depth).eval()
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for form in args.forms.split(","):
            path = os.path.join(tmp, f"resnet{args.depth}-{form}.onnx")
            export_onnx(base, path, opset=17, fold_bn=form == "folded")
            native = fold_bn(base) if form == "folded" else copy.deepcopy(base)
            with torch.no_grad():  # same function before training: the fold is exact up to rounding
                ref = base(x)
                if not torch.allclose(native.eval()(x), ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max())):
                    raise SystemExit(f"{form}: the native model does not match the reference")
            bridge = to_torch(onnx.load(path))
            runs = {"native": native.train(), "bridge": bridge.train()}
            opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in runs.items()}
            for k, m in runs.items():
                _time_steps(m, x, y, args.warmup, opts[k])
            ips: dict[str, list[float]] = {k: [] for k in runs}
            for _ in range(args.rounds):
                for k, m in runs.items():
                    ips[k].append(args.batch * args.steps / _time_steps(m, x, y, args.steps, opts[k]))
            nat, bri = statistics.median(ips["native"]), statistics.median(ips["bridge"])
            rows.append((form, nat, bri, bri / nat))
    print(f"ResNet-{args.depth} training throughput, batch {args.batch}, torch threads {args.threads}, "
          f"{args.rounds} rounds x {args.steps} steps (median)")
    print(f"{'graph form':<12}{'native img/s':>14}{'bridge img/s':>14}{'ratio':>8}")
    for form, nat, bri, ratio in rows:
        print(f"{form:<12}{nat:>14.1f}{bri:>14.1f}{ratio:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
