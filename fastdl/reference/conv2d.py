"""2-D convolution (cross-correlation, as torch) + fused activation, float64 NumPy.

Layout: input (N, C, H, W), weight (K, C // groups, R, S), bias (K,) or None, out (N, K, P, Q).
Unbatched (C, H, W) input is the caller's to handle (add the batch dimension, drop it from the
results); this module takes 4-D input only.

Padding is explicit per side, ((top, bottom), (left, right)), with zeros, so torch's
padding="same" for even kernels (the extra row/column at the bottom/right) is representable;
`normalize_args` turns torch's argument forms into these values. With xp the zero-padded input
and groups G (input channels C_g = C / G, output channels K_g = K / G; output channel k belongs to
group g = k // K_g and reads input channels g*C_g .. (g+1)*C_g - 1):

    z[n, k, p, q] = bias[k] + sum_{c, r, s} xp[n, g*C_g + c, p*sH + r*dH, q*sW + s*dW] * weight[k, c, r, s]
    out = act(z)                                    (the activations of linear, activation.py)

    P = (H + top + bottom - dH*(R - 1) - 1) // sH + 1      (`output_size`; Q likewise)

backward, with g = grad_out * act'(z):
    grad_bias[k]            = sum_{n, p, q} g[n, k, p, q]
    grad_weight[k, c, r, s] = sum_{n, p, q} g[n, k, p, q] * xp[n, g*C_g + c, p*sH + r*dH, q*sW + s*dW]
    grad_input              = the padding cropped from grad_xp, where each (n, k, p, q) adds
                              g * weight[k, c, r, s] at the position it read from

Everything is vectorized over batch, groups and pixels; the only Python loop is over the R*S
kernel positions, each of which is a strided slice of xp (and a slice-add into grad_xp).
"""
from __future__ import annotations

import operator

import numpy as np

from . import activation as _act

PADDING_STRINGS = ("same", "valid")


# --------------------------------------------------------------------------- argument forms

def _as_int(value, name: str) -> int:
    # torch takes anything with __index__ (numpy and 0-dim integer tensors) and rejects bool/float.
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"conv2d: {name} must be an int or a tuple of ints, not bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"conv2d: {name} must be an int or a tuple of ints, not "
                        f"{type(value).__name__}") from None


def _ints(value, name: str) -> list[int]:
    """An int or a sequence of ints -> a list of ints (type checks only, as torch's argument parser)."""
    if isinstance(value, (list, tuple)):
        return [_as_int(v, name) for v in value]
    return [_as_int(value, name)]


def _pair(values: list[int], name: str) -> tuple[int, int]:
    """1 or 2 ints -> 2 ints (torch's expand_param_if_needed)."""
    if len(values) == 1:
        return values[0], values[0]
    if len(values) != 2:
        raise RuntimeError(f"expected {name} to be a single integer value or a list of 2 values to "
                           f"match the convolution dimensions, but got {name}={values}")
    return values[0], values[1]


def normalize_args(kernel_size, stride=1, padding=0, dilation=1, groups=1):
    """torch.nn.functional.conv2d's stride / padding / dilation / groups -> this module's forms.

    kernel_size: (R, S), the weight's last two dimensions (needed by padding="same").
    stride, dilation: int or a tuple of 1 or 2 ints. padding: the same, or "same" / "valid".
    Returns (stride (sH, sW), padding ((top, bottom), (left, right)), dilation (dH, dW), groups).

    torch's rules: padding="same" pads dilation*(k - 1) in total per dimension, total // 2 at the
    top/left and the rest (one more for an odd total) at the bottom/right, and needs stride 1;
    "valid" is 0. Raised as torch raises, in torch's order and wording: TypeError for bool or
    non-integer values; RuntimeError for a tuple of the wrong length, an unknown padding string,
    "same" with a stride other than 1, then non-positive groups, negative padding (also "same"
    with a negative dilation), non-positive stride, non-positive dilation. Checks that need the
    input's or weight's shape (channels divisible by groups, the kernel larger than the padded
    input) are the functional layer's. One deliberate difference: torch's argument parser checks
    only the first element of a tuple for bool, so it takes stride=(1, True) as (1, 1); this
    rejects a bool anywhere.
    """
    R, S = (_as_int(k, "kernel_size") for k in kernel_size)
    stride_ints = _ints(stride, "stride")
    padding_ints = None if isinstance(padding, str) else _ints(padding, "padding")
    dilation_ints = _ints(dilation, "dilation")
    groups = _as_int(groups, "groups")
    sH, sW = _pair(stride_ints, "stride")
    if padding_ints is not None:
        pH, pW = _pair(padding_ints, "padding")
    dH, dW = _pair(dilation_ints, "dilation")
    if padding_ints is not None:
        pad = ((pH, pH), (pW, pW))
    elif padding == "valid":
        pad = ((0, 0), (0, 0))
    elif padding == "same":
        if (sH, sW) != (1, 1):
            raise RuntimeError("padding='same' is not supported for strided convolutions")
        pad = tuple((total // 2, total - total // 2) for total in (dH * (R - 1), dW * (S - 1)))
    else:
        raise RuntimeError(f"Invalid padding string: '{padding}'")
    if groups <= 0:
        raise RuntimeError("non-positive groups is not supported")
    if min(pad[0] + pad[1]) < 0:
        raise RuntimeError("negative padding is not supported")
    if sH <= 0 or sW <= 0:
        raise RuntimeError("non-positive stride is not supported")
    # torch has two checks: a negative dilation fails the first (no values in the message).
    if dH < 0 or dW < 0:
        raise RuntimeError("dilation should be greater than zero")
    if dH == 0 or dW == 0:
        raise RuntimeError(f"dilation should be greater than zero, but got {[dH, dW]}")
    return (sH, sW), pad, (dH, dW), groups


def output_size(size: int, kernel: int, stride: int = 1, pad_before: int = 0, pad_after: int = 0,
                dilation: int = 1) -> int:
    """Output length along one spatial dimension: (size + pads - dilation*(kernel-1) - 1) // stride + 1.

    Not positive when the dilated kernel is larger than the padded input (torch raises there).
    """
    return (size + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1


def output_shape(input_shape, weight_shape, stride=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1)):
    """(N, K, P, Q) for input (N, C, H, W) and weight (K, C // groups, R, S), normalized arguments."""
    N, _, H, W = input_shape
    K, _, R, S = weight_shape
    return (N, K, output_size(H, R, stride[0], padding[0][0], padding[0][1], dilation[0]),
            output_size(W, S, stride[1], padding[1][0], padding[1][1], dilation[1]))


# --------------------------------------------------------------------------- forward / backward

def _taps(R, S, P, Q, stride, dilation):
    """For each kernel position (r, s): the slices of the padded input that it reads, (P, Q) each."""
    sH, sW = stride
    dH, dW = dilation
    for r in range(R):
        rows = slice(r * dH, r * dH + (P - 1) * sH + 1, sH)
        for s in range(S):
            cols = slice(s * dW, s * dW + (Q - 1) * sW + 1, sW)
            yield r, s, rows, cols


def _pad(x, padding):
    (top, bottom), (left, right) = padding
    return np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))


