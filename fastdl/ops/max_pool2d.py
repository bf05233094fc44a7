"""torch.ops.fastdl.max_pool2d_<backend> and max_pool2d_backward_<backend>, with autograd.

max_pool2d(input (N, C, H, W), kernel_size, stride, padding, dilation (2-element lists), ceil_mode,
channels_last, return_indices, compute_grad) -> (out (N, C, P, Q), saved)

`saved` is what backward reads, written by the forward kernel beside the output, in the output's
layout:
  - return_indices: torch's indices, int64 flat offsets h * W + w into each (H, W) plane (the op's
    second output is then exactly what torch returns);
  - otherwise, when compute_grad: the window-local tap r * S + s of each window's maximum, one
    byte (uint8) per output element when a window has at most 256 taps (int64 flat indices
    beyond: a window of more than 16 x 16);
  - otherwise (inference): an empty tensor; the forward writes the output only.
The output (and saved) is channels_last when `channels_last`, else contiguous (the functional
layer picks torch's format). This module allocates both, so every backend and the fake agree.

Backward is a gather (every backend): each input element sums grad_out over the windows that
cover it and chose it, so no atomics and a fixed order (deterministic). It writes a new
grad_input; `saved` stays intact, so a second backward, jacobian and gradcheck work.

Double backward: max_pool2d's backward is linear in grad_out. Under create_graph it is computed
in torch ops instead (grad_out scattered to the saved flat indices: `_torch_backward`), whose
derivative with respect to grad_out is the gather torch's own double backward computes; there
is none with respect to the input (piecewise linear), as in torch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdl import backends
from fastdl.ops._define import create_graph, define, register_autograd
from fastdl.reference.max_pool2d import output_size

# The most taps a window may have for its position to be kept in one byte.
MAX_BYTE_TAPS = 256


def _format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def output_shape(input_shape, kernel_size, stride, padding, dilation, ceil_mode) -> tuple[int, int, int, int]:
    N, C, H, W = input_shape
    return (N, C, output_size(H, kernel_size[0], stride[0], padding[0], dilation[0], ceil_mode),
            output_size(W, kernel_size[1], stride[1], padding[1], dilation[1], ceil_mode))


def saved_dtype(kernel_size, return_indices: bool) -> torch.dtype:
    if return_indices or kernel_size[0] * kernel_size[1] > MAX_BYTE_TAPS:
        return torch.int64
    return torch.uint8


def allocate(input: Tensor, kernel_size, stride, padding, dilation, ceil_mode: bool, channels_last: bool,
             return_indices: bool, compute_grad: bool) -> tuple[Tensor, Tensor]:
    """(out, saved), uninitialized, in the layout the op returns them (see the module docstring)."""
    shape = output_shape(input.shape, kernel_size, stride, padding, dilation, ceil_mode)
    fmt = _format(channels_last)
    out = torch.empty(shape, device=input.device, dtype=input.dtype, memory_format=fmt)
    dtype = saved_dtype(kernel_size, return_indices)
    if return_indices or compute_grad:
        saved = torch.empty(shape, device=input.device, dtype=dtype, memory_format=fmt)
    else:
        saved = torch.empty((0,), device=input.device, dtype=dtype)
    return out, saved


def flat_indices(saved: Tensor, input_shape, kernel_size, stride, padding, dilation) -> Tensor:
    """torch's flat indices from saved window positions (int64 saved is returned as is)."""
    if saved.dtype == torch.int64:
        return saved
    W = input_shape[3]
    (S,), (sH, sW), (pH, pW), (dH, dW) = kernel_size[1:], stride, padding, dilation
    P, Q = saved.shape[2:]
    pos = saved.to(torch.int64)
    h0 = (torch.arange(P, device=saved.device) * sH - pH).view(P, 1)
    w0 = (torch.arange(Q, device=saved.device) * sW - pW).view(1, Q)
    return (h0 + pos // S * dH) * W + (w0 + pos % S * dW)


def _torch_backward(grad_out: Tensor, saved: Tensor, input_shape, kernel_size, stride, padding, dilation) -> Tensor:
    """grad_input in torch's differentiable ops (for double backward): grad_out added at each
    window's chosen element."""
    N, C, H, W = input_shape
    index = flat_indices(saved, input_shape, kernel_size, stride, padding, dilation).reshape(N * C, -1)
    grad = grad_out.new_zeros((N * C, H * W))
    return grad.scatter_add(1, index, grad_out.reshape(N * C, -1)).reshape(N, C, H, W)


def torch_composite(input: Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
                    dilation: list[int], ceil_mode: bool, channels_last: bool, return_indices: bool,
                    compute_grad: bool) -> tuple[Tensor, Tensor]:
    """The "torch" entry: torch's max_pool2d (its indices as saved when return_indices), for
    torch.func transforms and forward AD."""
    out, indices = F.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode,
                                return_indices=True)
    if not channels_last:
        out, indices = out.contiguous(), indices.contiguous()
    return out, indices if return_indices else indices.new_empty((0,))


