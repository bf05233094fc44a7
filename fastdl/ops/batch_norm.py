"""torch.ops.fastdl.batch_norm_<backend> and batch_norm_backward_<backend>, with autograd.

batch_norm(input (N, C, *spatial), weight (C,) | None, bias (C,) | None, residual | None,
           running_mean (C,) | None, running_var (C,) | None, training, eps, activation,
           negative_slope, channels_last, save_mask) -> (out, mean, invstd, var, mask)

The functional layer hands in the input contiguous or, when `channels_last`, in channels_last /
channels_last_3d; the residual (input's shape) in either dense layout. The op views each as
(N, C, S) for the launchers (`view3`: strides (C*S, S, 1), or (S*C, 1, C) for channels_last) and
returns out in the input's own shape and layout, a tensor of its own (not a view), so a caller may
modify it in place (nn.ReLU(inplace=True) after a BatchNorm in a channels_last ResNet).
The op composes the
backend's launchers (the contract in the backends' batch_norm modules):
  training: batch_norm_stats -> (mean, biased var), invstd = rsqrt(var + eps), then
            batch_norm_elemt; var is returned for the running-statistics update;
  eval:     batch_norm_elemt with mean = running_mean, invstd = rsqrt(running_var + eps), both
            computed here in the acc dtype; var is empty.
mean, invstd and var are in the acc dtype (float32, or float64 for float64 input), shape (C,).
out is in the input's layout; `mask` (uint8, out's layout) holds pre > 0 when `save_mask`
(relu / leaky_relu with a residual, gradient wanted: backward then reads neither the residual
nor the pre-activation's inputs beyond x), an empty tensor otherwise.

The op never writes the running statistics: the functional layer updates them with torch ops
from (mean, var), once per call, so an autotuner's trial launches cannot touch them.

Backward (batch_norm_backward_reduce + batch_norm_backward_elemt) writes new tensors only:
grad_bias = sum_dy, grad_weight = sum_dy_xmu * invstd, grad_input (training: with the means of
both sums; eval: dy * invstd * weight), grad_residual = dy. Where the backend's reduce launcher
has `writes_dy` (triton), an activation is fused and the residual's gradient is wanted, the
reduction writes dy into grad_residual and backward_elemt reads it back as its grad_out with no
activation (one activation-sized read instead of grad_out + the mask or residual). An empty batch (N * S == 0) launches
nothing: empty out and grad_input, zero statistics, zero grad_weight and grad_bias (torch's).

Double backward (create_graph=True) recomputes the forward with torch's differentiable ops
(`torch_batch_norm`) from the saved inputs and differentiates that (_define rule 3); the
"torch" entry runs the same function (rule 4: torch.func transforms and forward AD).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fastdl import backends
from fastdl.ops._define import acc_dtype, create_graph, define, recompute_grads, register_autograd
from fastdl.ops.linear import TORCH_ACTIVATIONS

MASK_ACTIVATIONS = ("relu", "leaky_relu")


def view3(t: Tensor, channels_last: bool) -> Tensor:
    """(N, C, *spatial) -> an (N, C, S) view: strides (C*S, S, 1), or (S*C, 1, C) for channels_last."""
    N, C = t.shape[:2]
    S = math.prod(t.shape[2:])  # not -1: an empty batch leaves -1 ambiguous
    if channels_last:
        return t.movedim(1, -1).reshape(N, S, C).permute(0, 2, 1)
    return t.reshape(N, C, S)


def _channels_last_format(t: Tensor):
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())


def is_channels_last(t: Tensor) -> bool:
    fmt = _channels_last_format(t)
    return fmt is not None and not t.is_contiguous() and t.is_contiguous(memory_format=fmt)


def is_dense(t: Tensor) -> bool:
    """Contiguous or channels_last(_3d): a layout the launchers take as an (N, C, S) view."""
    return t.is_contiguous() or is_channels_last(t)


def dense_view3(t: Tensor) -> Tensor:
    """An (N, C, S) view of t in whichever dense layout it has, contiguous or channels_last (t is
    copied to contiguous first if it has neither: an expanded or sliced gradient, say)."""
    if not is_dense(t):
        t = t.contiguous()
    return view3(t, is_channels_last(t))


def _empty_like(input: Tensor, channels_last: bool, dtype=None) -> Tensor:
    fmt = _channels_last_format(input) if channels_last else torch.contiguous_format
    return torch.empty(input.shape, dtype=dtype or input.dtype, device=input.device, memory_format=fmt)


def _outputs(input: Tensor, training: bool, channels_last: bool, save_mask: bool):
    C = input.shape[1]
    acc = acc_dtype(input.dtype)
    out = _empty_like(input, channels_last)
    mask = _empty_like(input, channels_last, torch.uint8) if save_mask else input.new_empty((0,), dtype=torch.uint8)
    mean = input.new_empty((C,), dtype=acc)
    invstd = input.new_empty((C,), dtype=acc)
    var = input.new_empty((C,) if training else (0,), dtype=acc)
    return out, mean, invstd, var, mask


def torch_batch_norm(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                     running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool, eps: float,
                     activation: str, negative_slope: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, mean, invstd, var) in torch's differentiable ops, in the acc dtype as the kernels
    compute (out rounded to the input's dtype once); var is empty in eval."""
    acc = acc_dtype(input.dtype)
    x = input.to(acc)
    C = input.shape[1]
    dims = (0,) + tuple(range(2, input.dim()))
    per_channel = (1, C) + (1,) * (input.dim() - 2)
    if training:
        mean = x.mean(dim=dims)
        var = x.var(dim=dims, unbiased=False)
        invstd = torch.rsqrt(var + eps)
    else:
        mean = running_mean.to(acc)
        invstd = torch.rsqrt(running_var.to(acc) + eps)
        var = x.new_empty((0,))
    pre = (x - mean.view(per_channel)) * invstd.view(per_channel)
    if weight is not None:
        pre = pre * weight.to(acc).view(per_channel)
    if bias is not None:
        pre = pre + bias.to(acc).view(per_channel)
    if residual is not None:
        pre = pre + residual.to(acc)
    out = TORCH_ACTIVATIONS[activation](pre, negative_slope).to(input.dtype)
    return out, mean, invstd, var


