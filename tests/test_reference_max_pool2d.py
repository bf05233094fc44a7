"""The float64 reference for max_pool2d is itself proven: values, return_indices and the backward
against torch's CPU kernel (NaN, -inf, ties and ceil_mode included), and finite differences."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastdl.reference import max_pool2d as ref
from fastdl.testing import make_tensor

torch.set_num_threads(1)

NAN, INF = float("nan"), float("inf")


def _torch(x, kernel, stride=None, padding=0, dilation=1, ceil_mode=False, grad=None):
    """torch's (out, indices, grad_input or None) in float64 on CPU."""
    xt = torch.as_tensor(np.asarray(x, dtype=np.float64)).clone().requires_grad_()
    out, idx = F.max_pool2d(xt, kernel, stride, padding, dilation, ceil_mode=ceil_mode, return_indices=True)
    if grad is None:
        return out.detach().numpy(), idx.numpy(), None
    out.backward(torch.as_tensor(grad))
    return out.detach().numpy(), idx.numpy(), xt.grad.numpy()


def _ref(x, kernel, stride=None, padding=0, dilation=1, ceil_mode=False):
    args = ref.normalize_args(kernel, stride, padding, dilation)
    return ref.forward(np.asarray(x, dtype=np.float64), *args, ceil_mode=ceil_mode)


def _check_against_torch(x, kernel, stride=None, padding=0, dilation=1, ceil_mode=False, seed=0):
    out, saved = _ref(x, kernel, stride, padding, dilation, ceil_mode)
    g = make_tensor(out.shape, torch.float64, seed=seed).numpy()
    t_out, t_idx, t_grad = _torch(x, kernel, stride, padding, dilation, ceil_mode, g)
    assert out.dtype == np.float64 and out.shape == t_out.shape
    np.testing.assert_array_equal(out, t_out)  # exact, NaN where torch has NaN
    assert np.array_equal(np.signbit(out), np.signbit(t_out))
    assert saved["indices"].dtype == np.int64
    np.testing.assert_array_equal(saved["indices"], t_idx)
    # torch's backward adds in output order, so does ours: equal, not just close.
    np.testing.assert_array_equal(ref.backward(g, saved), t_grad)
    _check_window_pos(saved)
    return out, saved


