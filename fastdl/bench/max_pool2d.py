"""Benchmark cases for max_pool2d: ResNet-50's stem pool (3x3, stride 2, padding 1) on the stem
convolution's output (N, 64, 112, 112) -> (N, 64, 56, 56), N = 32 and 256, in both layouts.

Pooling does no arithmetic worth counting (FLOPs 0): its floor is bytes over the copy bandwidth,
so the records' gbps and bandwidth_fraction are the numbers (the issue's target: >= 85% of the
memory bandwidth). The bytes no implementation can avoid:
  forward   read the input, write the output, and (inputs require grad: a training step) write
            which tap of each window won, ceil(log2(KH * KW)) bits per output (4 for 3x3);
  backward  read grad_out and that choice, write grad_input;
  forward+backward  both.
torch writes an 8-byte index per output instead of the 4 bits; fastdl a 1-byte tap.
channels_last is the layout a channels_last ResNet runs in (fastdl's 16-byte path); NCHW is
torch's default, where fastdl reads strided rows (kernels/triton/max_pool2d.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import fastdl
from fastdl.bench.spec import DTYPES, OpSpec, Workload, random_tensor, register

STEM_CHANNELS, STEM_SIZE = 64, 112  # ResNet-50's stem convolution output: (N, 64, 112, 112)
BATCHES = (32, 256)
QUICK_BATCHES = (32,)
LAYOUTS = ("channels_last", "NCHW")
KERNEL, STRIDE, PADDING = 3, 2, 1


def _workloads(quick: bool) -> list[Workload]:
    batches = QUICK_BATCHES if quick else BATCHES
    dtypes = ("bf16", "fp32") if quick else ("bf16", "fp16", "fp32")
    return [Workload("max_pool2d", "stem", dt, (n, STEM_CHANNELS, STEM_SIZE, STEM_SIZE),
                     (("layout", layout),), f"{n} {layout}")
            for layout in LAYOUTS for dt in dtypes for n in batches]


def _inputs(w: Workload, seed: int) -> tuple:
    x = random_tensor(w.shape, DTYPES[w.dtype][0], seed=seed)
    if w.param["layout"] == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return (x.requires_grad_(),)


def output_shape(w: Workload) -> tuple[int, int, int, int]:
    n, c, h, wd = w.shape
    return n, c, (h + 2 * PADDING - KERNEL) // STRIDE + 1, (wd + 2 * PADDING - KERNEL) // STRIDE + 1


def _cost(w: Workload, mode: str) -> tuple[float, float]:
    e = DTYPES[w.dtype][0].itemsize
    inputs, outputs = math.prod(w.shape), math.prod(output_shape(w))
    choice = outputs * math.ceil(math.log2(KERNEL * KERNEL)) / 8
    fwd = e * (inputs + outputs) + choice
    bwd = e * (outputs + inputs) + choice
    return {"forward": (0.0, fwd), "backward": (0.0, bwd), "forward+backward": (0.0, fwd + bwd)}[mode]


MAX_POOL2D = register(OpSpec(
    "max_pool2d", _workloads, _inputs,
    lambda w: lambda x: F.max_pool2d(x, KERNEL, STRIDE, PADDING),
    lambda w: lambda x: fastdl.functional.max_pool2d(x, KERNEL, STRIDE, PADDING),
    _cost))
