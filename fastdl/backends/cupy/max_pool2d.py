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
# The grid: x over an image's items, y over the images (CUDA's limit on gridDim.y; the kernels
# stride over the rest).
MAX_GRID_Y = 65535
# An image's items, its sizes and the pooling geometry are 32-bit in the kernels.
INT32_MAX = 2**31 - 1


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


def _grid(N: int, items_per_image: int, *sizes: int) -> tuple[int, int]:
    if items_per_image > INT32_MAX or max(sizes) > INT32_MAX:
        raise RuntimeError(f"fastdl.max_pool2d (cupy): {items_per_image} items per image or a size of {max(sizes)} "
                           "does not fit the kernels' 32-bit coordinates")
    return (max(1, rt.cdiv(items_per_image, POOL_THREADS)), max(1, min(N, MAX_GRID_Y)))


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
    items = P * Q * (C // lanes(input.dtype) if pack else C)
    rt.launch("max_pool2d_fwd", input, _grid(N, items, C, H, W, *kernel_size, *stride, *padding, *dilation), (
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
    items = H * W * (C // lanes(grad_input.dtype) if pack else C)
    rt.launch("max_pool2d_bwd", grad_input, _grid(N, items, C, H, W, *kernel_size, *stride, *padding, *dilation), (
        rt.ptr(grad_out), rt.ptr(saved), rt.ptr(grad_input),
        *rt.i64(N, C, H, W, P, Q, *grad_out.stride(), *saved.stride(), *grad_input.stride(), *kernel_size, *stride,
                *padding, *dilation),
        np.int32(save_index), np.int32(pack),
    ), stem="max_pool2d", threads=POOL_THREADS)
    return grad_input
