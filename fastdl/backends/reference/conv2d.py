"""Reference launchers of conv2d: the same interface as fastdl/backends/triton/conv2d.py (layouts included)."""
from __future__ import annotations

from fastdl.backends.reference._common import from_numpy, launcher, to_numpy
from fastdl.reference import conv2d as _conv2d


def _conv2d_forward(input, weight, bias, stride, padding, dilation, groups, activation, negative_slope):
    top, bottom, left, right = padding
    return _conv2d.forward(to_numpy(input), to_numpy(weight), to_numpy(bias), stride, ((top, bottom), (left, right)),
                           dilation, groups, activation, negative_slope)


def _like(a, like, fmt_of):
    from torch._prims_common import suggest_memory_format

    return from_numpy(a, like).contiguous(memory_format=suggest_memory_format(fmt_of))


@launcher
def conv2d_fwd(input, weight, bias, stride, padding, dilation, groups, activation, negative_slope):
    out, _ = _conv2d_forward(input, weight, bias, stride, padding, dilation, groups, activation, negative_slope)
    return _like(out, input, input), input.new_empty((0,))


@launcher
def conv2d_bwd(grad_out, input, weight, bias, saved, out, stride, padding, dilation, groups, activation,
               negative_slope, needs_input_grad, needs_weight_grad, needs_bias_grad):
    _, ctx = _conv2d_forward(input, weight, bias, stride, padding, dilation, groups, activation, negative_slope)
    grad_input, grad_weight, grad_bias = _conv2d.backward(to_numpy(grad_out), ctx)
    return (_like(grad_input, input, input) if needs_input_grad else None,
            _like(grad_weight, weight, weight) if needs_weight_grad else None,
            from_numpy(grad_bias, weight) if needs_bias_grad else None)
