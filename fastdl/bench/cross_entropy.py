"""Benchmark cases for cross_entropy and linear_cross_entropy.

cross_entropy is memory-bound: its floor is the bytes it must move, one read of the logits in
forward, plus one write of the gradient for forward+backward (the issue's count), over the
measured copy bandwidth. fastdl computes the gradient inside its forward, so forward+backward
is the fair comparison; "backward" alone is then only the scaling by grad_output.

linear_cross_entropy is matmul-bound (three N x V x H matmuls for forward+backward) and is
measured above all for its peak memory against torch's unfused linear + cross_entropy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fastdl
from fastdl.bench.spec import DTYPES, OpSpec, Workload, random_tensor, register

# (N, V), the headline first: N=8192 rows of a 128256-token vocabulary (Llama 3's).
CE_SHAPES = ((8192, 128256), (4096, 32000), (8192, 32000), (16384, 32000), (4096, 128256),
             (16384, 128256), (4096, 262144), (8192, 262144), (16384, 262144))
CE_QUICK_SHAPES = ((8192, 128256), (8192, 32000))
LCE_SHAPES = ((8192, 128256, 4096),)  # (N, V, H)


def _targets(n: int, classes: int, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randint(0, classes, (n,), generator=gen, device="cuda")


def _ce_workloads(quick: bool) -> list[Workload]:
    shapes = CE_QUICK_SHAPES if quick else CE_SHAPES
    return [Workload("cross_entropy", "rows x vocab", dt, shape, (), f"{shape[0]}x{shape[1]}")
            for shape in shapes for dt in ("bf16", "fp32")]


def _ce_inputs(w: Workload, seed: int) -> tuple:
    n, classes = w.shape
    # Logits of spread ~3 around row offsets: a softmax that is neither flat nor one-hot.
    logits = random_tensor((n, classes), DTYPES[w.dtype][0], seed=2 * seed, scale=3.0)
    return logits.requires_grad_(), _targets(n, classes, 2 * seed + 1)


def _ce_cost(w: Workload, mode: str) -> tuple[float, float]:
    n, classes = w.shape
    logits = n * classes * DTYPES[w.dtype][0].itemsize
    return {"forward": (0.0, logits), "backward": (0.0, logits),
            "forward+backward": (0.0, 2 * logits)}[mode]


CROSS_ENTROPY = register(OpSpec(
    "cross_entropy", _ce_workloads, _ce_inputs,
    lambda w: lambda logits, target: F.cross_entropy(logits, target),
    lambda w: lambda logits, target: fastdl.functional.cross_entropy(logits, target),
    _ce_cost))


def _lce_workloads(quick: bool) -> list[Workload]:
    return [Workload("linear_cross_entropy", "lm head", "bf16", shape, (), f"{shape[0]}x{shape[2]}->{shape[1]}")
            for shape in LCE_SHAPES]


def _lce_inputs(w: Workload, seed: int) -> tuple:
    n, classes, hidden = w.shape
    dtype = DTYPES[w.dtype][0]
    x = random_tensor((n, hidden), dtype, seed=3 * seed)
    weight = random_tensor((classes, hidden), dtype, seed=3 * seed + 1, scale=hidden ** -0.5)
    return x.requires_grad_(), weight.requires_grad_(), _targets(n, classes, 3 * seed + 2)


def _lce_cost(w: Workload, mode: str) -> tuple[float, float]:
    n, classes, hidden = w.shape
    e = DTYPES[w.dtype][0].itemsize
    mm = 2.0 * n * classes * hidden
    inputs = e * (n * hidden + classes * hidden)
    return {"forward": (mm, inputs), "backward": (2 * mm, 2 * inputs),
            "forward+backward": (3 * mm, 2 * inputs)}[mode]


LINEAR_CROSS_ENTROPY = register(OpSpec(
    "linear_cross_entropy", _lce_workloads, _lce_inputs,
    lambda w: lambda x, weight, target: F.cross_entropy(F.linear(x, weight), target),
    lambda w: lambda x, weight, target: fastdl.functional.linear_cross_entropy(x, weight, target),
    _lce_cost))
