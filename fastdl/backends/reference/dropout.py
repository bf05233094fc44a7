"""Reference launchers of dropout: the same interface as fastdl/backends/triton/dropout.py, the mask
drawn by the NumPy Philox of fastdl/reference/dropout.py (the key read back from the device)."""
from __future__ import annotations

import numpy as np

from fastdl.backends.reference._common import from_numpy, launcher, to_numpy
from fastdl.reference import dropout as _dropout


def _key(seed) -> tuple[int, int]:
    k0, k1 = (int(v) for v in seed.cpu())
    return k0, k1


def _memory_order(t):
    """t's elements in memory order (t is dense): the permutation of its dimensions by stride."""
    dims = sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))
    return t.permute(dims) if dims else t


def _flat(input, seed, p, out):
    if out.numel() == 0:
        return out
    src, dst = _memory_order(input), _memory_order(out)
    keep = _dropout.flat_keep_mask(_key(seed), p, tuple(src.shape))
    result, _ = _dropout.forward(to_numpy(src), keep, p)
    dst.copy_(from_numpy(result, out).reshape(dst.shape))  # ascontiguousarray makes 0-d arrays 1-d
    return out


@launcher
def dropout_fwd(input, seed, p, out):
    return _flat(input, seed, p, out)


@launcher
def dropout_bwd(grad_out, seed, p, grad_input):
    return _flat(grad_out, seed, p, grad_input)


@launcher
def dropout_rows(input, seed, p, out):
    R, C = input.shape
    if R and C:
        keep = _dropout.keep_mask(_key(seed), p, R, C)
        out.copy_(from_numpy(_dropout.forward(to_numpy(input), keep, p)[0], out))
    return out


def keep_rows(seed, p, R: int, C: int) -> np.ndarray:
    """The (R, C) mask dropout_rows applies (linear's fused dropout)."""
    return _dropout.keep_mask(_key(seed), p, R, C)
