"""CuPy launchers for dropout (kernels/cuda/dropout.cu): the launcher interface of
fastdl/backends/triton/dropout.py, the same arguments and results (see the docstrings there)."""
from __future__ import annotations

import numpy as np
import torch

from fastdl.backends.cupy import _runtime as rt
from fastdl.reference.dropout import threshold

# Threads per block: identical to the source's DROPOUT_THREADS.
DROPOUT_THREADS = 256
PACK_BYTES = 16
# CUDA's limit on gridDim.y (rows beyond it are strided over).
MAX_GRID_Y = 65535
MAX_GRID_X = 2**31 - 1


def chunk(dtype: torch.dtype) -> int:
    """Elements a thread takes: 8 for 2-byte types (one 16-byte access), 4 for float and double."""
    return 8 if torch.empty((), dtype=dtype).element_size() == 2 else 4


def packed(R: int, tensors_and_strides) -> bool:
    """Whether whole chunks move as 16-byte vectors: unit column strides, pointers and (for R > 1)
    row strides 16-byte aligned."""
    for t, (stride_r, stride_c) in tensors_and_strides:
        size = t.element_size()
        if stride_c != 1 or t.data_ptr() % PACK_BYTES or (R > 1 and (stride_r * size) % PACK_BYTES):
            return False
    return True


def _launch(input, seed, p, out, R, C, in_strides, out_strides):
    if R == 0 or C == 0:
        return out
    blocks = rt.cdiv(rt.cdiv(C, chunk(input.dtype)), DROPOUT_THREADS)
    if blocks > MAX_GRID_X:
        raise RuntimeError(f"fastdl.dropout (cupy): {C} elements per row exceed the kernel's grid")
    pack = packed(R, ((input, in_strides), (out, out_strides)))
    rt.launch("dropout_apply", input, (blocks, min(R, MAX_GRID_Y)), (
        rt.ptr(input), rt.ptr(out), rt.ptr(seed), *rt.i64(R, C, *in_strides, *out_strides),
        np.int32(threshold(p)), np.float64(1.0 / (1.0 - p)), np.int32(pack),
    ), stem="dropout", threads=DROPOUT_THREADS)
    return out


def dropout_fwd(input, seed, p, out):
    """out = input * keep * 1/(1-p); see fastdl.backends.triton.dropout_fwd."""
    return _launch(input, seed, p, out, 1, input.numel(), (0, 1), (0, 1))


def dropout_bwd(grad_out, seed, p, grad_input):
    """grad_input = grad_out * keep * 1/(1-p), the mask regenerated; see fastdl.backends.triton.dropout_bwd."""
    return _launch(grad_out, seed, p, grad_input, 1, grad_out.numel(), (0, 1), (0, 1))


def dropout_rows(input, seed, p, out):
    """The same on (R, C) matrices of any strides; see fastdl.backends.triton.dropout_rows."""
    R, C = input.shape
    return _launch(input, seed, p, out, R, C, input.stride(), out.stride())
