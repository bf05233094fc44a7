"""The float64 reference for batch_norm is itself proven: forward, backward and the running-stat
update against torch's F.batch_norm (+ residual + activation) under float64 autograd, finite
differences, the four contract primitives against the whole op, and SyncBatchNorm's statistics
protocol (halves combined == the whole batch)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastdl.ops.linear import TORCH_ACTIVATIONS
from fastdl.reference import batch_norm as ref
from fastdl.testing import make_tensor

torch.set_num_threads(1)

ACTIVATIONS = ("none", "relu", "leaky_relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh")
# id: input shape (2-D .. 5-D; odd sizes)
SHAPES = {"2d": (6, 5), "3d": (3, 4, 7), "4d": (2, 3, 5, 3), "5d": (2, 3, 2, 3, 2)}
EPS = 1e-5


def _inputs(shape, affine=True, residual=True, seed=0):
    C = shape[1]
    x = make_tensor(shape, torch.float64, seed=seed, scale=2.0) + 0.5
    w = make_tensor((C,), torch.float64, seed=seed + 1) if affine else None
    b = make_tensor((C,), torch.float64, seed=seed + 2) if affine else None
    r = make_tensor(shape, torch.float64, seed=seed + 3) if residual else None
    rm = make_tensor((C,), torch.float64, seed=seed + 4)
    rv = make_tensor((C,), torch.float64, seed=seed + 5).abs() + 0.5
    g = make_tensor(shape, torch.float64, seed=seed + 6)
    return x, w, b, r, rm, rv, g


def _torch(x, w, b, r, rm, rv, g, training, activation, slope=0.01, momentum=0.1):
    """torch's (out, grads (x, w, b, r), running_mean, running_var after the call), float64."""
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b, r)]
    xt, wt, bt, rt = leaves
    rm_t, rv_t = rm.clone(), rv.clone()
    z = F.batch_norm(xt, rm_t, rv_t, wt, bt, training=training, momentum=momentum, eps=EPS)
    if rt is not None:
        z = z + rt
    out = TORCH_ACTIVATIONS[activation](z, slope)
    out.backward(g)
    grads = [None if t is None else t.grad for t in leaves]
    return out.detach(), grads, rm_t, rv_t


def _np(t):
    return None if t is None else t.numpy()


def _close(actual, expected, rtol=1e-10, atol=1e-11):
    if expected is None:
        assert actual is None
        return
    np.testing.assert_allclose(actual, np.asarray(expected), rtol=rtol, atol=atol)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_backward_match_torch(shape, activation, training):
    x, w, b, r, rm, rv, g = _inputs(SHAPES[shape], seed=len(activation))
    slope = 0.2
    out, grads, rm_t, rv_t = _torch(x, w, b, r, rm, rv, g, training, activation, slope)
    mine, saved = ref.forward(x.numpy(), _np(w), _np(b), _np(rm), _np(rv), training, EPS, activation, slope, _np(r))
    _close(mine, out)
    for use_mask in (False, True):
        for a, e in zip(ref.backward(g.numpy(), saved, use_mask=use_mask), grads):
            _close(a, e)
    if training:
        new_rm, new_rv = ref.update_running_stats(rm.numpy(), rv.numpy(), saved["mean"], saved["var"],
                                                  saved["count"], 0.1)
        _close(new_rm, rm_t)
        _close(new_rv, rv_t)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_optional_weight_bias_residual(affine, residual, training):
    x, w, b, r, rm, rv, g = _inputs((3, 4, 5), affine, residual, seed=11)
    out, grads, _, _ = _torch(x, w, b, r, rm, rv, g, training, "relu")
    mine, saved = ref.forward(x.numpy(), _np(w), _np(b), _np(rm), _np(rv), training, EPS, "relu", 0.01, _np(r))
    _close(mine, out)
    for a, e in zip(ref.backward(g.numpy(), saved, use_mask=True), grads):
        _close(a, e)


def test_weight_without_bias():
    x, w, _, r, rm, rv, g = _inputs((4, 3, 5), seed=5)
    out, grads, _, _ = _torch(x, w, None, r, rm, rv, g, True, "silu")
    mine, saved = ref.forward(x.numpy(), _np(w), None, None, None, True, EPS, "silu", 0.01, _np(r))
    _close(mine, out)
    for a, e in zip(ref.backward(g.numpy(), saved), grads):
        _close(a, e)


