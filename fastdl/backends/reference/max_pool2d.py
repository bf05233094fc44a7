"""Reference launchers of max_pool2d: the same interface as fastdl/backends/triton/max_pool2d.py
(outputs allocated by the op)."""
from __future__ import annotations

import numpy as np
import torch

from fastdl.backends.reference._common import from_numpy, launcher, to_numpy
from fastdl.reference import max_pool2d as _max_pool2d


@launcher
def max_pool2d_fwd(input, kernel_size, stride, padding, dilation, ceil_mode, out, saved):
    result, ctx = _max_pool2d.forward(to_numpy(input), kernel_size, stride, padding, dilation, ceil_mode)
    out.copy_(from_numpy(result, out))
    if saved.numel():
        key = "indices" if saved.dtype == torch.int64 else "window_pos"
        saved.copy_(torch.from_numpy(ctx[key].astype(np.int64)).to(saved.device, saved.dtype))
    return out, saved


@launcher
def max_pool2d_bwd(grad_out, saved, kernel_size, stride, padding, dilation, grad_input):
    from fastdl.ops.max_pool2d import flat_indices

    indices = flat_indices(saved.cpu(), grad_input.shape, kernel_size, stride, padding, dilation)
    grad = _max_pool2d.backward(to_numpy(grad_out), {"indices": indices.numpy(), "input_shape": grad_input.shape})
    return grad_input.copy_(from_numpy(grad, grad_input))
