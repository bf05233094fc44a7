"""Triton launchers for linear (kernels/triton/linear.py): allocate outputs, pick constexprs, launch.
Inputs were validated upstream."""
from __future__ import annotations

import torch
import triton

from fastdl.backends.common import ACTIVATION_CODES, SAVE_KIND, linear_backward_saved, linear_outputs
from fastdl.backends.triton import _launch
from fastdl.backends.triton._launch import ACC_DTYPE, input_precision, wrap_triton
from fastdl.backends.triton._launch import interpreter_bf16
from fastdl.kernels.triton import linear as _k
from fastdl.reference.dropout import threshold


@interpreter_bf16(results=("io", "io"))  # out; saved (pre-activation, or a uint8 mask: left as is)
def linear_fwd(input, weight, bias, activation, negative_slope, dropout=0.0, seed=None):
    """input (M, K), weight (N, K), bias (N,) or None -> out (M, N), saved (M, N) or empty.
    With 0 < dropout < 1 and seed ((2,) int64 key), out = dropout(act(z)): element (m, n) kept as
    row m of fastdl.backends.triton.dropout_rows draws it (saved is still act's, pre-dropout)."""
    M, K = input.shape
    N = weight.shape[0]
    code, out, saved, writes_saved = linear_outputs(input, weight, activation)
    if M == 0 or N == 0:
        return out, saved
    s_strides = saved.stride() if writes_saved else (0, 0)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    wrap_triton(_k._linear_fwd)[grid](
        input, weight, bias if bias is not None else out, out, saved, seed if dropout else out,
        M, N, K,
        input.stride(0), input.stride(1), weight.stride(0), weight.stride(1),
        bias.stride(0) if bias is not None else 0,
        out.stride(0), out.stride(1), s_strides[0], s_strides[1],
        float(negative_slope), threshold(dropout) if dropout else 0, 1.0 / (1.0 - dropout),
        HAS_BIAS=bias is not None, ACTIVATION=code, SAVE=SAVE_KIND[code], DROPOUT=bool(dropout),
        ACC_DTYPE=ACC_DTYPE[input.dtype], INPUT_PRECISION=input_precision(input.dtype),
    )
    return out, saved


@interpreter_bf16(results=("io", "io", "io"))  # grad_input, grad_weight, grad_bias
def linear_bwd(grad_out, input, weight, bias, saved, out, activation, negative_slope,
               needs_input_grad, needs_weight_grad, needs_bias_grad):
    """Gradients of linear_fwd; `saved` is linear_fwd's second output (or `out` for sigmoid/tanh)."""
    M, K = input.shape
    N = weight.shape[0]
    code = ACTIVATION_CODES[activation]
    s = linear_backward_saved(code, saved, out)
    s = s if s is not None else grad_out  # any (M, N) tensor; not read when there is no activation
    acc_dtype = ACC_DTYPE[input.dtype]
    precision = input_precision(input.dtype)
    grad_input = grad_weight = grad_bias = None
    if needs_input_grad:
        grad_input = torch.empty((M, K), device=input.device, dtype=input.dtype)
        if M > 0 and K > 0:
            if N == 0:
                grad_input.zero_()
            else:
                grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)
                # With an activation g is computed in registers, the A operand; w is B (see k_major).
                w = k_major(weight, precision) if code != 0 else weight
                wrap_triton(_k._linear_bwd_input)[grid](
                    grad_out, s, w, grad_input, M, N, K,
                    grad_out.stride(0), grad_out.stride(1), s.stride(0), s.stride(1),
                    w.stride(0), w.stride(1), grad_input.stride(0), grad_input.stride(1),
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


def k_major(t: torch.Tensor, precision: str) -> torch.Tensor:
    """t (R, C), reduced over R as a matmul's B operand: a copy contiguous along R (strides (1, R))
    where _launch.wants_k_major(t, precision) (TF32 on Hopper: see there), else t itself. The B
    operand of grad_weight = g.T @ x is x, reduced over M but contiguous along K; that of grad_input =
    g @ w with an activation (g computed in registers, the A operand) is w, reduced over N but
    contiguous along K. The kernels read any strides."""
    if not _launch.wants_k_major(t, precision) or t.stride(0) == 1 or t.numel() == 0:
        return t
    return t.t().contiguous().t()


def register_a(b: torch.Tensor, precision: str) -> bool:
    """Whether the weight gradients feed g.T, their A operand, from registers (the kernels'
    _from_registers): in TF32 products whose B operand is K-major, so both are copied 16 bytes wide."""
    return precision == "tf32" and b.stride(0) == 1 and b.shape[0] > 1


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
    input = k_major(input, precision)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * max(1, triton.cdiv(K, meta["BLOCK_K"])), splits)
    wrap_triton(_k._linear_bwd_weight)[grid](
        grad_out, s, input, weight_out, bias_out,
        M, N, K,
        grad_out.stride(0), grad_out.stride(1), s.stride(0), s.stride(1), input.stride(0), input.stride(1),
        w_strides[0], w_strides[1], w_strides[2], b_split,
        float(negative_slope),
        HAS_BIAS=grad_bias is not None, ACTIVATION=code, ACC_DTYPE=acc_dtype, INPUT_PRECISION=precision,
        REGISTER_A=register_a(input, precision),
    )
    if splits > 1:
        for partial, out in ((weight_out, grad_weight), (bias_out, grad_bias)):
            if out is None or out.numel() == 0:
                continue
            block = 1024
            wrap_triton(_k._sum_splits)[(triton.cdiv(out.numel(), block),)](
                partial, out, out.numel(), SPLITS=splits, BLOCK=block)


@interpreter_bf16(mutates=("grad_weight", "grad_bias"))
def linear_grad_weight_accumulate(grad_out, input, grad_weight, grad_bias, accumulate=True):
    """In place: grad_weight += grad_out.T @ input; grad_bias += grad_out.sum(0) (grad_bias may be None).
    accumulate=False: = instead of += (what grad_weight and grad_bias held is neither read nor kept).

    grad_out (M, N), input (M, K) in the same dtype; grad_weight (N, K) in any float dtype;
    grad_bias (N,) contiguous or None.
    """
    M, K = input.shape
    N = grad_weight.shape[0]
    if M == 0 or N == 0:
        if not accumulate:
            grad_weight.zero_()
            if grad_bias is not None:
                grad_bias.zero_()
        return
    precision = input_precision(input.dtype)
    input = k_major(input, precision)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * max(1, triton.cdiv(K, meta["BLOCK_K"])),)
    wrap_triton(_k._linear_grad_weight_accumulate)[grid](
        grad_out, input, grad_weight, grad_bias if grad_bias is not None else grad_weight,
        M, N, K,
        grad_out.stride(0), grad_out.stride(1), input.stride(0), input.stride(1),
        grad_weight.stride(0), grad_weight.stride(1),
        HAS_BIAS=grad_bias is not None, ACCUMULATE=bool(accumulate), ACC_DTYPE=ACC_DTYPE[input.dtype],
        INPUT_PRECISION=precision, REGISTER_A=register_a(input, precision),
    )
