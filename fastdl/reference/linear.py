"""Dense layer + fused activation, float64 NumPy.

    z   = input @ weight.T + bias        input (M, K), weight (N, K), bias (N,) or None
    out = act(z)

backward, with g = grad_out * act'(z):
    grad_input  = g @ weight             (M, K)
    grad_weight = g.T @ input            (N, K)
    grad_bias   = g.sum(0)               (N,)
"""
from __future__ import annotations

import numpy as np

from . import activation as _act


def forward(input, weight, bias=None, activation=None, negative_slope=0.01):
    x = np.asarray(input, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    z = x @ w.T
    if bias is not None:
        z = z + np.asarray(bias, dtype=np.float64)
    out = _act.apply(z, activation, negative_slope)
    saved = dict(input=x, weight=w, z=z, out=out, has_bias=bias is not None,
                 activation=activation, negative_slope=negative_slope)
    return out, saved


def backward(grad_out, saved):
    g = np.asarray(grad_out, dtype=np.float64)
    g = g * _act.derivative(saved["z"], saved["out"], saved["activation"], saved["negative_slope"])
    grad_input = g @ saved["weight"]
    grad_weight = g.T @ saved["input"]
    grad_bias = g.sum(axis=0) if saved["has_bias"] else None
    return grad_input, grad_weight, grad_bias
