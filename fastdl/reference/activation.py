"""Activations fused into fastdl's dense and convolution layers, in float64 NumPy.

`apply(z, name, slope)` is the forward; `derivative(z, y, name, slope)` is d act / d z evaluated
from the pre-activation z and/or the output y (whichever the formula needs).
"""
from __future__ import annotations

import numpy as np
from scipy.special import erf

ACTIVATIONS = (None, "relu", "leaky_relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh")

_SQRT_2_OVER_PI = np.sqrt(2.0 / np.pi)
_GELU_TANH_C = 0.044715


def _sigmoid(z):
    # Split by sign so exp never overflows.
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


def apply(z: np.ndarray, name: str | None, slope: float = 0.01) -> np.ndarray:
    if name is None:
        return z
    if name == "relu":
        return np.maximum(z, 0.0)
    if name == "leaky_relu":
        return np.where(z > 0, z, z * slope)
    if name == "gelu":
        return 0.5 * z * (1.0 + erf(z / np.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * z * (1.0 + np.tanh(_SQRT_2_OVER_PI * (z + _GELU_TANH_C * z**3)))
    if name == "silu":
        return z * _sigmoid(z)
    if name == "sigmoid":
        return _sigmoid(z)
    if name == "tanh":
        return np.tanh(z)
    raise ValueError(f"unknown activation {name!r}")


def derivative(z: np.ndarray, y: np.ndarray, name: str | None, slope: float = 0.01) -> np.ndarray:
    if name is None:
        return np.ones_like(z)
    if name == "relu":
        # torch's threshold_backward: gradient 0 at z == 0.
        return (z > 0).astype(np.float64)
    if name == "leaky_relu":
        return np.where(z > 0, 1.0, slope)
    if name == "gelu":
        cdf = 0.5 * (1.0 + erf(z / np.sqrt(2.0)))
        pdf = np.exp(-0.5 * z * z) / np.sqrt(2.0 * np.pi)
        return cdf + z * pdf
    if name == "gelu_tanh":
        inner = _SQRT_2_OVER_PI * (z + _GELU_TANH_C * z**3)
        t = np.tanh(inner)
        d_inner = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_C * z * z)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * d_inner
    if name == "silu":
        s = _sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    if name == "sigmoid":
        return y * (1.0 - y)
    if name == "tanh":
        return 1.0 - y * y
    raise ValueError(f"unknown activation {name!r}")