def define_op(backend: str):
    def max_pool2d(input: Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
                   dilation: list[int], ceil_mode: bool, channels_last: bool, return_indices: bool,
                   compute_grad: bool) -> tuple[Tensor, Tensor]:
        out, saved = allocate(input, kernel_size, stride, padding, dilation, ceil_mode, channels_last,
                              return_indices, compute_grad)
        if out.numel() == 0:
            return out, saved
        return backends.get(backend).max_pool2d_fwd(input, kernel_size, stride, padding, dilation, ceil_mode,
                                                     out, saved)

    def max_pool2d_fake(input, kernel_size, stride, padding, dilation, ceil_mode, channels_last, return_indices,
                        compute_grad):
        return allocate(input, kernel_size, stride, padding, dilation, ceil_mode, channels_last, return_indices,
                        compute_grad)

    def max_pool2d_backward(grad_out: Tensor, saved: Tensor, input_shape: list[int], kernel_size: list[int],
                            stride: list[int], padding: list[int], dilation: list[int],
                            channels_last: bool) -> Tensor:
        grad_input = torch.empty(input_shape, device=grad_out.device, dtype=grad_out.dtype,
                                 memory_format=_format(channels_last))
        if grad_input.numel() == 0:
            return grad_input
        return backends.get(backend).max_pool2d_bwd(grad_out, saved, kernel_size, stride, padding, dilation,
                                                    grad_input)

    def max_pool2d_backward_fake(grad_out, saved, input_shape, kernel_size, stride, padding, dilation, channels_last):
        return torch.empty(input_shape, device=grad_out.device, dtype=grad_out.dtype,
                           memory_format=_format(channels_last))

    fwd = define("max_pool2d", backend, max_pool2d, max_pool2d_fake)
    bwd = define("max_pool2d_backward", backend, max_pool2d_backward, max_pool2d_backward_fake)

    def setup_context(ctx, inputs, output):
        input, kernel_size, stride, padding, dilation, ceil_mode, channels_last, return_indices, compute_grad = inputs
        _, saved = output
        ctx.geometry = (list(input.shape), list(kernel_size), list(stride), list(padding), list(dilation))
        ctx.channels_last, ctx.compute_grad = channels_last, compute_grad or return_indices
        ctx.save_for_backward(saved)
        ctx.mark_non_differentiable(saved)

    def backward(ctx, grad_out, _grad_saved):
        none = (None,) * 9
        if grad_out is None or not ctx.needs_input_grad[0]:
            return none
        if not ctx.compute_grad:
            raise RuntimeError("fastdl.max_pool2d: the forward ran with compute_grad=False, so it kept no "
                               "positions of the maxima")
        (saved,) = ctx.saved_tensors
        input_shape, kernel_size, stride, padding, dilation = ctx.geometry
        if create_graph():
            grad_input = _torch_backward(grad_out, saved, input_shape, kernel_size, stride, padding, dilation)
        else:
            grad_input = bwd(grad_out, saved, input_shape, kernel_size, stride, padding, dilation, ctx.channels_last)
        return (grad_input,) + none[1:]

    register_autograd(fwd, backward, setup_context)
    return fwd
