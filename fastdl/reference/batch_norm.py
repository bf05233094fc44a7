"""Batch normalization with a fused activation and residual, in float64 NumPy.

    out = act(pre),  pre = (x - mean) * invstd * weight + bias (+ residual)

x is (N, C, *spatial) with any number of spatial dimensions (none for (N, C) input); statistics are
per channel over N and the spatial positions (count n = N * S). Training normalizes with the
batch's mean and BIASED variance, invstd = 1 / sqrt(var + eps); eval with the running statistics.
weight and bias may be None (1 and 0). The running statistics are never written here:
`update_running_stats` returns torch's update (running_var from the UNBIASED variance
var * n / (n - 1), momentum as given) for the caller to compare or apply.

backward (training), with dy = grad_out * act'(pre) and xhat = (x - mean) * invstd:
    grad_bias = sum(dy),  grad_weight = sum(dy * xhat)
    grad_input = weight * invstd * (dy - mean(dy) - xhat * mean(dy * xhat))
    grad_residual = dy
In eval the statistics are constants: grad_input = dy * invstd * weight (grad_weight, grad_bias as
above, with the running statistics' mean and invstd).

The four primitives of the launcher contract (every backend's batch_norm_stats, batch_norm_elemt,
batch_norm_backward_reduce, batch_norm_backward_elemt) are here too, on (N, C, S) arrays:
`stats`, `elemt`, `backward_reduce`, `backward_elemt`; forward/backward above are their
composition, and tests/test_reference_batch_norm.py checks both against torch.

SyncBatchNorm's statistics protocol: each rank reports (mean, biased var, count) of its own
batch; `combine_stats` merges them in rank order with Chan et al.'s parallel formula
    n = n_a + n_b,  delta = mean_b - mean_a,  mean = mean_a + delta * n_b / n,
    M2 = M2_a + M2_b + delta^2 * n_a * n_b / n           (M2 = var * count)
A rank with count 0 takes part and changes nothing. The global (mean, var) equal those of the
concatenated batch.

Activation names are fastdl's ("none" or None, "relu", "leaky_relu", "gelu", "gelu_tanh",
"silu", "sigmoid", "tanh"; fastdl/reference/activation.py computes them). relu' = 0 and
leaky_relu' = negative_slope at pre == 0, as torch's backward kernels.
"""
from __future__ import annotations

import numpy as np

from fastdl.reference import activation as _act

MASK_ACTIVATIONS = ("relu", "leaky_relu")


def _name(activation):
    return None if activation in (None, "none") else activation


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def _per_channel(v, C: int, fill: float) -> np.ndarray:
    """weight / bias / statistics as a (1, C, 1) array (fill where v is None)."""
    return np.full((1, C, 1), fill) if v is None else _f64(v).reshape(1, C, 1)


def as3(x: np.ndarray) -> np.ndarray:
    """(N, C, *spatial) -> (N, C, S), S the product of the spatial sizes (1 for (N, C))."""
    x = np.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"batch_norm reference: input of at least 2 dimensions (N, C, ...) expected, got {x.shape}")
    return x.reshape(x.shape[0], x.shape[1], int(np.prod(x.shape[2:], dtype=np.int64)))


# --------------------------------------------------------------------------- the contract's primitives

