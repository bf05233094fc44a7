"""Triton launchers for conv2d (kernels/triton/conv2d.py): allocate outputs, pick constexprs, launch.
Inputs were validated upstream: input (N, C, H, W) with N >= 1 and any strides, weight
(K, C/groups, R, S), normalized stride (sH, sW), padding (top, bottom, left, right), dilation (dH, dW).

Layouts: the output (and the saved mask or pre-activation) is channels_last when the input is, by
torch's suggest_memory_format, and contiguous otherwise, as torch's convolutions keep the input's
memory format; grad_input follows the input and grad_weight the weight in the same way. The kernels
themselves read and write channels_last only (see _nhwc).

Depthwise convolutions (C / groups == 1) take the direct stencil kernels of
kernels/triton/conv2d_depthwise.py instead of the implicit GEMM (the _depthwise_* helpers below).
"""
from __future__ import annotations

import torch
import triton
from torch._prims_common import suggest_memory_format

from fastdl.backends.common import ACTIVATION_CODES, SAVE_KIND, SAVE_MASK, SAVE_NONE
from fastdl.backends.triton import _launch
from fastdl.backends.triton._launch import ACC_DTYPE, interpreter_bf16, wrap_triton
from fastdl.kernels.triton import conv2d as _k
from fastdl.kernels.triton import conv2d_depthwise as _dw

INT32_MAX = 2**31 - 1


def memory_format(t: torch.Tensor) -> torch.memory_format:
    """torch's suggest_memory_format: channels_last when a 4-D tensor's strides are ordered as NHWC's."""
    return suggest_memory_format(t)


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """The operand as the kernels read it fastest: channels_last (NHWC; KRSC for a weight), channels
    contiguous, so every operand tile is copied 16 bytes at a time. The kernels read and write
    channels_last only: NCHW and other strided operands make one layout change here, and NCHW
    results one on the way out. Read through their strides instead, the kernels gathered element by
    element and spilled 330-807 bytes per thread on sm_80, and NCHW stores spilled 400-500 bytes on
    sm_90 (`fastdl inspect`)."""
    return t.contiguous(memory_format=torch.channels_last)


def input_precision(input: torch.Tensor) -> str:
    """TF32 for float32 follows the switch torch's own convolutions obey (cuDNN's, on by default), on
    the GPU: torch's CPU convolutions are true float32, and so are fastdl's under the interpreter.
    While fastdl.inspection captures launches (CPU stand-ins for GPU tensors) the flag decides."""
    if input.dtype != torch.float32 or not torch.backends.cudnn.allow_tf32:
        return "ieee"
    return "tf32" if input.is_cuda or _launch.launch_interceptor is not None else "ieee"


def output_shape(input, weight, stride, padding, dilation):
    N, _, H, W = input.shape
    K, _, R, S = weight.shape
    P = (H + padding[0] + padding[1] - dilation[0] * (R - 1) - 1) // stride[0] + 1
    Q = (W + padding[2] + padding[3] - dilation[1] * (S - 1) - 1) // stride[1] + 1
    return N, K, P, Q


def conv2d_outputs(input, weight, stride, padding, dilation, activation, fmt=None):
    """(activation code, out, saved, whether saved is written): out (N, K, P, Q) in memory format `fmt`
    (default: the input's); saved a uint8 mask or the pre-activation in out's shape and layout, or an
    empty tensor."""
    code = ACTIVATION_CODES[activation]
    shape = output_shape(input, weight, stride, padding, dilation)
    fmt = fmt or memory_format(input)
    out = torch.empty(shape, device=input.device, dtype=input.dtype, memory_format=fmt)
    kind = SAVE_KIND[code]
    if kind == SAVE_NONE:
        return code, out, input.new_empty((0,)), False
    saved = torch.empty(shape, device=input.device, dtype=torch.uint8 if kind == SAVE_MASK else input.dtype,
                        memory_format=fmt)
    return code, out, saved, True


def _few_channels(C_g: int) -> bool:
    return C_g < _k.FEW_CHANNELS_BELOW


