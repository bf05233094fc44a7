"""CuPy launchers for max_pool2d (kernels/cuda/max_pool2d.cu): the launcher interface of
fastdl/backends/triton/max_pool2d.py, the same arguments and results (see the docstrings there)."""
from __future__ import annotations

import numpy as np
import torch

from fastdl.backends.cupy import _runtime as rt

# Threads per block: identical to the source's POOL_THREADS.
POOL_THREADS = 256
PACK_BYTES = 16
SAVE_NONE, SAVE_POS, SAVE_INDEX = 0, 1, 2
# Blocks of a grid at most (the kernels stride over the rest): 16 per SM on a 132-SM GPU is
# more than the 8 resident blocks of 256 threads an SM holds.
MAX_BLOCKS = 132 * 16


def lanes(dtype: torch.dtype) -> int:
    """Channels per 16-byte group: 8 half / bfloat16, 4 float, 2 double."""
    return PACK_BYTES // torch.empty((), dtype=dtype).element_size()


def packed(C: int, *tensors: torch.Tensor) -> bool:
    """Whether every tensor (N, C, y, x) is channels_last with 16-byte channel groups: channel
    stride 1, C and every pixel stride a multiple of the group, pointers aligned to the group (the
    kernels' packed path: one 16-byte load a tap, one 16-byte store)."""
    vec = lanes(tensors[0].dtype)
    if C % vec or C == 1:
        return False
    for t in tensors:
        if t.numel() == 0:
            continue
        n, c, y, x = t.stride()
        if c != 1 or any(s % vec for s in (n, y, x)) or t.data_ptr() % (vec * t.element_size()):
            return False
    return True


def _grid(items: int) -> int:
    return max(1, min(MAX_BLOCKS, rt.cdiv(items, POOL_THREADS)))


def _save_code(saved: torch.Tensor) -> int:
    if saved.numel() == 0:
        return SAVE_NONE
    return SAVE_INDEX if saved.dtype == torch.int64 else SAVE_POS


def max_pool2d_fwd(input, kernel_size, stride, padding, dilation, ceil_mode, out, saved):
    """Window maxima and what backward reads (kernels/cuda/max_pool2d.cu); see
    fastdl.backends.triton.max_pool2d_fwd."""
    N, C, H, W = input.shape
    P, Q = out.shape[2:]
    save = _save_code(saved)
    pack = packed(C, input, out, *((saved,) if save == SAVE_POS else ()))
    items = N * P * Q * (C // lanes(input.dtype) if pack else C)
    rt.launch("max_pool2d_fwd", input, _grid(items), (
        rt.ptr(input), rt.ptr(out), rt.ptr(saved if save != SAVE_NONE else None),
        *rt.i64(N, C, H, W, P, Q, *input.stride(), *out.stride(), *kernel_size, *stride, *padding, *dilation),
        np.int32(save), np.int32(pack),
    ), stem="max_pool2d", threads=POOL_THREADS)
    return out, saved


def max_pool2d_bwd(grad_out, saved, kernel_size, stride, padding, dilation, grad_input):
    """grad_input by gathering over the windows that chose each element; see
    fastdl.backends.triton.max_pool2d_bwd."""
    N, C, H, W = grad_input.shape
    P, Q = grad_out.shape[2:]
    save_index = saved.dtype == torch.int64
    pack = packed(C, grad_input, grad_out, *(() if save_index else (saved,)))
    items = N * H * W * (C // lanes(grad_input.dtype) if pack else C)
    rt.launch("max_pool2d_bwd", grad_input, _grid(items), (
        rt.ptr(grad_out), rt.ptr(saved), rt.ptr(grad_input),
        *rt.i64(N, C, H, W, P, Q, *grad_out.stride(), *saved.stride(), *grad_input.stride(), *kernel_size, *stride,
                *padding, *dilation),
        np.int32(save_index), np.int32(pack),
    ), stem="max_pool2d", threads=POOL_THREADS)
    return grad_input