@pytest.mark.parametrize("slope", [0.0, -0.5, 1.5])
def test_leaky_relu_slopes_and_ties_at_zero(slope):
    """pre == 0 exactly (weight 0, bias 0 for channel 0; a residual cancelling it elsewhere):
    relu' = 0 and leaky_relu' = slope there, as torch, with or without the mask."""
    x, w, b, r, rm, rv, g = _inputs((4, 3, 6), seed=21)
    w[0], b[0] = 0.0, 0.0
    for activation in ("relu", "leaky_relu"):
        out, grads, _, _ = _torch(x, w, b, r * 0, rm, rv, g, True, activation, slope)
        mine, saved = ref.forward(x.numpy(), _np(w), _np(b), None, None, True, EPS, activation, slope,
                                  _np(r * 0))
        assert (saved["mask"][:, 0] == 0).all()
        _close(mine, out)
        for use_mask in (False, True):
            for a, e in zip(ref.backward(g.numpy(), saved, use_mask=use_mask), grads):
                _close(a, e)


def test_running_stats_momenta_and_large_mean():
    """Several steps with momentum 0.1 and 0, and data of mean 1e4, std 1 (no cancellation)."""
    C = 3
    for momentum in (0.1, 0.0, 1.0):
        rm, rv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
        mine_rm, mine_rv = rm.numpy().copy(), rv.numpy().copy()
        for step in range(3):
            x = make_tensor((5, C, 4), torch.float64, seed=step) + 1e4
            F.batch_norm(x, rm, rv, training=True, momentum=momentum, eps=EPS)
            _, saved = ref.forward(x.numpy(), training=True)
            mine_rm, mine_rv = ref.update_running_stats(mine_rm, mine_rv, saved["mean"], saved["var"],
                                                        saved["count"], momentum)
            np.testing.assert_allclose(saved["var"], x.var(dim=(0, 2), unbiased=False).numpy(), rtol=1e-9)
        _close(mine_rm, rm, rtol=1e-12, atol=0)
        _close(mine_rv, rv, rtol=1e-9, atol=1e-12)


def test_empty_batch():
    x = np.zeros((0, 3, 4))
    out, saved = ref.forward(x, np.ones(3), np.zeros(3), training=True)
    assert out.shape == (0, 3, 4)
    gi, gw, gb, _ = ref.backward(np.zeros((0, 3, 4)), saved)
    assert gi.shape == (0, 3, 4)
    np.testing.assert_array_equal(gw, np.zeros(3))
    np.testing.assert_array_equal(gb, np.zeros(3))