def stats(x3) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance over N and S (two passes: no cancellation)."""
    x3 = _f64(x3)
    if x3.shape[0] * x3.shape[2] == 0:
        raise ValueError("batch_norm reference: stats of an empty batch (N * S == 0)")
    mean = x3.mean(axis=(0, 2))
    var = ((x3 - mean[None, :, None]) ** 2).mean(axis=(0, 2))
    return mean, var


def _pre(x3, mean, invstd, weight, bias, residual3):
    C = x3.shape[1]
    pre = (x3 - _per_channel(mean, C, 0.0)) * _per_channel(invstd, C, 1.0) * _per_channel(weight, C, 1.0) \
        + _per_channel(bias, C, 0.0)
    return pre if residual3 is None else pre + _f64(residual3)


def elemt(x3, mean, invstd, weight, bias, residual3, activation, negative_slope=0.01):
    """(out, mask): out = act(pre), mask = pre > 0 (bool; what the launchers store as uint8)."""
    pre = _pre(_f64(x3), mean, invstd, weight, bias, residual3)
    return _act.apply(pre, _name(activation), negative_slope), pre > 0


def _dy(grad_out3, x3, mean, invstd, weight, bias, residual3, mask3, activation, negative_slope):
    """grad_out through the activation: act'(pre) from the mask for relu/leaky_relu when one is
    given (the residual is then not read), else from the recomputed pre-activation."""
    g = _f64(grad_out3)
    name = _name(activation)
    if name is None:
        return g
    if mask3 is not None and name in MASK_ACTIVATIONS:
        on = np.asarray(mask3).astype(bool)
        return g * np.where(on, 1.0, 0.0 if name == "relu" else negative_slope)
    pre = _pre(_f64(x3), mean, invstd, weight, bias, residual3)
    y = _act.apply(pre, name, negative_slope)
    return g * _act.derivative(pre, y, name, negative_slope)


def backward_reduce(grad_out3, x3, mean, invstd, weight, bias, residual3, mask3, activation, negative_slope=0.01):
    """(sum_dy, sum_dy_xmu) per channel: sums over N and S of dy and of dy * (x - mean)."""
    x3 = _f64(x3)
    dy = _dy(grad_out3, x3, mean, invstd, weight, bias, residual3, mask3, activation, negative_slope)
    xmu = x3 - _per_channel(mean, x3.shape[1], 0.0)
    return dy.sum(axis=(0, 2)), (dy * xmu).sum(axis=(0, 2))


def backward_elemt(grad_out3, x3, mean, invstd, weight, bias, residual3, mask3, activation, negative_slope,
                   mean_dy, mean_dy_xmu):
    """(grad_input, grad_residual). mean_dy / mean_dy_xmu None: eval (statistics are constants)."""
    x3 = _f64(x3)
    C = x3.shape[1]
    dy = _dy(grad_out3, x3, mean, invstd, weight, bias, residual3, mask3, activation, negative_slope)
    inv = _per_channel(invstd, C, 1.0)
    scale = inv * _per_channel(weight, C, 1.0)
    if mean_dy is None:
        return dy * scale, dy
    xmu = x3 - _per_channel(mean, C, 0.0)
    grad_input = (dy - _per_channel(mean_dy, C, 0.0) - xmu * inv * inv * _per_channel(mean_dy_xmu, C, 0.0)) * scale
    return grad_input, dy


# --------------------------------------------------------------------------- the whole op

def forward(x, weight=None, bias=None, running_mean=None, running_var=None, training=True, eps=1e-5,
            activation=None, negative_slope=0.01, residual=None):
    """act(batch_norm(x) + residual) in float64. Returns (out in x's shape, saved).

    saved: mean and invstd used to normalize; var (biased; the batch's in training, running_var
    in eval); count (N * S); mask (pre > 0, (N, C, S)); training; and the inputs backward reads.
    Training with N * S == 0 gives an empty output, mean and var NaN (nothing to normalize).
    """
    x = _f64(x)
    x3 = as3(x)
    N, C, S = x3.shape
    r3 = None if residual is None else as3(_f64(residual))
    if training:
        if N * S == 0:
            mean = var = np.full(C, np.nan)
        else:
            mean, var = stats(x3)
    else:
        if running_mean is None or running_var is None:
            raise ValueError("batch_norm reference: eval needs running_mean and running_var")
        mean, var = _f64(running_mean).reshape(C), _f64(running_var).reshape(C)
    invstd = 1.0 / np.sqrt(var + eps)
    out3, mask3 = elemt(x3, mean, invstd, weight, bias, r3, activation, negative_slope)
    saved = dict(x3=x3, weight=_f64(weight), bias=_f64(bias), residual3=r3, mean=mean, var=var, invstd=invstd,
                 count=N * S, mask=mask3, training=bool(training), activation=_name(activation),
                 negative_slope=float(negative_slope), shape=x.shape)
    return out3.reshape(x.shape), saved


def backward(grad_out, saved, use_mask: bool = False):
    """(grad_input, grad_weight, grad_bias, grad_residual) in the shapes of x, weight (C,), bias
    (C,) and residual; grad_weight / grad_bias / grad_residual are None where the forward had
    none. use_mask: relu/leaky_relu's derivative from the saved mask (else recomputed)."""
    s = saved
    x3 = s["x3"]
    N, C, S = x3.shape
    g3 = as3(_f64(grad_out))
    mask = s["mask"] if use_mask and s["activation"] in MASK_ACTIVATIONS else None
    args = (g3, x3, s["mean"], s["invstd"], s["weight"], s["bias"], s["residual3"], mask, s["activation"],
            s["negative_slope"])
    if N * S == 0:
        sum_dy = sum_dy_xmu = np.zeros(C)
    else:
        sum_dy, sum_dy_xmu = backward_reduce(*args)
    if s["training"] and N * S > 0:
        grad_input, grad_residual = backward_elemt(*args, sum_dy / (N * S), sum_dy_xmu / (N * S))
    else:
        grad_input, grad_residual = backward_elemt(*args, None, None)
    # An empty batch: zero gradients for weight and bias (torch's), not 0 * NaN statistics.
    grad_weight = None if s["weight"] is None else (sum_dy_xmu * s["invstd"] if N * S else np.zeros(C))
    grad_bias = None if s["bias"] is None else sum_dy
    return (grad_input.reshape(s["shape"]), grad_weight, grad_bias,
            None if s["residual3"] is None else grad_residual.reshape(s["shape"]))


def update_running_stats(running_mean, running_var, mean, var, count: int, momentum: float):
    """torch's update: new = (1 - momentum) * running + momentum * batch, running_var from the
    unbiased variance var * n / (n - 1). Returns new arrays; the inputs are not written."""
    unbiased = _f64(var) * (count / (count - 1))
    return ((1.0 - momentum) * _f64(running_mean) + momentum * _f64(mean),
            (1.0 - momentum) * _f64(running_var) + momentum * unbiased)


# --------------------------------------------------------------------------- SyncBatchNorm's protocol

def combine_stats(means, variances, counts) -> tuple[np.ndarray, np.ndarray, int]:
    """Global (mean, biased var, total count) from per-rank rows: means and variances (R, C), counts
    (R,), merged in rank order with Chan's parallel formula. Ranks with count 0 contribute
    nothing (their mean and var are not read, may be anything). With no values at all (total 0)
    mean and var are NaN."""
    means, variances = np.atleast_2d(_f64(means)), np.atleast_2d(_f64(variances))
    counts = np.asarray(counts, dtype=np.float64).reshape(-1)
    n = 0.0
    mean = np.zeros(means.shape[1])
    m2 = np.zeros(means.shape[1])
    for mean_b, var_b, n_b in zip(means, variances, counts):
        if n_b == 0:
            continue
        total = n + n_b
        delta = mean_b - mean
        mean = mean + delta * (n_b / total)
        m2 = m2 + var_b * n_b + delta * delta * (n * n_b / total)
        n = total
    if n == 0:
        return np.full_like(mean, np.nan), np.full_like(mean, np.nan), 0
    return mean, m2 / n, int(n)
