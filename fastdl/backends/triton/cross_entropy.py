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


def _aligned_rows(t: torch.Tensor, vec: int) -> bool:
    """t's base is on a 16-byte boundary and its columns are contiguous (what a VEC > 1 launch
    of the row kernels needs of every tensor it hints)."""
    return vec > 1 and t.stride(1) == 1 and t.data_ptr() % 16 == 0


def _same_phase(a: torch.Tensor, b: torch.Tensor, vec: int) -> bool:
    """Every row of b starts on the same 16-byte phase as the same row of a (both aligned)."""
    return _aligned_rows(b, vec) and (a.shape[0] <= 1 or (a.stride(0) - b.stride(0)) % vec == 0)


def row_vector_width(logits: torch.Tensor, *others: torch.Tensor) -> tuple[int, bool]:
    """(VEC, RAGGED) for the row kernels (see kernels/triton/cross_entropy.py): VEC elements of
    the narrowest dtype per 16 bytes when logits' base is 16-byte aligned with contiguous
    columns (else 1: one element a lane, any strides); RAGGED when some row may start off a
    16-byte boundary or C % VEC != 0, so rows have a ragged head and tail around the aligned body."""
    vec = 16 // min(t.element_size() for t in (logits, *others))
    if not _aligned_rows(logits, vec):
        return 1, False
    R, C = logits.shape
    rows_aligned = all(R <= 1 or t.stride(0) % vec == 0 for t in (logits, *others))
    return vec, not (C % vec == 0 and rows_aligned)


def _fwd_arguments(logits, target, weight, grad_scale, ignore_index, label_smoothing, compute_grad, loss_rows, grad):
    """_cross_entropy_fwd's arguments and constexprs for one launch (R > 0, C > 0)."""
    C = logits.shape[1]
    prob = target.dim() == 2
    smoothing = label_smoothing > 0.0
    weight_sum = (weight.sum(dtype=loss_rows.dtype) if weight is not None and smoothing and not prob
                  else loss_rows)  # not read otherwise
    # As a tensor: a float kernel argument is fp32, too coarse for float64 logits.
    smoothing_t = (torch.full((), label_smoothing, device=logits.device, dtype=loss_rows.dtype) if smoothing
                   else loss_rows)
    block = _ce.block_c(C)
    g = grad if compute_grad else logits  # not written when compute_grad is False
    vec, ragged = row_vector_width(logits)
    if g.stride(1) != 1:  # never for the gradients allocated here (contiguous, or the logits)
        vec, ragged = 1, False
    args = (logits, target, weight if weight is not None else logits, weight_sum, smoothing_t, grad_scale, loss_rows,
            g, C,
            logits.stride(0), logits.stride(1), target.stride(0), target.stride(1) if prob else 0,
            weight.stride(0) if weight is not None else 0, grad_scale.stride(0) if grad_scale.dim() else 0,
            g.stride(0), g.stride(1),
            int(ignore_index))
    kwargs = dict(PROB_TARGET=prob, HAS_WEIGHT=weight is not None, SMOOTHING=smoothing,
                  COMPUTE_GRAD=bool(compute_grad), ACC_DTYPE=ACC_DTYPE[logits.dtype], BLOCK_C=block,
                  VEC=vec, RAGGED=ragged, GRAD_ALIGNED=_same_phase(logits, g, vec),
                  TARGET_ALIGNED=prob and _same_phase(logits, target, vec), num_warps=_ce.num_warps(block))
    return args, kwargs


def cross_entropy_fwd_resources(logits, target, grad_scale, label_smoothing, compute_grad, inplace=True):
    """(registers, shared memory bytes, warps) of the _cross_entropy_fwd a cross_entropy_fwd call
    with these arguments would launch, compiled (or found in Triton's cache) without launching:
    what linear_cross_entropy sizes its chunks in whole waves by. CUDA tensors only; the
    arguments may be small stand-ins with the real call's dtypes, row stride and alignment."""
    loss_rows, grad = cross_entropy_outputs(logits, compute_grad, inplace)
    args, kwargs = _fwd_arguments(logits, target, None, grad_scale, -100, label_smoothing, compute_grad, loss_rows,
                                  grad)
    kernel = _ce._cross_entropy_fwd.warmup(*args, grid=(logits.shape[0],), **kwargs)
    kernel._init_handles()  # loads the binary: n_regs comes from the driver
    return int(kernel.n_regs), int(kernel.metadata.shared), int(kernel.metadata.num_warps)


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
    loss_rows, grad = cross_entropy_outputs(logits, compute_grad, inplace)
    if R == 0:
        return loss_rows, grad
    if C == 0:  # every index target was ignored (validated); probabilities sum over nothing
        loss_rows.zero_()
        return loss_rows, grad
    args, kwargs = _fwd_arguments(logits, target, weight, grad_scale, ignore_index, label_smoothing, compute_grad,
                                  loss_rows, grad)
    wrap_triton(_ce._cross_entropy_fwd)[(R,)](*args, **kwargs)
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
    vec, ragged = row_vector_width(x, y)
    if not _same_phase(x, y, vec):
        vec, ragged = 1, False
    wrap_triton(_ce._scale_rows)[(R, triton.cdiv(C, block))](
        x, scale, y, C, x.stride(0), x.stride(1), scale.stride(0) if scale.dim() else 0, y.stride(0), y.stride(1),
        ACC_DTYPE=ACC_DTYPE[x.dtype], BLOCK_C=block, VEC=vec, RAGGED=ragged, num_warps=4,
    )
    return out
