"""CuPy launchers for cross_entropy and linear_cross_entropy (kernels/cuda/cross_entropy.cu): the launcher
interface of fastdl/backends/triton/cross_entropy.py, the same arguments and results (see the docstrings
there)."""
from __future__ import annotations

import numpy as np
import torch

from fastdl.backends.common import ACC_DTYPE as _ACC_DTYPE
from fastdl.backends.common import cross_entropy_outputs
from fastdl.backends.cupy import _runtime as rt
from fastdl.backends.cupy._runtime import BLOCK_COLS, BLOCK_ROWS

# The most threads a block of cross_entropy_fwd may have: identical to the source's #define.
CE_MAX_THREADS = 512
# scale_rows: threads per block, 16-byte packs a thread takes per row, and the most rows in a grid
# (CUDA's limit on gridDim.y; each block then walks several rows).
SCALE_ROWS_THREADS = 256
SCALE_ROWS_PACKS = 4
MAX_GRID_Y = 65535


def row_threads(C: int) -> int:
    """cross_entropy_fwd's block: about 16 columns a thread, from one warp to CE_MAX_THREADS."""
    return min(CE_MAX_THREADS, max(32, 1 << (rt.cdiv(C, 16) - 1).bit_length()))


def _as_acc(t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    return t if t.dtype == acc else t.to(acc)


def cross_entropy_fwd(logits, target, weight, grad_scale, ignore_index, label_smoothing, compute_grad,
                      inplace=False):
    """Per-row softmax cross-entropy and its gradient, one block per row (kernels/cuda/cross_entropy.cu).

    The interface and results of fastdl.backends.triton.cross_entropy_fwd: (loss_rows (R,) in
    float32 / float64 for float64, grad_logits (R, C) or (0, 0)); a bad class index fails a
    device-side assert.
    """
    R, C = logits.shape
    acc = _ACC_DTYPE[logits.dtype]
    loss_rows, grad = cross_entropy_outputs(logits, compute_grad, inplace)
    if R == 0:
        return loss_rows, grad
    if C == 0:  # every index target was ignored (validated); probabilities sum over nothing
        loss_rows.zero_()
        return loss_rows, grad
    prob = target.dim() == 2
    smoothing = label_smoothing > 0.0
    weight_sum = weight.sum(dtype=acc) if weight is not None and smoothing and not prob else None
    scale = _as_acc(grad_scale, acc)
    g = grad if compute_grad else None
    rt.launch("cross_entropy_fwd", logits, R, (
        rt.ptr(logits), rt.ptr(target), rt.ptr(weight), rt.ptr(weight_sum), rt.ptr(scale), rt.ptr(loss_rows), rt.ptr(g),
        *rt.i64(C,
              logits.stride(0), logits.stride(1), target.stride(0), target.stride(1) if prob else 0,
              weight.stride(0) if weight is not None else 0, scale.stride(0) if scale.dim() else 0,
              g.stride(0) if g is not None else 0, g.stride(1) if g is not None else 0,
              ignore_index),
        np.float64(label_smoothing), np.int32(prob), np.int32(weight is not None), np.int32(smoothing),
        np.int32(bool(compute_grad)),
    ), stem="cross_entropy", threads=row_threads(C))
    return loss_rows, grad


def cross_entropy_bwd(grad_logits, scale, out):
    """out[r, :] = grad_logits[r, :] * scale (shape ()) or scale[r] (shape (R,)); returns out.

    grad_logits is only read; out has its shape, any strides, and its dtype or (for
    linear_cross_entropy's float32 sums) another; a 1-D grad_logits is one row.
    """
    x = grad_logits if grad_logits.dim() == 2 else grad_logits.view(1, -1)
    y = out if out.dim() == 2 else out.view(1, -1)
    R, C = x.shape
    if R == 0 or C == 0:
        return out
    s = _as_acc(scale, _ACC_DTYPE[x.dtype])
    if y.dtype != x.dtype:
        # linear_cross_entropy's float32 sums rounded into the weight's dtype: rare (once per
        # backward), so torch's ops, a block of rows at a time to bound the float32 temporary.
        rows = s.reshape(-1, 1) if s.dim() else s
        step = max(1, (64 * 2**20) // max(1, C * 4))
        for start in range(0, R, step):
            end = min(R, start + step)
            y[start:end].copy_(x[start:end] * (rows[start:end] if s.dim() else rows))
        return out
    columns_per_block = SCALE_ROWS_THREADS * SCALE_ROWS_PACKS * (16 // x.element_size())
    rt.launch("scale_rows", x, (rt.cdiv(C, columns_per_block), min(R, MAX_GRID_Y)), (
        rt.ptr(x), rt.ptr(s), rt.ptr(y),
        *rt.i64(R, C, x.stride(0), x.stride(1), s.stride(0) if s.dim() else 0, y.stride(0), y.stride(1)),
    ), stem="cross_entropy", threads=SCALE_ROWS_THREADS)
    return out


def linear_grad_weight_accumulate(grad_out, input, grad_weight, grad_bias, accumulate=True):
    """In place: grad_weight += grad_out.T @ input; grad_bias += grad_out.sum(0) (grad_bias may be None).
    accumulate=False: = instead of += (here by zero-filling first: the CUDA kernel always adds).

    grad_out (M, N), input (M, K) in the same dtype; grad_weight (N, K) in any float dtype;
    grad_bias (N,) or None. The kernel adds into a grad_weight and grad_bias of the accumulator's
    dtype (float32, float64 for float64: what linear_cross_entropy passes, so its sums across
    chunks round once); other dtypes go through a temporary.
    """
    M, K = input.shape
    N = grad_weight.shape[0]
    if not accumulate:
        grad_weight.zero_()
        if grad_bias is not None:
            grad_bias.zero_()
    if M == 0 or N == 0:
        return
    acc = _ACC_DTYPE[input.dtype]
    w = grad_weight if grad_weight.dtype == acc else torch.zeros((N, K), device=input.device, dtype=acc)
    b = grad_bias if grad_bias is None or (grad_bias.dtype == acc and grad_bias.stride(0) == 1) else torch.zeros(
        (N,), device=input.device, dtype=acc)
    rt.launch("linear_grad_weight_accumulate", input, rt.cdiv(N, BLOCK_ROWS) * max(1, rt.cdiv(K, BLOCK_COLS)), (
        rt.ptr(grad_out), rt.ptr(input), rt.ptr(w), rt.ptr(b),
        *rt.i64(M, N, K, grad_out.stride(0), grad_out.stride(1), input.stride(0), input.stride(1),
              w.stride(0), w.stride(1)),
        np.int32(b is not None),
    ), stem="cross_entropy")
    if w is not grad_weight:
        grad_weight.add_(w)
    if b is not grad_bias:
        grad_bias.add_(b)
