"""SyncBatchNorm's functional core: batch statistics shared across the ranks of a process group.

torch's protocol, on fastdl's four batch-norm launchers (see fastdl/ops/batch_norm.py):

forward (training)
  1. each rank: (mean, var) of its own batch per channel (`batch_norm_stats`), count = N * S;
     a rank holding an empty batch contributes zeros with count 0 and still joins the collective;
  2. all_gather of [mean, var, count] (one tensor of 2C + 1 values per rank);
  3. each rank combines the world's statistics in rank order with Chan's parallel formula
     (fastdl.reference.batch_norm's protocol, here in torch ops on the device): every rank gets
     bitwise the same global mean and variance, and updates its running statistics from them once
     (running_var from the unbiased variance over the global count);
  4. each rank normalizes its own batch (`batch_norm_elemt`), with the fused activation and residual.
backward
  1. each rank: per-channel sums of dy and dy * (x - mean) over its batch (`batch_norm_backward_reduce`;
     dy is the gradient through the activation); grad_weight and grad_bias from its own sums, as
     torch's SyncBatchNorm returns them (the data-parallel wrapper averages them across ranks);
  2. all_reduce (sum) of [sum_dy, sum_dy_xmu];
  3. grad_input (`batch_norm_backward_elemt`) with the global means of both sums, and the residual's
     gradient.

What is gathered is the variance, not torch's inverse standard deviation: the combine needs the
variance, and recovering it from invstd loses digits when eps dominates.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from fastdl import backends
from fastdl.ops import batch_norm as bn_op


def combine_stats(gathered: Tensor, C: int) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, biased var, total count) of the union of the ranks' batches, from the all_gathered
    (world, 2C + 1) rows [mean, var, count], combined in rank order (Chan et al.): every rank
    computes the same bits. Ranks with count 0 contribute nothing."""
    means, variances, counts = gathered[:, :C], gathered[:, C:2 * C], gathered[:, 2 * C:]
    total = counts.sum()
    mean = (means * counts).sum(0) / total
    m2 = (variances * counts).sum(0) + ((means - mean) ** 2 * counts).sum(0)
    return mean, m2 / total, total


class _SyncBatchNorm(torch.autograd.Function):
    """On the activation in its own shape (contiguous or channels_last; the launchers get (N, C, S)
    views); returns a tensor of its own. The rank's running statistics are updated in forward, once."""

    @staticmethod
    def forward(ctx, input: Tensor, weight, bias, residual, running_mean, running_var, momentum: float, eps: float,
                process_group, world_size: int, activation: str, negative_slope: float, backend: str,
                channels_last: bool):
        from fastdl.functional.batch_norm import _update_running_stats

        launchers = backends.get(backend)
        x3 = bn_op.view3(input, channels_last)
        N, C, S = x3.shape
        acc = bn_op.acc_dtype(input.dtype)
        count = N * S
        if count > 0:
            mean, var = launchers.batch_norm_stats(x3)
        else:  # an empty batch still joins the collective, contributing nothing
            mean = var = torch.zeros(C, device=input.device, dtype=acc)
        local = torch.cat([mean.to(acc), var.to(acc), torch.full((1,), count, device=input.device, dtype=acc)])
        gathered = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(gathered, local, group=process_group)
        mean, var, total = combine_stats(torch.stack(gathered), C)
        total = int(total.item())  # torch's SyncBatchNorm syncs here too, for the same check
        if total == 1:
            raise ValueError(f"fastdl.sync_batch_norm: Expected more than 1 value per channel when training, "
                             f"got input size {list(input.shape)} on this rank and 1 value per channel over all "
                             "ranks")
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None and total > 0:
            _update_running_stats(running_mean, running_var, mean, var, total, momentum)
        out = bn_op._empty_like(input, channels_last)
        if count > 0:
            launchers.batch_norm_elemt(x3, mean, invstd, weight, bias,
                                       None if residual is None else bn_op.dense_view3(residual), activation,
                                       negative_slope, bn_op.view3(out, channels_last), None)
        ctx.save_for_backward(input, weight, bias, residual, mean, invstd)
        ctx.options = (process_group, activation, negative_slope, backend, channels_last, max(total, 1))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        input, weight, bias, residual, mean, invstd = ctx.saved_tensors
        process_group, activation, negative_slope, backend, channels_last, total = ctx.options
        launchers = backends.get(backend)
        x3 = bn_op.view3(input, channels_last)
        r3 = None if residual is None else bn_op.dense_view3(residual)
        N, C, S = x3.shape
        if grad_out is None:
            grad_out = torch.zeros_like(input)  # this rank must still join the all_reduce
        g3 = bn_op.dense_view3(grad_out)
        if N * S > 0:
            sum_dy, sum_dy_xmu = launchers.batch_norm_backward_reduce(g3, x3, mean, invstd, weight, bias, r3, None,
                                                                      activation, negative_slope)
        else:
            sum_dy = sum_dy_xmu = torch.zeros(C, device=input.device, dtype=mean.dtype)
        # This rank's own shares, as torch's SyncBatchNorm returns them (DDP averages them).
        grad_weight = (sum_dy_xmu * invstd).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        sums = torch.cat([sum_dy.to(mean.dtype), sum_dy_xmu.to(mean.dtype)])
        dist.all_reduce(sums, group=process_group)
        mean_dy, mean_dy_xmu = sums[:C] / total, sums[C:] / total
        grad_input = bn_op._empty_like(input, channels_last) if ctx.needs_input_grad[0] else None
        grad_residual = torch.empty_like(residual) if residual is not None and ctx.needs_input_grad[3] else None
        if N * S > 0 and (grad_input is not None or grad_residual is not None):
            launchers.batch_norm_backward_elemt(
                g3, x3, mean, invstd, weight, bias, r3, None, activation, negative_slope, mean_dy, mean_dy_xmu,
                None if grad_input is None else bn_op.view3(grad_input, channels_last),
                None if grad_residual is None else bn_op.dense_view3(grad_residual))
        return (grad_input, grad_weight, grad_bias, grad_residual) + (None,) * 10


def sync_batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None,
                    bias: Tensor | None, momentum: float, eps: float, process_group=None, *,
                    activation: str | None = None, negative_slope: float = 0.01,
                    residual: Tensor | None = None) -> Tensor:
    """Training-mode batch norm over the union of the batches of `process_group`'s ranks (every rank
    calls it; see the module docstring). Arguments as fastdl.functional.batch_norm's; forward-mode
    AD, torch.func transforms and double backward are not supported (torch's SyncBatchNorm has
    none of them either)."""
    from fastdl.functional.batch_norm import check_args, layouts

    momentum, eps, negative_slope = check_args(input, running_mean, running_var, weight, bias, True, momentum,
                                               eps, activation, negative_slope, residual, single_batch=False)
    x, w, b, residual, channels_last = layouts(input, weight, bias, residual)
    return _SyncBatchNorm.apply(x, w, b, residual, running_mean, running_var, momentum, eps, process_group,
                                dist.get_world_size(process_group), activation or "none", negative_slope,
                                backends.resolve(input.device), channels_last)
