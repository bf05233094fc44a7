"""fastdl.functional.max_pool2d: torch.nn.functional.max_pool2d's semantics on fastdl's pooling kernels.

What the kernels keep for backward is the window-local position of each window's maximum, one
byte per output element (uint8, when a window has at most 256 taps), instead of torch's 8-byte
flat index; return_indices=True asks for torch's int64 flat indices instead, and then those are
what backward reads. Inference (no grad, no indices) writes the output only.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from fastdl import ops
from fastdl.functional._checks import FLOAT_DTYPES, _check_tensor, _shape, backend_for, torch_function_dispatch
from fastdl.reference import max_pool2d as _ref


def _check_windows_reach_the_input(op: str, input: Tensor, size: int, out: int, kernel: int, stride: int,
                                   pad: int, dilation: int, dim: str) -> None:
    """Every window must hold at least one in-bounds tap. torch accepts a window that holds none
    (dilation > 1 with padding, e.g. H = 2, kernel 2, dilation 3, padding 1: taps at rows -1 and 2),
    reports an index outside the (H, W) plane for it and its backward then writes out of bounds;
    fastdl rejects the configuration. Only windows starting in the top/left padding can miss the
    input (a window starts below `size + pad` and the padding is at most half the kernel)."""
    p = 0
    while p < out and p * stride - pad < 0:
        start = p * stride - pad
        first = (-start + dilation - 1) // dilation  # the first tap at or after row/column 0
        if first >= kernel or start + first * dilation >= size:
            raise RuntimeError(
                f"fastdl.{op}: output {dim} {p} pools over no element of the input (input {_shape(input)}, "
                f"kernel_size={kernel}, stride={stride}, padding={pad}, dilation={dilation}: its taps at "
                f"{start}..{start + (kernel - 1) * dilation} step {dilation} all fall in the padding). torch returns "
                f"an index outside the input for such a window and its backward writes out of bounds; use a "
                f"smaller dilation or padding")
        p += 1


def output_memory_format(input: Tensor) -> torch.memory_format:
    """The memory format torch's max_pool2d gives its output (and indices): the input's suggested
    one for 4-D input (channels_last for NHWC strides, views included), contiguous for 3-D."""
    return suggest_memory_format(input) if input.dim() == 4 else torch.contiguous_format


@torch_function_dispatch("input")
def max_pool2d(input: Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False,
               return_indices: bool = False):
    """torch.nn.functional.max_pool2d: (N, C, H, W) or (C, H, W) input, int or tuple arguments, NaN
    propagation (a window holding a NaN gives NaN), ceil_mode, return_indices with torch's flat
    int64 indices; the output keeps the input's memory format as torch's does."""
    op = "max_pool2d"
    _check_tensor(op, "input", input, 1)
    kernel, stride, padding, dilation = _ref.normalize_args(kernel_size, stride, padding, dilation)
    if input.dim() not in (3, 4):
        raise RuntimeError(f"fastdl.{op}: non-empty 3D or 4D (batch mode) tensor expected for input, "
                           f"got {_shape(input)}")
    if any(d == 0 for d in input.shape[-3:]):
        raise RuntimeError(f"fastdl.{op}: Expected 3D or 4D (batch mode) tensor with optional 0 dim batch size "
                           f"for input, but got: {list(input.shape)}")
    try:
        P, Q = _ref.check_args(tuple(input.shape), kernel, stride, padding, dilation, ceil_mode)
    except RuntimeError as exc:
        raise RuntimeError(f"fastdl.{op}: {exc} (input {_shape(input)}, kernel_size={kernel}, stride={stride}, "
                           f"padding={padding}, dilation={dilation}, ceil_mode={bool(ceil_mode)})") from None
    if input.dtype not in FLOAT_DTYPES:
        raise NotImplementedError(f"fastdl.{op}: input dtype {input.dtype} is not supported; expected one of "
                                  f"float16, bfloat16, float32, float64")
    H, W = input.shape[-2:]
    for size, out, k, s, p, d, dim in ((H, P, kernel[0], stride[0], padding[0], dilation[0], "row"),
                                       (W, Q, kernel[1], stride[1], padding[1], dilation[1], "column")):
        _check_windows_reach_the_input(op, input, size, out, k, s, p, d, dim)
    channels_last = output_memory_format(input) == torch.channels_last
    batched = input if input.dim() == 4 else input.unsqueeze(0)
    compute_grad = torch.is_grad_enabled() and input.requires_grad
    backend = backend_for(input.device, input)
    out, saved = ops.get(op, backend)(batched, list(kernel), list(stride), list(padding), list(dilation),
                                      bool(ceil_mode), channels_last, bool(return_indices), compute_grad)
    if input.dim() == 3:
        out, saved = out.squeeze(0), (saved.squeeze(0) if return_indices else saved)
    return (out, saved) if return_indices else out
