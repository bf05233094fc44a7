"""Reference launchers of cross_entropy: the same interface as fastdl/backends/triton/cross_entropy.py."""
from __future__ import annotations

import numpy as np
import torch

from fastdl.backends.common import check_class_targets
from fastdl.backends.reference._common import from_numpy, launcher, to_numpy
from fastdl.ops._define import acc_dtype
from fastdl.reference import cross_entropy as _cross_entropy


@launcher
def cross_entropy_fwd(logits, target, weight, grad_scale, ignore_index, label_smoothing, compute_grad,
                      inplace=False):
    x = to_numpy(logits)
    prob = target.dim() == 2
    if not prob:
        # At run time, so graphs compiled by torch.compile (whose tracing skips the functional
        # layer's check) still raise torch's IndexError instead of indexing with the bad value.
        check_class_targets("fastdl.cross_entropy", target, x.shape[1], ignore_index)
    t = to_numpy(target) if prob else target.detach().cpu().numpy().astype(np.int64)
    loss, dloss, _ = _cross_entropy.rows_forward(x, t, to_numpy(weight), ignore_index, label_smoothing)
    loss_rows = from_numpy(loss, logits, acc_dtype(logits.dtype))
    if not compute_grad:
        return loss_rows, logits.new_empty((0, 0))
    scale = np.broadcast_to(to_numpy(grad_scale), (x.shape[0],))
    if not prob:
        scale = np.where(t != ignore_index, scale, 0.0)  # torch scales ignored rows by 0, even by 0 / 0
    grad = from_numpy(dloss * scale[:, None], logits)
    if inplace:
        return loss_rows, logits.copy_(grad)
    return loss_rows, grad


@launcher
def cross_entropy_bwd(grad_logits, scale, out):
    """out[r, :] = grad_logits[r, :] * scale (or scale[r]); grad_logits is only read."""
    x = grad_logits if grad_logits.dim() == 2 else grad_logits.view(1, -1)
    s = np.broadcast_to(to_numpy(scale), (x.shape[0],))
    return out.copy_(from_numpy(to_numpy(x) * s[:, None], out).reshape(out.shape))
