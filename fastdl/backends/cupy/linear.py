"""CuPy launchers for linear (kernels/cuda/linear.cu). Inputs were validated upstream."""
from __future__ import annotations

import numpy as np
import torch

from fastdl.backends.common import ACC_DTYPE as _ACC_DTYPE
from fastdl.backends.common import ACTIVATION_CODES, linear_backward_saved, linear_outputs
from fastdl.backends.cupy import _runtime as rt
from fastdl.backends.cupy._runtime import BLOCK_COLS, BLOCK_ROWS
from fastdl.reference.dropout import threshold


def _precision(input: torch.Tensor):
    """The instantiation to launch: TF32 tensor cores for float32 when torch allows TF32, else
    the input's dtype (float32 then stays on the SIMT path, in full float32)."""
    return rt.TF32 if rt.tf32(input.dtype) else input.dtype


def linear_fwd(input, weight, bias, activation, negative_slope, dropout=0.0, seed=None):
    """input (M, K), weight (N, K), bias (N,) or None -> out (M, N), saved (M, N) or empty; with
    dropout, out = dropout(act(z)) (see fastdl.backends.triton.linear_fwd)."""
    M, K = input.shape
    N = weight.shape[0]
    code, out, saved, writes_saved = linear_outputs(input, weight, activation)
    if M == 0 or N == 0:
        return out, saved
    s_strides = saved.stride() if writes_saved else (0, 0)
    rt.launch("linear_fwd", input, rt.cdiv(M, BLOCK_ROWS) * rt.cdiv(N, BLOCK_COLS), (
        rt.ptr(input), rt.ptr(weight), rt.ptr(bias), rt.ptr(out), rt.ptr(saved if writes_saved else None),
        *rt.i64(M, N, K,
              input.stride(0), input.stride(1), weight.stride(0), weight.stride(1),
              bias.stride(0) if bias is not None else 0,
              out.stride(0), out.stride(1), s_strides[0], s_strides[1]),
        np.float64(negative_slope), np.int32(bias is not None), np.int32(code),
        rt.ptr(seed if dropout else None), np.int32(threshold(dropout) if dropout else 0),
        np.float64(1.0 / (1.0 - dropout)),
    ), precision=_precision(input))
    return out, saved


def linear_bwd(grad_out, input, weight, bias, saved, out, activation, negative_slope,
               needs_input_grad, needs_weight_grad, needs_bias_grad):
    """Gradients of linear_fwd; `saved` is linear_fwd's second output (or `out` for sigmoid/tanh)."""
    M, K = input.shape
    N = weight.shape[0]
    code = ACTIVATION_CODES[activation]
    s = linear_backward_saved(code, saved, out)  # None: not read without an activation
    s_strides = s.stride() if s is not None else (0, 0)
    grad_input = grad_weight = grad_bias = None
    if needs_input_grad:
        grad_input = torch.empty((M, K), device=input.device, dtype=input.dtype)
        if M > 0 and K > 0:
            if N == 0:
                grad_input.zero_()
            else:
                rt.launch("linear_bwd_input", input, rt.cdiv(M, BLOCK_ROWS) * rt.cdiv(K, BLOCK_COLS), (
                    rt.ptr(grad_out), rt.ptr(s), rt.ptr(weight), rt.ptr(grad_input),
                    *rt.i64(M, N, K,
                          grad_out.stride(0), grad_out.stride(1), s_strides[0], s_strides[1],
                          weight.stride(0), weight.stride(1), grad_input.stride(0), grad_input.stride(1)),
                    np.float64(negative_slope), np.int32(code),
                ), precision=_precision(input))
    if needs_weight_grad or needs_bias_grad:
        if needs_weight_grad:
            grad_weight = torch.empty((N, K), device=input.device, dtype=weight.dtype)
        if needs_bias_grad:
            grad_bias = torch.empty((N,), device=input.device, dtype=weight.dtype)
        if M == 0:
            for grad in (grad_weight, grad_bias):
                if grad is not None:
                    grad.zero_()
        elif N > 0:
            # Bias only: run with K = 0, so only the k-tile-0 blocks run and grad_weight is never
            # written. At least one k-tile either way, so the bias column runs even when K == 0.
            k_run = K if needs_weight_grad else 0
            w_strides = grad_weight.stride() if grad_weight is not None else (0, 0)
            rt.launch("linear_bwd_weight", input, rt.cdiv(N, BLOCK_ROWS) * max(1, rt.cdiv(k_run, BLOCK_COLS)), (
                rt.ptr(grad_out), rt.ptr(s), rt.ptr(input), rt.ptr(grad_weight), rt.ptr(grad_bias),
                *rt.i64(M, N, k_run,
                      grad_out.stride(0), grad_out.stride(1), s_strides[0], s_strides[1],
                      input.stride(0), input.stride(1), w_strides[0], w_strides[1]),
                np.float64(negative_slope), np.int32(needs_bias_grad), np.int32(code),
            ), precision=_precision(input))
    return grad_input, grad_weight, grad_bias


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
    ), stem="linear", precision=_precision(input))
    if w is not grad_weight:
        grad_weight.add_(w)
    if b is not grad_bias:
        grad_bias.add_(b)