@pytest.mark.parametrize("activation", ["gelu_tanh", "leaky_relu", "tanh"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backward_matches_finite_differences(activation, training):
    """Central differences of <g, out> with respect to x, weight, bias and residual."""
    x, w, b, r, rm, rv, g = _inputs((3, 2, 4), seed=31)
    args = dict(running_mean=rm.numpy(), running_var=rv.numpy(), training=training, eps=EPS,
                activation=activation, negative_slope=0.3)
    inputs = dict(x=x.numpy().copy(), weight=w.numpy().copy(), bias=b.numpy().copy(), residual=r.numpy().copy())

    def loss():
        out, _ = ref.forward(**inputs, **args)
        return float((out * g.numpy()).sum())

    _, saved = ref.forward(**inputs, **args)
    analytic = dict(zip(("x", "weight", "bias", "residual"), ref.backward(g.numpy(), saved)))
    h = 1e-6
    for name, value in inputs.items():
        numeric = np.zeros_like(value)
        for i in np.ndindex(value.shape):
            old = value[i]
            value[i] = old + h
            up = loss()
            value[i] = old - h
            down = loss()
            value[i] = old
            numeric[i] = (up - down) / (2 * h)
        np.testing.assert_allclose(analytic[name], numeric, rtol=1e-5, atol=1e-6, err_msg=name)


# --------------------------------------------------------------------------- primitives

@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_primitives_compose_to_the_whole_op(activation):
    """stats + elemt and backward_reduce + backward_elemt (with and without the mask) give the
    whole op's forward and gradients (torch's), on an (N, C, S) view of a 4-D input."""
    shape = (3, 4, 3, 5)
    x, w, b, r, rm, rv, g = _inputs(shape, seed=41)
    out, (gx, gw, gb, gr), _, _ = _torch(x, w, b, r, rm, rv, g, True, activation, 0.05)
    x3, r3, g3 = (t.numpy().reshape(3, 4, 15) for t in (x, r, g))
    mean, var = ref.stats(x3)
    np.testing.assert_allclose(var, x.var(dim=(0, 2, 3), unbiased=False).numpy(), rtol=1e-12)
    invstd = 1 / np.sqrt(var + EPS)
    out3, mask3 = ref.elemt(x3, mean, invstd, w.numpy(), b.numpy(), r3, activation, 0.05)
    _close(out3.reshape(shape), out)
    n = x3.shape[0] * x3.shape[2]
    for mask in (None, mask3.astype(np.uint8)):
        # With a mask, relu/leaky_relu never read the residual: pass garbage to prove it.
        residual = r3 if mask is None or activation not in ref.MASK_ACTIVATIONS else np.full_like(r3, np.nan)
        common = (g3, x3, mean, invstd, w.numpy(), b.numpy(), residual, mask, activation, 0.05)
        sum_dy, sum_dy_xmu = ref.backward_reduce(*common)
        _close(sum_dy, gb)
        _close(sum_dy_xmu * invstd, gw)
        grad_input, grad_residual = ref.backward_elemt(*common, sum_dy / n, sum_dy_xmu / n)
        _close(grad_input.reshape(shape), gx)
        _close(grad_residual.reshape(shape), gr)


def test_eval_backward_elemt():
    x, w, b, r, rm, rv, g = _inputs((4, 3, 5), seed=51)
    _, (gx, gw, gb, gr), _, _ = _torch(x, w, b, r, rm, rv, g, False, "gelu")
    invstd = 1 / np.sqrt(rv.numpy() + EPS)
    common = (g.numpy(), x.numpy(), rm.numpy(), invstd, w.numpy(), b.numpy(), r.numpy(), None, "gelu", 0.01)
    sum_dy, sum_dy_xmu = ref.backward_reduce(*common)
    _close(sum_dy, gb)
    _close(sum_dy_xmu * invstd, gw)
    grad_input, grad_residual = ref.backward_elemt(*common, None, None)
    _close(grad_input, gx)
    _close(grad_residual, gr)


def test_stats_is_stable_for_a_large_mean():
    x = np.random.default_rng(0).standard_normal((64, 2, 50)) + np.array([1e4, -3e6])[None, :, None]
    mean, var = ref.stats(x)
    np.testing.assert_allclose(var, (x - x.mean(axis=(0, 2), keepdims=True)).var(axis=(0, 2)), rtol=1e-9)
    assert abs(var[0] - 1) < 0.1


# --------------------------------------------------------------------------- SyncBatchNorm protocol

@pytest.mark.parametrize("splits", [(4, 4), (1, 7), (3, 0, 5), (0, 8), (2, 2, 2, 2), (8,)])
def test_combined_rank_stats_equal_the_whole_batch(splits):
    """Per-rank (mean, var, count) of slices of the batch, combined, equal the whole batch's;
    empty ranks (count 0, with garbage statistics) change nothing."""
    x = make_tensor((8, 5, 3, 2), torch.float64, seed=61).numpy() + 100.0
    x3 = ref.as3(x)
    means, variances, counts = [], [], []
    start = 0
    for n in splits:
        part = x3[start:start + n]
        start += n
        if n:
            m, v = ref.stats(part)
        else:
            m, v = np.full(5, np.nan), np.full(5, np.inf)
        means.append(m)
        variances.append(v)
        counts.append(part.shape[0] * part.shape[2])
    mean, var, total = ref.combine_stats(np.stack(means), np.stack(variances), counts)
    whole_mean, whole_var = ref.stats(x3)
    assert total == x3.shape[0] * x3.shape[2]
    np.testing.assert_allclose(mean, whole_mean, rtol=1e-13)
    np.testing.assert_allclose(var, whole_var, rtol=1e-11)


def test_combined_backward_sums_equal_the_whole_batch():
    """SyncBatchNorm's backward: per-rank (sum_dy, sum_dy_xmu) with the global statistics, summed,
    then backward_elemt on each half with the global means == the whole batch's gradients."""
    shape = (6, 3, 4)
    x, w, b, r, rm, rv, g = _inputs(shape, seed=71)
    _, (gx, gw, gb, gr), _, _ = _torch(x, w, b, r, rm, rv, g, True, "relu")
    x3, r3, g3 = x.numpy(), r.numpy(), g.numpy()
    halves = (slice(0, 2), slice(2, 6))
    parts = [ref.stats(x3[h]) for h in halves]
    mean, var, total = ref.combine_stats([p[0] for p in parts], [p[1] for p in parts], [8, 16])
    invstd = 1 / np.sqrt(var + EPS)
    sums = [ref.backward_reduce(g3[h], x3[h], mean, invstd, w.numpy(), b.numpy(), r3[h], None, "relu")
            for h in halves]
    sum_dy, sum_dy_xmu = sum(s[0] for s in sums), sum(s[1] for s in sums)
    _close(sum_dy, gb)
    _close(sum_dy_xmu * invstd, gw)
    for h in halves:
        grad_input, grad_residual = ref.backward_elemt(g3[h], x3[h], mean, invstd, w.numpy(), b.numpy(), r3[h],
                                                       None, "relu", 0.01, sum_dy / total, sum_dy_xmu / total)
        _close(grad_input, gx[h])
        _close(grad_residual, gr[h])


def test_no_values_anywhere():
    mean, var, total = ref.combine_stats(np.ones((2, 3)), np.ones((2, 3)), [0, 0])
    assert total == 0 and np.isnan(mean).all() and np.isnan(var).all()
