"""Triton launchers: allocate outputs, pick constexprs, launch. Inputs were validated upstream."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

try:  # torch >= 2.6: lets torch.compile see through the launch (torch.library.triton_op).
    from torch.library import wrap_triton as _wrap
except ImportError:  # pragma: no cover - older torch
    def _wrap(kernel):
        return kernel

from fastdl.backends.common import (ACTIVATION_CODES, SAVE_KIND, cross_entropy_outputs, linear_backward_saved,
                                    linear_outputs)
from fastdl.kernels.triton import linear as _k

_ACC_DTYPE = {torch.float16: tl.float32, torch.bfloat16: tl.float32, torch.float32: tl.float32,
              torch.float64: tl.float64}


def _input_precision(dtype: torch.dtype) -> str:
    # TF32 follows torch's own switch, so fastdl matches F.linear's numerics on Ampere+.
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def linear_fwd(input, weight, bias, activation, negative_slope):
    """input (M, K), weight (N, K), bias (N,) or None -> out (M, N), saved (M, N) or empty."""
    M, K = input.shape
    N = weight.shape[0]
    code, out, saved, writes_saved = linear_outputs(input, weight, activation)
    if M == 0 or N == 0:
        return out, saved
    s_strides = saved.stride() if writes_saved else (0, 0)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _wrap(_k._linear_fwd)[grid](
        input, weight, bias if bias is not None else out, out, saved,
        M, N, K,
        input.stride(0), input.stride(1), weight.stride(0), weight.stride(1),
        bias.stride(0) if bias is not None else 0,
        out.stride(0), out.stride(1), s_strides[0], s_strides[1],
        float(negative_slope),
        HAS_BIAS=bias is not None, ACTIVATION=code, SAVE=SAVE_KIND[code],
        ACC_DTYPE=_ACC_DTYPE[input.dtype], INPUT_PRECISION=_input_precision(input.dtype),
    )
    return out, saved


def linear_bwd(grad_out, input, weight, bias, saved, out, activation, negative_slope,
               needs_input_grad, needs_weight_grad, needs_bias_grad):
    """Gradients of linear_fwd; `saved` is linear_fwd's second output (or `out` for sigmoid/tanh)."""
    M, K = input.shape
    N = weight.shape[0]
    code = ACTIVATION_CODES[activation]
    s = linear_backward_saved(code, saved, out)
    s = s if s is not None else grad_out  # any (M, N) tensor; not read when there is no activation
    acc_dtype = _ACC_DTYPE[input.dtype]
    precision = _input_precision(input.dtype)
    grad_input = grad_weight = grad_bias = None
    if needs_input_grad:
        grad_input = torch.empty((M, K), device=input.device, dtype=input.dtype)
        if M > 0 and K > 0:
            if N == 0:
                grad_input.zero_()
            else:
                grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)
                _wrap(_k._linear_bwd_input)[grid](
                    grad_out, s, weight, grad_input, M, N, K,
                    grad_out.stride(0), grad_out.stride(1), s.stride(0), s.stride(1),
                    weight.stride(0), weight.stride(1), grad_input.stride(0), grad_input.stride(1),
                    float(negative_slope),
                    ACTIVATION=code, ACC_DTYPE=acc_dtype, INPUT_PRECISION=precision,
                )
    if needs_weight_grad or needs_bias_grad:
        grad_weight = torch.empty((N, K), device=input.device, dtype=weight.dtype)
        grad_bias = torch.empty((N,), device=input.device, dtype=weight.dtype) if needs_bias_grad else None
        if M == 0:
            grad_weight.zero_()
            if grad_bias is not None:
                grad_bias.zero_()
        elif N > 0:
            _grad_weight(grad_out, s, input, grad_weight, grad_bias, code, negative_slope, acc_dtype, precision)
        if not needs_weight_grad:
            grad_weight = None
    return grad_input, grad_weight, grad_bias


# Split the rows of grad_weight = g.T @ x over this many programs per (N, K) tile; None: by shape.
GRAD_WEIGHT_SPLITS = None


