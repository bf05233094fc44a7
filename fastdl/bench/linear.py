"""Benchmark cases for linear: square sweeps, the 784-256-128-64-10 MLP's layers, a gelu case."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

import fastdl
from fastdl.bench.spec import DTYPES, OpSpec, Workload, random_tensor, register

SQUARE_SIZES = (256, 512, 1024, 2048, 4096, 8192)
QUICK_SQUARE_SIZES = (1024, 8192)
MLP_BATCH = 4096
# (in_features, out_features, activation) of the 784-256-128-64-10 MLP; the output layer has none.
MLP_LAYERS = ((784, 256, "relu"), (256, 128, "relu"), (128, 64, "relu"), (64, 10, None))
_TORCH_ACTIVATIONS = {None: lambda z: z, "relu": torch.relu, "gelu": F.gelu}


def _linear_workloads(quick: bool) -> list[Workload]:
    squares = QUICK_SQUARE_SIZES if quick else SQUARE_SIZES
    mlp = MLP_LAYERS[:1] if quick else MLP_LAYERS

    def square(dtype, s, act="relu", group="square"):
        label = f"{s}^3" if group == "square" else f"{s}^3 {act}"
        return Workload("linear", group, dtype, (s, s, s), (("activation", act),), label)

    out = [square(dt, s) for dt in ("bf16", "fp16", "tf32") for s in squares]
    out += [Workload("linear", "mlp", dt, (MLP_BATCH, n, k), (("activation", act),), f"mlp {k}->{n}")
            for dt in DTYPES for k, n, act in mlp]
    out += [square("fp32", s) for s in squares]
    # The TF32 backward on sm_90 copies its strided B operands K-major (fastdl/backends/triton/linear.py:
    # k_major, _launch.TF32_K_MAJOR); the same products without the copies (4-byte cp.async instead), to weigh the two.
    out += [Workload("linear", "square", "tf32", (s, s, s), (("activation", "relu"), ("tf32_k_major", False)),
                     f"{s}^3 k-major copies off") for s in (QUICK_SQUARE_SIZES[-1:] if quick else (2048, 8192))]
    if not quick:
        out += [square(dt, 4096, "gelu", "gelu") for dt in DTYPES]
    return out


def _linear_inputs(w: Workload, seed: int) -> tuple:
    M, N, K = w.shape
    dtype = DTYPES[w.dtype][0]
    x = random_tensor((M, K), dtype, seed=3 * seed)
    # 1/sqrt(K) keeps outputs O(1) at K = 8192, far from fp16's range.
    weight = random_tensor((N, K), dtype, seed=3 * seed + 1, scale=K ** -0.5)
    bias = random_tensor((N,), dtype, seed=3 * seed + 2)
    return tuple(t.requires_grad_() for t in (x, weight, bias))


def _linear_torch(w: Workload) -> Callable:
    act = _TORCH_ACTIVATIONS[w.param["activation"]]
    return lambda x, weight, bias: act(F.linear(x, weight, bias))


def _linear_fastdl(w: Workload) -> Callable:
    from fastdl.backends.triton import _launch

    act = w.param["activation"]
    k_major = w.param.get("tf32_k_major")  # None: the default choice

    def run(x, weight, bias):
        # Set at every call (the backward that follows reads it too), so no workload inherits another's.
        _launch.TF32_K_MAJOR = k_major
        return fastdl.functional.linear(x, weight, bias, activation=act)

    return run


def _linear_cost(w: Workload, mode: str) -> tuple[float, float]:
    """FLOPs of the matmuls (2MNK each; backward has two) and the bytes no implementation can avoid."""
    M, N, K = w.shape
    e = DTYPES[w.dtype][0].itemsize
    act = w.param["activation"]
    # What backward must know of the activation: one bit per output for relu, else the pre-activation.
    state = 0 if act is None else (M * N / 8 if act == "relu" else M * N * e)
    fwd = e * (M * K + N * K + N + M * N)
    bwd = e * (M * N + M * K + N * K) + state + e * (M * K + N * K + N)
    mm = 2.0 * M * N * K
    return {"forward": (mm, fwd), "backward": (2 * mm, bwd),
            "forward+backward": (3 * mm, fwd + state + bwd)}[mode]


LINEAR = register(OpSpec("linear", _linear_workloads, _linear_inputs, _linear_torch, _linear_fastdl, _linear_cost))