def torch_composite(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                    running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool, eps: float,
                    activation: str, negative_slope: float, channels_last: bool,
                    save_mask: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The "torch" entry: the op's signature and outputs (mask empty), for torch.func and forward AD."""
    out, mean, invstd, var = torch_batch_norm(input, weight, bias, residual, running_mean, running_var, training,
                                              eps, activation, negative_slope)
    return out, mean, invstd, var, input.new_empty((0,), dtype=torch.uint8)


def define_op(backend: str):
    def batch_norm(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                   running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool, eps: float,
                   activation: str, negative_slope: float, channels_last: bool,
                   save_mask: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        launchers = backends.get(backend)
        out, mean, invstd, var, mask = _outputs(input, training, channels_last, save_mask)
        x3 = view3(input, channels_last)
        N, C, S = x3.shape
        if training:
            if N * S == 0 or C == 0:
                # Nothing to normalize: no launch; the functional layer leaves the running stats alone.
                return out, mean.zero_(), invstd.zero_(), var.zero_(), mask
            mean, var = launchers.batch_norm_stats(x3)  # new (C,) acc-dtype tensors
            invstd = torch.rsqrt(var + eps)
        else:
            mean.copy_(running_mean)
            torch.rsqrt(running_var.to(mean.dtype) + eps, out=invstd)
            if out.numel() == 0:
                return out, mean, invstd, var, mask
        launchers.batch_norm_elemt(x3, mean, invstd, weight, bias, None if residual is None else dense_view3(residual),
                                   activation, negative_slope, view3(out, channels_last),
                                   view3(mask, channels_last) if save_mask else None)
        return out, mean, invstd, var, mask

    def batch_norm_fake(input, weight, bias, residual, running_mean, running_var, training, eps, activation,
                        negative_slope, channels_last, save_mask):
        return _outputs(input, training, channels_last, save_mask)

    def batch_norm_backward(grad_out: Tensor, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                            residual: Optional[Tensor], mask: Tensor, mean: Tensor, invstd: Tensor, training: bool,
                            activation: str, negative_slope: float, channels_last: bool, needs_input_grad: bool,
                            needs_weight_grad: bool, needs_bias_grad: bool,
                            needs_residual_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        launchers = backends.get(backend)
        x3 = view3(input, channels_last)
        N, C, S = x3.shape
        # What is not needed comes back as an empty tensor of its own (an op's outputs may not alias).
        grad_input = _empty_like(input, channels_last) if needs_input_grad else input.new_empty((0,))
        grad_residual = torch.empty_like(residual) if needs_residual_grad else input.new_empty((0,))
        grad_weight = torch.zeros_like(weight) if needs_weight_grad else input.new_empty((0,))
        grad_bias = torch.zeros_like(bias) if needs_bias_grad else input.new_empty((0,))
        if N * S == 0 or C == 0:
            return grad_input, grad_weight, grad_bias, grad_residual
        mask3 = view3(mask, channels_last) if mask.numel() else None
        r3 = dense_view3(residual) if residual is not None and mask3 is None else None
        common = (dense_view3(grad_out), x3, mean, invstd, weight, bias, r3, mask3, activation, negative_slope)
        reduce = needs_weight_grad or needs_bias_grad or (training and needs_input_grad)
        # The reduction pass writes dy (the residual's gradient) where the backend can: the
        # elementwise pass then reads dy and x, not grad_out, x and the mask (or residual) again.
        dy_first = (reduce and needs_residual_grad and activation not in (None, "none")
                    and getattr(launchers.batch_norm_backward_reduce, "writes_dy", False))
        if reduce:
            sum_dy, sum_dy_xmu = launchers.batch_norm_backward_reduce(
                *common, **({"dy3": dense_view3(grad_residual)} if dy_first else {}))
            if needs_weight_grad:
                grad_weight.copy_(sum_dy_xmu * invstd)
            if needs_bias_grad:
                grad_bias.copy_(sum_dy)
        if dy_first:
            needs_residual_grad = False
            common = (dense_view3(grad_residual), x3, mean, invstd, weight, bias, None, None, "none", negative_slope)
        if needs_input_grad or needs_residual_grad:
            mean_dy = mean_dy_xmu = None
            if training and needs_input_grad:
                mean_dy, mean_dy_xmu = sum_dy / (N * S), sum_dy_xmu / (N * S)
            launchers.batch_norm_backward_elemt(*common, mean_dy, mean_dy_xmu,
                                                view3(grad_input, channels_last) if needs_input_grad else None,
                                                dense_view3(grad_residual) if needs_residual_grad else None)
        return grad_input, grad_weight, grad_bias, grad_residual

    def batch_norm_backward_fake(grad_out, input, weight, bias, residual, mask, mean, invstd, training, activation,
                                 negative_slope, channels_last, needs_input_grad, needs_weight_grad, needs_bias_grad,
                                 needs_residual_grad):
        return (_empty_like(input, channels_last) if needs_input_grad else input.new_empty((0,)),
                torch.empty_like(weight) if needs_weight_grad else input.new_empty((0,)),
                torch.empty_like(bias) if needs_bias_grad else input.new_empty((0,)),
                torch.empty_like(residual) if needs_residual_grad else input.new_empty((0,)))

    fwd = define("batch_norm", backend, batch_norm, batch_norm_fake)
    bwd = define("batch_norm_backward", backend, batch_norm_backward, batch_norm_backward_fake)

    def setup_context(ctx, inputs, output):
        (input, weight, bias, residual, running_mean, running_var, training, eps, activation, negative_slope,
         channels_last, save_mask) = inputs
        _, mean, invstd, var, mask = output
        ctx.options = (training, eps, activation, negative_slope, channels_last)
        # The running statistics are read by eval's recompute only; in training the functional layer
        # updates them in place right after this call, so they are not saved then.
        if training:
            running_mean = running_var = None
        ctx.save_for_backward(input, weight, bias, residual, running_mean, running_var, mean, invstd, mask)
        ctx.mark_non_differentiable(mean, invstd, var, mask)

    def backward(ctx, grad_out, _grad_mean, _grad_invstd, _grad_var, _grad_mask):
        none = (None,) * 12
        if grad_out is None:
            return none
        input, weight, bias, residual, running_mean, running_var, mean, invstd, mask = ctx.saved_tensors
        training, eps, activation, negative_slope, channels_last = ctx.options
        needs = ctx.needs_input_grad
        wanted = (needs[0], weight is not None and needs[1], bias is not None and needs[2],
                  residual is not None and needs[3])
        if create_graph():
            grads = recompute_grads(
                lambda x, w, b, r: torch_batch_norm(x, w, b, r, running_mean, running_var, training, eps, activation,
                                                    negative_slope)[0],
                (input, weight, bias, residual), wanted, (grad_out,))
            return (*grads, *none[4:])
        grads = bwd(grad_out, input, weight, bias, residual, mask, mean, invstd, training, activation, negative_slope,
                    channels_last, *wanted)
        return (*(g if want else None for g, want in zip(grads, wanted)), *none[4:])

    register_autograd(fwd, backward, setup_context)
    return fwd

