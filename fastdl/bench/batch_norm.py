"""Benchmark cases for batch_norm: training batch norm on ResNet-50's activation shapes at batch 256
(the stem's output and each stage's narrow and wide activations), bf16 and fp32, channels_last and
NCHW, plain and with the fused ReLU and residual (a bottleneck block's last BN), float32
parameters and running statistics (what mixed-precision training keeps).

torch's side is eager F.batch_norm (cuDNN for fp32; torch sends bf16 to its native kernels, as
_select_batch_norm_backend does) and, for the fused variant, the unfused sequence
relu(batch_norm(x) + residual) that fastdl replaces; torch.compile of the same is the other column.

Batch norm does no arithmetic worth counting (FLOPs 0): the floor is bytes over the copy bandwidth,
so gbps and bandwidth_fraction are the numbers (the issue's targets: >= 85% of bandwidth, >= 1.3x
torch eager; fused >= 1.5x torch's unfused sequence). The bytes no implementation can avoid, A the
activation's elements, e its element size (the per-channel parameters are negligible):
  forward   read x, write out (2eA); fused: also read the residual and write which outputs were
            positive, 1 bit each, for backward (3eA + A/8);
  backward  read grad_out and x, write grad_input (3eA); fused: also read the bit and write the
            residual's gradient (4eA + A/8);
  forward+backward  both.
A training forward reads x twice in every implementation that does not keep it on chip (statistics,
then normalize) and the backward reads grad_out and x twice (reduction, then elementwise): the
records' bandwidth fraction shows how close the two-pass kernels get to the one-pass floor.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import fastdl
from fastdl.bench.spec import DTYPES, OpSpec, Workload, random_tensor, register

BATCH, QUICK_BATCH = 256, 32
# label, C, H (= W): ResNet-50's activations that a batch norm normalizes
SHAPES = (
    ("stem 64x112x112", 64, 112),
    ("stage1 64x56x56", 64, 56),
    ("stage1 256x56x56", 256, 56),
    ("stage2 512x28x28", 512, 28),
    ("stage3 1024x14x14", 1024, 14),
    ("stage4 2048x7x7", 2048, 7),
)
QUICK_SHAPES = ("stage1 64x56x56", "stage4 2048x7x7")
LAYOUTS = ("channels_last", "NCHW")
VARIANTS = ("bn", "bn+relu+residual")


def _workloads(quick: bool) -> list[Workload]:
    shapes = [s for s in SHAPES if s[0] in QUICK_SHAPES] if quick else SHAPES
    batch = QUICK_BATCH if quick else BATCH
    return [Workload("batch_norm", variant, dt, (batch, c, h, h), (("variant", variant), ("layout", layout)),
                     f"{label} {variant} {layout}")
            for variant in VARIANTS for layout in LAYOUTS for dt in ("bf16", "fp32") for label, c, h in shapes]


def _inputs(w: Workload, seed: int) -> tuple:
    """(x, weight, bias, running_mean, running_var[, residual]); x, weight, bias and the residual
    require grad."""
    dtype = DTYPES[w.dtype][0]
    C = w.shape[1]
    fmt = torch.channels_last if w.param["layout"] == "channels_last" else torch.contiguous_format
    x = random_tensor(w.shape, dtype, seed=4 * seed, scale=2.0).add_(0.5).contiguous(memory_format=fmt)
    weight = random_tensor((C,), torch.float32, seed=4 * seed + 1).add_(1.0)
    bias = random_tensor((C,), torch.float32, seed=4 * seed + 2)
    stats = (torch.zeros(C, device=x.device), torch.ones(C, device=x.device))
    tensors = (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()) + stats
    if w.param["variant"] == "bn":
        return tensors
    residual = random_tensor(w.shape, dtype, seed=4 * seed + 3).contiguous(memory_format=fmt)
    return tensors + (residual.requires_grad_(),)


def _cost(w: Workload, mode: str) -> tuple[float, float]:
    e = DTYPES[w.dtype][0].itemsize
    A = math.prod(w.shape)
    if w.param["variant"] == "bn":
        fwd, bwd = 2 * e * A, 3 * e * A
    else:
        fwd, bwd = 3 * e * A + A / 8, 4 * e * A + A / 8
    return {"forward": (0.0, fwd), "backward": (0.0, bwd), "forward+backward": (0.0, fwd + bwd)}[mode]


def _torch(w: Workload):
    if w.param["variant"] == "bn":
        return lambda x, weight, bias, rm, rv: F.batch_norm(x, rm, rv, weight, bias, True)
    return lambda x, weight, bias, rm, rv, residual: F.relu(F.batch_norm(x, rm, rv, weight, bias, True) + residual)


def _fastdl(w: Workload):
    if w.param["variant"] == "bn":
        return lambda x, weight, bias, rm, rv: fastdl.functional.batch_norm(x, rm, rv, weight, bias, True)
    return lambda x, weight, bias, rm, rv, residual: fastdl.functional.batch_norm(
        x, rm, rv, weight, bias, True, activation="relu", residual=residual)


BATCH_NORM = register(OpSpec("batch_norm", _workloads, _inputs, _torch, _fastdl, _cost))
