"""A small anchor-free detector in the style of Ultralytics YOLOv8 (C2f backbone with residual bottlenecks, a
PAN neck, a decoupled head at strides 8 and 16), with the two export layouts people deploy.

* layout "concat" (Ultralytics' ONNX export): one output ``output0`` (N, 4 + C, A): boxes cx, cy, w, h in input
  pixels (DFL: softmax over ``reg_max`` bins per side, expectation, dist2bbox, times the stride) concatenated
  with sigmoid class scores along axis 1. A = (S/8)^2 + (S/16)^2 anchors.
* layout "split" (YOLO-NAS / SSD-style export): two outputs ``boxes`` (N, A, 4) x1, y1, x2, y2 in input pixels
  and ``scores`` (N, A, C) sigmoid class scores. With ``dfl=False`` the box side distances are a plain
  regression (softplus of 4 channels, times the stride) instead of DFL.

Input ``images`` (N, 3, S, S) float32 RGB in [0, 1] (tools/data/det_scenes.py letterbox). Residual blocks: the
bottlenecks of the backbone's C2f modules (x + cv2(cv1(x))); the neck's C2f have no shortcut (as in YOLOv8).
BatchNormalization is folded into the convolutions before export (Ultralytics' fuse()).
"""
from __future__ import annotations

import torch
from torch import nn