@interpreter_bf16(results=("io", "io"))  # out; saved (pre-activation, or a uint8 mask: left as is)
def conv2d_fwd(input, weight, bias, stride, padding, dilation, groups, activation, negative_slope):
    """-> (out (N, K, P, Q), saved)."""
    N, C, H, W = input.shape
    K, C_g, R, S = weight.shape
    code, out, saved, _ = conv2d_outputs(input, weight, stride, padding, dilation, activation, torch.channels_last)
    _, _, P, Q = out.shape
    K_g = K // groups
    if out.numel() == 0:
        fmt = memory_format(input)
        return out.contiguous(memory_format=fmt), saved.contiguous(memory_format=fmt) if saved.numel() else saved
    save_ptr = saved if saved.numel() else out
    if C_g == 1:  # depthwise: one input channel per group
        _depthwise_fwd(_nhwc(input), weight, bias, out, save_ptr, stride, padding, dilation, code, negative_slope)
    else:
        x, w = _nhwc(input), _nhwc(weight)
        grid = lambda meta: (triton.cdiv(N * P * Q, meta["BLOCK_M"]) * triton.cdiv(K_g, meta["BLOCK_N"]), groups)
        wrap_triton(_k._conv2d_fwd)[grid](
            x, w, bias if bias is not None else out, out, save_ptr,
            N, C_g, H, W, K_g, P, Q, R, S,
            stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1],
            *x.stride(), *w.stride(), bias.stride(0) if bias is not None else 0,
            *out.stride(),
            float(negative_slope),
            HAS_BIAS=bias is not None, ACTIVATION=code, SAVE=SAVE_KIND[code], FEW_CHANNELS=_few_channels(C_g),
            ACC_DTYPE=ACC_DTYPE[input.dtype], INPUT_PRECISION=input_precision(input),
        )
    fmt = memory_format(input)
    return out.contiguous(memory_format=fmt), saved.contiguous(memory_format=fmt) if saved.numel() else saved


# Split the N*P*Q pixels of grad_weight over this many programs per tile; None: by shape.
GRAD_WEIGHT_SPLITS = None


def _grad_weight_splits(M: int, tiles: int, device) -> int:
    if GRAD_WEIGHT_SPLITS is not None:
        return GRAD_WEIGHT_SPLITS
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if tiles >= sms:
        return 1
    # Enough programs to fill the SMs twice over, each still looping over >= 4 blocks of 128 pixels.
    return max(1, min(triton.cdiv(2 * sms, tiles), M // 512, 32))


@interpreter_bf16(results=("io", "io", "io"))  # grad_input, grad_weight, grad_bias
def conv2d_bwd(grad_out, input, weight, bias, saved, out, stride, padding, dilation, groups, activation,
               negative_slope, needs_input_grad, needs_weight_grad, needs_bias_grad):
    """Gradients of conv2d_fwd; `saved` is its second output (read for relu/leaky_relu/gelu*/silu),
    `out` its first (read for sigmoid/tanh)."""
    N, C, H, W = input.shape
    K, C_g, R, S = weight.shape
    _, _, P, Q = grad_out.shape
    K_g = K // groups
    code = ACTIVATION_CODES[activation]
    kind = SAVE_KIND[code]
    s = grad_out if code == 0 else (out if kind == SAVE_NONE else saved)
    # Operands channels_last (see _nhwc); grad_input and grad_weight keep the caller's layouts.
    grad_out, s = _nhwc(grad_out), _nhwc(s)
    x, w = _nhwc(input), _nhwc(weight)
    acc_dtype = ACC_DTYPE[input.dtype]
    precision = input_precision(input)
    geometry = (N, C_g, H, W, K_g, P, Q, R, S, stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1])
    grad_input = grad_weight = grad_bias = None
    if needs_input_grad:
        grad_input = torch.empty(input.shape, device=input.device, dtype=input.dtype,
                                 memory_format=torch.channels_last)
        rows, cols = triton.cdiv(H, stride[0]), triton.cdiv(W, stride[1])
        grid = lambda meta: (triton.cdiv(N * rows * cols, meta["BLOCK_M"]) * triton.cdiv(C_g, meta["BLOCK_K"]),
                             groups * stride[0] * stride[1])
        if grad_input.numel() and C_g == 1:
            _depthwise_bwd_input(grad_out, s, w, grad_input, stride, padding, dilation, code, negative_slope)
        elif grad_input.numel():
            w_k = _k_major_weight(w, precision)
            wrap_triton(_k._conv2d_bwd_input)[grid](
                grad_out, s, w_k, grad_input, *geometry,
                *grad_out.stride(), *s.stride(), *w_k.stride(),
                *grad_input.stride(),
                float(negative_slope),
                ACTIVATION=code, ACC_DTYPE=acc_dtype, INPUT_PRECISION=precision,
            )
        grad_input = grad_input.contiguous(memory_format=memory_format(input))
    if needs_weight_grad or needs_bias_grad:
        grad_weight = torch.empty(weight.shape, device=input.device, dtype=weight.dtype,
                                  memory_format=torch.channels_last)
        grad_bias = torch.empty((K,), device=input.device, dtype=weight.dtype) if needs_bias_grad else None
        if C_g == 1:
            _depthwise_bwd_weight(grad_out, s, x, grad_weight, grad_bias, stride, padding, dilation, code,
                                  negative_slope)
        else:
            _grad_weight(grad_out, s, x, grad_weight, grad_bias, geometry, groups, code, negative_slope,
                         acc_dtype, precision)
        grad_weight = grad_weight.contiguous(memory_format=memory_format(weight)) if needs_weight_grad else None
    return grad_input, grad_weight, grad_bias


def _k_major_weight(w: torch.Tensor, precision: str) -> torch.Tensor:
    """grad_input's B operand, the weight (K, C_g, R, S) reduced over K: channels_last (w, as _nhwc
    made it) it is contiguous along C_g, which on Hopper costs 4-byte TF32 copies (see
    _launch.wants_k_major); there, a copy contiguous along K (K * C_g * R * S elements, small next to
    the activations), else w itself."""
    if not _launch.wants_k_major(w, precision) or w.numel() == 0:
        return w
    return w.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)


