"""torch.ops.fastdl.dropout_<backend> and dropout_backward_<backend>, with autograd.

dropout(input, seed (2,) int64, p: float) -> out
dropout_backward(grad_out, seed, p) -> grad_input

Randomness. The functional layer draws the key per call, on the input's device, from torch's
default generator of that device:

    seed = torch.randint(0, 2**31 - 1, (2,), dtype=torch.int64, device=input.device)

so torch.manual_seed makes runs reproducible, nothing syncs with the host, and a captured CUDA
graph replays the draw. The kernels read the two words as the Philox4x32-10 key (k0, k1). The mask
is a pure function of (seed, p, element): element i of the input, counted in memory order (the
input is dense: contiguous, channels_last or any permutation; the output has its strides), has
the counter i // 4 and takes word i % 4 of the four Philox returns; it is kept when the top 24
bits of that word, as a uniform in [0, 1), are >= p. Block sizes and launch configurations do not
enter, and the Triton kernel, the CUDA kernel and the NumPy reference draw the same mask
(fastdl/reference/dropout.py has the scheme; tests/test_dropout.py checks the three agree).

Kept elements are scaled by 1/(1-p) in float32 (float64 for float64), rounded once; the mask
multiplies (torch's rule: a dropped NaN or inf gives NaN, a dropped -x gives -0.0). For float16
and bfloat16 that is torch's CUDA result; torch's CPU kernel rounds the scale to the input dtype
first (a 1-ulp difference on some elements).

Backward regenerates the mask from the saved seed: grad_input = grad_out * keep / (1 - p), the
forward's kernel applied to grad_out, in the input's layout. Nothing per element is saved. The
backward op has the same op as its own backward (dropout is linear), so double backward and
higher orders run the kernels. Forward AD and torch.func transforms run the "torch" entry, which
draws the same mask with Philox written in torch's int64 ops.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastdl import backends
from fastdl.ops._define import acc_dtype, define, register_autograd
from fastdl.reference import dropout as _ref

SEED_HIGH = 2**31 - 1  # key words are drawn from [0, SEED_HIGH)


def draw_seed(device: torch.device) -> Tensor:
    """A fresh key from torch's default generator of `device`, kept on the device."""
    return torch.randint(0, SEED_HIGH, (2,), dtype=torch.int64, device=device)


def _empty_like_dense(t: Tensor) -> Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)


def _in_layout(grad: Tensor, shape, strides) -> Tensor:
    """grad with the strides the forward's input had (the mask is in its memory order)."""
    if tuple(grad.stride()) == tuple(strides) or grad.numel() <= 1:
        return grad
    return torch.empty_strided(shape, strides, dtype=grad.dtype, device=grad.device).copy_(grad)


# --- Philox in torch's ops (the "torch" entry: forward AD, torch.func) --------------------------

_LOW = 0xFFFFFFFF


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit halves of a * b for b < 2**32, without leaving int64: a is split in 16-bit
    halves so every partial product is below 2**48."""
    t, u = (a & 0xFFFF) * b, (a >> 16) * b
    s = ((u & 0xFFFF) << 16) + t
    return (u >> 16) + (s >> 32), s & _LOW


def _philox_torch(counter: Tensor, k0: Tensor, k1: Tensor) -> tuple[Tensor, ...]:
    c0, c1 = counter & _LOW, counter >> 32
    c2 = c3 = torch.zeros_like(counter)
    for _ in range(_ref.PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(_ref.PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(_ref.PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _ref.PHILOX_W0) & _LOW, (k1 + _ref.PHILOX_W1) & _LOW
    return c0, c1, c2, c3


def keep_factor_torch(seed: Tensor, p: float, rows: int, cols: int, dtype: torch.dtype) -> Tensor:
    """(rows, cols) keep / (1-p) in `dtype` from the key `seed`, in torch's ops on seed's device."""
    groups = _ref.row_groups(cols)
    counter = (torch.arange(rows, device=seed.device)[:, None] * groups
               + torch.arange(groups, device=seed.device)[None, :])
    k0, k1 = seed[0] & _LOW, seed[1] & _LOW
    words = torch.stack(_philox_torch(counter, k0, k1), dim=-1).reshape(rows, groups * 4)[:, :cols]
    keep = (words >> (32 - _ref.UNIFORM_BITS)) >= _ref.threshold(p)
    return keep.to(acc_dtype(dtype)) * (1.0 / (1.0 - p))


def torch_composite(input: Tensor, seed: Tensor, p: float) -> Tensor:
    """The "torch" entry: the same mask and rounding in torch's differentiable ops."""
    order = sorted(range(input.dim()), key=lambda d: (-input.stride(d), d))
    in_memory_order = input.permute(order) if order else input
    factor = keep_factor_torch(seed, p, 1, input.numel(), input.dtype).reshape(in_memory_order.shape)
    inverse = sorted(range(len(order)), key=lambda i: order[i])
    factor = factor.permute(inverse) if order else factor.reshape(())
    return (input.to(factor.dtype) * factor).to(input.dtype)


def define_op(backend: str):
    def dropout(input: Tensor, seed: Tensor, p: float) -> Tensor:
        out = _empty_like_dense(input)
        if out.numel() == 0:
            return out
        return backends.get(backend).dropout_fwd(input, seed, p, out)

    def dropout_fake(input, seed, p):
        return _empty_like_dense(input)

    def dropout_backward(grad_out: Tensor, seed: Tensor, p: float) -> Tensor:
        grad_input = _empty_like_dense(grad_out)
        if grad_input.numel() == 0:
            return grad_input
        return backends.get(backend).dropout_bwd(grad_out, seed, p, grad_input)

    def dropout_backward_fake(grad_out, seed, p):
        return _empty_like_dense(grad_out)

    fwd = define("dropout", backend, dropout, dropout_fake)
    bwd = define("dropout_backward", backend, dropout_backward, dropout_backward_fake)

    def setup_context(ctx, inputs, output):
        input, seed, p = inputs
        ctx.layout = (tuple(input.shape), tuple(input.stride()))
        ctx.p = p
        ctx.save_for_backward(seed)

    def backward(ctx, grad_out):
        if grad_out is None:
            return None, None, None
        (seed,) = ctx.saved_tensors
        return bwd(_in_layout(grad_out, *ctx.layout), seed, ctx.p), None, None

    register_autograd(fwd, backward, setup_context)
    # grad_input is linear in grad_out with the same mask: the backward's backward is itself.
    register_autograd(bwd, backward, setup_context)
    return fwd
