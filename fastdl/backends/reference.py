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


# --- cross_entropy ---
# The same launcher interface as fastdl/backends/triton/cross_entropy.py.
from fastdl.reference import cross_entropy as _cross_entropy  # noqa: E402


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def cross_entropy_fwd(logits, target, weight, grad_scale, ignore_index, label_smoothing, compute_grad,
                      inplace=False):
    x = to_numpy(logits)
    prob = target.dim() == 2
    t = to_numpy(target) if prob else target.detach().cpu().numpy().astype(np.int64)
    loss, dloss, _ = _cross_entropy.rows_forward(x, t, to_numpy(weight), ignore_index, label_smoothing)
    loss_rows = from_numpy(loss, logits, _acc_dtype(logits.dtype))
    if not compute_grad:
        return loss_rows, logits.new_empty((0, 0))
    scale = np.broadcast_to(to_numpy(grad_scale), (x.shape[0],))
    if not prob:
        scale = np.where(t != ignore_index, scale, 0.0)  # torch scales ignored rows by 0, even by 0 / 0
    with np.errstate(invalid="ignore"):
        grad = from_numpy(dloss * scale[:, None], logits)
    if inplace:
        return loss_rows, logits.copy_(grad)
    return loss_rows, grad


def cross_entropy_bwd(grad_logits, scale, out):
    """out[r, :] = grad_logits[r, :] * scale (or scale[r]); grad_logits is only read."""
    x = grad_logits if grad_logits.dim() == 2 else grad_logits.view(1, -1)
    s = np.broadcast_to(to_numpy(scale), (x.shape[0],))
    return out.copy_(from_numpy(to_numpy(x) * s[:, None], out).reshape(out.shape))


def linear_grad_weight_accumulate(grad_out, input, grad_weight, grad_bias):
    g = to_numpy(grad_out)
    grad_weight.copy_(from_numpy(to_numpy(grad_weight) + g.T @ to_numpy(input), grad_weight))
    if grad_bias is not None:
        grad_bias.copy_(from_numpy(to_numpy(grad_bias) + g.sum(axis=0), grad_bias))
