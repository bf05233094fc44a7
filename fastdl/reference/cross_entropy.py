"""Softmax cross-entropy with torch's full semantics, and dense layer + cross-entropy, float64 NumPy.

Layout: input (C,), (N, C) or (N, C, d1, ..., dk); the class dimension is 1 (0 for a 1-D input).
Every position (n, d1, ..., dk) is one row of C logits x; with lse = log sum_c exp(x_c) and
logp = x - lse, each row's loss is sum_c T_c (lse - x_c) for a target distribution T:

  class index t, no smoothing      T = w_t * onehot(t)
  class index t, smoothing eps     T = (1 - eps) * w_t * onehot(t) + eps / C * w
  probabilities p                  T = w * q,  q = (1 - eps) * p + eps / C  (q = p when eps == 0)

(w = 1 without class weights). A row whose index target equals ignore_index has loss 0.
Reductions: "none" keeps the rows' shape, "sum" adds them, "mean" divides the sum by
sum(w_t over non-ignored rows) for index targets (nan when that is 0: all ignored, as torch) and
by the number of rows for probability targets.

The gradient of row r is (softmax(x) * sum_c T_c - T) * scale_r, with scale_r the reduction's
factor times grad_out (per row for "none"); torch's nll_loss scales ignored rows by 0, so a
"mean" over all-ignored rows still has a zero gradient. Probability targets and their class
weights are differentiable too: d/dp_c = -(1 - eps) w_c logp_c scale_r, d/dw_c = -q_c logp_c scale_r.
"""
from __future__ import annotations

import numpy as np

REDUCTIONS = ("none", "mean", "sum")


def _rows_layout(x: np.ndarray):
    """(C,) / (N, C) / (N, C, d...) -> (rows, C) with the class dimension last, and the rows' shape."""
    if x.ndim == 1:
        return x[None, :], ()
    moved = np.moveaxis(x, 1, -1)
    # Rows counted explicitly: reshape(-1, 0) cannot infer them when there are no classes.
    return moved.reshape(int(np.prod(moved.shape[:-1])), x.shape[1]), moved.shape[:-1]


def _from_rows(rows: np.ndarray, shape: tuple) -> np.ndarray:
    """Inverse of _rows_layout for an array shaped like the input."""
    if len(shape) == 1:
        return rows[0]
    moved = rows.reshape(shape[:1] + shape[2:] + shape[1:2])
    return np.moveaxis(moved, -1, 1)


def log_softmax(x: np.ndarray):
    """Row-wise log-softmax of (rows, C), as torch: a row of -inf, a row holding +inf and a row holding
    nan are all nan; never a warning."""
    m = np.max(x, axis=1, initial=-np.inf)
    # Only an all -inf row is shifted by 0 (its max minus itself would be nan before exp); a +inf
    # max stays, so inf - inf makes the row nan exactly where torch's does.
    shift = np.where(m == -np.inf, 0.0, m)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s = np.exp(x - shift[:, None]).sum(axis=1)
        lse = shift + np.log(s)
        return x - lse[:, None]


def rows_forward(logits, target, weight, ignore_index=-100, label_smoothing=0.0):
    """The per-row kernel of cross-entropy on (rows, C) logits, the oracle for the backends' launchers.

    target: (rows,) class indices or (rows, C) probabilities. Returns
    (loss_rows (rows,), dloss (rows, C) = d loss_r / d logits_r, row_weight (rows,)) where
    row_weight is w_t for a non-ignored index target, 0 for an ignored one, 1 for probabilities.
    """
    x = np.asarray(logits, dtype=np.float64)
    rows, C = x.shape
    w = np.ones(C) if weight is None else np.asarray(weight, dtype=np.float64)
    eps = max(float(label_smoothing), 0.0)
    logp = log_softmax(x)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # torch multiplies the smoothing term by eps / C: with no classes that is inf, and every
        # row's loss 0 * inf = nan (ignored rows too), which np.float64 division reproduces.
        smooth_share = np.float64(eps) / C if eps > 0 else 0.0
        p = np.exp(logp)
        if np.issubdtype(np.asarray(target).dtype, np.floating):
            q = np.asarray(target, dtype=np.float64)
            if eps > 0:
                q = q * (1.0 - eps) + smooth_share
            T = w * q
            loss = -(T * logp).sum(axis=1)
            row_weight = np.ones(rows)
        else:
            t = np.asarray(target).astype(np.int64)
            valid = t != ignore_index
            t_safe = np.where(valid, t, 0)
            row_weight = np.where(valid, w[t_safe] if C else 0.0, 0.0)
            T = np.zeros_like(x)
            if C:
                T[np.arange(rows), t_safe] = (1.0 - eps) * row_weight
            nll = np.where(valid, -row_weight * logp[np.arange(rows), t_safe] if C else 0.0, 0.0)
            loss = nll
            if eps > 0:
                T = T + np.where(valid, smooth_share, 0.0)[:, None] * w
                smooth = np.where(valid, -(w * logp).sum(axis=1), 0.0)
                loss = (1.0 - eps) * nll + smooth_share * smooth
        # Ignored rows have T == 0: their gradient is 0 * softmax, nan for a row of -inf as in torch.
        dloss = p * T.sum(axis=1, keepdims=True) - T
    return loss, dloss, row_weight


