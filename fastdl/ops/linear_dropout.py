"""torch.ops.fastdl.linear_dropout_<backend> and linear_dropout_backward_<backend>: linear with its
activation and dropout fused into the epilogue, with autograd.

linear_dropout(input (M, K), weight (N, K), bias (N,) | None, activation: str, negative_slope: float,
               p: float in (0, 1), seed (2,) int64) -> (out (M, N), saved)

out = dropout(act(input @ weight.T + bias)); element (m, n) is kept as row m of an (M, N) view is in
fastdl/ops/dropout.py's scheme (fastdl/reference/dropout.py: counter m * ceil(N / 4) + n // 4, word
n % 4), so when N % 4 == 0 the mask is exactly the one fastdl.functional.dropout draws for the
contiguous output from the same seed. `saved` is what linear saves for its activation (the relu
mask, the pre-activation; nothing per element for dropout).

Backward regenerates the mask from the seed: one pass g = grad_out * keep / (1 - p)
(dropout_rows, the dropout kernel on the (M, N) gradient), then linear's backward kernels on g
(sigmoid and tanh, which differentiate through the output, read it undone: out * (1 - p) where
kept). Double backward recomputes dropout(act(F.linear(...))) with torch's ops and the same mask.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastdl import backends
from fastdl.ops._define import (acc_dtype, create_graph, define, fake_dense_grads, or_empty, recompute_grads,
                                register_autograd)
from fastdl.ops.dropout import keep_factor_torch
from fastdl.ops.linear import SAVES_EXTRA, SAVES_OUTPUT, _act, _fake_saved, torch_linear


def torch_linear_dropout(input: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str,
                         negative_slope: float, p: float, seed: Tensor) -> Tensor:
    """dropout(act(input @ weight.T + bias)) in torch's differentiable ops, the kernels' mask."""
    y = torch_linear(input, weight, bias, activation, negative_slope)
    factor = keep_factor_torch(seed, p, y.shape[0], y.shape[1], y.dtype)
    return (y.to(factor.dtype) * factor).to(y.dtype)


def torch_composite(input: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str, negative_slope: float,
                    p: float, seed: Tensor) -> tuple[Tensor, Tensor]:
    """The "torch" entry (torch.func, forward AD): the op's outputs, saved empty."""
    return torch_linear_dropout(input, weight, bias, activation, negative_slope, p, seed), input.new_empty((0, 0))


def define_op(backend: str):
    def linear_dropout(input: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str,
                       negative_slope: float, p: float, seed: Tensor) -> tuple[Tensor, Tensor]:
        return backends.get(backend).linear_fwd(input, weight, bias, _act(activation), negative_slope, p, seed)

    def linear_dropout_fake(input, weight, bias, activation, negative_slope, p, seed):
        return input.new_empty((input.shape[0], weight.shape[0])), _fake_saved(input, weight, activation)

    def linear_dropout_backward(grad_out: Tensor, input: Tensor, weight: Tensor, bias: Optional[Tensor],
                                saved: Tensor, out: Optional[Tensor], activation: str, negative_slope: float,
                                p: float, seed: Tensor, needs_input_grad: bool, needs_weight_grad: bool,
                                needs_bias_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
        launchers = backends.get(backend)
        grad = torch.empty(grad_out.shape, device=grad_out.device, dtype=grad_out.dtype)
        if grad.numel():
            launchers.dropout_rows(grad_out, seed, p, grad)
        if out is not None and activation in SAVES_OUTPUT:
            out = (out.to(acc_dtype(out.dtype)) * (1.0 - p)).to(out.dtype)
        grads = launchers.linear_bwd(grad, input, weight, bias, saved, out, _act(activation), negative_slope,
                                     needs_input_grad, needs_weight_grad, needs_bias_grad)
        return or_empty(grads, grad_out)

    def linear_dropout_backward_fake(grad_out, input, weight, bias, saved, out, activation, negative_slope, p, seed,
                                     needs_input_grad, needs_weight_grad, needs_bias_grad):
        return fake_dense_grads(input, weight, needs_input_grad, needs_weight_grad, needs_bias_grad)

    fwd = define("linear_dropout", backend, linear_dropout, linear_dropout_fake)
    bwd = define("linear_dropout_backward", backend, linear_dropout_backward, linear_dropout_backward_fake)

    def setup_context(ctx, inputs, output):
        input, weight, bias, activation, negative_slope, p, seed = inputs
        out, saved = output
        ctx.options = (activation, negative_slope, p)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(input, weight, bias, saved if activation in SAVES_EXTRA else None,
                              out if activation in SAVES_OUTPUT else None, seed)
        ctx.mark_non_differentiable(saved)

    def backward(ctx, grad_out, _grad_saved):
        none = (None,) * 4  # activation, negative_slope, p, seed
        if grad_out is None:
            return (None,) * 3 + none
        input, weight, bias, saved, out, seed = ctx.saved_tensors
        activation, negative_slope, p = ctx.options
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])
        if create_graph():
            grads = recompute_grads(
                lambda x, w, b: torch_linear_dropout(x, w, b, activation, negative_slope, p, seed),
                (input, weight, bias), needs, (grad_out,))
            return (*grads, *none)
        if saved is None:
            saved = grad_out.new_empty((0, 0))
        grads = bwd(grad_out, input, weight, bias, saved, out, activation, negative_slope, p, seed, *needs)
        return (*(g if need else None for g, need in zip(grads, needs)), *none)

    register_autograd(fwd, backward, setup_context)
    return fwd
