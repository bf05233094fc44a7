"""Triton launchers for dropout (kernels/triton/dropout.py).

The launcher interface every backend implements for it (fastdl/ops/dropout.py is the only caller:
it has validated the arguments, drawn the seed and allocated the output):

  dropout_fwd(input, seed, p, out) -> out           out = input * keep * 1/(1-p)
  dropout_bwd(grad_out, seed, p, grad_input) -> grad_input
                                                    grad_input = grad_out * keep * 1/(1-p), keep
                                                    regenerated from the same seed
  dropout_rows(input, seed, p, out) -> out          the same on an (R, C) matrix of any strides,
                                                    element (r, c) drawn as row r of (R, C) (linear's
                                                    fused dropout: its backward's gradient pass)

input and out of dropout_fwd / dropout_bwd are dense with the same strides (any order of dimensions):
the element index is the position in memory. seed is the (2,) int64 key on the input's device;
0 < p < 1.
"""
from __future__ import annotations

import torch

from fastdl.backends.triton._launch import ACC_DTYPE, interpreter_bf16, wrap_triton
from fastdl.kernels.triton import dropout as _k
from fastdl.reference.dropout import threshold


def _launch(input, seed, p, out, R, C, in_strides, out_strides):
    if R == 0 or C == 0:
        return out
    block = _k.block_size(C)
    grid = (R * -(-C // block),)
    wrap_triton(_k._dropout)[grid](
        input, out, seed, R, C, *in_strides, *out_strides, threshold(p), 1.0 / (1.0 - p),
        ACC_DTYPE=ACC_DTYPE[input.dtype], BLOCK=block, num_warps=_k.NUM_WARPS,
    )
    return out


@interpreter_bf16(results=("io",), mutates=("out",))
def dropout_fwd(input, seed, p, out):
    """out = input * keep * 1/(1-p); input and out dense with equal strides (flat in memory order)."""
    return _launch(input, seed, p, out, 1, input.numel(), (0, 1), (0, 1))


@interpreter_bf16(results=("io",), mutates=("grad_input",))
def dropout_bwd(grad_out, seed, p, grad_input):
    """grad_input = grad_out * keep * 1/(1-p), the forward's mask regenerated from seed."""
    return _launch(grad_out, seed, p, grad_input, 1, grad_out.numel(), (0, 1), (0, 1))


@interpreter_bf16(results=("io",), mutates=("out",))
def dropout_rows(input, seed, p, out):
    """out = input * keep * 1/(1-p) on (R, C) matrices of any strides, rows padded to groups of 4."""
    R, C = input.shape
    return _launch(input, seed, p, out, R, C, input.stride(), out.stride())
