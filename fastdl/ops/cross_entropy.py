"""torch.ops.fastdl.cross_entropy_<backend>, with autograd to any order; and the helpers
linear_cross_entropy (linear_cross_entropy.py) shares with it.

cross_entropy(logits (R, C), target, weight, ignore_index, label_smoothing, reduction,
compute_grad) -> (loss, grad). The forward kernel computes the loss and, when compute_grad,
g = d loss / d logits in the same pass (already divided by the "mean" denominator); that buffer
is fastdl's own, saved for backward. The caller's logits are only read.

First order: grad_logits = g * grad_output (a scalar, or one value per row for reduction="none"),
written to a new (R, C) tensor by the backend's scale kernel (`scale_rows_op`): the same bytes an
in-place scaling would move, and the saved g stays intact, so a second backward, jacobian and
gradcheck work.

Saved bytes: the (R, C) gradient in the logits' dtype, and the target and class weights (inputs:
kept alive, not copied); torch's log_softmax output is the same size, and torch's backward then
allocates a second one.

Double backward: `grad` is a differentiable output of the op. Under create_graph, the first order
is computed as `grad * grad_output` in torch ops, so its graph reaches grad_output and, through
`grad`, this op again; a gradient v reaching `grad` adds the Hessian-vector product
(`_grad_of_grad`). Per row, with s the row's scale (1 / the "mean" denominator, 1, and 0 for an
ignored row), T the target distribution (class weights and smoothing applied), S = sum_c T_c and
p = softmax(logits):

    g = s (S p - T),   u = g + s T = s S p,
    (dg/dlogits)^T v = u * v - u (u . v) / (s S)      (0 where s S = 0)

so p comes back from the saved gradient and no logits are saved. It is written in torch ops on
`grad`, so third order is right too. For probability targets, also

    dg_c/dtarget_k = s (1 - eps) (p_c w_k - w_c delta_ck),   dg_c/dweight_k = s (p_c q_k - q_k delta_ck)

with q the smoothed target, which give v's contribution to target and weight.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastdl import backends
from fastdl.ops._define import acc_dtype, create_graph, define, register_autograd  # noqa: F401  (acc_dtype: re-exported)


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
    return denominator, _nan_over_zero(torch.ones((), device=device, dtype=dtype), denominator)


def _nan_over_zero(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator, nan where the denominator is 0: torch's "mean" is 0 / 0 there (every
    row ignored, or every target's class weight 0), nan even when label smoothing makes the sum
    nonzero, and so is the gradient of every row that is not ignored (the kernels zero the ignored
    rows' scale with a select, so their gradient stays 0)."""
    return torch.where(denominator == 0, torch.full_like(numerator, float("nan")), numerator / denominator)


