"""Reference launchers of batch_norm: the launcher contract's four pieces (the same interface as
fastdl/backends/triton/batch_norm.py and fastdl/backends/cupy/batch_norm.py) on the float64 oracle.

Tensors named *3 are (N, C, S) strided views; outputs are handed in and written in place (copy_
keeps their strides); statistics come back in the acc dtype (float64 for float64 x, else float32).
Running statistics are never touched here.
"""
from __future__ import annotations

import torch

from fastdl.backends.reference._common import launcher, to_numpy
from fastdl.ops._define import acc_dtype
from fastdl.reference import batch_norm as _bn


def _stat(a, x3: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(a).to(device=x3.device, dtype=acc_dtype(x3.dtype))


def _write(out: torch.Tensor | None, a) -> None:
    if out is not None:
        out.copy_(torch.from_numpy(a).to(out.device))  # rounded once, to out's dtype


@launcher
def batch_norm_stats(x3):
    mean, var = _bn.stats(to_numpy(x3))
    return _stat(mean, x3), _stat(var, x3)


@launcher
def batch_norm_elemt(x3, mean, invstd, weight, bias, residual3, activation, negative_slope, out3, mask3):
    out, mask = _bn.elemt(to_numpy(x3), to_numpy(mean), to_numpy(invstd), to_numpy(weight), to_numpy(bias),
                          to_numpy(residual3), activation, negative_slope)
    _write(out3, out)
    if mask3 is not None:
        mask3.copy_(torch.from_numpy(mask).to(mask3.device, torch.uint8))


def _common(grad_out3, x3, mean, invstd, weight, bias, residual3, mask3, activation, negative_slope):
    return (to_numpy(grad_out3), to_numpy(x3), to_numpy(mean), to_numpy(invstd), to_numpy(weight), to_numpy(bias),
            to_numpy(residual3), None if mask3 is None else mask3.cpu().numpy(), activation, negative_slope)


@launcher
def batch_norm_backward_reduce(grad_out3, x3, mean, invstd, weight, bias, residual3, mask3, activation,
                               negative_slope):
    sum_dy, sum_dy_xmu = _bn.backward_reduce(*_common(grad_out3, x3, mean, invstd, weight, bias, residual3, mask3,
                                                      activation, negative_slope))
    return _stat(sum_dy, x3), _stat(sum_dy_xmu, x3)


@launcher
def batch_norm_backward_elemt(grad_out3, x3, mean, invstd, weight, bias, residual3, mask3, activation,
                              negative_slope, mean_dy, mean_dy_xmu, grad_input3, grad_residual3):
    grad_input, grad_residual = _bn.backward_elemt(
        *_common(grad_out3, x3, mean, invstd, weight, bias, residual3, mask3, activation, negative_slope),
        to_numpy(mean_dy), to_numpy(mean_dy_xmu))
    _write(grad_input3, grad_input)
    _write(grad_residual3, grad_residual)
