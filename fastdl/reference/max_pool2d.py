"""2-D max pooling with torch's semantics exactly (values, return_indices, backward), float64 NumPy.

Layout: input (N, C, H, W) -> out (N, C, P, Q). Unbatched (C, H, W) input is the caller's to handle
(add the batch dimension, drop it from the results); this module takes 4-D input only.

Window (p, q) covers rows h0 + r*dH (r = 0..R-1), h0 = p*sH - pH, and columns w0 + s*dW
(s = 0..S-1), w0 = q*sW - pW; taps outside the input are implicit -inf padding and never chosen.
torch's CPU kernel (and its CUDA kernel) scan the in-bounds taps row-major with

    maxval = -inf; maxindex = first in-bounds tap
    for each in-bounds tap, in order:  if val > maxval or isnan(val): maxval, maxindex = val, tap

which this module reproduces in vectorized form; the consequences, checked against torch 2.13 on
CPU by tests/test_reference_max_pool2d.py:

- ties: the FIRST maximum in row-major window order wins (strict >), its value is copied (so of
  0.0 and -0.0 the first one's sign is kept);
- NaN: a window holding a NaN gives NaN, and the index is the LAST NaN in row-major window order
  (every NaN re-takes the lead; nothing beats a NaN afterwards);
- a window whose in-bounds values are all -inf gives -inf and the index of its first in-bounds tap;
- +inf is an ordinary maximum (first one wins);
- a window with no in-bounds tap at all (only possible with dilation > 1 and padding, e.g. H = 2,
  kernel 2, dilation 3, padding 1): -inf, and torch still reports the index
  h_first * W + w_first of the first dilated taps at or after row/column 0, which lies outside the
  (H, W) plane. torch's backward adds that window's gradient at that flat offset, i.e. into
  another plane or past the end of the tensor (memory corruption); this module's backward drops it.

Indices are torch's: int64 flat offsets h * W + w into each (H, W) plane. `window_pos` is the same
choice as a window-local tap number r * S + s in 0..R*S-1 (the kernels store it in one byte, so it
is returned as uint8 when R*S <= 256); index = (h0 + r*dH) * W + (w0 + s*dW) holds for every window.

Output size (torch's pooling_output_shape, per dimension, `output_size`):
    P = (H + 2*pH - dH*(R-1) - 1 + (sH - 1 if ceil_mode else 0)) // sH + 1
    ceil_mode only: if (P - 1) * sH >= H + pH: P -= 1   (the last window must start inside the
                                                          input or the top/left padding)

backward: grad_input[n, c].flat[index[n, c, p, q]] += grad_out[n, c, p, q], summed where windows
overlap and choose the same element (in output order, as torch's CPU backward adds them).
"""
from __future__ import annotations

import operator

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


# --------------------------------------------------------------------------- argument forms

def _as_int(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"max_pool2d: {name} must be an int or a tuple of ints, not bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"max_pool2d: {name} must be an int or a tuple of ints, not "
                        f"{type(value).__name__}") from None


def _ints(value, name: str) -> list[int]:
    if isinstance(value, (list, tuple)):
        return [_as_int(v, name) for v in value]
    return [_as_int(value, name)]


