"""Triton launchers for max_pool2d (kernels/triton/max_pool2d.py).

The launcher interface every backend implements for it (fastdl/ops/max_pool2d.py is the only
caller: it has validated the arguments and allocated the outputs in their layouts):

  max_pool2d_fwd(input, kernel_size, stride, padding, dilation, ceil_mode, out, saved) -> (out, saved)
  max_pool2d_bwd(grad_out, saved, kernel_size, stride, padding, dilation, grad_input) -> grad_input
"""
from __future__ import annotations

import torch

from fastdl.backends.triton._launch import ACC_DTYPE, interpreter_bf16, wrap_triton
from fastdl.kernels.triton import max_pool2d as _pool

INT32_MAX = 2**31 - 1


def save_code(saved: torch.Tensor) -> int:
    """What the forward writes beside the output, from the buffer the op allocated for it."""
    if saved.numel() == 0:
        return _pool.SAVE_NONE
    return _pool.SAVE_INDEX if saved.dtype == torch.int64 else _pool.SAVE_POS


def channels_tile(t: torch.Tensor) -> bool:
    """Tile channels (the channels_last path) when t's channels are contiguous: its (N, C, H, W)
    channel stride is 1 and there is more than one channel."""
    return t.shape[1] > 1 and t.stride(1) == 1


def _align(t: torch.Tensor, width: int) -> int:
    """NCHW rows: the largest power of two, up to 16 bytes of t's elements, that divides the row
    length and t's (N, C, row) strides: the kernels' ALIGN (row offsets are multiples of it, and
    the column mask is constant over it, so a row's stores are that many elements wide)."""
    align = 16 // t.element_size()
    while align > 1 and any(v % align for v in (width, *t.stride()[:3])):
        align //= 2
    return align


def _launch_shape(N: int, C: int, rows: int, width: int, tile_channels: bool) -> tuple[int, tuple[int], int, int]:
    """(num_rows, grid, BLOCK_ROWS, BLOCK_COLS): channel tiles over N * rows * width pixels, or
    NCHW's rows of width columns, N * C * rows of them (see kernels/triton/max_pool2d.py)."""
    block_rows, block_cols = _pool.blocks(C, width, tile_channels)
    num_rows = N * rows * width if tile_channels else N * C * rows
    col_blocks = -(-(C if tile_channels else width) // block_cols)
    return num_rows, (-(-num_rows // block_rows) * col_blocks,), block_rows, block_cols


@interpreter_bf16(results=("io", "other"), mutates=("out",))
def max_pool2d_fwd(input, kernel_size, stride, padding, dilation, ceil_mode, out, saved):
    """out[n, c, p, q] = the maximum of window (p, q) of input[n, c] with torch's NaN, tie and -inf
    rules; saved[n, c, p, q] = its tap r * S + s (uint8 saved) or torch's flat index (int64 saved),
    unless saved is empty. input (N, C, H, W) any strides; out and saved (N, C, P, Q) with the same
    strides (channels_last or contiguous). N * P * Q > 0."""
    N, C, H, W = input.shape
    P, Q = out.shape[2:]
    tile_channels = channels_tile(input)
    num_rows, grid, block_rows, block_cols = _launch_shape(N, C, P, Q, tile_channels)
    target = saved if saved.numel() else out  # not written with SAVE_NONE
    wrap_triton(_pool._max_pool2d_fwd)[grid](
        input, out, target, C, H, W, P, Q, num_rows,
        *input.stride(), *out.stride(), *stride, *padding, *dilation,
        KH=kernel_size[0], KW=kernel_size[1], SAVE=save_code(saved), CHANNELS_TILE=tile_channels,
        ROW64=num_rows + block_rows > INT32_MAX, ALIGN=1 if tile_channels else _align(out, Q),
        BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=_pool.NUM_WARPS, maxnreg=_pool.MAX_REGISTERS,
    )
    return out, saved


@interpreter_bf16(results=("io",), mutates=("grad_input",))
def max_pool2d_bwd(grad_out, saved, kernel_size, stride, padding, dilation, grad_input):
    """grad_input[n, c, h, w] = the sum of grad_out over the windows that chose input element
    (h, w) (saved: uint8 taps or int64 flat indices); every element written. grad_out and saved
    (N, C, P, Q) any strides; grad_input (N, C, H, W), numel > 0."""
    N, C, H, W = grad_input.shape
    P, Q = grad_out.shape[2:]
    tile_channels = channels_tile(grad_input)
    num_rows, grid, block_rows, block_cols = _launch_shape(N, C, H, W, tile_channels)
    wrap_triton(_pool._max_pool2d_bwd)[grid](
        grad_out, saved, grad_input, C, H, W, P, Q, num_rows,
        *grad_out.stride(), *saved.stride(), *grad_input.stride(), *stride, *padding, *dilation,
        KH=kernel_size[0], KW=kernel_size[1], SAVE_INDEX=saved.dtype == torch.int64,
        ACC_DTYPE=ACC_DTYPE[grad_out.dtype], CHANNELS_TILE=tile_channels, ROW64=num_rows + block_rows > INT32_MAX,
        ALIGN=1 if tile_channels else _align(grad_input, W),
        BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=_pool.NUM_WARPS, maxnreg=_pool.MAX_REGISTERS,
    )
    return grad_input
