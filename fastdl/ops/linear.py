"""torch.ops.fastdl.linear_<backend> and linear_backward_<backend>, with autograd.

Forward returns (out, saved): `saved` is what the backend keeps for backward (a uint8 mask for
relu/leaky_relu, the pre-activation for gelu/gelu_tanh/silu, an empty tensor otherwise). Only
the tensors backward reads are saved: sigmoid and tanh save `out`, nothing else does.

Double backward (create_graph=True): the backward recomputes act(F.linear(input, weight, bias))
with torch's ops from the saved input, weight and bias and differentiates that with a graph
(_define.recompute_grads); fastdl's kernels serve first order.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdl import backends
from fastdl.ops._define import define, fake_dense_grads, or_empty, register_fused_autograd

SAVES_OUTPUT = ("sigmoid", "tanh")
SAVES_EXTRA = ("relu", "leaky_relu", "gelu", "gelu_tanh", "silu")

# The activations as torch computes them (differentiable to any order), by the op's names.
TORCH_ACTIVATIONS = {
    "none": lambda z, s: z,
    "relu": lambda z, s: F.relu(z),
    "leaky_relu": lambda z, s: F.leaky_relu(z, s),
    "gelu": lambda z, s: F.gelu(z),
    "gelu_tanh": lambda z, s: F.gelu(z, approximate="tanh"),
    "silu": lambda z, s: F.silu(z),
    "sigmoid": lambda z, s: torch.sigmoid(z),
    "tanh": lambda z, s: torch.tanh(z),
}


def _act(name: str) -> str | None:
    return None if name == "none" else name


def _fake_saved(input: Tensor, weight: Tensor, activation: str) -> Tensor:
    M, N = input.shape[0], weight.shape[0]
    if activation in ("relu", "leaky_relu"):
        return input.new_empty((M, N), dtype=torch.uint8)
    if activation in ("gelu", "gelu_tanh", "silu"):
        return input.new_empty((M, N))
    return input.new_empty((0, 0))


def torch_linear(input: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str,
                 negative_slope: float) -> Tensor:
    """act(input @ weight.T + bias) in torch's differentiable ops."""
    return TORCH_ACTIVATIONS[activation](F.linear(input, weight, bias), negative_slope)


def torch_composite(input: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str,
                    negative_slope: float) -> tuple[Tensor, Tensor]:
    """The "torch" entry: the op's signature and outputs (saved is empty), for torch.func and forward AD."""
    return torch_linear(input, weight, bias, activation, negative_slope), input.new_empty((0, 0))


def define_op(backend: str):
    def linear(input: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str,
               negative_slope: float) -> tuple[Tensor, Tensor]:
        return backends.get(backend).linear_fwd(input, weight, bias, _act(activation), negative_slope)

    def linear_fake(input, weight, bias, activation, negative_slope):
        out = input.new_empty((input.shape[0], weight.shape[0]))
        return out, _fake_saved(input, weight, activation)

    def linear_backward(grad_out: Tensor, input: Tensor, weight: Tensor, bias: Optional[Tensor],
                        saved: Tensor, out: Optional[Tensor], activation: str, negative_slope: float,
                        needs_input_grad: bool, needs_weight_grad: bool,
                        needs_bias_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
        grads = backends.get(backend).linear_bwd(
            grad_out, input, weight, bias, saved, out, _act(activation), negative_slope,
            needs_input_grad, needs_weight_grad, needs_bias_grad)
        return or_empty(grads, grad_out)

    def linear_backward_fake(grad_out, input, weight, bias, saved, out, activation, negative_slope,
                             needs_input_grad, needs_weight_grad, needs_bias_grad):
        return fake_dense_grads(input, weight, needs_input_grad, needs_weight_grad, needs_bias_grad)

    fwd = define("linear", backend, linear, linear_fake)
    bwd = define("linear_backward", backend, linear_backward, linear_backward_fake)

    register_fused_autograd(fwd, bwd, torch_linear, SAVES_EXTRA, SAVES_OUTPUT, empty_saved=(0, 0))
    return fwd
