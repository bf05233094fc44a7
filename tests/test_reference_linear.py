"""The float64 reference for linear is itself proven: against torch autograd and finite differences."""
import numpy as np
import pytest
import torch

from fastdl.functional import ACTIVATIONS, _TORCH_ACTIVATIONS
from fastdl.reference import linear as ref
from fastdl.testing import make_tensor


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("has_bias", [True, False])
def test_reference_matches_torch_autograd_float64(activation, has_bias):
    M, K, N = 13, 11, 7
    x = make_tensor((M, K), torch.float64, seed=1, requires_grad=True)
    w = make_tensor((N, K), torch.float64, seed=2, requires_grad=True)
    b = make_tensor((N,), torch.float64, seed=3, requires_grad=True) if has_bias else None
    g = make_tensor((M, N), torch.float64, seed=4)
    expected = _TORCH_ACTIVATIONS[activation](torch.nn.functional.linear(x, w, b), 0.2)
    expected.backward(g)
    out, saved = ref.forward(x.detach().numpy(), w.detach().numpy(),
                             None if b is None else b.detach().numpy(), activation, 0.2)
    grad_x, grad_w, grad_b = ref.backward(g.numpy(), saved)
    np.testing.assert_allclose(out, expected.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad_x, x.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad_w, w.grad.numpy(), rtol=1e-12, atol=1e-12)
    if has_bias:
        np.testing.assert_allclose(grad_b, b.grad.numpy(), rtol=1e-12, atol=1e-12)
    else:
        assert grad_b is None


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_backward_matches_finite_differences(activation):
    rng = np.random.default_rng(5)
    M, K, N = 4, 3, 5
    x, w, b = rng.normal(size=(M, K)), rng.normal(size=(N, K)), rng.normal(size=N)
    g = rng.normal(size=(M, N))
    _, saved = ref.forward(x, w, b, activation, 0.3)
    analytic = ref.backward(g, saved)

    def loss(x_, w_, b_):
        return float((ref.forward(x_, w_, b_, activation, 0.3)[0] * g).sum())

    eps = 1e-6
    for index, param in enumerate((x, w, b)):
        numeric = np.zeros_like(param)
        for i in np.ndindex(param.shape):
            args_plus = [p.copy() for p in (x, w, b)]
            args_minus = [p.copy() for p in (x, w, b)]
            args_plus[index][i] += eps
            args_minus[index][i] -= eps
            numeric[i] = (loss(*args_plus) - loss(*args_minus)) / (2 * eps)
        # relu/leaky kinks: random data is almost surely away from z == 0.
        np.testing.assert_allclose(analytic[index], numeric, rtol=1e-6, atol=1e-7)
