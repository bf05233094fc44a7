"""CuPy launchers for cross_entropy and linear_cross_entropy (kernels/cuda/cross_entropy.cu): the launcher
interface of fastdl/backends/triton/cross_entropy.py, the same arguments and results (see the docstrings
there)."""
from __future__ import annotations

import numpy as np
import torch

from fastdl.backends.common import ACC_DTYPE as _ACC_DTYPE
from fastdl.backends.common import cross_entropy_outputs
from fastdl.backends.cupy import _runtime as rt

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


def cross_entropy_fwd_resources(logits, target, grad_scale, label_smoothing, compute_grad, inplace=True):
    """(registers, static shared memory bytes, warps) of the cross_entropy_fwd<T> a cross_entropy_fwd
    call on logits like these launches, from the CUDA function's attributes as this device compiled
    it (one instantiation per type: the other arguments do not change the binary). What
    linear_cross_entropy sizes its chunks in whole waves by. CUDA tensors only."""
    device = logits.device
    index = device.index if device.index is not None else torch.cuda.current_device()
    fn = rt._function("cross_entropy", index, f"cross_entropy_fwd<{rt.CUDA_TYPES[logits.dtype]}>")
    with rt._cupy().cuda.Device(index):  # RawKernel's attributes are those of the current device
        return int(fn.num_regs), int(fn.shared_size_bytes), row_threads(logits.shape[1]) // 32


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
