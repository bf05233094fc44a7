"""fastdl/reference/dropout.py proven: Philox4x32-10 against the published known-answer vectors
(Random123's kat_vectors), the mask scheme's properties, and forward / backward given a mask against
torch's float64 autograd and finite differences."""
import numpy as np
import pytest
import torch

from fastdl.ops.dropout import keep_factor_torch
from fastdl.reference import dropout as ref
from fastdl.testing import make_tensor

# Random123's philox4x32_10 known answers: (counter, key) -> the four output words.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    assert tuple(int(w) for w in ref.philox4x32(counter, key)) == expected


def test_philox_vectorized_matches_scalar_calls():
    counters = np.array([0, 1, 7, 2**32 - 1, 2**32, 2**40 + 5], dtype=np.uint64)
    low, high = counters & np.uint64(0xFFFFFFFF), counters >> np.uint64(32)
    words = ref.philox4x32((low, high, 0, 0), (12345, 2**31 - 2))
    for i, c in enumerate(counters.tolist()):
        one = ref.philox4x32((c & 0xFFFFFFFF, c >> 32, 0, 0), (12345, 2**31 - 2))
        assert [int(w[i]) for w in words] == [int(w) for w in one]


def test_threshold_is_the_exact_uniform_compare():
    # keep <=> (word >> 8) / 2**24 >= p: the integer threshold is the smallest kept numerator.
    for p in (1e-9, 0.1, 0.25, 0.5, 1 / 3, 0.9, 1 - 2**-24, 1 - 1e-12):
        t = ref.threshold(p)
        assert t / 2**24 >= p and (t - 1) / 2**24 < p


def test_rows_are_padded_to_groups_of_four():
    key = (7, 11)
    flat = ref.keep_mask(key, 0.5, 1, 3 * 8)
    assert np.array_equal(ref.keep_mask(key, 0.5, 3, 8), flat.reshape(3, 8))  # 8 % 4 == 0: the flat mask
    rows = ref.random_words(key, 3, 6)                                         # 6 % 4 != 0: rows of 2 counters
    wide = ref.random_words(key, 3, 8)
    assert np.array_equal(rows, wide[:, :6])


def test_mask_statistics_and_key_dependence():
    n = 1 << 20
    for p in (0.1, 0.5, 0.9):
        kept = ref.keep_mask((3, 4), p, 1, n).mean()
        assert abs(kept - (1 - p)) < 4 * np.sqrt(p * (1 - p) / n)
    a, b = ref.keep_mask((3, 4), 0.5, 1, 4096), ref.keep_mask((3, 5), 0.5, 1, 4096)
    assert 0.4 < (a == b).mean() < 0.6  # another key: an independent mask


def test_torch_philox_matches_numpy():
    # The "torch" entry (forward AD, torch.func) draws the same mask in int64 torch ops.
    seed = torch.tensor([2**31 - 2, 987654321])
    for rows, cols in ((1, 1001), (5, 6), (3, 8)):
        keep = ref.keep_mask(tuple(seed.tolist()), 0.3, rows, cols)
        factor = keep_factor_torch(seed, 0.3, rows, cols, torch.float64)
        assert np.array_equal(factor.numpy() != 0, keep)
        assert torch.all(factor[factor != 0] == 1 / 0.7)


@pytest.mark.parametrize("p", [0.2, 0.5, 0.75])
def test_forward_backward_match_torch_autograd(p):
    x = make_tensor((7, 13), torch.float64, seed=1, requires_grad=True)
    keep = ref.keep_mask((5, 9), p, 7, 13)
    g = make_tensor((7, 13), torch.float64, seed=2)
    want = x * torch.from_numpy(keep).double() * (1 / (1 - p))
    out, saved = ref.forward(x.detach().numpy(), keep, p)
    np.testing.assert_allclose(out, want.detach().numpy(), rtol=1e-15, atol=0)
    (grad_want,) = torch.autograd.grad(want, x, g)
    np.testing.assert_allclose(ref.backward(g.numpy(), saved), grad_want.numpy(), rtol=1e-15, atol=0)


def test_backward_matches_finite_differences():
    p, eps = 0.4, 1e-6
    x = make_tensor((4, 9), torch.float64, seed=3).numpy()
    keep = ref.keep_mask((1, 2), p, 4, 9)
    g = make_tensor((4, 9), torch.float64, seed=4).numpy()
    _, saved = ref.forward(x, keep, p)
    grad = ref.backward(g, saved)
    numeric = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        d = np.zeros_like(x)
        d[idx] = eps
        numeric[idx] = ((ref.forward(x + d, keep, p)[0] - ref.forward(x - d, keep, p)[0]) * g).sum() / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-7, atol=1e-9)


def test_dropped_nan_and_inf_give_nan_as_torch():
    x = np.array([np.nan, np.inf, -2.0, 3.0])
    with np.errstate(invalid="ignore"):  # inf * 0, as torch computes it
        out, _ = ref.forward(x, np.array([False, False, False, True]), 0.5)
    assert np.isnan(out[0]) and np.isnan(out[1]) and out[2] == 0 and np.signbit(out[2]) and out[3] == 6.0
