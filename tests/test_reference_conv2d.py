"""The float64 reference for conv2d is itself proven: against torch autograd and finite differences,
and its normalization of torch's argument forms against torch's own."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastdl.functional import ACTIVATIONS, _TORCH_ACTIVATIONS
from fastdl.reference import conv2d as ref
from fastdl.testing import make_tensor

torch.set_num_threads(1)

TOL = dict(rtol=1e-12, atol=1e-12)

# id: (N, C, H, W), (K, R, S), torch.nn.functional.conv2d's keyword arguments.
CASES = {
    "1x1": ((3, 5, 6, 7), (4, 1, 1), {}),
    "3x3_stride2": ((1, 4, 9, 8), (6, 3, 3), dict(stride=2, padding=1)),
    "7x7_stride2_pad3_rgb": ((3, 3, 15, 13), (8, 7, 7), dict(stride=2, padding=3)),
    "dilation2": ((2, 3, 10, 9), (4, 3, 3), dict(dilation=2, padding=2)),
    "depthwise": ((2, 6, 7, 7), (6, 3, 3), dict(padding=1, groups=6)),
    "depthwise_multiplier2": ((1, 4, 6, 5), (8, 3, 3), dict(stride=2, groups=4)),
    "groups4": ((3, 8, 7, 6), (12, 3, 3), dict(stride=(2, 1), padding=1, groups=4)),
    "same_odd": ((1, 3, 8, 7), (5, 5, 5), dict(padding="same")),
    "same_even": ((2, 3, 7, 8), (4, 4, 4), dict(padding="same")),
    "same_even_odd_dilation": ((1, 2, 9, 9), (3, 2, 4), dict(padding="same", dilation=(3, 2))),
    "same_odd_dilation2": ((1, 2, 8, 9), (3, 3, 3), dict(padding="same", dilation=2)),
    "valid": ((1, 3, 7, 9), (2, 3, 2), dict(padding="valid", stride=(1, 2))),
    "asymmetric_stride_padding": ((3, 4, 9, 7), (5, 3, 2), dict(stride=(2, 1), padding=(1, 0))),
    "odd_spatial_stride3": ((1, 2, 11, 5), (3, 3, 3), dict(stride=3, padding=(0, 1))),
    "stride_over_kernel": ((2, 3, 9, 10), (4, 2, 2), dict(stride=3)),
    "kernel_is_input": ((1, 3, 5, 4), (2, 5, 4), {}),
    "grouped_strided_dilated": ((1, 6, 12, 11), (9, 3, 2), dict(stride=(2, 3), padding=(2, 1),
                                                                dilation=(2, 3), groups=3)),
}


def _torch_and_reference(shape, kshape, kwargs, has_bias, activation, slope=0.2, seed=0):
    N, C, H, W = shape
    K, R, S = kshape
    groups = kwargs.get("groups", 1)
    x = make_tensor(shape, torch.float64, seed=seed + 1, requires_grad=True)
    w = make_tensor((K, C // groups, R, S), torch.float64, seed=seed + 2, requires_grad=True)
    b = make_tensor((K,), torch.float64, seed=seed + 3, requires_grad=True) if has_bias else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "same" with even kernels warns about a padded copy
        expected = _TORCH_ACTIVATIONS[activation](F.conv2d(x, w, b, **kwargs), slope)
    g = make_tensor(expected.shape, torch.float64, seed=seed + 4)
    expected.backward(g)

    stride, padding, dilation, groups = ref.normalize_args(
        (R, S), kwargs.get("stride", 1), kwargs.get("padding", 0), kwargs.get("dilation", 1), groups)
    assert ref.output_shape(shape, w.shape, stride, padding, dilation) == tuple(expected.shape)
    out, saved = ref.forward(x.detach().numpy(), w.detach().numpy(),
                             None if b is None else b.detach().numpy(), stride, padding, dilation,
                             groups, activation, slope)
    grads = ref.backward(g.numpy(), saved)
    torch_grads = (x.grad, w.grad, None if b is None else b.grad)
    return out, grads, expected.detach().numpy(), torch_grads


def _assert_matches(out, grads, expected, torch_grads):
    assert out.dtype == np.float64 and out.shape == expected.shape
    np.testing.assert_allclose(out, expected, **TOL)
    for mine, theirs in zip(grads, torch_grads):
        if theirs is None:
            assert mine is None
        else:
            assert mine.dtype == np.float64 and mine.shape == theirs.shape
            np.testing.assert_allclose(mine, theirs.numpy(), **TOL)


@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_reference_matches_torch_autograd_float64(case, has_bias):
    _assert_matches(*_torch_and_reference(*CASES[case], has_bias, None))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("case", ["groups4", "same_even"])
def test_reference_activations_match_torch(case, activation):
    _assert_matches(*_torch_and_reference(*CASES[case], True, activation, seed=10))


def test_padding_same_grid_matches_torch():
    """"same" for every kernel length 1..4 x dilation 1..3, odd and even input sizes: the padding
    split (extra row/column at the bottom/right when dilation*(k-1) is odd), shapes and values."""
    for R in range(1, 5):
        for dH in (1, 2, 3):
            for S, dW in ((1, 1), (2, 3), (4, 1), (3, 2)):
                x = make_tensor((1, 2, 7, 6), torch.float64, seed=R * 10 + dH)
                w = make_tensor((2, 2, R, S), torch.float64, seed=R * 10 + dH + 1)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    expected = F.conv2d(x, w, padding="same", dilation=(dH, dW)).numpy()
                stride, padding, dilation, _ = ref.normalize_args((R, S), 1, "same", (dH, dW))
                total_h, total_w = dH * (R - 1), dW * (S - 1)
                assert padding == ((total_h // 2, total_h - total_h // 2),
                                   (total_w // 2, total_w - total_w // 2))
                assert ref.output_shape(x.shape, w.shape, stride, padding, dilation) == (1, 2, 7, 6)
                out, _ = ref.forward(x.numpy(), w.numpy(), None, stride, padding, dilation)
                np.testing.assert_allclose(out, expected, **TOL)


def test_output_size_matches_torch_grid():
    for H in (1, 2, 5, 8):
        for R in (1, 2, 3):
            for s in (1, 2, 3):
                for p in (0, 1, 2):
                    for d in (1, 2):
                        size = ref.output_size(H, R, s, p, p, d)
                        x = torch.zeros(1, 1, H, 1, dtype=torch.float64)
                        w = torch.zeros(1, 1, R, 1, dtype=torch.float64)
                        if size < 1:
                            with pytest.raises(RuntimeError):
                                F.conv2d(x, w, stride=(s, 1), padding=(p, 0), dilation=(d, 1))
                        else:
                            assert F.conv2d(x, w, stride=(s, 1), padding=(p, 0),
                                            dilation=(d, 1)).shape[2] == size


@pytest.mark.parametrize("kwargs, expected", [
    (dict(), ((1, 1), ((0, 0), (0, 0)), (1, 1), 1)),
    (dict(stride=(2,), padding=(1,), dilation=(3,)), ((2, 2), ((1, 1), (1, 1)), (3, 3), 1)),
    (dict(stride=[2, 1], padding=[1, 0], dilation=[1, 2], groups=2),
     ((2, 1), ((1, 1), (0, 0)), (1, 2), 2)),
    (dict(stride=np.int64(2), padding=torch.tensor(1), groups=np.int32(1)),
     ((2, 2), ((1, 1), (1, 1)), (1, 1), 1)),
    (dict(padding="valid", stride=3), ((3, 3), ((0, 0), (0, 0)), (1, 1), 1)),
    (dict(padding="same", stride=(1, 1)), ((1, 1), ((1, 2), (1, 1)), (1, 1), 1)),
])
def test_normalize_args_accepts_what_torch_accepts(kwargs, expected):
    # Kernel (4, 3): "same" pads (1, 2) rows and (1, 1) columns.
    assert ref.normalize_args((4, 3), **kwargs) == expected
    x = make_tensor((1, 2, 9, 8), torch.float64)
    w = make_tensor((2, 2 // kwargs.get("groups", 1), 4, 3), torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shape = F.conv2d(x, w, **kwargs).shape
    stride, padding, dilation, _ = expected
    assert ref.output_shape(x.shape, w.shape, stride, padding, dilation) == tuple(shape)


@pytest.mark.parametrize("kwargs", [
    dict(stride=(2, 1, 1)), dict(stride=()), dict(padding=(1, 1, 1, 1)), dict(dilation=(1, 1, 1)),
    dict(stride=(1, 1, 1), padding=(1, 1, 1)),
    dict(stride=0), dict(stride=-1), dict(stride=(1, 0)), dict(padding=-1), dict(padding=(0, -2)),
    dict(dilation=0), dict(dilation=(1, 0)), dict(dilation=-1), dict(dilation=(1, -1)),
    dict(dilation=(0, -1)),
    dict(dilation=-1, stride=0), dict(dilation=-1, groups=0), dict(groups=0), dict(groups=-1),
    dict(padding="foo"), dict(padding="SAME"), dict(padding="same", stride=2),
    dict(padding="same", stride=(1, 2)), dict(padding="same", stride=0), dict(padding="same", dilation=0),
    dict(padding="same", dilation=-1), dict(padding="same", groups=0),
    dict(stride=0, padding=-1), dict(stride=0, dilation=0), dict(groups=0, padding=-1),
    dict(padding=-1, dilation=0),
    dict(stride=True), dict(padding=1.0), dict(dilation=(1, 2.0)), dict(stride=(1, 1, 1), padding=True),
])
def test_normalize_args_rejects_what_torch_rejects(kwargs):
    x = make_tensor((1, 2, 9, 8), torch.float64)
    w = make_tensor((2, 2, 3, 3), torch.float64)
    with pytest.raises((RuntimeError, TypeError)) as theirs:
        F.conv2d(x, w, **kwargs)
    with pytest.raises(theirs.type) as mine:
        ref.normalize_args((3, 3), **kwargs)
    if theirs.type is RuntimeError:  # TypeErrors are torch's argument parser's wording
        assert str(mine.value) == str(theirs.value).splitlines()[0]


def test_forward_leaves_inputs_alone_and_rejects_unbatched():
    x = make_tensor((2, 4, 6, 5), torch.float64).numpy()
    w = make_tensor((4, 2, 3, 3), torch.float64).numpy()
    x0, w0 = x.copy(), w.copy()
    out, saved = ref.forward(x, w, None, (1, 2), ((1, 0), (0, 2)), (1, 1), 2, "relu")
    ref.backward(np.ones_like(out), saved)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(w, w0)
    with pytest.raises(ValueError, match="unbatched"):
        ref.forward(x[0], w)


FD_CASES = {
    "plain_pad_rows": ((2, 2, 5, 4), (3, 3, 2), dict(stride=(1, 1), padding=((1, 1), (0, 0)),
                                                     dilation=(1, 1), groups=1), None),
    "asymmetric_pad_silu": ((1, 2, 4, 5), (2, 2, 2), dict(stride=(1, 1), padding=((0, 1), (0, 1)),
                                                          dilation=(1, 1), groups=1), "silu"),
    "strided_dilated_grouped": ((1, 4, 7, 6), (4, 3, 3), dict(stride=(2, 2), padding=((1, 1), (1, 1)),
                                                              dilation=(2, 2), groups=2), "tanh"),
}


@pytest.mark.parametrize("case", list(FD_CASES))
def test_reference_backward_matches_finite_differences(case):
    shape, (K, R, S), kwargs, activation = FD_CASES[case]
    rng = np.random.default_rng(7)
    x = rng.normal(size=shape)
    w = rng.normal(size=(K, shape[1] // kwargs["groups"], R, S))
    b = rng.normal(size=K)
    out, saved = ref.forward(x, w, b, activation=activation, negative_slope=0.3, **kwargs)
    g = rng.normal(size=out.shape)
    analytic = ref.backward(g, saved)

    def loss(x_, w_, b_):
        return float((ref.forward(x_, w_, b_, activation=activation, negative_slope=0.3,
                                  **kwargs)[0] * g).sum())

    eps = 1e-6
    for index, param in enumerate((x, w, b)):
        numeric = np.zeros_like(param)
        for i in np.ndindex(param.shape):
            args_plus = [p.copy() for p in (x, w, b)]
            args_minus = [p.copy() for p in (x, w, b)]
            args_plus[index][i] += eps
            args_minus[index][i] -= eps
            numeric[i] = (loss(*args_plus) - loss(*args_minus)) / (2 * eps)
        np.testing.assert_allclose(analytic[index], numeric, rtol=1e-6, atol=1e-7)


def test_bool_in_a_later_tuple_element_is_rejected_though_torch_takes_it():
    x = make_tensor((1, 2, 9, 8), torch.float64)
    w = make_tensor((2, 2, 3, 3), torch.float64)
    assert F.conv2d(x, w, stride=(1, True)).shape == (1, 2, 7, 6)  # torch reads (1, 1)
    with pytest.raises(TypeError):
        ref.normalize_args((3, 3), stride=(1, True))
