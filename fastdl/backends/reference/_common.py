"""What every reference launcher shares: the quiet-NumPy decorator and the tensor <-> float64 array
round trip."""
from __future__ import annotations

import functools

import numpy as np
import torch


def launcher(fn):
    """A reference launcher: NumPy's floating-point warnings off, as torch's kernels raise none."""
    @functools.wraps(fn)
    def quiet(*args, **kwargs):
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)

    quiet.fastdl_launcher = True
    return quiet


def to_numpy(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().to("cpu", torch.float64).numpy()


def from_numpy(a: np.ndarray | None, like: torch.Tensor, dtype: torch.dtype | None = None):
    if a is None:
        return None
    return torch.from_numpy(np.ascontiguousarray(a)).to(device=like.device, dtype=dtype or like.dtype)
