"""torch.ops.fastdl.linear_<backend> and linear_backward_<backend>, with autograd.

Forward returns (out, saved): `saved` is what the backend keeps for backward (a uint8 mask for
relu/leaky_relu, the pre-activation for gelu/gelu_tanh/silu, an empty tensor otherwise). Only
the tensors backward reads are saved: sigmoid and tanh save `out`, nothing else does.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastdl import backends
from fastdl.ops._define import BACKEND_NAMES, define, fake_dense_grads, or_empty

SAVES_OUTPUT = ("sigmoid", "tanh")
SAVES_EXTRA = ("relu", "leaky_relu", "gelu", "gelu_tanh", "silu")


def _act(name: str) -> str | None:
    return None if name == "none" else name


def _fake_saved(input: Tensor, weight: Tensor, activation: str) -> Tensor:
    M, N = input.shape[0], weight.shape[0]
    if activation in ("relu", "leaky_relu"):
        return input.new_empty((M, N), dtype=torch.uint8)
    if activation in ("gelu", "gelu_tanh", "silu"):
        return input.new_empty((M, N))
    return input.new_empty((0, 0))


def _make(backend: str):
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

    def setup_context(ctx, inputs, output):
        input, weight, bias, activation, negative_slope = inputs
        out, saved = output
        ctx.activation, ctx.negative_slope = activation, negative_slope
        ctx.has_bias = bias is not None
        ctx.save_for_backward(input, weight, bias,
                              saved if activation in SAVES_EXTRA else None,
                              out if activation in SAVES_OUTPUT else None)
        ctx.mark_non_differentiable(saved)

    def backward(ctx, grad_out, _grad_saved):
        input, weight, bias, saved, out = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if saved is None:
            saved = grad_out.new_empty((0, 0))
        grad_input, grad_weight, grad_bias = bwd(
            grad_out, input, weight, bias, saved, out, ctx.activation, ctx.negative_slope,
            needs[0], needs[1], ctx.has_bias and needs[2])
        return (grad_input if needs[0] else None,
                grad_weight if needs[1] else None,
                grad_bias if ctx.has_bias and needs[2] else None,
                None, None)

    fwd.register_autograd(backward, setup_context=setup_context)
    return fwd


OPS = {name: _make(name) for name in BACKEND_NAMES}
