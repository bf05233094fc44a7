"""Triton launchers for cross_entropy and linear_cross_entropy (kernels/triton/cross_entropy.py).

The launcher interface every backend implements for them (fastdl/ops/cross_entropy.py and
linear_cross_entropy.py are the only callers; they have validated everything):

  cross_entropy_fwd(logits, target, weight, grad_scale, ignore_index, label_smoothing,
                    compute_grad, inplace=False) -> (loss_rows, grad_logits)
  cross_entropy_bwd(grad_logits, scale, out) -> out                (out = grad_logits * scale per row)

linear_cross_entropy also calls linear_grad_weight_accumulate, in fastdl/backends/triton/linear.py.
"""
from __future__ import annotations

import torch
import triton

from fastdl.backends.common import cross_entropy_outputs
from fastdl.backends.triton._launch import ACC_DTYPE, input_precision, interpreter_bf16, wrap_triton
from fastdl.kernels.triton import cross_entropy as _ce


@interpreter_bf16(results=("acc", "io"), mutates=("logits",))  # loss_rows, grad_logits; logits if inplace
def cross_entropy_fwd(logits, target, weight, grad_scale, ignore_index, label_smoothing, compute_grad,
                      inplace=False):
    """Per-row softmax cross-entropy and its gradient, one program per row (see kernels/triton/cross_entropy.py).

    logits      (R, C) float16 / bfloat16 / float32 / float64, any strides (C may be 0).
    target      (R,) int64 class indices in [0, C) or == ignore_index; or (R, C) probabilities in
                logits' dtype (ignore_index is then unused), any strides.
    weight      (C,) class weights in logits' dtype, or None.
    grad_scale  float32 (float64 for float64 logits) tensor of shape () or (R,): row r's gradient
                is multiplied by grad_scale (grad_scale[r]); ignored rows are multiplied by 0.
    label_smoothing  float in [0, 1]; 0 disables it.
    compute_grad     False: no gradient is written (and plain class-index rows are read once).
    inplace          True: the gradient overwrites `logits` (same strides) and `logits` is returned
                     as grad_logits. Only for logits the caller owns (linear_cross_entropy's chunks).

    Returns loss_rows (R,) in float32 (float64 for float64 logits): row r's loss before any
    reduction, 0 for an ignored row; and grad_logits (R, C) in logits' dtype holding
    grad_scale[r] * d loss_r / d logits[r] (contiguous unless inplace), or a (0, 0) tensor when
    compute_grad is False.

    A class index outside [0, C) that is not ignore_index fails a device-side assert; the host
    never syncs to check it here (the functional layer does on CPU, or with FASTDL_CHECK_TARGETS=1).
    """
    R, C = logits.shape
    device = logits.device
    loss_rows, grad = cross_entropy_outputs(logits, compute_grad, inplace)
    if R == 0:
        return loss_rows, grad
    if C == 0:  # every index target was ignored (validated); probabilities sum over nothing
        loss_rows.zero_()
        return loss_rows, grad
    prob = target.dim() == 2
    smoothing = label_smoothing > 0.0
    weight_sum = (weight.sum(dtype=loss_rows.dtype) if weight is not None and smoothing and not prob
                  else loss_rows)  # not read otherwise
    # As a tensor: a float kernel argument is fp32, too coarse for float64 logits.
    smoothing_t = torch.full((), label_smoothing, device=device, dtype=loss_rows.dtype) if smoothing else loss_rows
    block = _ce.block_c(C)
    g = grad if compute_grad else logits  # not written when compute_grad is False
    wrap_triton(_ce._cross_entropy_fwd)[(R,)](
        logits, target, weight if weight is not None else logits, weight_sum, smoothing_t, grad_scale, loss_rows, g,
        C,
        logits.stride(0), logits.stride(1), target.stride(0), target.stride(1) if prob else 0,
        weight.stride(0) if weight is not None else 0, grad_scale.stride(0) if grad_scale.dim() else 0,
        g.stride(0), g.stride(1),
        int(ignore_index),
        PROB_TARGET=prob, HAS_WEIGHT=weight is not None, SMOOTHING=smoothing, COMPUTE_GRAD=bool(compute_grad),
        ACC_DTYPE=ACC_DTYPE[logits.dtype], BLOCK_C=block, num_warps=_ce.num_warps(block),
    )
    return loss_rows, grad


@interpreter_bf16(results=("io",), mutates=("out",))
def cross_entropy_bwd(grad_logits, scale, out):
    """out[r, :] = grad_logits[r, :] * scale (shape ()) or scale[r] (shape (R,)); returns out.

    grad_logits is only read (the saved gradient stays intact for a second backward); out has its
    shape, any strides, and its dtype or (linear_cross_entropy's float32 sums) another.
    cross_entropy's backward (grad_output per row for reduction="none") and the final scaling of
    linear_cross_entropy's gradients. A 1-D grad_logits is treated as one row.
    """
    x = grad_logits if grad_logits.dim() == 2 else grad_logits.view(1, -1)
    y = out if out.dim() == 2 else out.view(1, -1)
    R, C = x.shape
    if R == 0 or C == 0:
        return out
    block = min(1024, triton.next_power_of_2(C))
    wrap_triton(_ce._scale_rows)[(R, triton.cdiv(C, block))](
        x, scale, y, C, x.stride(0), x.stride(1), scale.stride(0) if scale.dim() else 0, y.stride(0), y.stride(1),
        ACC_DTYPE=ACC_DTYPE[x.dtype], BLOCK_C=block, num_warps=4,
    )
    return out
