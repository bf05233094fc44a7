"""torch.ops.fastdl.cross_entropy_<backend> and linear_cross_entropy_<backend>, with autograd.

cross_entropy(logits (R, C), target, weight, ignore_index, label_smoothing, reduction,
compute_grad) -> (loss, grad_logits). The forward kernel computes the loss and, when
compute_grad, d loss / d logits in the same pass (already divided by the "mean" denominator);
that buffer is fastdl's own, saved for backward, which multiplies it in place by grad_output
(a scalar, or one value per row for reduction="none"): no second (R, C) buffer, no
recomputation. The caller's logits are only read.

Saved bytes: the (R, C) gradient in the logits' dtype, nothing else (torch's log_softmax output is
the same size, and torch's backward then allocates a second one). Scaling in place means the
graph can be backpropagated once: a second backward (retain_graph=True) raises torch's
"modified by an inplace operation" error instead of returning a gradient scaled twice.

linear_cross_entropy(input (N, H), weight (V, H), bias, target, ...) walks the rows in chunks:
logits chunk = input chunk @ weight.T + bias (the dense kernel), then the fused loss+gradient
kernel writes the gradient over that chunk's logits, then grad_input rows and grad_weight /
grad_bias accumulate from it, so the extra memory is one (chunk, V) buffer. For "mean"/"sum"
that all happens in the forward and backward scales the three gradients by grad_output; for
"none" each row's grad_output must scale its gradient before it reaches grad_weight, so the
forward computes only the loss and the backward redoes the chunks with that per-row scale.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from fastdl import backends
from fastdl.ops._define import BACKEND_NAMES, define, fake_dense_grads, or_empty

# linear_cross_entropy's chunk: the bytes of one chunk of logits (its gradient overwrites it).
# 256 MiB keeps the extra memory near 5% of the unfused path's at N=8192, V=128256 in bf16
# while each chunk's matmuls (>= 1024 x V x H there) still fill the GPU.
CHUNK_BYTES = 256 * 2**20
# Forces a chunk size (rows); tests use it to run several chunks on small shapes.
CHUNK_ROWS_ENV = "FASTDL_LINEAR_CE_CHUNK_ROWS"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_rows(rows: int, vocab: int, itemsize: int, device: torch.device) -> int:
    """Rows per linear_cross_entropy chunk: the logits of a chunk fit the budget, at least 1 row."""
    forced = os.environ.get(CHUNK_ROWS_ENV)
    if forced:
        return max(1, int(forced))
    budget = CHUNK_BYTES
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(budget, free // 8)
    n = budget // max(1, vocab * itemsize)
    if n >= 256:
        n -= n % 128  # whole 128-row tiles for the matmuls
    return int(max(1, min(rows, n)))


def mean_denominator(target: Tensor, weight: Optional[Tensor], ignore_index: int, C: int,
                     dtype: torch.dtype) -> Tensor:
    """What "mean" divides by: sum of w[target] over non-ignored rows, or the rows for probabilities."""
    if target.dim() == 2:
        return torch.full((), float(target.shape[0]), device=target.device, dtype=dtype)
    valid = target != ignore_index
    if weight is None or C == 0:
        return valid.sum(dtype=dtype)
    # Clamped so an out-of-range target (caught by the kernel's assert) cannot fault here first.
    index = torch.where(valid, target, 0).clamp(0, C - 1)
    return (weight.to(dtype)[index] * valid).sum()


def reduction_scale(reduction: str, target: Tensor, weight: Optional[Tensor], ignore_index: int, C: int,
               dtype: torch.dtype, device: torch.device) -> tuple[Optional[Tensor], Tensor]:
    """("mean"'s denominator or None, the factor every row's gradient is computed with)."""
    if reduction != "mean":
        return None, torch.ones((), device=device, dtype=dtype)
    denominator = mean_denominator(target, weight, ignore_index, C, dtype)
    return denominator, torch.reciprocal(denominator)


def _reduce(loss_rows: Tensor, reduction: str, denominator: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    if reduction == "none":
        return loss_rows.to(dtype)
    total = loss_rows.sum()
    if reduction == "mean":
        total = total / denominator
    return total.to(dtype)


def _define_mutating(name: str, backend: str, fn):
    """An op that scales its first argument in place (define() only makes functional ops)."""
    qualname = f"fastdl::{name}_{backend}"
    if backend == "triton" and hasattr(torch.library, "triton_op"):
        return torch.library.triton_op(qualname, fn, mutates_args={"grad"})
    op = torch.library.custom_op(qualname, fn, mutates_args={"grad"})
    op.register_fake(lambda grad, scale: None)
    return op


def _soft_target_grads(grad_loss, logits, target, weight, label_smoothing, reduction, needs_target, needs_weight):
    """Gradients for probability targets and class weights (distillation with a trainable teacher).

    Rare enough to take torch's log_softmax (one extra (R, C) pass) instead of a kernel; the
    logits' gradient never comes this way.
    """
    acc = acc_dtype(logits.dtype)
    R, C = logits.shape
    logp = torch.log_softmax(logits.to(acc), dim=1)
    scale = grad_loss.to(acc).reshape(-1, 1) if reduction == "none" else grad_loss.to(acc).expand(R, 1)
    if reduction == "mean":
        scale = scale / R
    w = weight.to(acc) if weight is not None else torch.ones((C,), device=logits.device, dtype=acc)
    eps = label_smoothing
    grad_target = grad_weight = None
    if needs_target:
        grad_target = (-(1.0 - eps) * w * logp * scale).to(target.dtype)
    if needs_weight:
        q = target.to(acc) * (1.0 - eps) + eps / C if eps > 0 else target.to(acc)
        grad_weight = (-(q * logp * scale).sum(0)).to(weight.dtype)
    return grad_target, grad_weight


def _make_scale_rows(backend: str):
    def scale_rows(grad: Tensor, scale: Tensor) -> None:
        """grad[r, :] *= scale (or scale[r]), in place: the backward of both ops."""
        backends.get(backend).cross_entropy_bwd(grad, scale)

    return _define_mutating("cross_entropy_scale_rows", backend, scale_rows)


SCALE_OPS = {name: _make_scale_rows(name) for name in BACKEND_NAMES}


def _make_cross_entropy(backend: str):
    def cross_entropy(logits: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                      label_smoothing: float, reduction: str, compute_grad: bool) -> tuple[Tensor, Tensor]:
        launchers = backends.get(backend)
        denominator, scale = reduction_scale(reduction, target, weight, ignore_index, logits.shape[1],
                                        acc_dtype(logits.dtype), logits.device)
        loss_rows, grad = launchers.cross_entropy_fwd(logits, target, weight, scale, ignore_index,
                                                      label_smoothing, compute_grad)
        return _reduce(loss_rows, reduction, denominator, logits.dtype), grad

    def cross_entropy_fake(logits, target, weight, ignore_index, label_smoothing, reduction, compute_grad):
        loss = logits.new_empty((logits.shape[0],) if reduction == "none" else ())
        grad = logits.new_empty(logits.shape if compute_grad else (0, 0))
        return loss, grad

    fwd = define("cross_entropy", backend, cross_entropy, cross_entropy_fake)
    scale_op = SCALE_OPS[backend]

    def setup_context(ctx, inputs, output):
        logits, target, weight, ignore_index, label_smoothing, reduction, compute_grad = inputs
        _, grad = output
        ctx.reduction, ctx.label_smoothing, ctx.compute_grad = reduction, label_smoothing, compute_grad
        soft = target.dim() == 2 and (target.requires_grad or (weight is not None and weight.requires_grad))
        ctx.save_for_backward(grad if compute_grad else None, *((logits, target, weight) if soft else (None,) * 3))
        ctx.mark_non_differentiable(grad)

    def backward(ctx, grad_loss, _grad_grad):
        grad, logits, target, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_logits = grad_target = grad_weight = None
        if needs[0]:
            if not ctx.compute_grad:
                raise RuntimeError("fastdl.cross_entropy: the forward ran with compute_grad=False, so it "
                                   "kept no gradient for the logits")
            scale_op(grad, grad_loss)
            grad_logits = grad
        if needs[1] or needs[2]:
            grad_target, grad_weight = _soft_target_grads(grad_loss, logits, target, weight, ctx.label_smoothing,
                                                          ctx.reduction, needs[1], needs[2])
        return grad_logits, grad_target, grad_weight, None, None, None, None

    fwd.register_autograd(backward, setup_context=setup_context)
    return fwd


CE_OPS = {name: _make_cross_entropy(name) for name in BACKEND_NAMES}


# --- linear_cross_entropy -------------------------------------------------------------------------

def _chunked(launchers, input, weight, bias, target, ignore_index, label_smoothing, grad_scale, per_row_scale,
             want_loss, needs_input, needs_weight, needs_bias):
    """One walk over the row chunks: loss rows and/or the three gradients, grad_scale applied per row."""
    R, H = input.shape
    V = weight.shape[0]
    acc = acc_dtype(input.dtype)
    device = input.device
    loss_rows = torch.empty((R,), device=device, dtype=acc) if want_loss else None
    grad_input = torch.empty((R, H), device=device, dtype=input.dtype) if needs_input else None
    # grad_weight accumulates in the weight's dtype: an fp32 copy would cost V * H * 4 bytes, as
    # much as the logits chunking avoids; each chunk's share is summed in fp32 inside the kernel.
    grad_weight = torch.zeros((V, H), device=device, dtype=weight.dtype) if needs_weight else None
    grad_bias = torch.zeros((V,), device=device, dtype=acc) if needs_bias else None
    compute_grad = needs_input or needs_weight or needs_bias
    no_saved = input.new_empty((0, 0))
    accumulate = getattr(launchers, "linear_grad_weight_accumulate", None)
    step = chunk_rows(R, V, input.element_size(), device)
    for start in range(0, R, step):
        end = min(R, start + step)
        x = input[start:end]
        logits = launchers.linear_fwd(x, weight, bias, None, 0.0)[0]
        scale = grad_scale[start:end] if per_row_scale else grad_scale
        loss_chunk, grad = launchers.cross_entropy_fwd(logits, target[start:end], None, scale, ignore_index,
                                                       label_smoothing, compute_grad, inplace=True)
        if want_loss:
            loss_rows[start:end] = loss_chunk
        if needs_input:
            grad_input[start:end] = launchers.linear_bwd(grad, x, weight, None, no_saved, None, None, 0.0,
                                                         True, False, False)[0]
        if needs_weight and accumulate is not None:
            accumulate(grad, x, grad_weight, grad_bias)
        elif needs_weight or needs_bias:
            # A backend without an accumulating kernel: a fresh (V, H) partial per chunk.
            _, partial_weight, partial_bias = launchers.linear_bwd(grad, x, weight, None, no_saved, None, None, 0.0,
                                                                   False, needs_weight, needs_bias)
            if needs_weight:
                grad_weight += partial_weight
            if needs_bias:
                grad_bias += partial_bias
        del logits, grad
    if grad_bias is not None:
        grad_bias = grad_bias.to(weight.dtype)
    return loss_rows, grad_input, grad_weight, grad_bias


def _make_linear_cross_entropy(backend: str):
    def linear_cross_entropy(input: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                             ignore_index: int, label_smoothing: float, reduction: str, needs_input_grad: bool,
                             needs_weight_grad: bool, needs_bias_grad: bool
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        denominator, scale = reduction_scale(reduction, target, None, ignore_index, weight.shape[0],
                                        acc_dtype(input.dtype), input.device)
        # "none": gradients need the per-row grad_output, so the backward computes them.
        grads_now = reduction != "none"
        loss_rows, grad_input, grad_weight, grad_bias = _chunked(
            backends.get(backend), input, weight, bias, target, ignore_index, label_smoothing, scale, False,
            True, grads_now and needs_input_grad, grads_now and needs_weight_grad, grads_now and needs_bias_grad)
        loss = _reduce(loss_rows, reduction, denominator, input.dtype)
        return (loss, *or_empty((grad_input, grad_weight, grad_bias), input))

    def linear_cross_entropy_fake(input, weight, bias, target, ignore_index, label_smoothing, reduction,
                                  needs_input_grad, needs_weight_grad, needs_bias_grad):
        loss = input.new_empty((input.shape[0],) if reduction == "none" else ())
        now = reduction != "none"
        return (loss, *fake_dense_grads(input, weight, now and needs_input_grad, now and needs_weight_grad,
                                        now and needs_bias_grad))

    def linear_cross_entropy_backward(grad_loss: Tensor, input: Tensor, weight: Tensor, bias: Optional[Tensor],
                                      target: Tensor, ignore_index: int, label_smoothing: float,
                                      needs_input_grad: bool, needs_weight_grad: bool, needs_bias_grad: bool
                                      ) -> tuple[Tensor, Tensor, Tensor]:
        """reduction="none": the chunks again, each row's gradient scaled by its grad_output."""
        _, grad_input, grad_weight, grad_bias = _chunked(
            backends.get(backend), input, weight, bias, target, ignore_index, label_smoothing, grad_loss, True,
            False, needs_input_grad, needs_weight_grad, needs_bias_grad)
        return or_empty((grad_input, grad_weight, grad_bias), input)

    def linear_cross_entropy_backward_fake(grad_loss, input, weight, bias, target, ignore_index, label_smoothing,
                                           needs_input_grad, needs_weight_grad, needs_bias_grad):
        return fake_dense_grads(input, weight, needs_input_grad, needs_weight_grad, needs_bias_grad)

    fwd = define("linear_cross_entropy", backend, linear_cross_entropy, linear_cross_entropy_fake)
    bwd_none = define("linear_cross_entropy_backward", backend, linear_cross_entropy_backward,
                      linear_cross_entropy_backward_fake)
    scale_op = SCALE_OPS[backend]

    def setup_context(ctx, inputs, output):
        input, weight, bias, target, ignore_index, label_smoothing, reduction, *needs = inputs
        _, grad_input, grad_weight, grad_bias = output
        ctx.reduction, ctx.ignore_index, ctx.label_smoothing = reduction, ignore_index, label_smoothing
        ctx.needs = needs
        if reduction == "none":
            ctx.save_for_backward(input, weight, bias, target)
        else:
            ctx.save_for_backward(grad_input, grad_weight, grad_bias)
        ctx.mark_non_differentiable(grad_input, grad_weight, grad_bias)

    def backward(ctx, grad_loss, *_):
        needs = [a and b for a, b in zip(ctx.needs_input_grad[:3], ctx.needs)]
        if ctx.reduction == "none":
            input, weight, bias, target = ctx.saved_tensors
            grads = bwd_none(grad_loss, input, weight, bias, target, ctx.ignore_index, ctx.label_smoothing,
                             *needs)
        else:
            grads = ctx.saved_tensors
            for grad, need in zip(grads, needs):
                if need:
                    scale_op(grad, grad_loss)
        return (*(g if need else None for g, need in zip(grads, needs)), None, None, None, None, None, None, None)

    fwd.register_autograd(backward, setup_context=setup_context)
    return fwd


LINEAR_CE_OPS = {name: _make_linear_cross_entropy(name) for name in BACKEND_NAMES}