def reduce_rows(loss_rows: Tensor, reduction: str, denominator: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    if reduction == "none":
        return loss_rows.to(dtype)
    total = loss_rows.sum()
    if reduction == "mean":
        total = _nan_over_zero(total, denominator)
    return total.to(dtype)


# --- the backward's scaling: out = grad * grad_output, a new tensor ----------------------------------

_scale_ops: dict[str, object] = {}


def scale_rows_op(backend: str):
    """torch.ops.fastdl.cross_entropy_scale_rows_<backend>(grad, scale, dtype) -> grad * scale per row,
    a new tensor of `dtype` (linear_cross_entropy rounds its float32 sums into the weight's dtype
    here, after the scaling).

    The first-order backward of cross_entropy and linear_cross_entropy (called from fastdl.ops.get's
    lock, so defined once)."""
    op = _scale_ops.get(backend)
    if op is None:
        def scale_rows(grad: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
            """out[r, :] = grad[r, :] * scale (or scale[r]); a 1-D grad is one row. grad is only read."""
            out = torch.empty(grad.shape, device=grad.device, dtype=dtype)
            return backends.get(backend).cross_entropy_bwd(grad, scale, out)

        op = _scale_ops[backend] = define("cross_entropy_scale_rows", backend, scale_rows,
                                          lambda grad, scale, dtype: grad.new_empty(grad.shape, dtype=dtype))
    return op


def row_factor(grad_loss: Tensor, reduction: str) -> Tensor:
    """grad_output as a factor of each row of an (R, C) gradient: (R, 1) for "none", () otherwise."""
    return grad_loss.reshape(-1, 1) if reduction == "none" else grad_loss


# --- gradients for probability targets and class weights ---------------------------------------------

def _soft_target_grads(grad_loss, logits, target, weight, label_smoothing, reduction, needs_target, needs_weight):
    """First-order gradients for probability targets and class weights (distillation with a trainable
    teacher), in torch ops (differentiable again under create_graph).

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


def _target_distribution(target: Tensor, weight: Optional[Tensor], ignore_index: int, eps: float, R: int, C: int,
                         acc: torch.dtype, device) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """(T (R, C), valid (R,) bool, q (R, C) or None): the target distribution the kernels use (class
    weights and smoothing applied; 0 on ignored rows), which rows count, and for probability targets
    the smoothed target before the weights."""
    w = weight.to(acc) if weight is not None else None
    if target.dim() == 2:
        q = target.to(acc) * (1.0 - eps) + eps / C if eps > 0 else target.to(acc)
        dist = q * w if w is not None else q
        return dist, torch.ones((R,), device=device, dtype=torch.bool), q
    valid = target != ignore_index
    index = torch.where(valid, target, 0).clamp(0, C - 1)
    w_target = w[index] if w is not None else torch.ones((R,), device=device, dtype=acc)
    w_target = torch.where(valid, w_target, 0.0)
    dist = torch.zeros((R, C), device=device, dtype=acc).scatter(1, index[:, None], ((1.0 - eps) * w_target)[:, None])
    if eps > 0:
        per_class = (w if w is not None else torch.ones((C,), device=device, dtype=acc)) * (eps / C)
        dist = dist + valid[:, None].to(acc) * per_class
    return dist, valid, None


def _grad_of_grad(ctx, grad, logits, target, weight, v, needs):
    """v's contribution, v a gradient reaching the saved `grad`: (d grad / d (logits, target, weight))^T v,
    in torch ops on `grad` (and on the logits where they were saved), so differentiable again."""
    R, C = grad.shape
    acc = acc_dtype(grad.dtype)
    eps = ctx.label_smoothing
    dist, valid, q = _target_distribution(target, weight, ctx.ignore_index, eps, R, C, acc, grad.device)
    if ctx.reduction == "mean":
        _, base = reduction_scale("mean", target, weight, ctx.ignore_index, C, acc, grad.device)
    else:
        base = torch.ones((), device=grad.device, dtype=acc)
    s = torch.where(valid, base, 0.0)                  # (R,)
    sS = s * dist.sum(1)                               # (R,)
    nonzero = sS != 0
    safe_sS = torch.where(nonzero, sS, 1.0)
    v = v.to(acc)
    if logits is not None:
        # Probability targets with a differentiable target or weight keep the logits (for the first
        # order's log_softmax): p from them stays right where s S = 0.
        p = torch.softmax(logits.to(acc), dim=1)
        u = sS[:, None] * p
    else:
        u = grad.to(acc) + s[:, None] * dist
        p = u / safe_sS[:, None]
    pv = (p * v).sum(1, keepdim=True)                  # p . v
    grad_logits = grad_target = grad_weight = None
    if needs[0]:
        grad_logits = torch.where(nonzero[:, None], u * v - u * pv, 0.0).to(grad.dtype)
    if target.dim() == 2 and (needs[1] or needs[2]):
        dv = s[:, None] * (pv - v)                     # s (p . v - v_k), per row and class
        if needs[1]:
            w = weight.to(acc) if weight is not None else 1.0
            grad_target = ((1.0 - eps) * w * dv).to(target.dtype)
        if needs[2]:
            grad_weight = (q * dv).sum(0).to(weight.dtype)
    return grad_logits, grad_target, grad_weight


def _add(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    return b if a is None else a if b is None else a + b


# --- the op ----------------------------------------------------------------------------------------

def torch_composite(logits: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                    label_smoothing: float, reduction: str, compute_grad: bool) -> tuple[Tensor, Tensor]:
    """The "torch" entry: torch.nn.functional.cross_entropy on the (R, C) rows, with an empty grad
    (torch's autograd differentiates the loss), for torch.func transforms and forward AD."""
    loss = torch.nn.functional.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index,
                                             reduction=reduction, label_smoothing=label_smoothing)
    return loss, logits.new_empty((0, 0))


def define_op(backend: str):
    def cross_entropy(logits: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                      label_smoothing: float, reduction: str, compute_grad: bool) -> tuple[Tensor, Tensor]:
        launchers = backends.get(backend)
        denominator, scale = reduction_scale(reduction, target, weight, ignore_index, logits.shape[1],
                                             acc_dtype(logits.dtype), logits.device)
        loss_rows, grad = launchers.cross_entropy_fwd(logits, target, weight, scale, ignore_index,
                                                      label_smoothing, compute_grad)
        return reduce_rows(loss_rows, reduction, denominator, logits.dtype), grad

    def cross_entropy_fake(logits, target, weight, ignore_index, label_smoothing, reduction, compute_grad):
        loss = logits.new_empty((logits.shape[0],) if reduction == "none" else ())
        grad = logits.new_empty(logits.shape if compute_grad else (0, 0))
        return loss, grad

    fwd = define("cross_entropy", backend, cross_entropy, cross_entropy_fake)
    scale_op = scale_rows_op(backend)

    def setup_context(ctx, inputs, output):
        logits, target, weight, ignore_index, label_smoothing, reduction, compute_grad = inputs
        _, grad = output
        ctx.reduction, ctx.label_smoothing, ctx.compute_grad = reduction, label_smoothing, compute_grad
        ctx.ignore_index = ignore_index
        soft = target.dim() == 2 and (target.requires_grad or (weight is not None and weight.requires_grad))
        # `grad` stays a differentiable output: a second differentiation reaches this op through it.
        ctx.save_for_backward(grad if compute_grad else None, target, weight, logits if soft else None)

    def backward(ctx, grad_loss, grad_grad):
        grad, target, weight, logits = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        grad_logits = grad_target = grad_weight = None
        if grad_loss is not None:
            if needs[0]:
                if not ctx.compute_grad:
                    raise RuntimeError("fastdl.cross_entropy: the forward ran with compute_grad=False, so it "
                                       "kept no gradient for the logits")
                if create_graph():
                    grad_logits = grad * row_factor(grad_loss, ctx.reduction)  # a graph to grad_loss and grad
                else:
                    grad_logits = scale_op(grad, grad_loss, grad.dtype)
            if needs[1] or needs[2]:
                grad_target, grad_weight = _soft_target_grads(grad_loss, logits, target, weight, ctx.label_smoothing,
                                                              ctx.reduction, needs[1], needs[2])
        if grad_grad is not None and grad is not None and any(needs):
            second = _grad_of_grad(ctx, grad, logits, target, weight, grad_grad, needs)
            grad_logits, grad_target, grad_weight = (_add(a, b) for a, b in
                                                     zip((grad_logits, grad_target, grad_weight), second))
        return grad_logits, grad_target, grad_weight, None, None, None, None

    register_autograd(fwd, backward, setup_context)
    return fwd