def _trunc_div(a: int, b: int) -> int:
    """C++ integer division (toward zero), as torch's checks compute it."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def normalize_args(kernel_size, stride=None, padding=0, dilation=1):
    """torch.nn.functional.max_pool2d's argument forms -> 2-tuples (kernel, stride, padding, dilation).

    Each is an int or a tuple of 1 or 2 ints; stride None (or an empty tuple) means kernel_size.
    padding (pH, pW) is symmetric: torch's max_pool2d has no per-side padding. Raises as torch:
    TypeError for bool or non-integer values, RuntimeError with torch's wording for a tuple of the
    wrong length (checked in the order kernel_size, stride, padding, dilation). The value checks
    need the input size and are in `check_args`. One deliberate difference: torch's argument
    parser checks only the first element of a tuple for bool, so it takes (2, True) as (2, 1);
    this rejects a bool anywhere.
    """
    k, s, p, d = (_ints(v, n) for v, n in ((kernel_size, "kernel_size"),
                                           ([] if stride is None else stride, "stride"),
                                           (padding, "padding"), (dilation, "dilation")))
    if len(k) not in (1, 2):
        raise RuntimeError("max_pool2d: kernel_size must either be a single int, or a tuple of two ints")
    if len(s) not in (0, 1, 2):
        raise RuntimeError("max_pool2d: stride must either be omitted, a single int, or a tuple of two ints")
    if len(p) not in (1, 2):
        raise RuntimeError("max_pool2d: padding must either be a single int, or a tuple of two ints")
    if len(d) not in (1, 2):
        raise RuntimeError("max_pool2d: dilation must be either a single int, or a tuple of two ints")
    kernel = (k[0], k[-1])
    stride = kernel if not s else (s[0], s[-1])
    return kernel, stride, (p[0], p[-1]), (d[0], d[-1])


def output_size(size: int, kernel: int, stride: int, pad: int, dilation: int, ceil_mode: bool) -> int:
    """torch's pooling_output_shape for one dimension, with its checks (RuntimeError, torch's words)."""
    if stride == 0:
        raise RuntimeError("stride should not be zero")
    if pad < 0:
        raise RuntimeError(f"pad must be non-negative, but got pad: {pad}")
    if pad > _trunc_div((kernel - 1) * dilation + 1, 2):
        raise RuntimeError(f"pad should be at most half of effective kernel size, but got pad={pad}, "
                           f"kernel_size={kernel} and dilation={dilation}")
    # div_rtn: rounds toward negative infinity, as Python's //.
    out = (size + 2 * pad - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def check_args(input_shape, kernel, stride, padding, dilation, ceil_mode):
    """torch's checks of normalized arguments against an (N, C, H, W) input, in torch's order
    (pooling_output_shape for H then W, then pool2d_shape_check). Returns the output size (P, Q)."""
    C, H, W = input_shape[-3:]
    (R, S), (sH, sW), (pH, pW), (dH, dW) = kernel, stride, padding, dilation
    P = output_size(H, R, sH, pH, dH, ceil_mode)
    Q = output_size(W, S, sW, pW, dW, ceil_mode)
    if R <= 0 or S <= 0:
        raise RuntimeError(f"kernel size should be greater than zero, but got kH: {R} kW: {S}")
    if sH <= 0 or sW <= 0:
        raise RuntimeError(f"stride should be greater than zero, but got dH: {sH} dW: {sW}")
    if dH <= 0 or dW <= 0:
        raise RuntimeError(f"dilation should be greater than zero, but got dilationH: {dH} dilationW: {dW}")
    if pW > S // 2 or pH > R // 2:
        raise RuntimeError(f"pad should be smaller than or equal to half of kernel size, but got "
                           f"padW = {pW}, padH = {pH}, kW = {S}, kH = {R}")
    if P < 1 or Q < 1:
        raise RuntimeError(f"Given input size: ({C}x{H}x{W}). Calculated output size: ({C}x{P}x{Q}). "
                           f"Output size is too small")
    return P, Q


# --------------------------------------------------------------------------- forward / backward

def _first_tap(start: np.ndarray, dilation: int) -> np.ndarray:
    """Per window: the first tap r with start + r*dilation >= 0 (torch's ih0 loop)."""
    return np.where(start < 0, (-start + dilation - 1) // dilation, 0)


def forward(input, kernel_size, stride=None, padding=(0, 0), dilation=(1, 1), ceil_mode=False):
    """max_pool2d(input, ..., return_indices=True) in float64 with normalized (2-tuple) arguments.

    Returns (out (N, C, P, Q) float64, saved). saved: indices (N, C, P, Q) int64, torch's flat
    offsets into each (H, W) plane (return_indices' second output); window_pos (N, C, P, Q), the
    chosen tap r*S + s (uint8 when R*S <= 256, else int64); input_shape; kernel_size, stride,
    padding, dilation, ceil_mode.
    """
    x = np.asarray(input, dtype=np.float64)
    if x.ndim != 4:
        raise ValueError(f"max_pool2d reference: input (N, C, H, W) expected, got {x.shape} "
                         "(unbatched input is the caller's to handle)")
    (R, S) = kernel = tuple(kernel_size)
    (sH, sW) = stride = kernel if stride is None else tuple(stride)
    (pH, pW) = padding = tuple(padding)
    (dH, dW) = dilation = tuple(dilation)
    N, C, H, W = x.shape
    P, Q = check_args(x.shape, kernel, stride, padding, dilation, ceil_mode)
    span_h, span_w = dH * (R - 1) + 1, dW * (S - 1) + 1
    # -inf padding: pH/pW before, and after as far as the last window reaches (ceil_mode's windows
    # may reach past the symmetric padding; floor mode's may stop short of it).
    bottom = max(0, (P - 1) * sH + span_h - pH - H)
    right = max(0, (Q - 1) * sW + span_w - pW - W)
    xp = np.pad(x, ((0, 0), (0, 0), (pH, bottom), (pW, right)), constant_values=-np.inf)
    windows = sliding_window_view(xp, (span_h, span_w), axis=(2, 3))
    windows = windows[:, :, ::sH, ::sW, ::dH, ::dW][:, :, :P, :Q].reshape(N, C, P, Q, R * S)

    h0 = np.arange(P) * sH - pH                                   # (P,) first row of each window
    w0 = np.arange(Q) * sW - pW
    rows = h0[:, None] + np.arange(R) * dH                        # (P, R)
    cols = w0[:, None] + np.arange(S) * dW                        # (Q, S)
    valid = (((rows >= 0) & (rows < H))[:, None, :, None]
             & ((cols >= 0) & (cols < W))[None, :, None, :]).reshape(P, Q, R * S)
    first = (_first_tap(h0, dH)[:, None] * S + _first_tap(w0, dW)[None, :])    # (P, Q)

    with np.errstate(invalid="ignore"):
        is_nan = np.isnan(windows)
        last_nan = R * S - 1 - np.argmax(is_nan[..., ::-1], axis=-1)
        top = np.max(np.where(is_nan, -np.inf, windows), axis=-1, keepdims=True)
        best = (windows == top) & valid
    pos = np.where(best.any(axis=-1), np.argmax(best, axis=-1), first)
    pos = np.where(is_nan.any(axis=-1), last_nan, pos)
    # The value is the chosen element itself (its sign for a tie of 0.0 and -0.0, its NaN payload);
    # a window with no in-bounds tap picks a padding tap, -inf.
    out = np.take_along_axis(windows, pos[..., None], axis=-1)[..., 0]
    r, s = np.divmod(pos, S)
    indices = (h0[:, None] + r * dH) * W + (w0[None, :] + s * dW)
    saved = dict(indices=indices.astype(np.int64),
                 window_pos=pos.astype(np.uint8 if R * S <= 256 else np.int64),
                 input_shape=x.shape, kernel_size=kernel, stride=stride, padding=padding,
                 dilation=dilation, ceil_mode=bool(ceil_mode))
    return np.ascontiguousarray(out), saved


def backward(grad_out, saved):
    """grad_input (N, C, H, W): each grad_out element added at its window's chosen input element."""
    g = np.asarray(grad_out, dtype=np.float64)
    N, C, H, W = saved["input_shape"]
    idx = saved["indices"].reshape(N * C, -1)
    # Windows with no in-bounds tap point outside their plane; torch writes there, we drop them.
    inside = (idx >= 0) & (idx < H * W)
    flat = idx + (np.arange(N * C) * (H * W))[:, None]
    # bincount adds in output order, as torch's CPU backward does.
    grad = np.bincount(flat[inside], weights=g.reshape(N * C, -1)[inside], minlength=N * C * H * W)
    return grad.reshape(N, C, H, W)