def forward(input, weight, bias=None, stride=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1),
            groups=1, activation=None, negative_slope=0.01):
    """act(conv2d(input, weight, bias)) in float64 with normalized arguments. Returns (out, saved).

    saved: input (N, C, H, W) and weight float64, z (the pre-activation) and out (N, K, P, Q),
    has_bias, activation, negative_slope, stride, padding, dilation, groups.
    """
    x = np.asarray(input, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(f"conv2d reference: input (N, C, H, W) and weight (K, C/groups, R, S) expected, "
                         f"got {x.shape} and {w.shape} (unbatched input is the caller's to handle)")
    stride, dilation = tuple(stride), tuple(dilation)
    padding = tuple(tuple(p) for p in padding)
    N, C, _, _ = x.shape
    K, Cg, R, S = w.shape
    G = groups
    if C != Cg * G or K % G:
        raise ValueError(f"conv2d reference: input channels {C} and weight {w.shape} do not match "
                         f"groups={G}")
    Kg = K // G
    _, _, P, Q = output_shape(x.shape, w.shape, stride, padding, dilation)
    xp = _pad(x, padding)
    xp = xp.reshape(N, G, Cg, *xp.shape[2:])
    wg = w.reshape(G, Kg, Cg, R, S)
    z = np.zeros((N, G, Kg, P, Q))
    for r, s, rows, cols in _taps(R, S, P, Q, stride, dilation):
        z += np.einsum("ngchw,gkc->ngkhw", xp[..., rows, cols], wg[..., r, s], optimize=True)
    z = z.reshape(N, K, P, Q)
    if bias is not None:
        z = z + np.asarray(bias, dtype=np.float64)[:, None, None]
    out = _act.apply(z, activation, negative_slope)
    saved = dict(input=x, weight=w, z=z, out=out, has_bias=bias is not None, activation=activation,
                 negative_slope=negative_slope, stride=stride, padding=padding, dilation=dilation,
                 groups=G)
    return out, saved


def backward(grad_out, saved):
    """Returns (grad_input (N, C, H, W), grad_weight (K, C // groups, R, S), grad_bias (K,) or None)."""
    x, w = saved["input"], saved["weight"]
    stride, padding, dilation, G = saved["stride"], saved["padding"], saved["dilation"], saved["groups"]
    g = np.asarray(grad_out, dtype=np.float64)
    g = g * _act.derivative(saved["z"], saved["out"], saved["activation"], saved["negative_slope"])
    N, C, H, W = x.shape
    K, Cg, R, S = w.shape
    Kg = K // G
    P, Q = g.shape[2:]
    xp = _pad(x, padding)
    Hp, Wp = xp.shape[2:]
    xp = xp.reshape(N, G, Cg, Hp, Wp)
    wg = w.reshape(G, Kg, Cg, R, S)
    gg = g.reshape(N, G, Kg, P, Q)
    grad_xp = np.zeros_like(xp)
    grad_wg = np.zeros_like(wg)
    for r, s, rows, cols in _taps(R, S, P, Q, stride, dilation):
        grad_wg[..., r, s] = np.einsum("ngkhw,ngchw->gkc", gg, xp[..., rows, cols], optimize=True)
        # One (r, s) reads each padded position at most once: a plain slice-add, no np.add.at.
        grad_xp[..., rows, cols] += np.einsum("ngkhw,gkc->ngchw", gg, wg[..., r, s], optimize=True)
    (top, _), (left, _) = padding
    grad_input = grad_xp.reshape(N, C, Hp, Wp)[:, :, top:top + H, left:left + W]
    grad_weight = grad_wg.reshape(K, Cg, R, S)
    grad_bias = g.sum(axis=(0, 2, 3)) if saved["has_bias"] else None
    return np.ascontiguousarray(grad_input), grad_weight, grad_bias