def _grad_weight(grad_out, s, input, grad_weight, grad_bias, geometry, groups, code, negative_slope, acc_dtype,
                 precision):
    N, C_g, H, W, K_g, P, Q, R, S = geometry[:9]
    few = _few_channels(C_g)
    taps, span = (R, S * C_g) if few else (R * S, C_g)
    tiles = triton.cdiv(K_g, 128) * max(1, triton.cdiv(span, 128)) * taps * groups
    splits = _grad_weight_splits(N * P * Q, tiles, input.device)
    if splits > 1:
        # fp32 (fp64) partial sums per split, in grad_weight's own layout, reduced in a fixed order.
        work_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
        numel = grad_weight.numel()
        weight_out = torch.empty_strided((splits,) + tuple(grad_weight.shape), (numel,) + grad_weight.stride(),
                                         device=input.device, dtype=work_dtype)
        bias_out = torch.empty((splits, K_g * groups), device=input.device, dtype=work_dtype)
        w_strides = weight_out.stride()
        b_split = bias_out.stride(0)
    else:
        weight_out = grad_weight
        bias_out = grad_bias if grad_bias is not None else grad_weight
        w_strides = (0,) + grad_weight.stride()
        b_split = 0
    grid = lambda meta: (triton.cdiv(K_g, meta["BLOCK_N"]) * max(1, triton.cdiv(span, meta["BLOCK_K"])),
                         groups * taps, splits)
    wrap_triton(_k._conv2d_bwd_weight)[grid](
        grad_out, s, input, weight_out, bias_out, *geometry,
        *grad_out.stride(), *s.stride(), *input.stride(),
        *w_strides, b_split,
        float(negative_slope),
        HAS_BIAS=grad_bias is not None, ACTIVATION=code, FEW_CHANNELS=few, ACC_DTYPE=acc_dtype,
        INPUT_PRECISION=precision, REGISTER_A=_launch.wants_k_major(input, precision),
    )
    if splits > 1:
        for partial, result in ((weight_out, grad_weight), (bias_out, grad_bias)):
            if result is not None and result.numel():
                _sum_splits(partial, result, splits)


def _sum_splits(partial, result, splits):
    """result = partial.sum(0) in a fixed order; partial (splits,) + result's shape, in its layout."""
    block = 1024
    wrap_triton(_k._sum_splits)[(triton.cdiv(result.numel(), block),)](
        partial, result, result.numel(), SPLITS=splits, BLOCK=block)


# --- depthwise (C / groups == 1): kernels/triton/conv2d_depthwise.py, FMA stencils on channel tiles ----

def _taps(weight):
    """The depthwise weight (K, 1, R, S) as (R*S, K), channels contiguous: each tap's weights are
    one 16-byte load per thread in the kernels (a copy of K*R*S elements)."""
    K, _, R, S = weight.shape
    return weight.permute(2, 3, 1, 0).reshape(R * S, K).contiguous()


def _depthwise_fwd(x, weight, bias, out, save_ptr, stride, padding, dilation, code, negative_slope):
    """out (and saved) = the depthwise forward of x (channels_last) with weight (K, 1, R, S)."""
    N, C, H, W = x.shape
    K, _, R, S = weight.shape
    w = _taps(weight)
    _, _, P, Q = out.shape
    block_p, block_c = _dw.blocks(K)
    rows = N * P * Q
    grid = (triton.cdiv(rows, block_p) * triton.cdiv(K, block_c),)
    wrap_triton(_dw._conv2d_depthwise_fwd)[grid](
        x, w, bias if bias is not None else out, out, save_ptr,
        rows, H, W, K, P, Q, R, S,
        stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1],
        *x.stride(), *w.stride(), bias.stride(0) if bias is not None else 0,
        *out.stride(),
        float(negative_slope),
        K_G=K // C, HAS_BIAS=bias is not None, ACTIVATION=code, SAVE=SAVE_KIND[code], ACC_DTYPE=ACC_DTYPE[x.dtype],
        ROW64=rows + block_p > INT32_MAX, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=_dw.NUM_WARPS,
    )