def _check_window_pos(saved):
    """window_pos (r*S + s) maps back to the flat index: (h0 + r*dH) * W + (w0 + s*dW)."""
    (R, S), (sH, sW), (pH, pW), (dH, dW) = (saved[k] for k in ("kernel_size", "stride", "padding", "dilation"))
    W = saved["input_shape"][3]
    pos = saved["window_pos"].astype(np.int64)
    assert saved["window_pos"].dtype == (np.uint8 if R * S <= 256 else np.int64)
    assert ((pos >= 0) & (pos < R * S)).all()
    P, Q = pos.shape[2:]
    h0 = (np.arange(P) * sH - pH)[:, None]
    w0 = (np.arange(Q) * sW - pW)[None, :]
    np.testing.assert_array_equal((h0 + pos // S * dH) * W + (w0 + pos % S * dW), saved["indices"])


# id: input shape, kernel_size, stride, padding, dilation, ceil_mode (torch's argument forms)
CASES = {
    "k3_s2_p1": ((2, 3, 9, 8), 3, 2, 1, 1, False),
    "k2_s2": ((1, 4, 8, 6), 2, 2, 0, 1, False),
    "k2_default_stride_odd_input": ((2, 2, 7, 9), 2, None, 0, 1, False),
    "k3_s1_overlapping": ((1, 2, 6, 7), 3, 1, 0, 1, False),
    "dilation2": ((2, 2, 9, 10), 3, 1, 1, 2, False),
    "dilation_2_3_stride2": ((1, 3, 11, 12), (2, 3), 2, (1, 1), (2, 3), False),
    "non_square": ((2, 2, 9, 7), (3, 2), (1, 2), (1, 1), 1, False),
    "non_square_stride_only": ((1, 2, 10, 9), (2, 4), (3, 1), (0, 2), 1, False),
    "pad_half_k5": ((1, 2, 7, 8), 5, 1, 2, 1, False),
    "pad_half_k4_s3": ((1, 2, 10, 11), 4, 3, 2, 1, False),
    "kernel1": ((1, 2, 4, 5), 1, 2, 0, 1, False),
    "ceil_k3_s2": ((1, 3, 8, 8), 3, 2, 0, 1, True),
    "ceil_k2_s2_p1_drop": ((2, 2, 5, 5), 2, 2, 1, 1, True),
    "ceil_k3_s2_p1": ((1, 2, 6, 7), 3, 2, 1, 1, True),
    "ceil_dilation": ((1, 2, 6, 7), 3, 2, 1, 2, True),
    "ceil_non_square": ((1, 2, 7, 6), (2, 3), (3, 2), (1, 0), 1, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tie_free_matches_torch(case):
    shape, *args = CASES[case]
    x = make_tensor(shape, torch.float64, seed=3).numpy()
    assert len(np.unique(x)) == x.size
    _check_against_torch(x, *args)


def _floor_and_ceil_sizes(size, k, s, p, d):
    unclipped_ceil = (size + 2 * p - d * (k - 1) - 1 + s - 1) // s + 1
    return (ref.output_size(size, k, s, p, d, False), unclipped_ceil, ref.output_size(size, k, s, p, d, True))


def test_ceil_mode_rule_drops_a_window_that_starts_in_the_right_padding():
    # H = 5, kernel 2, stride 2, padding 1: floor 3, plain ceil 4, but window 4 would start at row
    # 3*2 - 1 = 5 = H, in the bottom padding: torch drops it ((4-1)*2 >= 5 + 1).
    assert _floor_and_ceil_sizes(5, 2, 2, 1, 1) == (3, 4, 3)
    # H = 8, kernel 3, stride 2, no padding: ceil keeps a window that starts inside (row 6).
    assert _floor_and_ceil_sizes(8, 3, 2, 0, 1) == (3, 4, 4)
    # A grid against torch's shapes, and the rule fires somewhere in it.
    fired = 0
    for H in range(1, 10):
        for k in (1, 2, 3, 4):
            for s in (1, 2, 3, 4):
                for p in range(k // 2 + 1):
                    for d in (1, 2):
                        for ceil in (False, True):
                            x = torch.zeros(1, 1, H, 1, dtype=torch.float64)
                            try:
                                P = F.max_pool2d(x, (k, 1), (s, 1), (p, 0), (d, 1), ceil_mode=ceil).shape[2]
                            except RuntimeError as e:
                                with pytest.raises(RuntimeError) as mine:
                                    ref.check_args(x.shape, (k, 1), (s, 1), (p, 0), (d, 1), ceil)
                                assert str(mine.value) == str(e)
                                continue
                            assert ref.output_size(H, k, s, p, d, ceil) == P
                            fired += ceil and _floor_and_ceil_sizes(H, k, s, p, d)[1] != P
    assert fired > 10


@pytest.mark.parametrize("case", ["ceil_k2_s2_p1_drop", "ceil_dilation", "ceil_non_square"])
def test_ceil_mode_windows_with_special_values(case):
    shape, *args = CASES[case]
    rng = np.random.default_rng(11)
    x = rng.integers(-2, 3, size=shape).astype(np.float64)
    x[..., -1, :] = -INF  # the partial last windows (ceil_mode) see only -inf or padding
    x[0, 0, -2, -1] = NAN
    _check_against_torch(x, *args)


# Hand-written planes that pin torch's behaviour (checked against torch and against the values
# written here, so a change in torch shows up as a failure of the second kind).
# id: plane, kernel, stride, padding, expected out, expected indices
BEHAVIOUR = {
    # ties: the first maximum in row-major window order.
    "tie_all_equal": ([[1., 1.], [1., 1.]], 2, 2, 0, [[1.]], [[0]]),
    "tie_later_row": ([[0., 2.], [2., 2.]], 2, 2, 0, [[2.]], [[1]]),
    "tie_signed_zero": ([[-0., 0.], [-1., 0.]], 2, 2, 0, [[-0.]], [[0]]),
    "tie_positive_zero_first": ([[0., -0.], [-1., -0.]], 2, 2, 0, [[0.]], [[0]]),
    "tie_inf": ([[1., INF], [INF, 2.]], 2, 2, 0, [[INF]], [[1]]),
    # NaN: wins, and the LAST NaN in window order gives the index.
    "nan_single": ([[1., 9.], [NAN, 5.]], 2, 2, 0, [[NAN]], [[2]]),
    "nan_then_larger": ([[NAN, 9.], [1., 1.]], 2, 2, 0, [[NAN]], [[0]]),
    "nan_two": ([[0., NAN], [NAN, 5.]], 2, 2, 0, [[NAN]], [[2]]),
    "nan_all": ([[NAN, NAN], [NAN, NAN]], 2, 2, 0, [[NAN]], [[3]]),
    "nan_and_inf": ([[INF, NAN], [-INF, INF]], 2, 2, 0, [[NAN]], [[1]]),
    # all -inf: -inf and the first in-bounds tap of the window (padding is never an index).
    "neg_inf_all": ([[-INF, -INF], [-INF, -INF]], 2, 2, 0, [[-INF]], [[0]]),
    "neg_inf_padded": ([[-INF] * 3] * 3, 3, 2, 1, [[-INF, -INF], [-INF, -INF]], [[0, 1], [3, 4]]),
    "neg_inf_padded_one_value": ([[-INF] * 3, [-INF] * 3, [-INF, -INF, 7.]], 3, 2, 1,
                                 [[-INF, -INF], [-INF, 7.]], [[0, 1], [3, 8]]),
}


@pytest.mark.parametrize("case", list(BEHAVIOUR))
def test_torch_behaviour_nan_inf_ties(case):
    plane, kernel, stride, padding, expected_out, expected_idx = BEHAVIOUR[case]
    x = np.asarray(plane)[None, None]
    out, saved = _check_against_torch(x, kernel, stride, padding)
    np.testing.assert_array_equal(out[0, 0], expected_out)
    assert np.array_equal(np.signbit(out[0, 0]), np.signbit(np.asarray(expected_out)))
    np.testing.assert_array_equal(saved["indices"][0, 0], expected_idx)


def test_nan_index_is_the_last_nan_across_channels_and_layouts():
    """The scalar (contiguous) and the vectorized channels_last CPU kernels agree: the last NaN."""
    x = make_tensor((2, 16, 4, 4), torch.float64, seed=5)
    x[:, :, 1, 0] = NAN
    x[:, :, 0, 1] = NAN
    x[1, 3, 1, 1] = NAN
    out, saved = _ref(x.numpy(), 2)
    for t in (x, x.contiguous(memory_format=torch.channels_last)):
        t_out, t_idx = F.max_pool2d(t, 2, return_indices=True)
        np.testing.assert_array_equal(out, t_out.numpy())
        np.testing.assert_array_equal(saved["indices"], t_idx.numpy())
    assert saved["indices"][0, 0, 0, 0] == 4 and saved["indices"][1, 3, 0, 0] == 5


@pytest.mark.parametrize("seed", range(4))
def test_random_special_values_and_ties_match_torch(seed):
    """Small integers (many ties) with NaN and -inf sprinkled in, over random geometries."""
    rng = np.random.default_rng(seed)
    checked = 0
    while checked < 25:
        R, S = (int(v) for v in rng.integers(1, 5, 2))
        stride = tuple(int(v) for v in rng.integers(1, 4, 2))
        dilation = tuple(int(v) for v in rng.integers(1, 3, 2))
        padding = (int(rng.integers(0, R // 2 + 1)), int(rng.integers(0, S // 2 + 1)))
        ceil_mode = bool(rng.integers(2))
        H, W = (int(v) for v in rng.integers(1, 9, 2))
        x = rng.integers(-2, 3, size=(2, 2, H, W)).astype(np.float64)
        x[rng.random(x.shape) < 0.1] = NAN
        x[rng.random(x.shape) < 0.2] = -INF
        try:
            _torch(x, (R, S), stride, padding, dilation, ceil_mode)
        except RuntimeError:
            continue  # output too small: covered by the argument tests
        _, saved = _ref(x, (R, S), stride, padding, dilation, ceil_mode)
        if (saved["indices"] >= H * W).any():
            continue  # a window with no in-bounds tap: torch's backward writes out of bounds
        _check_against_torch(x, (R, S), stride, padding, dilation, ceil_mode, seed=checked)
        checked += 1


def test_window_with_no_in_bounds_tap():
    """H = W = 2, kernel 2, dilation 3, padding 1: the one window's taps are rows/columns -1 and 2.
    torch reports -inf and index (2 * 2 + 2) = 6, outside the plane; its backward then adds into
    the next plane (or past the tensor's end), so the reference's backward drops that gradient."""
    x = np.arange(8.0).reshape(1, 2, 2, 2)
    out, saved = _ref(x, 2, 1, 1, 3)
    t_out, t_idx, _ = _torch(x, 2, 1, 1, 3)
    np.testing.assert_array_equal(out, t_out)
    np.testing.assert_array_equal(saved["indices"], t_idx)
    assert (out == -INF).all() and (saved["indices"] == 6).all()
    _check_window_pos(saved)
    np.testing.assert_array_equal(ref.backward(np.ones_like(out), saved), np.zeros_like(x))


def test_backward_sums_where_windows_choose_the_same_element():
    x = np.array([[[[1., 2., 3.], [4., 9., 6.], [7., 8., 5.]]]])
    out, saved = _check_against_torch(x, 2, 1)
    np.testing.assert_array_equal(saved["indices"][0, 0], [[4, 4], [4, 4]])
    grad = ref.backward(np.array([[[[1., 2.], [3., 4.]]]]), saved)
    assert grad[0, 0, 1, 1] == 10.0 and np.count_nonzero(grad) == 1


@pytest.mark.parametrize("args", [
    (3, 2, 1, 1, False),
    ((2, 3), (1, 2), (1, 1), (2, 1), True),
])
def test_backward_matches_finite_differences(args):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 2, 6, 5))
    out, saved = _ref(x, *args)
    g = rng.normal(size=out.shape)
    analytic = ref.backward(g, saved)

    def loss(x_):
        return float((_ref(x_, *args)[0] * g).sum())

    eps = 1e-6
    numeric = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[i] += eps
        minus[i] -= eps
        numeric[i] = (loss(plus) - loss(minus)) / (2 * eps)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("args, expected", [
    ((3,), ((3, 3), (3, 3), (0, 0), (1, 1))),
    ((3, None, 1), ((3, 3), (3, 3), (1, 1), (1, 1))),
    (((3,), (), (1,), (2,)), ((3, 3), (3, 3), (1, 1), (2, 2))),
    (((3, 2), [2, 1], [1, 0], [1, 2]), ((3, 2), (2, 1), (1, 0), (1, 2))),
    ((np.int64(2), torch.tensor(1)), ((2, 2), (1, 1), (0, 0), (1, 1))),
])
def test_normalize_args_accepts_what_torch_accepts(args, expected):
    assert ref.normalize_args(*args) == expected
    x = torch.zeros(1, 1, 9, 8, dtype=torch.float64)
    shape = F.max_pool2d(x, *args, return_indices=True)[0].shape
    assert ref.check_args(x.shape, *expected, False) == tuple(shape[2:])


@pytest.mark.parametrize("args", [
    ((2, 2, 2),), (2, (1, 1, 1)), (2, 1, (1, 1, 1)), (2, 1, 0, (1, 1, 1)), ((2, 2, 2), (1, 1, 1)),
    (0,), (0, 1), (-1, 1), (-2, 1), (2, 0), (2, -1), (2, 1, -1), (2, 1, 2), (2, 0, -1),
    (2, 1, 0, 0), (2, 1, 0, -1), (2, -1, 0, 0), (0, 1, 3), (2, 1, 3, 0), (0, 1, -1),
    (2, 1, 2, 3), ((2, 3), 1, (1, 2), (2, 2)), ((1, 2), 1, (1, 0)), ((3, 1), 1, (1, 1)),
    (9,), ((1, 9), 1),
    (True,), (2, 1.0), (2, 1, (False, 0)), (2, np.bool_(True)),
])
def test_arguments_rejected_as_torch_rejects_them(args):
    x = torch.zeros(1, 1, 5, 8, dtype=torch.float64)
    with pytest.raises((RuntimeError, TypeError)) as theirs:
        F.max_pool2d(x, *args, return_indices=True)
    with pytest.raises(theirs.type) as mine:
        ref.check_args(x.shape, *ref.normalize_args(*args), False)
    if theirs.type is RuntimeError:  # TypeErrors are torch's argument parser's wording
        assert str(mine.value) == str(theirs.value)


def test_forward_rejects_unbatched_and_leaves_input_alone():
    x = make_tensor((1, 2, 5, 5), torch.float64).numpy()
    x0 = x.copy()
    out, saved = _ref(x, 3, 2, 1)
    ref.backward(np.ones_like(out), saved)
    np.testing.assert_array_equal(x, x0)
    with pytest.raises(ValueError, match="unbatched"):
        _ref(x[0], 3)


def test_bool_in_a_later_tuple_element_is_rejected_though_torch_takes_it():
    x = torch.zeros(1, 1, 5, 8, dtype=torch.float64)
    assert F.max_pool2d(x, (2, True), return_indices=True)[0].shape == (1, 1, 2, 8)  # torch: (2, 1)
    with pytest.raises(TypeError):
        ref.normalize_args((2, True))
