"""torch.ops.fastdl.conv2d_<backend> and conv2d_backward_<backend>, with autograd.

The arguments are normalized by the functional layer: input (N, C, H, W) with N >= 1 and any
strides, weight (K, C/groups, R, S), stride [sH, sW], padding [top, bottom, left, right],
dilation [dH, dW]. Forward returns (out, saved): out (N, K, P, Q) is channels_last when the input
is (torch's suggest_memory_format), contiguous otherwise; `saved` is a uint8 mask for
relu/leaky_relu, the pre-activation for gelu/gelu_tanh/silu (both in out's shape and layout), an
empty tensor otherwise. Only the tensors backward reads are saved: sigmoid and tanh save `out`.

Double backward (create_graph=True): the backward recomputes act(conv2d(input, weight, bias)) with
torch's ops from the saved input, weight and bias and differentiates that with a graph
(_define.recompute_grads), as linear does; fastdl's kernels serve first order.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._prims_common import suggest_memory_format

from fastdl import backends
from fastdl.ops._define import define, or_empty, register_fused_autograd
from fastdl.ops.linear import SAVES_EXTRA, SAVES_OUTPUT, TORCH_ACTIVATIONS, _act


def output_shape(input: Tensor, weight: Tensor, stride, padding, dilation) -> tuple[int, int, int, int]:
    N, _, H, W = input.shape
    K, _, R, S = weight.shape
    P = (H + padding[0] + padding[1] - dilation[0] * (R - 1) - 1) // stride[0] + 1
    Q = (W + padding[2] + padding[3] - dilation[1] * (S - 1) - 1) // stride[1] + 1
    return N, K, P, Q


def torch_conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups: int,
                 activation: str, negative_slope: float) -> Tensor:
    """act(conv2d(input, weight) + bias) in torch's differentiable ops (per-side padding by F.pad
    when the sides differ, as torch's own padding="same" does for even kernels)."""
    top, bottom, left, right = padding
    if top == bottom and left == right:
        z = F.conv2d(input, weight, bias, tuple(stride), (top, left), tuple(dilation), groups)
    else:
        z = F.conv2d(F.pad(input, (left, right, top, bottom)), weight, bias, tuple(stride), 0, tuple(dilation), groups)
    return TORCH_ACTIVATIONS[activation](z, negative_slope)


def torch_composite(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int], padding: list[int],
                    dilation: list[int], groups: int, activation: str, negative_slope: float) -> tuple[Tensor, Tensor]:
    """The "torch" entry: the op's signature and outputs (saved is empty), for torch.func and forward AD."""
    out = torch_conv2d(input, weight, bias, stride, padding, dilation, groups, activation, negative_slope)
    return out, input.new_empty((0,))


def _fake_outputs(input, weight, stride, padding, dilation, activation):
    shape = output_shape(input, weight, stride, padding, dilation)
    fmt = suggest_memory_format(input)
    out = torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=fmt)
    if activation in ("relu", "leaky_relu"):
        return out, torch.empty(shape, dtype=torch.uint8, device=input.device, memory_format=fmt)
    if activation in ("gelu", "gelu_tanh", "silu"):
        return out, torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=fmt)
    return out, input.new_empty((0,))


def define_op(backend: str):
    def conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int], padding: list[int],
               dilation: list[int], groups: int, activation: str, negative_slope: float) -> tuple[Tensor, Tensor]:
        return backends.get(backend).conv2d_fwd(input, weight, bias, tuple(stride), tuple(padding), tuple(dilation),
                                                groups, _act(activation), negative_slope)

    def conv2d_fake(input, weight, bias, stride, padding, dilation, groups, activation, negative_slope):
        return _fake_outputs(input, weight, stride, padding, dilation, activation)

    def conv2d_backward(grad_out: Tensor, input: Tensor, weight: Tensor, bias: Optional[Tensor], saved: Tensor,
                        out: Optional[Tensor], stride: list[int], padding: list[int], dilation: list[int], groups: int,
                        activation: str, negative_slope: float, needs_input_grad: bool, needs_weight_grad: bool,
                        needs_bias_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
        grads = backends.get(backend).conv2d_bwd(
            grad_out, input, weight, bias, saved, out, tuple(stride), tuple(padding), tuple(dilation), groups,
            _act(activation), negative_slope, needs_input_grad, needs_weight_grad, needs_bias_grad)
        return or_empty(grads, grad_out)

    def conv2d_backward_fake(grad_out, input, weight, bias, saved, out, stride, padding, dilation, groups, activation,
                             negative_slope, needs_input_grad, needs_weight_grad, needs_bias_grad):
        empty = input.new_empty((0,))
        like = lambda t: torch.empty(t.shape, dtype=t.dtype, device=t.device,  # noqa: E731
                                     memory_format=suggest_memory_format(t))
        return (like(input) if needs_input_grad else empty,
                like(weight) if needs_weight_grad else empty,
                weight.new_empty((weight.shape[0],)) if needs_bias_grad else empty)

    fwd = define("conv2d", backend, conv2d, conv2d_fake)
    bwd = define("conv2d_backward", backend, conv2d_backward, conv2d_backward_fake)

    register_fused_autograd(fwd, bwd, torch_conv2d, SAVES_EXTRA, SAVES_OUTPUT, empty_saved=(0,))
    return fwd
