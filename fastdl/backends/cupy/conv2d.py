"""CuPy launchers for conv2d (kernels/cuda/conv2d.cu). Inputs were validated upstream.

stride (sH, sW), padding (top, bottom, left, right), dilation (dH, dW) come normalized. The output
(and grad_input) is channels_last exactly when the input is, by torch's suggest_memory_format, as
torch's convolutions do; any other strides of any tensor are read as they are.

One input channel per group (C/groups == 1: depthwise, with any channel multiplier K/groups) runs
the direct kernels conv2d_dw_* (the implicit GEMM would have one useful column per group); they
take the GEMM kernels' arguments, so only the kernel's name and grid differ. They compute in float
(double) without tensor cores, so TF32 does not apply to them.
"""
from __future__ import annotations

import numpy as np
import torch
from torch._prims_common import suggest_memory_format

from fastdl.backends.common import ACC_DTYPE as _ACC_DTYPE
from fastdl.backends.common import ACTIVATION_CODES, SAVE_KIND, SAVE_MASK, SAVE_NONE, linear_backward_saved
from fastdl.backends.cupy import _runtime as rt
from fastdl.backends.cupy._runtime import BLOCK_COLS, BLOCK_ROWS, THREADS

# The weight gradient's reduction over the N*P*Q pixels is split across grid rows when the weight
# has fewer tiles than SPLIT_WAVES blocks per SM would fill; each split covers at least
# MIN_SPLIT_PIXELS pixels (a multiple of the 64-pixel step), so a split's partial (float32, 4 bytes
# per weight element) costs less than the pixels it reads.
SPLIT_WAVES = 2
MIN_SPLIT_PIXELS = 1024
_DEFAULT_SMS = 132  # where the device cannot be asked (the host emulation): an H100 / H200
# The kernels divide pixel indices in 32 bits (a 64-bit division is a long software routine): a
# launch covers at most MAX_PIXELS output (and input) pixels; a larger batch runs as several launches
# of whole images.
MAX_PIXELS = 2**31 - 2**16
# CUDA's limit on gridDim.y, which holds groups x phases (bwd_input) and groups x splits (bwd_weight),
# and the depthwise kernels' channel tiles (fwd, bwd_input) or splits (bwd_weight).
_MAX_GRID_Y = 65535
# The depthwise kernels' block: DW_CHANNELS channels x dw_pixels(dtype) pixels, a thread owning 16
# bytes of channels of one pixel (conv2d_depthwise.cuh's DW_CHANNELS and DwTile).
DW_CHANNELS = 32


def depthwise(weight: torch.Tensor) -> bool:
    """Whether conv2d runs the direct depthwise kernels: one input channel per group."""
    return weight.shape[1] == 1


