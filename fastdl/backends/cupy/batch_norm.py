"""CuPy launchers for batch_norm (kernels/cuda/batch_norm.cu): the launcher contract's four pieces,
the same arguments and results as fastdl/backends/reference/batch_norm.py and
fastdl/backends/triton/batch_norm.py. Inputs were validated upstream.

*3 tensors are (N, C, S) strided views, each read or written through its own strides. x's strides
pick the kernels' mapping: channels (stride_c == 1 with C > 1: NHWC, and (N, C) input) or rows
(NCHW). Statistics and sums come back in the acc dtype (float64 for float64 x, else float32), (C,).
The reductions split over grid rows when the channel tiles alone leave the GPU idle, and combine the
splits in a second, fixed-order launch: the split count depends on the shape only, never on timing,
so the result is bitwise the same on every run (and on every GPU).
"""
from __future__ import annotations

import numpy as np
import torch

from fastdl.backends.common import ACC_DTYPE as _ACC_DTYPE
from fastdl.backends.common import ACTIVATION_CODES
from fastdl.backends.cupy import _runtime as rt

# Identical to the source's BN_THREADS, BN_PACK_BYTES, BN_MAX_GROUPS and BN_VEC_* bits.
BN_THREADS = 256
BN_PACK_BYTES = 16
BN_MAX_GROUPS = 32
VEC_X, VEC_RESIDUAL, VEC_OUT, VEC_MASK, VEC_GRAD_OUT, VEC_GRAD_INPUT, VEC_GRAD_RESIDUAL = 1, 2, 4, 8, 16, 32, 64
# The reductions aim at REDUCE_BLOCKS blocks (4 per SM of a 132-SM H100 / H200, fixed rather than
# asked of the device so that the split, and so the bits, do not depend on the GPU), each block row
# covering at least MIN_SPLIT_STEPS steps of its threads (a split's partial, 8 bytes per channel,
# costs nothing next to the items it reads).
REDUCE_BLOCKS = 528
MIN_SPLIT_STEPS = 8
# The element-wise kernels give a block row ELEMT_STEPS steps of its threads (each thread divides
# its first item index once per block row: a 64-bit division, a few dozen instructions).
ELEMT_STEPS = 8
# CUDA's limit on gridDim.y (the element-wise kernels stride over the rest).
MAX_GRID_Y = 65535
MASK_ACTIVATIONS = (ACTIVATION_CODES["relu"], ACTIVATION_CODES["leaky_relu"])


def _code(activation) -> int:
    return ACTIVATION_CODES[None if activation in (None, "none") else activation]


def lanes(dtype: torch.dtype) -> int:
    """Elements per 16-byte pack: 8 half / bfloat16, 4 float, 2 double."""
    return BN_PACK_BYTES // torch.empty((), dtype=dtype).element_size()


class Geometry:
    """How the kernels map x (N, C, S) to blocks and threads: the mapping (channels or rows), the
    lanes an item covers (`packed`), the channel groups a block takes, the items and the step."""

    def __init__(self, x3: torch.Tensor):
        N, C, S = x3.shape
        self.N, self.C, self.S = N, C, S
        self.channels = x3.stride(1) == 1 and C > 1
        self.lanes = lanes(x3.dtype)
        self.packed = (C if self.channels else S) % self.lanes == 0 and self.lanes > 1
        lanes_ = self.lanes if self.packed else 1
        if self.channels:
            groups = C // lanes_ if self.packed else C
            self.tile_groups = min(BN_MAX_GROUPS, 1 << max(0, (groups - 1).bit_length()))
            self.grid_x = rt.cdiv(groups, self.tile_groups)
            self.step = BN_THREADS // self.tile_groups
            self.items = N * S
            self.item_count = 1  # elements of a channel an item holds
        else:
            self.tile_groups = 1
            self.grid_x = C
            self.step = BN_THREADS
            self.items = N * S // lanes_
            self.item_count = lanes_
        self.inner = 1 if self.channels else 2  # the dimension an item's lanes run along

    def vec(self, t: torch.Tensor | None) -> bool:
        """Whether t's lanes are one aligned 16-byte (for uint8 masks: LANES-byte) access: its stride
        along the lanes is 1, its other strides multiples of the lanes and its pointer aligned."""
        if t is None or not self.packed:
            return False
        strides = t.stride()
        if strides[self.inner] != 1 and t.shape[self.inner] > 1:
            return False
        if any(s % self.lanes for d, s in enumerate(strides) if d != self.inner and t.shape[d] > 1):
            return False
        return t.data_ptr() % (self.lanes * t.element_size()) == 0

    def vec_bits(self, **tensors) -> int:
        bits = {"x": VEC_X, "residual": VEC_RESIDUAL, "out": VEC_OUT, "mask": VEC_MASK, "grad_out": VEC_GRAD_OUT,
                "grad_input": VEC_GRAD_INPUT, "grad_residual": VEC_GRAD_RESIDUAL}
        return sum(bits[name] for name, t in tensors.items() if self.vec(t))

    def reduce_split(self) -> tuple[int, int]:
        """(splits, chunk): the reduction's block rows and the items each covers."""
        min_chunk = self.step * MIN_SPLIT_STEPS
        splits = max(1, min(rt.cdiv(REDUCE_BLOCKS, self.grid_x), rt.cdiv(self.items, min_chunk), MAX_GRID_Y))
        chunk = rt.cdiv(rt.cdiv(self.items, splits), self.step) * self.step
        return rt.cdiv(self.items, chunk), chunk

    def elemt_grid(self) -> tuple[tuple[int, int], int]:
        chunk = self.step * ELEMT_STEPS
        return (self.grid_x, max(1, min(rt.cdiv(self.items, chunk), MAX_GRID_Y))), chunk


