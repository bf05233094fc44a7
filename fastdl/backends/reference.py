"""Reference launchers: the float64 NumPy oracle behind the same interface as the GPU backends.

Runs anywhere (CUDA tensors make a round trip through host memory); results are rounded to the
input dtype once, at the end. Saves nothing for backward: it recomputes in float64 instead.

Every launcher runs under np.errstate(all="ignore"): inf and nan inputs give inf and nan results
exactly as torch's kernels do, and, as with torch, without a NumPy RuntimeWarning (`launcher`
marks them; a test checks every public launcher is marked).
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from fastdl.backends.common import check_class_targets
from fastdl.reference import linear as _linear


# What one linear_cross_entropy chunk holds per logit here, for its chunk size (fastdl.ops.
# linear_cross_entropy sizes chunks by it): linear_fwd's float64 z and its copy in the input's dtype,
# cross_entropy_fwd's float64 logits, log-probabilities, probabilities, target distribution and
# gradient (with one expression temporary), then linear_bwd's recomputed float64 z: about 8 float64
# arrays of the chunk's shape alive at the peak. Sized by the input's itemsize instead, a chunk's
# temporaries were 16x the budget (1.4 GB of RSS growth at N=1024, V=32000, where torch's unfused
# path grows by 375 MB).
LINEAR_CE_BYTES_PER_LOGIT = 64


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


@launcher
def linear_fwd(input, weight, bias, activation, negative_slope):
    out, _ = _linear.forward(to_numpy(input), to_numpy(weight), to_numpy(bias), activation, negative_slope)
    return from_numpy(out, input), input.new_empty((0, 0))


@launcher
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


@launcher
def cross_entropy_fwd(logits, target, weight, grad_scale, ignore_index, label_smoothing, compute_grad,
                      inplace=False):
    x = to_numpy(logits)
    prob = target.dim() == 2
    if not prob:
        # At run time, so graphs compiled by torch.compile (whose tracing skips the functional
        # layer's check) still raise torch's IndexError instead of indexing with the bad value.
        check_class_targets("fastdl.cross_entropy", target, x.shape[1], ignore_index)
    t = to_numpy(target) if prob else target.detach().cpu().numpy().astype(np.int64)
    loss, dloss, _ = _cross_entropy.rows_forward(x, t, to_numpy(weight), ignore_index, label_smoothing)
    loss_rows = from_numpy(loss, logits, _acc_dtype(logits.dtype))
    if not compute_grad:
        return loss_rows, logits.new_empty((0, 0))
    scale = np.broadcast_to(to_numpy(grad_scale), (x.shape[0],))
    if not prob:
        scale = np.where(t != ignore_index, scale, 0.0)  # torch scales ignored rows by 0, even by 0 / 0
    grad = from_numpy(dloss * scale[:, None], logits)
    if inplace:
        return loss_rows, logits.copy_(grad)
    return loss_rows, grad


@launcher
def cross_entropy_bwd(grad_logits, scale, out):
    """out[r, :] = grad_logits[r, :] * scale (or scale[r]); grad_logits is only read."""
    x = grad_logits if grad_logits.dim() == 2 else grad_logits.view(1, -1)
    s = np.broadcast_to(to_numpy(scale), (x.shape[0],))
    return out.copy_(from_numpy(to_numpy(x) * s[:, None], out).reshape(out.shape))


@launcher
def linear_grad_weight_accumulate(grad_out, input, grad_weight, grad_bias, accumulate=True):
    g = to_numpy(grad_out)
    start_weight = to_numpy(grad_weight) if accumulate else 0.0
    grad_weight.copy_(from_numpy(start_weight + g.T @ to_numpy(input), grad_weight))
    if grad_bias is not None:
        start_bias = to_numpy(grad_bias) if accumulate else 0.0
        grad_bias.copy_(from_numpy(start_bias + g.sum(axis=0), grad_bias))


# --- max_pool2d ---
# The same launcher interface as fastdl/backends/triton/max_pool2d.py: outputs allocated by the op.
from fastdl.reference import max_pool2d as _max_pool2d  # noqa: E402


@launcher
def max_pool2d_fwd(input, kernel_size, stride, padding, dilation, ceil_mode, out, saved):
    result, ctx = _max_pool2d.forward(to_numpy(input), kernel_size, stride, padding, dilation, ceil_mode)
    out.copy_(from_numpy(result, out))
    if saved.numel():
        key = "indices" if saved.dtype == torch.int64 else "window_pos"
        saved.copy_(torch.from_numpy(ctx[key].astype(np.int64)).to(saved.device, saved.dtype))
    return out, saved


@launcher
def max_pool2d_bwd(grad_out, saved, kernel_size, stride, padding, dilation, grad_input):
    from fastdl.ops.max_pool2d import flat_indices

    indices = flat_indices(saved.cpu(), grad_input.shape, kernel_size, stride, padding, dilation)
    grad = _max_pool2d.backward(to_numpy(grad_out), {"indices": indices.numpy(), "input_shape": grad_input.shape})
    return grad_input.copy_(from_numpy(grad, grad_input))


# --- conv2d ---
# The same launcher interface as fastdl/backends/triton/conv2d.py (layouts included).
from fastdl.reference import conv2d as _conv2d  # noqa: E402


def _conv2d_forward(input, weight, bias, stride, padding, dilation, groups, activation, negative_slope):
    top, bottom, left, right = padding
    return _conv2d.forward(to_numpy(input), to_numpy(weight), to_numpy(bias), stride, ((top, bottom), (left, right)),
                           dilation, groups, activation, negative_slope)


def _like(a, like, fmt_of):
    from torch._prims_common import suggest_memory_format

    return from_numpy(a, like).contiguous(memory_format=suggest_memory_format(fmt_of))


@launcher
def conv2d_fwd(input, weight, bias, stride, padding, dilation, groups, activation, negative_slope):
    out, _ = _conv2d_forward(input, weight, bias, stride, padding, dilation, groups, activation, negative_slope)
    return _like(out, input, input), input.new_empty((0,))


@launcher
def conv2d_bwd(grad_out, input, weight, bias, saved, out, stride, padding, dilation, groups, activation,
               negative_slope, needs_input_grad, needs_weight_grad, needs_bias_grad):
    _, ctx = _conv2d_forward(input, weight, bias, stride, padding, dilation, groups, activation, negative_slope)
    grad_input, grad_weight, grad_bias = _conv2d.backward(to_numpy(grad_out), ctx)
    return (_like(grad_input, input, input) if needs_input_grad else None,
            _like(grad_weight, weight, weight) if needs_weight_grad else None,
            from_numpy(grad_bias, weight) if needs_bias_grad else None)
