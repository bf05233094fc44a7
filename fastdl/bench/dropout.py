"""Benchmark cases for dropout: alone on a transformer MLP's activations, and fused into linear's
epilogue after relu (an MLP block: dropout(relu(x @ w.T + b))), next to linear + relu without
dropout and to torch's F.dropout(F.relu(F.linear(...))).

Dropout alone does no arithmetic worth counting (the Philox rounds are integer work on chip):
its floor is bytes over the copy bandwidth, so gbps and bandwidth_fraction are the numbers (the
issue's target: >= 85% of bandwidth). The bytes no implementation can avoid, e the element size,
N the elements:
  forward   read x, write out (2eN); nothing per element need be saved: the mask is a function
            of a seed (fastdl regenerates it; torch eager writes a 1-byte bool mask, eN + N);
  backward  read grad_out, write grad_input (2eN; torch eager also reads its mask);
  forward+backward  both.

Fused into linear, dropout adds no bytes to linear + relu's floor (the relu bit is all backward
needs of the activation; the mask is regenerated), so the three groups share one cost model
(fastdl/bench/linear.py's) and the issue's target reads directly off the records:
fastdl's linear+relu+dropout within 5% of its linear+relu at the same shape (`fused_overhead`).

Each draws its own mask, so a provider's forward output is not compared with torch's: `check`
compares it with its own inputs (kept elements scaled by exactly 1/(1-p), the kept fraction
within 6 sigma of 1-p), which torch's output passes as well.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import fastdl
from fastdl.bench.linear import _linear_cost, _linear_inputs
from fastdl.bench.spec import DTYPES, OpSpec, Workload, random_tensor, register

P = 0.1  # a transformer's dropout
# label, shape: a transformer MLP's activations (tokens x hidden), 16M and 64M elements
DROPOUT_SHAPES = (("4096x4096", (4096, 4096)), ("8192x8192", (8192, 8192)))
QUICK_DROPOUT_SHAPES = ("8192x8192",)
# label, (M, N, K): an MLP block's up-projection at 4096 tokens, a wide one (the epilogue is a larger
# share of the time: K = 1024), and the digits MLP's first layer (fastdl/bench/linear.py's MLP_BATCH).
LINEAR_SHAPES = (("4096x4096->4096", (4096, 4096, 4096)), ("16384x1024->4096", (16384, 4096, 1024)),
                 ("4096x784->256", (4096, 256, 784)))
QUICK_LINEAR_SHAPES = ("4096x4096->4096", "16384x1024->4096")
LINEAR_GROUPS = ("linear+relu", "linear+relu+dropout")
CHECK_SIGMAS = 6.0


def _workloads(quick: bool) -> list[Workload]:
    out = [Workload("dropout", "dropout", dt, shape, (("p", P),), f"{label} p={P}")
           for dt in (("bf16", "fp32") if quick else ("bf16", "fp16", "fp32"))
           for label, shape in DROPOUT_SHAPES if not quick or label in QUICK_DROPOUT_SHAPES]
    # The two linear groups side by side per shape, so their records sit next to each other.
    for dt in (("bf16",) if quick else ("bf16", "tf32")):
        for label, shape in LINEAR_SHAPES:
            if quick and label not in QUICK_LINEAR_SHAPES:
                continue
            out.append(Workload("dropout", "linear+relu", dt, shape, (("activation", "relu"),), label))
            out.append(Workload("dropout", "linear+relu+dropout", dt, shape, (("activation", "relu"), ("p", P)),
                                f"{label} p={P}"))
    return out


def _inputs(w: Workload, seed: int) -> tuple:
    if w.group == "dropout":
        return (random_tensor(w.shape, DTYPES[w.dtype][0], seed=seed, scale=2.0).requires_grad_(),)
    return _linear_inputs(w, seed)


def _cost(w: Workload, mode: str) -> tuple[float, float]:
    if w.group != "dropout":
        return _linear_cost(w, mode)  # dropout in the epilogue adds no compulsory bytes
    nbytes = 2 * DTYPES[w.dtype][0].itemsize * math.prod(w.shape)
    return {"forward": (0.0, nbytes), "backward": (0.0, nbytes), "forward+backward": (0.0, 2 * nbytes)}[mode]


def _torch(w: Workload):
    if w.group == "dropout":
        return lambda x: F.dropout(x, w.param["p"])
    if w.group == "linear+relu":
        return lambda x, weight, bias: F.relu(F.linear(x, weight, bias))
    return lambda x, weight, bias: F.dropout(F.relu(F.linear(x, weight, bias)), w.param["p"])


def _fastdl(w: Workload):
    if w.group == "dropout":
        return lambda x: fastdl.functional.dropout(x, w.param["p"])
    p = w.param.get("p", 0.0)
    return lambda x, weight, bias: fastdl.functional.linear(x, weight, bias, activation="relu", dropout=p)


def _undropped(w: Workload, inputs: tuple) -> torch.Tensor:
    """What dropout is applied to, in float32: x, or relu(linear) by torch eager."""
    if w.group == "dropout":
        return inputs[0].float()
    return F.relu(F.linear(*inputs)).float()


def check(w: Workload, inputs: tuple, output: torch.Tensor) -> float:
    """Largest |output - y * keep / (1-p)| over max|y / (1-p)|, keep read off the output (y: what
    dropout is applied to); inf when the kept fraction of y's nonzero elements is more than
    CHECK_SIGMAS sigma from 1-p, nan when the output is not finite or has the wrong shape."""
    y = _undropped(w, inputs)
    out = output.float()
    if out.shape != y.shape or not bool(torch.isfinite(out).all()):
        return math.nan
    p = w.param.get("p", 0.0)
    if p:
        nonzero = y != 0
        n = int(nonzero.sum())
        kept = int((nonzero & (out != 0)).sum())
        if n and abs(kept / n - (1 - p)) > CHECK_SIGMAS * math.sqrt(p * (1 - p) / n):
            return math.inf
        y = torch.where(out != 0, y / (1 - p), 0.0)
    scale = y.abs().max().clamp_min(1e-30)
    return ((out - y).abs().max() / scale).item()


def fused_overhead(records: list[dict]) -> list[dict]:
    """Per provider, dtype, shape and mode: the time of linear+relu+dropout over that of linear+relu
    (the issue's target for fastdl: <= 1.05), from a dropout.json's records."""
    timed = {(r["provider"], r["dtype"], tuple(r["shape"]), r["mode"], r["group"]): r["ms"]
             for r in records if r.get("ms") and r["group"] in LINEAR_GROUPS}
    out = []
    for (provider, dtype, shape, mode, group), fused in timed.items():
        plain = timed.get((provider, dtype, shape, mode, "linear+relu"))
        if group == "linear+relu+dropout" and plain:
            out.append(dict(provider=provider, dtype=dtype, shape=list(shape), mode=mode, ratio=fused / plain))
    return out


DROPOUT = register(OpSpec("dropout", _workloads, _inputs, _torch, _fastdl, _cost, check))