def _strides(t: torch.Tensor | None) -> list:
    return rt.i64(*(t.stride() if t is not None else (0, 0, 0)))


def _weight_float(x3: torch.Tensor, weight, bias) -> int:
    p = weight if weight is not None else bias
    return int(p is not None and p.dtype == torch.float32 and x3.dtype != torch.float32)


def _flags(g: Geometry, vec: int, weight_float: int) -> tuple:
    return (np.int32(int(g.channels)), np.int32(int(g.packed)), np.int32(g.tile_groups), np.int32(vec),
            np.int32(weight_float))


def batch_norm_stats(x3):
    """Per-channel mean and biased variance over N and S (acc dtype, (C,)); N * S >= 1."""
    N, C, S = x3.shape
    acc = _ACC_DTYPE[x3.dtype]
    mean = torch.empty(C, device=x3.device, dtype=acc)
    var = torch.empty(C, device=x3.device, dtype=acc)
    if C == 0:
        return mean, var
    g = Geometry(x3)
    splits, chunk = g.reduce_split()
    partial = torch.empty((2, splits, C), device=x3.device, dtype=acc) if splits > 1 else None
    rt.launch("batch_norm_stats", x3, (g.grid_x, splits), (
        rt.ptr(x3), rt.ptr(partial), rt.ptr(mean), rt.ptr(var), *rt.i64(N, C, S), *_strides(x3), np.int64(chunk),
        *_flags(g, g.vec_bits(x=x3), 0)[:4],
    ), stem="batch_norm", threads=BN_THREADS)
    if splits > 1:
        rt.launch("batch_norm_stats_combine", x3, rt.cdiv(C, BN_THREADS), (
            rt.ptr(partial), rt.ptr(mean), rt.ptr(var), *rt.i64(C, splits, N * S, chunk * g.item_count),
        ), stem="batch_norm", threads=BN_THREADS, precision=acc)
    return mean, var


def batch_norm_elemt(x3, mean, invstd, weight, bias, residual3, activation, negative_slope, out3, mask3):
    """out3 = act((x - mean) * invstd * weight + bias (+ residual3)); mask3 (if given) = pre > 0."""
    N, C, S = x3.shape
    if x3.numel() == 0:
        return None
    g = Geometry(x3)
    grid, chunk = g.elemt_grid()
    vec = g.vec_bits(x=x3, residual=residual3, out=out3, mask=mask3)
    rt.launch("batch_norm_elemt", x3, grid, (
        rt.ptr(x3), rt.ptr(mean), rt.ptr(invstd), rt.ptr(weight), rt.ptr(bias), rt.ptr(residual3), rt.ptr(out3),
        rt.ptr(mask3), *rt.i64(N, C, S), *_strides(x3), *_strides(residual3), *_strides(out3), *_strides(mask3),
        np.int64(chunk), np.float64(negative_slope), np.int32(_code(activation)),
        *_flags(g, vec, _weight_float(x3, weight, bias)),
    ), stem="batch_norm", threads=BN_THREADS)
    return None