def _depthwise_bwd_input(grad_out, s, weight, grad_input, stride, padding, dilation, code, negative_slope):
    """grad_input (channels_last) of the depthwise conv: a gather over the taps that reach each pixel,
    one stride phase per program_id(1); act' applied to grad_out as it is loaded (s: what it reads)."""
    N, C, H, W = grad_input.shape
    K, _, R, S = weight.shape
    _, _, P, Q = grad_out.shape
    w = _taps(weight)
    block_p, block_c = _dw.blocks(C)
    rows = N * triton.cdiv(H, stride[0]) * triton.cdiv(W, stride[1])
    grid = (triton.cdiv(rows, block_p) * triton.cdiv(C, block_c), stride[0] * stride[1])
    wrap_triton(_dw._conv2d_depthwise_bwd_input)[grid](
        grad_out, s, w, grad_input,
        rows, H, W, C, P, Q, R, S, stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1],
        *grad_out.stride(), *s.stride(), *w.stride(),
        *grad_input.stride(),
        float(negative_slope),
        K_G=K // C, ACTIVATION=code, ACC_DTYPE=ACC_DTYPE[grad_input.dtype], ROW64=rows + block_p > INT32_MAX,
        BLOCK_P=block_p, BLOCK_C=block_c, num_warps=_dw.NUM_WARPS,
    )


def _depthwise_weight_splits(M: int, programs: int, device) -> int:
    """Splits of the N*P*Q pixels of the depthwise grad_weight: enough programs for two waves at 4
    blocks per SM (a memory-bound reduction wants many warps in flight), each still summing >= 128
    pixels; at most 256 (the fp32 partials are splits x K*R*S, next to N*P*Q*K elements read)."""
    if GRAD_WEIGHT_SPLITS is not None:
        return GRAD_WEIGHT_SPLITS
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if programs >= 8 * sms:
        return 1
    return max(1, min(triton.cdiv(8 * sms, programs), M // 128, 256))


def _depthwise_bwd_weight(grad_out, s, x, grad_weight, grad_bias, stride, padding, dilation, code, negative_slope):
    """grad_weight (K, 1, R, S), in its own layout, and grad_bias (K,) (None: not wanted) of the
    depthwise conv of x (channels_last): one pass over grad_out and x per tap block, the pixels split
    over programs when the channels alone cannot fill the GPU."""
    N, C, H, W = x.shape
    K, _, R, S = grad_weight.shape
    _, _, P, Q = grad_out.shape
    block_t, block_p, block_c = _dw.weight_blocks(K, R * S, x.element_size())
    rows = N * P * Q
    programs = triton.cdiv(K, block_c) * triton.cdiv(R * S, block_t)
    splits = _depthwise_weight_splits(rows, programs, x.device)
    if splits > 1:
        # fp32 (fp64) partial sums per split, in grad_weight's own layout, reduced in a fixed order.
        work_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        numel = grad_weight.numel()
        weight_out = torch.empty_strided((splits,) + tuple(grad_weight.shape), (numel,) + grad_weight.stride(),
                                         device=x.device, dtype=work_dtype)
        bias_out = torch.empty((splits, K), device=x.device, dtype=work_dtype)
        w_split, b_split = numel, K
    else:
        weight_out = grad_weight
        bias_out = grad_bias if grad_bias is not None else grad_weight
        w_split = b_split = 0
    wrap_triton(_dw._conv2d_depthwise_bwd_weight)[(programs, splits)](
        grad_out, s, x, weight_out, bias_out,
        rows, H, W, K, P, Q, R, S, stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1],
        *grad_out.stride(), *s.stride(), *x.stride(),
        w_split, grad_weight.stride(0), grad_weight.stride(2), grad_weight.stride(3), b_split,
        float(negative_slope),
        K_G=K // C, HAS_BIAS=grad_bias is not None, ACTIVATION=code, ACC_DTYPE=ACC_DTYPE[x.dtype],
        ROW64=rows + block_p * splits > INT32_MAX, BLOCK_T=block_t, BLOCK_P=block_p, BLOCK_C=block_c,
        num_warps=_dw.NUM_WARPS,
    )
    if splits > 1:
        for partial, result in ((weight_out, grad_weight), (bias_out, grad_bias)):
            if result is not None and result.numel():
                _sum_splits(partial, result, splits)