def dw_pixels(dtype: torch.dtype) -> int:
    """Pixels per block of the depthwise kernels: THREADS / (DW_CHANNELS / (16 bytes of dtype))."""
    return THREADS * (16 // dtype.itemsize) // DW_CHANNELS


def _dw_grid(pixels: int, channels: int, dtype: torch.dtype) -> tuple[int, int]:
    tiles = rt.cdiv(channels, DW_CHANNELS)
    if tiles > _MAX_GRID_Y:
        raise ValueError(f"conv2d (cupy): {channels} channels in a depthwise convolution; the CUDA kernels take at "
                         f"most {_MAX_GRID_Y * DW_CHANNELS}")
    return rt.cdiv(pixels, dw_pixels(dtype)), tiles


def _precision(dtype: torch.dtype):
    """TF32 tensor cores for float32 when torch.backends.cudnn.allow_tf32 (the flag torch's own
    convolutions follow; the matmul flag is linear's), else the dtype's own path."""
    return rt.TF32 if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 else dtype


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if suggest_memory_format(t) == torch.channels_last else torch.contiguous_format


def output_size(size: int, kernel: int, stride: int, before: int, after: int, dilation: int) -> int:
    return (size + before + after - dilation * (kernel - 1) - 1) // stride + 1


def _geometry(input, weight, stride, padding, dilation, groups):
    N, C, H, W = input.shape
    K, _, R, S = weight.shape
    top, bottom, left, right = padding
    P = output_size(H, R, stride[0], top, bottom, dilation[0])
    Q = output_size(W, S, stride[1], left, right, dilation[1])
    return rt.i64(N, C, H, W, K, P, Q, R, S, groups, stride[0], stride[1], top, left, dilation[0], dilation[1]), P, Q


def _batches(N: int, pixels_per_image: int) -> list[tuple[int, int]]:
    """[(n0, n1)]: the batch in runs of whole images of at most MAX_PIXELS pixels each."""
    if pixels_per_image > MAX_PIXELS:
        raise ValueError(f"conv2d (cupy): {pixels_per_image} pixels in one image; the CUDA kernels index at "
                         f"most {MAX_PIXELS} pixels per launch")
    step = max(1, MAX_PIXELS // max(pixels_per_image, 1))
    return [(n0, min(N, n0 + step)) for n0 in range(0, N, step)]


def conv2d_fwd(input, weight, bias, stride, padding, dilation, groups, activation, negative_slope):
    """input (N, C, H, W), weight (K, C/groups, R, S), bias (K,) or None -> (out (N, K, P, Q), saved):
    saved is a uint8 mask like out for relu / leaky_relu, the pre-activation for gelu / gelu_tanh /
    silu, an empty tensor otherwise."""
    N, C, H, W = input.shape
    K = weight.shape[0]
    _, P, Q = _geometry(input, weight, stride, padding, dilation, groups)
    code = ACTIVATION_CODES[activation]
    kind = SAVE_KIND[code]
    layout = _memory_format(input)
    out = torch.empty((N, K, P, Q), device=input.device, dtype=input.dtype, memory_format=layout)
    if kind == SAVE_NONE:
        saved = input.new_empty((0,))
    else:
        saved = torch.empty((N, K, P, Q), device=input.device, memory_format=layout,
                            dtype=torch.uint8 if kind == SAVE_MASK else input.dtype)
    if out.numel() == 0:
        return out, saved
    Kg = K // groups
    dw = depthwise(weight)
    for n0, n1 in _batches(N, P * Q):
        x = input[n0:n1]
        geometry, _, _ = _geometry(x, weight, stride, padding, dilation, groups)
        s = saved[n0:n1] if kind != SAVE_NONE else None
        if dw:
            name, grid = "conv2d_dw_fwd", _dw_grid((n1 - n0) * P * Q, K, input.dtype)
        else:
            name, grid = "conv2d_fwd", (rt.cdiv((n1 - n0) * P * Q, BLOCK_ROWS) * rt.cdiv(Kg, BLOCK_COLS), groups)
        rt.launch(name, input, grid, (
            rt.ptr(x), rt.ptr(weight), rt.ptr(bias), rt.ptr(out[n0:n1]), rt.ptr(s),
            *geometry, *rt.i64(*x.stride(), *weight.stride(), bias.stride(0) if bias is not None else 0,
                               *out.stride(), *(s.stride() if s is not None else (0, 0, 0, 0))),
            np.float64(negative_slope), np.int32(bias is not None), np.int32(code),
        ), stem="conv2d", precision=input.dtype if dw else _precision(input.dtype))
    return out, saved


def _sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_SMS


def weight_grad_splits(pixels: int, tiles: int, device: torch.device) -> tuple[int, int]:
    """(splits, pixels per split) of the weight gradient's reduction: one split when the weight's
    `tiles` blocks fill SPLIT_WAVES blocks per SM, else as many as fill them, each at least
    MIN_SPLIT_PIXELS pixels. Depends only on the shapes and the device: deterministic."""
    wanted = rt.cdiv(SPLIT_WAVES * _sms(device), max(tiles, 1))
    split_len = max(MIN_SPLIT_PIXELS, rt.cdiv(rt.cdiv(pixels, max(wanted, 1)), BLOCK_ROWS) * BLOCK_ROWS)
    splits = max(1, rt.cdiv(pixels, split_len))
    return (1, pixels) if splits == 1 else (splits, split_len)


def conv2d_bwd(grad_out, input, weight, bias, saved, out, stride, padding, dilation, groups, activation,
               negative_slope, needs_input_grad, needs_weight_grad, needs_bias_grad):
    """Gradients of conv2d_fwd -> (grad_input, grad_weight, grad_bias), None where not needed.
    `saved` is conv2d_fwd's second output; `out` its first (read for sigmoid / tanh)."""
    N, C, H, W = input.shape
    K, Cg, R, S = weight.shape
    Kg = K // groups
    _, P, Q = _geometry(input, weight, stride, padding, dilation, groups)
    code = ACTIVATION_CODES[activation]
    s = linear_backward_saved(code, saved, out)  # None: not read without an activation
    dw = depthwise(weight)
    precision = input.dtype if dw else _precision(input.dtype)
    sH, sW = stride
    grad_input = grad_weight = grad_bias = None

    def launch_args(n0, n1):
        """This run of images' geometry, grad_out and saved pointers and strides."""
        geometry, _, _ = _geometry(input[n0:n1], weight, stride, padding, dilation, groups)
        g, sv = grad_out[n0:n1], s[n0:n1] if s is not None else None
        return geometry, (rt.ptr(g), rt.ptr(sv)), (*g.stride(), *(sv.stride() if sv is not None else (0, 0, 0, 0)))

    if needs_input_grad:
        grad_input = torch.empty((N, C, H, W), device=input.device, dtype=input.dtype,
                                 memory_format=_memory_format(input))
        if grad_input.numel() > 0:
            for n0, n1 in _batches(N, max(H * W, P * Q)):
                geometry, pointers, strides = launch_args(n0, n1)
                gi = grad_input[n0:n1]
                if dw:  # one thread per input pixel and 16 bytes of channels
                    name, grid = "conv2d_dw_bwd_input", _dw_grid((n1 - n0) * H * W, C, input.dtype)
                else:  # rows for phase (0, 0), the largest; column tiles over the group's channels
                    rows = (n1 - n0) * rt.cdiv(H, sH) * rt.cdiv(W, sW)
                    name, grid = "conv2d_bwd_input", (rt.cdiv(rows, BLOCK_ROWS) * rt.cdiv(Cg, BLOCK_COLS),
                                                      groups * sH * sW)
                rt.launch(name, input, grid, (
                    *pointers, rt.ptr(weight), rt.ptr(gi),
                    *geometry, *rt.i64(*strides, *weight.stride(), *gi.stride()),
                    np.float64(negative_slope), np.int32(code),
                ), stem="conv2d", precision=precision)
    if needs_weight_grad:
        grad_weight = torch.empty(weight.shape, device=weight.device, dtype=weight.dtype,
                                  memory_format=_memory_format(weight))
    if needs_bias_grad:
        grad_bias = torch.empty((K,), device=weight.device, dtype=weight.dtype)
    if (needs_weight_grad or needs_bias_grad) and K > 0:
        if N * P * Q == 0:
            for grad in (grad_weight, grad_bias):
                if grad is not None:
                    grad.zero_()
        else:
            _weight_grad(input, weight, grad_weight, grad_bias, launch_args, P * Q, groups, code, negative_slope,
                         precision)
    return grad_input, grad_weight, grad_bias


def _weight_grad(input, weight, grad_weight, grad_bias, launch_args, pixels_per_image, groups, code, negative_slope,
                 precision):
    """grad_weight and / or grad_bias (the other None): one launch per run of images, its pixels split
    when the weight is small; partials (one per split and run) summed in order by conv2d_sum_splits."""
    N = input.shape[0]
    K, Cg, R, S = weight.shape
    Kg = K // groups
    # Bias only: no columns, so only the blocks of column tile 0 run and sum the rows.
    columns = R * S * Cg if grad_weight is not None else 0
    if depthwise(weight):  # a block per DW_CHANNELS channels and split; no groups on the grid
        name, tiles, grid_groups = "conv2d_dw_bwd_weight", rt.cdiv(K, DW_CHANNELS), 1
    else:
        tiles = rt.cdiv(Kg, BLOCK_ROWS) * max(1, rt.cdiv(columns, BLOCK_COLS))
        name, grid_groups = "conv2d_bwd_weight", groups
    batches = _batches(N, pixels_per_image)
    largest = max(n1 - n0 for n0, n1 in batches) * pixels_per_image
    splits, split_len = weight_grad_splits(largest, tiles * grid_groups, input.device)
    if grid_groups * splits > _MAX_GRID_Y:
        splits = _MAX_GRID_Y // grid_groups
        split_len = rt.cdiv(rt.cdiv(largest, splits), BLOCK_ROWS) * BLOCK_ROWS
    total = splits * len(batches)
    acc = _ACC_DTYPE[input.dtype]
    partial_weight = partial_bias = None
    if total > 1:
        if grad_weight is not None:
            partial_weight = torch.empty((total, K, columns), device=input.device, dtype=acc)
        if grad_bias is not None:
            partial_bias = torch.empty((total, K), device=input.device, dtype=acc)
    w_strides = grad_weight.stride() if grad_weight is not None else (0, 0, 0, 0)
    for index, (n0, n1) in enumerate(batches):
        geometry, pointers, strides = launch_args(n0, n1)
        parts = slice(index * splits, (index + 1) * splits)
        rt.launch(name, input, (tiles, grid_groups * splits), (
            *pointers, rt.ptr(input[n0:n1]), rt.ptr(grad_weight), rt.ptr(grad_bias),
            rt.ptr(partial_weight[parts] if partial_weight is not None else None),
            rt.ptr(partial_bias[parts] if partial_bias is not None else None),
            *geometry, *rt.i64(*strides, *input.stride(), *w_strides, columns, splits, split_len),
            np.float64(negative_slope), np.int32(grad_bias is not None), np.int32(code),
        ), stem="conv2d", precision=precision)
    if total > 1:
        outputs = K * columns + (K if grad_bias is not None else 0)
        rt.launch("conv2d_sum_splits", input, rt.cdiv(outputs, THREADS), (
            rt.ptr(partial_weight), rt.ptr(partial_bias), rt.ptr(grad_weight), rt.ptr(grad_bias),
            *rt.i64(K, Cg, S, columns, total, *w_strides),
        ), stem="conv2d")
