"""Reference launchers: the float64 NumPy oracle behind the same interface as the GPU backends.

Runs anywhere (CUDA tensors make a round trip through host memory); results are rounded to the
input dtype once, at the end. Saves nothing for backward: it recomputes in float64 instead.
"""
from __future__ import annotations

import numpy as np
import torch

from fastdl.reference import linear as _linear


def to_numpy(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().to("cpu", torch.float64).numpy()


def from_numpy(a: np.ndarray | None, like: torch.Tensor, dtype: torch.dtype | None = None):
    if a is None:
        return None
    return torch.from_numpy(np.ascontiguousarray(a)).to(device=like.device, dtype=dtype or like.dtype)


def linear_fwd(input, weight, bias, activation, negative_slope):
    out, _ = _linear.forward(to_numpy(input), to_numpy(weight), to_numpy(bias), activation, negative_slope)
    return from_numpy(out, input), input.new_empty((0, 0))


def linear_bwd(grad_out, input, weight, bias, saved, out, activation, negative_slope,
               needs_input_grad, needs_weight_grad, needs_bias_grad):
    _, ctx = _linear.forward(to_numpy(input), to_numpy(weight), to_numpy(bias), activation, negative_slope)
    grad_input, grad_weight, grad_bias = _linear.backward(to_numpy(grad_out), ctx)
    return (from_numpy(grad_input, input) if needs_input_grad else None,
            from_numpy(grad_weight, weight) if needs_weight_grad else None,
            from_numpy(grad_bias, weight) if needs_bias_grad else None)
