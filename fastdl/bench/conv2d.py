"""Benchmark cases for conv2d: ResNet-50's convolution layers at batch 32 (the stem, the bottleneck
1x1 and 3x3 convolutions of each stage, the strided 3x3 and the 1x1 downsample), bf16 / fp16 / TF32,
channels_last and NCHW, no bias and no activation (ResNet's convolutions feed a batch norm).

TF32: torch's convolutions take TF32 from torch.backends.cudnn.allow_tf32 (on by default) and so do
fastdl's (fastdl/backends/triton/conv2d.py: input_precision), so the "tf32" cases run with the
default switch; there are no true-fp32 cases.

FLOPs 2 N P Q K (C/groups) R S per pass (backward: grad_input and grad_weight, two); the floor's bytes:
  forward   read input and weight, write the output;
  backward  read grad_out, input and weight, write grad_input and grad_weight;
  forward+backward  input, weight, output, grad_out, grad_input, grad_weight once each.
channels_last is the layout a channels_last ResNet runs in (the kernels' own); NCHW operands make
one layout change each way in fastdl (fastdl/backends/triton/conv2d.py: _nhwc).

conv2d_depthwise: MobileNetV2's depthwise 3x3 convolutions (groups == C, kernels/triton/
conv2d_depthwise.py) at batch 32, bf16 and fp32, both layouts; FLOPs 2 N P Q K R S, memory-bound:
the floor's bytes are what dominates (GB/s and the fraction of the floor are their figures).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import fastdl
from fastdl.bench.spec import DTYPES, OpSpec, Workload, random_tensor, register

BATCH = 32
# (label, C, H, W, K, kernel, stride, padding): ResNet-50 (torchvision v1.5: stride on the 3x3).
LAYERS = (
    ("stem 7x7/2", 3, 224, 224, 64, 7, 2, 3),
    ("conv2 1x1 64->256", 64, 56, 56, 256, 1, 1, 0),
    ("conv2 3x3 64", 64, 56, 56, 64, 3, 1, 1),
    ("conv3 3x3/2 128", 128, 56, 56, 128, 3, 2, 1),
    ("conv3 1x1/2 downsample 256->512", 256, 56, 56, 512, 1, 2, 0),
    ("conv4 3x3 256", 256, 14, 14, 256, 3, 1, 1),
    ("conv4 1x1 1024->256", 1024, 14, 14, 256, 1, 1, 0),
    ("conv5 3x3 512", 512, 7, 7, 512, 3, 1, 1),
)
QUICK_LAYERS = ("stem 7x7/2", "conv2 3x3 64", "conv4 1x1 1024->256")
LAYOUTS = ("channels_last", "NCHW")
# MobileNetV2's depthwise 3x3 convolutions (label, C, H, W, stride): stage 2's first block (stride 2
# on 96 x 112 x 112), the 144-channel blocks at 56 x 56 (stride 1 and 2), a 384-channel block at
# 14 x 14 and the last 960-channel one at 7 x 7.
DEPTHWISE_LAYERS = (
    ("dw 3x3/2 96", 96, 112, 112, 2),
    ("dw 3x3 144", 144, 56, 56, 1),
    ("dw 3x3/2 144", 144, 56, 56, 2),
    ("dw 3x3 384", 384, 14, 14, 1),
    ("dw 3x3 960", 960, 7, 7, 1),
)
QUICK_DEPTHWISE = ("dw 3x3/2 96", "dw 3x3 144")


def _workloads(quick: bool) -> list[Workload]:
    layers = [l for l in LAYERS if l[0] in QUICK_LAYERS] if quick else LAYERS
    dtypes = ("bf16", "tf32") if quick else ("bf16", "fp16", "tf32")
    return [Workload("conv2d", "resnet50", dt, (BATCH, c, h, wd, k, r, r),
                     (("stride", stride), ("padding", padding), ("layout", layout)), f"{label} {layout}")
            for layout in LAYOUTS for dt in dtypes for label, c, h, wd, k, r, stride, padding in layers]


def _depthwise_workloads(quick: bool) -> list[Workload]:
    layers = [l for l in DEPTHWISE_LAYERS if l[0] in QUICK_DEPTHWISE] if quick else DEPTHWISE_LAYERS
    layouts = LAYOUTS[:1] if quick else LAYOUTS
    return [Workload("conv2d_depthwise", "mobilenetv2", dt, (BATCH, c, h, wd, c, 3, 3),
                     (("stride", stride), ("padding", 1), ("groups", c), ("layout", layout)), f"{label} {layout}")
            for layout in layouts for dt in ("bf16", "fp32") for label, c, h, wd, stride in layers]


def _inputs(w: Workload, seed: int) -> tuple:
    n, c, h, wd, k, r, s = w.shape
    c_g = c // w.param.get("groups", 1)
    dtype = DTYPES[w.dtype][0]
    x = random_tensor((n, c, h, wd), dtype, seed=2 * seed)
    weight = random_tensor((k, c_g, r, s), dtype, seed=2 * seed + 1, scale=(c_g * r * s) ** -0.5)
    if w.param["layout"] == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        weight = weight.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(), weight.requires_grad_()


def output_shape(w: Workload) -> tuple[int, int, int, int]:
    n, c, h, wd, k, r, s = w.shape
    stride, padding = w.param["stride"], w.param["padding"]
    return n, k, (h + 2 * padding - r) // stride + 1, (wd + 2 * padding - s) // stride + 1


def _cost(w: Workload, mode: str) -> tuple[float, float]:
    n, c, h, wd, k, r, s = w.shape
    e = DTYPES[w.dtype][0].itemsize
    c_g = c // w.param.get("groups", 1)
    _, _, p, q = output_shape(w)
    flops = 2.0 * n * p * q * k * c_g * r * s
    x, weight, out = n * c * h * wd, k * c_g * r * s, n * k * p * q
    fwd = e * (x + weight + out)
    bwd = e * (out + x + weight + x + weight)
    both = e * (x + weight + out + out + x + weight)
    return {"forward": (flops, fwd), "backward": (2 * flops, bwd), "forward+backward": (3 * flops, both)}[mode]


def _torch(w: Workload):
    stride, padding, groups = w.param["stride"], w.param["padding"], w.param.get("groups", 1)
    return lambda x, weight: F.conv2d(x, weight, None, stride, padding, 1, groups)


def _fastdl(w: Workload):
    stride, padding, groups = w.param["stride"], w.param["padding"], w.param.get("groups", 1)
    return lambda x, weight: fastdl.functional.conv2d(x, weight, None, stride, padding, 1, groups)


CONV2D = register(OpSpec("conv2d", _workloads, _inputs, _torch, _fastdl, _cost))
CONV2D_DEPTHWISE = register(OpSpec("conv2d_depthwise", _depthwise_workloads, _inputs, _torch, _fastdl, _cost))