class Conv(nn.Module):
    """Conv2d (no bias) + BatchNorm + SiLU; after fuse() a biased Conv2d + SiLU."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)) if self.bn is not None else self.conv(x))

    def fuse(self) -> None:
        w, bn = self.conv.weight, self.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        fused = nn.Conv2d(self.conv.in_channels, self.conv.out_channels, self.conv.kernel_size, self.conv.stride,
                          self.conv.padding, bias=True)
        fused.weight.data = w.data * scale[:, None, None, None]
        fused.bias.data = bn.bias.data - bn.running_mean * scale
        self.conv, self.bn = fused, None


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool = True):
        super().__init__()
        self.cv1, self.cv2, self.add = Conv(c, c, 3), Conv(c, c, 3), shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """Ultralytics C2f: 1x1 conv to 2c, split in two halves, n bottlenecks on the second, concat all, 1x1 conv."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True):
        super().__init__()
        self.c = c2 // 2
        self.cv1 = Conv(c1, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).split((self.c, self.c), 1))  # Ultralytics' forward_split: exports as one Split
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class TinyDetector(nn.Module):
    """See the module docstring. ``forward(x, raw=True)`` returns the training tensors per level:
    [(box (N, 4 * reg_max or 4, h, w), cls logits (N, C, h, w))]."""

    strides = (8, 16)

    def __init__(self, num_classes: int = 10, size: int = 128, layout: str = "concat", dfl: bool = True,
                 reg_max: int = 16, widths: tuple[int, ...] = (16, 32, 48, 64), depths: tuple[int, ...] = (1, 2, 2)):
        super().__init__()
        if layout not in ("concat", "split"):
            raise ValueError(f"layout must be 'concat' or 'split', got {layout!r}")
        w0, w1, w2, w3 = widths
        self.nc, self.size, self.layout, self.dfl, self.reg_max = num_classes, size, layout, dfl, reg_max
        self.stem = Conv(3, w0, 3, 2)
        self.s1 = nn.Sequential(Conv(w0, w1, 3, 2), C2f(w1, w1, depths[0]))
        self.s2 = nn.Sequential(Conv(w1, w2, 3, 2), C2f(w2, w2, depths[1]))   # P3, stride 8
        self.s3 = nn.Sequential(Conv(w2, w3, 3, 2), C2f(w3, w3, depths[2]))   # P4, stride 16
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.n3 = C2f(w3 + w2, w2, 1, shortcut=False)
        self.down = Conv(w2, w2, 3, 2)
        self.n4 = C2f(w2 + w3, w3, 1, shortcut=False)
        nb = 4 * reg_max if dfl else 4
        hc = 32
        self.box = nn.ModuleList(nn.Sequential(Conv(c, hc, 3), Conv(hc, hc, 3), nn.Conv2d(hc, nb, 1)) for c in (w2, w3))
        self.cls = nn.ModuleList(nn.Sequential(Conv(c, hc, 3), Conv(hc, hc, 3), nn.Conv2d(hc, num_classes, 1))
                                 for c in (w2, w3))
        for m in self.cls:
            nn.init.constant_(m[-1].bias, -4.6)  # prior 0.01 (Ultralytics' bias_init does the same idea)
        self.register_buffer("proj", torch.arange(reg_max, dtype=torch.float32), persistent=False)

    def levels(self, x):
        p3 = self.s2(self.s1(self.stem(x)))
        p4 = self.s3(p3)
        n3 = self.n3(torch.cat([self.up(p4), p3], 1))
        n4 = self.n4(torch.cat([self.down(n3), p4], 1))
        return [(self.box[i](f), self.cls[i](f)) for i, f in enumerate((n3, n4))]

    def anchors(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Anchor centres (A, 2) in grid units (+0.5) per level, concatenated, and strides (A, 1)."""
        pts, strides = [], []
        for s in self.strides:
            g = self.size // s
            yy, xx = torch.meshgrid(torch.arange(g, device=device), torch.arange(g, device=device), indexing="ij")
            pts.append(torch.stack([xx, yy], -1).reshape(-1, 2).float() + 0.5)
            strides.append(torch.full((g * g, 1), float(s), device=device))
        return torch.cat(pts), torch.cat(strides)

    def distances(self, box: torch.Tensor) -> torch.Tensor:
        """box (N, 4 * reg_max or 4, A) -> ltrb distances (N, 4, A) in grid units."""
        n, _, a = box.shape
        if self.dfl:
            p = box.view(n, 4, self.reg_max, a).softmax(2)
            return (p * self.proj.view(1, 1, -1, 1)).sum(2)
        return nn.functional.softplus(box)

    def forward(self, x, raw: bool = False):
        outs = self.levels(x)
        if raw:
            return outs
        n = x.shape[0]
        box = torch.cat([b.flatten(2) for b, _ in outs], 2)
        cls = torch.cat([c.flatten(2) for _, c in outs], 2)
        anc, st = self.anchors(x.device)
        d = self.distances(box)                                      # (N, 4, A)
        lt, rb = d[:, :2], d[:, 2:]
        c = anc.t().unsqueeze(0)
        x1y1, x2y2 = (c - lt) * st.t(), (c + rb) * st.t()
        scores = cls.sigmoid()
        if self.layout == "concat":
            xywh = torch.cat([(x1y1 + x2y2) / 2, x2y2 - x1y1], 1)
            return torch.cat([xywh, scores], 1)
        return torch.cat([x1y1, x2y2], 1).transpose(1, 2), scores.transpose(1, 2).reshape(n, -1, self.nc)

    def fuse(self) -> "TinyDetector":
        for m in self.modules():
            if isinstance(m, Conv) and m.bn is not None:
                m.fuse()
        return self

    @property
    def output_names(self) -> list[str]:
        return ["output0"] if self.layout == "concat" else ["boxes", "scores"]


def export_onnx(model: TinyDetector, path: str, opset: int = 17) -> None:
    """Fuse BN and export with torch's classic exporter, dynamic batch."""
    model = model.eval().fuse()
    x = torch.zeros(1, 3, model.size, model.size)
    names = model.output_names
    axes = {"images": {0: "batch"}, **{k: {0: "batch"} for k in names}}
    torch.onnx.export(model, (x,), path, input_names=["images"], output_names=names, dynamic_axes=axes,
                      opset_version=opset, do_constant_folding=True, dynamo=False)
    with torch.no_grad():
        y = model(x)
    chunks_to_split(path)
    static_output_dims(path, [tuple(o.shape[1:]) for o in (y if isinstance(y, tuple) else (y,))])


def chunks_to_split(path: str) -> None:
    """Replace each pair of Slice nodes that ``Tensor.chunk(2, 1)`` exports with a dynamic batch (Shape, Gather,
    Add, Div, Mul computing the bounds) by the equivalent Split (axis 1, two equal halves), as the C2f of an
    Ultralytics export has it, so that shape inference knows the halves' shapes. models/yolo8_fmnist.onnx was
    exported by the chunk version of C2f and rewritten so; the split version exports a Split directly."""
    import numpy as np
    import onnx
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(onnx.load(path))
    slices: dict[str, list] = {}
    for node in graph.nodes:
        if node.op == "Slice" and len(node.inputs) == 4:
            slices.setdefault(node.inputs[0].name, []).append(node)
    changed = False
    for pair in slices.values():
        if len(pair) != 2:
            continue
        first, second = sorted(pair, key=lambda n: n.name)  # "/m/Slice" (lower half), "/m/Slice_1" (upper)
        data = first.inputs[0]
        conv = data.inputs[0].inputs[0].inputs[0] if data.inputs and data.inputs[0].op == "Mul" else None
        if conv is None or conv.op != "Conv":
            continue
        half = int(conv.inputs[1].values.shape[0]) // 2
        split = gs.Constant(f"{first.name}_split_sizes", np.array([half, half], np.int64))
        outs = [first.outputs[0], second.outputs[0]]
        first.outputs.clear()
        second.outputs.clear()
        graph.nodes.append(gs.Node("Split", f"{first.name}_as_split", {"axis": 1}, [data, split], outs))
        changed = True
    if changed:
        graph.cleanup().toposort()
        onnx.save(gs.export_onnx(graph), path)


def static_output_dims(path: str, dims: list[tuple[int, ...]]) -> None:
    """Write the outputs' non-batch dims as numbers (the exporter leaves them symbolic after the Concat), as
    Ultralytics' export has them: (batch, 4 + C, A), (batch, A, 4), (batch, A, C)."""
    import onnx

    m = onnx.load(path)
    for out, ds in zip(m.graph.output, dims):
        for d, v in zip(out.type.tensor_type.shape.dim[1:], ds):
            d.Clear()
            d.dim_value = int(v)
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, path)