def _grad_weight_splits(M, N, K, device) -> int:
    if GRAD_WEIGHT_SPLITS is not None:
        return GRAD_WEIGHT_SPLITS
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = triton.cdiv(N, 128) * max(1, triton.cdiv(K, 128))
    if tiles >= sms:
        return 1
    # Enough programs to fill the SMs twice over, each still looping over >= 4 blocks of 128 rows.
    return max(1, min(triton.cdiv(2 * sms, tiles), M // 512, 32))


def _grad_weight(grad_out, s, input, grad_weight, grad_bias, code, negative_slope, acc_dtype, precision):
    M, K = input.shape
    N = grad_weight.shape[0]
    splits = _grad_weight_splits(M, N, K, input.device)
    if splits > 1:
        # fp32 (fp64) partial sums per split, reduced in a fixed order: deterministic.
        work_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
        weight_out = torch.empty((splits, N, K), device=input.device, dtype=work_dtype)
        bias_out = torch.empty((splits, N), device=input.device, dtype=work_dtype)
        w_strides = weight_out.stride()
        b_split = bias_out.stride(0)
    else:
        weight_out, bias_out = grad_weight, grad_bias if grad_bias is not None else grad_weight
        w_strides = (0,) + grad_weight.stride()
        b_split = 0
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * max(1, triton.cdiv(K, meta["BLOCK_K"])), splits)
    _wrap(_k._linear_bwd_weight)[grid](
        grad_out, s, input, weight_out, bias_out,
        M, N, K,
        grad_out.stride(0), grad_out.stride(1), s.stride(0), s.stride(1), input.stride(0), input.stride(1),
        w_strides[0], w_strides[1], w_strides[2], b_split,
        float(negative_slope),
        HAS_BIAS=grad_bias is not None, ACTIVATION=code, ACC_DTYPE=acc_dtype, INPUT_PRECISION=precision,
    )
    if splits > 1:
        for partial, out in ((weight_out, grad_weight), (bias_out, grad_bias)):
            if out is None or out.numel() == 0:
                continue
            block = 1024
            _wrap(_k._sum_splits)[(triton.cdiv(out.numel(), block),)](
                partial, out, out.numel(), SPLITS=splits, BLOCK=block)


# --- cross_entropy ---
# The launcher interface every backend implements for cross_entropy and linear_cross_entropy
# (fastdl/ops/cross_entropy.py is the only caller; it has validated everything):
#
#   cross_entropy_fwd(logits, target, weight, grad_scale, ignore_index, label_smoothing,
#                     compute_grad, inplace=False) -> (loss_rows, grad_logits)
#   cross_entropy_bwd(grad_logits, scale) -> None                     (in place)
#   linear_grad_weight_accumulate(grad_out, input, grad_weight, grad_bias) -> None   (optional)
from fastdl.kernels.triton import cross_entropy as _ce



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
    _wrap(_ce._cross_entropy_fwd)[(R,)](
        logits, target, weight if weight is not None else logits, weight_sum, smoothing_t, grad_scale, loss_rows, g,
        C,
        logits.stride(0), logits.stride(1), target.stride(0), target.stride(1) if prob else 0,
        weight.stride(0) if weight is not None else 0, grad_scale.stride(0) if grad_scale.dim() else 0,
        g.stride(0), g.stride(1),
        int(ignore_index),
        PROB_TARGET=prob, HAS_WEIGHT=weight is not None, SMOOTHING=smoothing, COMPUTE_GRAD=bool(compute_grad),
        ACC_DTYPE=_ACC_DTYPE[logits.dtype], BLOCK_C=block, num_warps=_ce.num_warps(block),
    )
    return loss_rows, grad


def cross_entropy_bwd(grad_logits, scale):
    """In place: grad_logits[r, :] *= scale (shape ()) or scale[r] (shape (R,)); any float dtypes.

    cross_entropy's backward (grad_output per row for reduction="none") and the final scaling of
    linear_cross_entropy's gradients. A 1-D grad_logits is treated as one row.
    """
    x = grad_logits if grad_logits.dim() == 2 else grad_logits.view(1, -1)
    R, C = x.shape
    if R == 0 or C == 0:
        return
    block = min(1024, triton.next_power_of_2(C))
    _wrap(_ce._scale_rows)[(R, triton.cdiv(C, block))](
        x, scale, C, x.stride(0), x.stride(1), scale.stride(0) if scale.dim() else 0,
        ACC_DTYPE=_ACC_DTYPE[x.dtype], BLOCK_C=block, num_warps=4,
    )


def linear_grad_weight_accumulate(grad_out, input, grad_weight, grad_bias):
    """In place: grad_weight += grad_out.T @ input; grad_bias += grad_out.sum(0) (grad_bias may be None).

    grad_out (M, N), input (M, K) in the same dtype; grad_weight (N, K) in any float dtype;
    grad_bias (N,) contiguous or None.
    """
    M, K = input.shape
    N = grad_weight.shape[0]
    if M == 0 or N == 0:
        return
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * max(1, triton.cdiv(K, meta["BLOCK_K"])),)
    _wrap(_ce._linear_grad_weight_accumulate)[grid](
        grad_out, input, grad_weight, grad_bias if grad_bias is not None else grad_weight,
        M, N, K,
        grad_out.stride(0), grad_out.stride(1), input.stride(0), input.stride(1),
        grad_weight.stride(0), grad_weight.stride(1),
        HAS_BIAS=grad_bias is not None, ACC_DTYPE=_ACC_DTYPE[input.dtype],
        INPUT_PRECISION=_input_precision(input.dtype),
    )
