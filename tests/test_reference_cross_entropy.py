"""The float64 reference for cross-entropy is itself proven: against torch autograd in float64 for
every semantic combination, and its backward against finite differences."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastdl.reference import cross_entropy as ref
from fastdl.testing import make_tensor

TOL = dict(rtol=1e-12, atol=1e-12)
INPUT_SHAPES = [(7,), (6, 7), (3, 7, 2, 3)]  # (C,), (N, C), (N, C, d1, d2)


def make_index_target(input_shape, seed, ignore_index=None, all_ignored=False):
    gen = torch.Generator().manual_seed(seed)
    C = input_shape[0] if len(input_shape) == 1 else input_shape[1]
    shape = () if len(input_shape) == 1 else input_shape[:1] + input_shape[2:]
    t = torch.randint(0, C, shape, generator=gen)
    if ignore_index is not None:
        if all_ignored:
            t = torch.full(shape, ignore_index)
        elif t.dim():
            t.view(-1)[::3] = ignore_index  # every third row ignored
    return t


def make_prob_target(input_shape, seed):
    logits = make_tensor(input_shape, torch.float64, seed=seed, scale=2.0)
    return torch.softmax(logits, dim=0 if len(input_shape) == 1 else 1)


def check_against_torch(x, target, weight, ignore_index, reduction, label_smoothing):
    x = x.detach().clone().requires_grad_()
    prob = target.is_floating_point()
    target = target.detach().clone().requires_grad_(prob)
    weight = None if weight is None else weight.detach().clone().requires_grad_(prob)
    expected = F.cross_entropy(x, target, weight, ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=label_smoothing)
    grad_out = make_tensor(expected.shape, torch.float64, seed=11) if expected.dim() else torch.tensor(0.7,
                                                                                                  dtype=torch.float64)
    expected.backward(grad_out)
    out, saved = ref.forward(x.detach().numpy(), target.detach().numpy(),
                             None if weight is None else weight.detach().numpy(),
                             ignore_index, reduction, label_smoothing)
    grad_x, grad_t, grad_w = ref.backward(grad_out.numpy(), saved)
    assert np.shape(out) == tuple(expected.shape)
    np.testing.assert_allclose(out, expected.detach().numpy(), **TOL)
    np.testing.assert_allclose(grad_x, x.grad.numpy(), **TOL)
    if prob:
        np.testing.assert_allclose(grad_t, target.grad.numpy(), **TOL)
        if weight is not None:
            np.testing.assert_allclose(grad_w, weight.grad.numpy(), **TOL)


@pytest.mark.parametrize("input_shape", INPUT_SHAPES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("has_weight,ignore_index,label_smoothing",
                         list(itertools.product([False, True], [-100, 2], [0.0, 0.3])))
def test_index_targets_match_torch(input_shape, reduction, has_weight, ignore_index, label_smoothing):
    x = make_tensor(input_shape, torch.float64, seed=1, scale=3.0)
    C = input_shape[0] if len(input_shape) == 1 else input_shape[1]
    weight = make_tensor((C,), torch.float64, seed=2).abs() + 0.1 if has_weight else None
    target = make_index_target(input_shape, seed=3, ignore_index=ignore_index if ignore_index == 2 else None)
    check_against_torch(x, target, weight, ignore_index, reduction, label_smoothing)


@pytest.mark.parametrize("input_shape", INPUT_SHAPES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("has_weight,label_smoothing", list(itertools.product([False, True], [0.0, 0.25])))
def test_probability_targets_match_torch(input_shape, reduction, has_weight, label_smoothing):
    x = make_tensor(input_shape, torch.float64, seed=4, scale=3.0)
    C = input_shape[0] if len(input_shape) == 1 else input_shape[1]
    weight = make_tensor((C,), torch.float64, seed=5).abs() + 0.1 if has_weight else None
    check_against_torch(x, make_prob_target(input_shape, 6), weight, -100, reduction, label_smoothing)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("has_weight,label_smoothing", [(False, 0.0), (True, 0.0), (True, 0.2)])
def test_all_targets_ignored_matches_torch(reduction, has_weight, label_smoothing):
    # torch: "mean" is nan (0 / 0) while the gradient stays 0; "sum" is 0.
    x = make_tensor((5, 7), torch.float64, seed=7)
    weight = make_tensor((7,), torch.float64, seed=8).abs() if has_weight else None
    target = make_index_target((5, 7), 9, ignore_index=-100, all_ignored=True)
    check_against_torch(x, target, weight, -100, reduction, label_smoothing)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_large_logits_and_minus_inf_match_torch(label_smoothing):
    # Magnitude 1e4 and -inf entries (never at the target): the loss stays finite without smoothing.
    x = make_tensor((6, 9), torch.float64, seed=10, scale=1e4)
    x[1, 3:] = -float("inf")
    x[4, ::2] = -float("inf")
    target = torch.tensor([0, 1, 2, 3, 5, 8])
    check_against_torch(x, target, None, -100, "none", label_smoothing)


def test_target_at_minus_inf_gives_inf_loss_and_finite_grad_like_torch():
    x = make_tensor((3, 5), torch.float64, seed=12)
    x[1, 2:] = -float("inf")
    check_against_torch(x, torch.tensor([0, 3, 2]), None, -100, "none", 0.0)


def test_empty_batch_matches_torch():
    x = torch.zeros((0, 4), dtype=torch.float64)
    for reduction in ("mean", "sum", "none"):
        check_against_torch(x, torch.zeros(0, dtype=torch.long), None, -100, reduction, 0.0)


@pytest.mark.parametrize("case", ["index", "index_smooth_weight", "prob_smooth_weight"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_backward_matches_finite_differences(case, reduction):
    rng = np.random.default_rng(13)
    x = rng.normal(size=(4, 5)) * 2
    weight = np.abs(rng.normal(size=5)) + 0.1 if "weight" in case else None
    smoothing = 0.2 if "smooth" in case else 0.0
    if case.startswith("prob"):
        target = rng.dirichlet(np.ones(5), size=4)
    else:
        target = np.array([0, 3, -100, 4])
    g = rng.normal(size=4) if reduction == "none" else np.float64(1.3)
    _, saved = ref.forward(x, target, weight, -100, reduction, smoothing)
    analytic = ref.backward(g, saved)

    def loss(x_, t_, w_):
        return float((ref.forward(x_, t_, w_, -100, reduction, smoothing)[0] * g).sum())

    eps = 1e-6
    params = [x, target, weight] if case.startswith("prob") else [x]
    for index, param in enumerate(params):
        if param is None:
            continue
        numeric = np.zeros_like(param)
        for i in np.ndindex(param.shape):
            plus = [p if p is None else p.copy() for p in (x, target, weight)]
            minus = [p if p is None else p.copy() for p in (x, target, weight)]
            plus[index][i] += eps
            minus[index][i] -= eps
            numeric[i] = (loss(*plus) - loss(*minus)) / (2 * eps)
        np.testing.assert_allclose(analytic[index], numeric, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("has_bias,label_smoothing", [(True, 0.0), (False, 0.1)])
def test_linear_cross_entropy_reference_matches_torch(reduction, has_bias, label_smoothing):
    x = make_tensor((9, 6), torch.float64, seed=14, requires_grad=True)
    w = make_tensor((11, 6), torch.float64, seed=15, requires_grad=True)
    b = make_tensor((11,), torch.float64, seed=16, requires_grad=True) if has_bias else None
    target = make_index_target((9, 11), 17, ignore_index=-100)
    expected = F.cross_entropy(F.linear(x, w, b), target, reduction=reduction, label_smoothing=label_smoothing)
    grad_out = make_tensor(expected.shape, torch.float64, seed=18) if expected.dim() else torch.tensor(
        1.7, dtype=torch.float64)
    expected.backward(grad_out)
    out, saved = ref.linear_forward(x.detach().numpy(), w.detach().numpy(), target.numpy(),
                                    None if b is None else b.detach().numpy(), -100, reduction, label_smoothing)
    grad_x, grad_w, grad_b = ref.linear_backward(grad_out.numpy(), saved)
    np.testing.assert_allclose(out, expected.detach().numpy(), **TOL)
    np.testing.assert_allclose(grad_x, x.grad.numpy(), **TOL)
    np.testing.assert_allclose(grad_w, w.grad.numpy(), **TOL)
    if has_bias:
        np.testing.assert_allclose(grad_b, b.grad.numpy(), **TOL)
    else:
        assert grad_b is None


# Degenerate cases where the reference once differed from torch (issue #6, items 10 and 13): torch's
# own float64 result is the expectation, nan included (assert_allclose treats nan == nan).
DEGENERATE = {
    # no classes, every target ignored, label smoothing: torch's eps / C is inf, every loss nan
    "no_classes_smoothing": lambda: (torch.zeros(3, 0, dtype=torch.float64), torch.full((3,), -100), None, 0.1),
    "no_classes": lambda: (torch.zeros(3, 0, dtype=torch.float64), torch.full((3,), -100), None, 0.0),
    # every target's class weight 0: "mean" divides by 0, torch gives nan (not inf) and nan gradients
    "zero_target_weights_smoothing": lambda: (make_tensor((4, 5), torch.float64, seed=1), torch.tensor([0, 1, 2, 1]),
                                              torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0], dtype=torch.float64), 0.2),
    "zero_target_weights": lambda: (make_tensor((4, 5), torch.float64, seed=2), torch.tensor([0, 1, 2, 1]),
                                    torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0], dtype=torch.float64), 0.0),
    # +inf on the target class (and elsewhere): the whole row is nan in torch, loss and gradient
    "plus_inf_on_target": lambda: (torch.tensor([[0.5, float("inf"), -1.0], [0.1, 0.2, 0.3]], dtype=torch.float64),
                                   torch.tensor([1, 2]), None, 0.0),
    "plus_inf_off_target": lambda: (torch.tensor([[0.5, float("inf"), -1.0], [0.1, 0.2, 0.3]], dtype=torch.float64),
                                    torch.tensor([0, 2]), None, 0.1),
    # a row of -inf and a row holding nan
    "minus_inf_row": lambda: (torch.tensor([[-float("inf")] * 3, [0.1, 0.2, 0.3]], dtype=torch.float64),
                              torch.tensor([1, 2]), None, 0.0),
    "nan_in_row": lambda: (torch.tensor([[0.5, float("nan"), -1.0], [0.1, 0.2, 0.3]], dtype=torch.float64),
                           torch.tensor([0, 2]), None, 0.0),
}


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_degenerate_cases_match_torch(case, reduction):
    x, target, weight, label_smoothing = DEGENERATE[case]()
    check_against_torch(x, target, weight, -100, reduction, label_smoothing)