def forward(input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """torch.nn.functional.cross_entropy in float64. Returns (out, saved)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    x = np.asarray(input, dtype=np.float64)
    tgt = np.asarray(target)
    prob = np.issubdtype(tgt.dtype, np.floating)
    x_rows, rows_shape = _rows_layout(x)
    t_rows = _rows_layout(tgt.astype(np.float64))[0] if prob else tgt.reshape(-1)
    loss, dloss, row_weight = rows_forward(x_rows, t_rows, weight, ignore_index, label_smoothing)
    with np.errstate(divide="ignore", invalid="ignore"):
        if reduction == "none":
            out = loss.reshape(rows_shape)
            scale = np.ones(len(loss))
        elif reduction == "sum":
            out = np.float64(loss.sum())
            scale = np.ones(len(loss))
        else:
            denom = float(len(loss)) if prob else row_weight.sum()
            # A zero denominator (every row ignored, or every target's class weight 0) gives nan, as
            # torch's 0 / 0: the loss, and the gradient of every row that is not ignored.
            out = np.float64(loss.sum() / denom) if denom else np.float64(np.nan)
            scale = np.full(len(loss), 1.0 / denom if denom else np.nan)
    saved = dict(x_rows=x_rows, t_rows=t_rows, weight=weight, prob=prob, dloss=dloss, scale=scale,
                 ignore_index=ignore_index, label_smoothing=max(float(label_smoothing), 0.0),
                 reduction=reduction, input_shape=x.shape, target_shape=tgt.shape)
    return out, saved


def backward(grad_out, saved):
    """Returns (grad_input, grad_target, grad_weight); the last two are None for index targets."""
    g = np.asarray(grad_out, dtype=np.float64)
    rows = saved["dloss"].shape[0]
    g_rows = g.reshape(-1) if saved["reduction"] == "none" else np.full(rows, float(g))
    with np.errstate(invalid="ignore", over="ignore"):
        if saved["prob"]:
            scale = saved["scale"] * g_rows
        else:
            # Ignored rows keep a 0 factor even when "mean" divides by 0 (all rows ignored).
            t = saved["t_rows"].astype(np.int64)
            scale = np.where(t != saved["ignore_index"], saved["scale"] * g_rows, 0.0)
        grad_rows = saved["dloss"] * scale[:, None]
    grad_input = _from_rows(grad_rows, saved["input_shape"])
    if not saved["prob"]:
        return grad_input, None, None
    x_rows = saved["x_rows"]
    C = x_rows.shape[1]
    logp = log_softmax(x_rows)
    w = np.ones(C) if saved["weight"] is None else np.asarray(saved["weight"], dtype=np.float64)
    eps = saved["label_smoothing"]
    with np.errstate(divide="ignore"):
        q = saved["t_rows"] * (1.0 - eps) + np.float64(eps) / C if eps > 0 else saved["t_rows"]
    with np.errstate(invalid="ignore"):
        grad_t_rows = -(1.0 - eps) * w * logp * scale[:, None]
        grad_weight = -(q * logp * scale[:, None]).sum(axis=0)
    grad_target = _from_rows(grad_t_rows, saved["input_shape"])
    return grad_input, grad_target, grad_weight


def linear_forward(input, weight, target, bias=None, ignore_index=-100, reduction="mean",
                   label_smoothing=0.0):
    """cross_entropy(input @ weight.T + bias, target); input (N, H) or (H,), weight (V, H)."""
    x = np.asarray(input, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    z = x @ w.T
    if bias is not None:
        z = z + np.asarray(bias, dtype=np.float64)
    out, saved = forward(z, target, None, ignore_index, reduction, label_smoothing)
    return out, dict(ce=saved, input=x, weight=w, has_bias=bias is not None)


def linear_backward(grad_out, saved):
    """Returns (grad_input, grad_weight, grad_bias or None)."""
    grad_z = backward(grad_out, saved["ce"])[0]
    x, w = saved["input"], saved["weight"]
    grad_z_2d = grad_z.reshape(-1, w.shape[0])
    grad_input = (grad_z_2d @ w).reshape(x.shape)
    grad_weight = grad_z_2d.T @ x.reshape(-1, w.shape[1])
    grad_bias = grad_z_2d.sum(axis=0) if saved["has_bias"] else None
    return grad_input, grad_weight, grad_bias