def _backward_mask(mask3, code: int):
    """The mask the backward reads act' from: only relu's and leaky_relu's (any other activation
    recomputes the pre-activation)."""
    return mask3 if code in MASK_ACTIVATIONS else None


def batch_norm_backward_reduce(grad_out3, x3, mean, invstd, weight, bias, residual3, mask3, activation,
                               negative_slope):
    """(sum_dy, sum_dy_xmu) per channel (acc dtype, (C,)), dy = grad_out * act'(pre)."""
    N, C, S = x3.shape
    acc = _ACC_DTYPE[x3.dtype]
    sum_dy = torch.empty(C, device=x3.device, dtype=acc)
    sum_dy_xmu = torch.empty(C, device=x3.device, dtype=acc)
    if x3.numel() == 0:
        return sum_dy.zero_(), sum_dy_xmu.zero_()
    code = _code(activation)
    mask3 = _backward_mask(mask3, code)
    if mask3 is not None or code == 0:
        residual3 = None  # not read: act' comes from the mask (or there is no activation)
    g = Geometry(x3)
    splits, chunk = g.reduce_split()
    partial = torch.empty((2, splits, C), device=x3.device, dtype=acc) if splits > 1 else None
    vec = g.vec_bits(x=x3, residual=residual3, mask=mask3, grad_out=grad_out3)
    rt.launch("batch_norm_backward_reduce", x3, (g.grid_x, splits), (
        rt.ptr(grad_out3), rt.ptr(x3), rt.ptr(mean), rt.ptr(invstd), rt.ptr(weight), rt.ptr(bias), rt.ptr(residual3),
        rt.ptr(mask3), rt.ptr(partial), rt.ptr(sum_dy), rt.ptr(sum_dy_xmu), *rt.i64(N, C, S), *_strides(grad_out3),
        *_strides(x3), *_strides(residual3), *_strides(mask3), np.int64(chunk), np.float64(negative_slope),
        np.int32(code), *_flags(g, vec, _weight_float(x3, weight, bias)),
    ), stem="batch_norm", threads=BN_THREADS)
    if splits > 1:
        rt.launch("batch_norm_backward_reduce_combine", x3, rt.cdiv(C, BN_THREADS), (
            rt.ptr(partial), rt.ptr(sum_dy), rt.ptr(sum_dy_xmu), *rt.i64(C, splits),
        ), stem="batch_norm", threads=BN_THREADS, precision=acc)
    return sum_dy, sum_dy_xmu


def batch_norm_backward_elemt(grad_out3, x3, mean, invstd, weight, bias, residual3, mask3, activation,
                              negative_slope, mean_dy, mean_dy_xmu, grad_input3, grad_residual3):
    """grad_input3 = (dy - mean_dy - (x - mean) * invstd^2 * mean_dy_xmu) * invstd * weight (dy * invstd *
    weight without mean_dy: eval); grad_residual3 = dy. Either may be None."""
    N, C, S = x3.shape
    if x3.numel() == 0 or (grad_input3 is None and grad_residual3 is None):
        return None
    code = _code(activation)
    mask3 = _backward_mask(mask3, code)
    if mask3 is not None or code == 0:
        residual3 = None
    g = Geometry(x3)
    grid, chunk = g.elemt_grid()
    vec = g.vec_bits(x=x3, residual=residual3, mask=mask3, grad_out=grad_out3, grad_input=grad_input3,
                     grad_residual=grad_residual3)
    rt.launch("batch_norm_backward_elemt", x3, grid, (
        rt.ptr(grad_out3), rt.ptr(x3), rt.ptr(mean), rt.ptr(invstd), rt.ptr(weight), rt.ptr(bias), rt.ptr(residual3),
        rt.ptr(mask3), rt.ptr(mean_dy), rt.ptr(mean_dy_xmu), rt.ptr(grad_input3), rt.ptr(grad_residual3),
        *rt.i64(N, C, S), *_strides(grad_out3), *_strides(x3), *_strides(residual3), *_strides(mask3),
        *_strides(grad_input3), *_strides(grad_residual3), np.int64(chunk), np.float64(negative_slope),
        np.int32(code), *_flags(g, vec, _weight_float(x3, weight, bias)),
    ), stem="batch_norm", threads=BN_THREADS)
    return None
