"""The Triton batch-norm launchers (fastdl/backends/triton/batch_norm.py) against the float64
reference launchers (fastdl/backends/reference/batch_norm.py), launcher by launcher, under
Triton's interpreter: both layouts, odd C and S, split and unsplit reductions, a residual in the
other layout, the relu mask, every activation, float32 / float16 / float64 (bf16 runs as the
interpreter's float32 stand-in, see fastdl/backends/triton/_launch.py), and bitwise determinism.

The kernels' block sizes are not autotuned (the partial boundaries decide the bits of a
reduction); every tile shape the launchers choose runs here: channel blocks of 1..64 channels,
position blocks of 16..1024 (block_positions), the fp64 tiles, unsplit (FINAL) and split
reductions over images and over pixels, and the int64 row-index variant (ROW64, forced).
"""
from __future__ import annotations

import pytest
import torch

from fastdl.backends import reference as ref
from fastdl.backends.triton import batch_norm as bn
from fastdl.kernels.triton import batch_norm as bn_kernels
from fastdl.testing import assert_close, make_tensor

ACTIVATIONS = ("none", "relu", "leaky_relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh")
DTYPES = (torch.float32, torch.float16, torch.float64)
BF16 = pytest.param(torch.bfloat16, id="bf16-as-fp32",
                    marks=pytest.mark.skip(reason="the interpreter computes bf16 wrongly; the launchers run bf16 as a "
                                                  "float32 copy there (test_bf16_stand_in covers that path once)"))

# (shape, what it exercises); channels_last and NCHW both run each.
SHAPES = [
    ((2, 3, 5, 7), "odd C and S, one tile; NCHW: 3 position blocks of 16 over S = 35"),
    ((4, 5, 7, 7), "7x7 spatial (S = 49: a 64-position block, 15 masked)"),
    ((3, 67, 3, 5), "C = 67: two channel blocks (64 + 3)"),
    ((512, 3, 7, 7), "split: NCHW images over 2 programs (64-image tiles), channels_last pixels over 6"),
    ((8, 3, 40, 40), "channels_last: pixels split (12800 pixels, 1024-row tiles, 3 programs)"),
    ((5, 4), "(N, C) input: S = 1, channels tile"),
]


def _x(shape, dtype, channels_last, seed=0, mean=0.0, scale=1.0):
    """Non-uniform data: every channel its own offset and scale (plus `mean`), rows of different scale."""
    C = shape[1]
    t = make_tensor(shape, torch.float64, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    view = (1, C) + (1,) * (len(shape) - 2)
    t = t * torch.exp(0.5 * torch.randn(C, generator=g, dtype=torch.float64)).view(view) * scale \
        + (mean + 0.5 * torch.randn(C, generator=g, dtype=torch.float64)).view(view)
    t = t.to(dtype)
    if channels_last and len(shape) == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def view3(t):
    N, C = t.shape[:2]
    if t.dim() == 2:
        return t.unsqueeze(-1)
    if t.is_contiguous():
        return t.view(N, C, -1)
    return t.permute(0, 2, 3, 1).reshape(N, -1, C).permute(0, 2, 1)  # channels_last: a view, strides (S*C, 1, C)


def _params(C, dtype, seed, affine=True):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(C, generator=g, dtype=torch.float64).to(acc)
    invstd = (0.5 + torch.rand(C, generator=g, dtype=torch.float64)).to(acc)
    weight = (1 + 0.5 * torch.randn(C, generator=g, dtype=torch.float64)).to(dtype) if affine else None
    bias = (0.3 * torch.randn(C, generator=g, dtype=torch.float64)).to(dtype) if affine else None
    return mean, invstd, weight, bias


def _layouts(shape):
    return (False,) if len(shape) == 2 else (False, True)


def _cases(shapes):
    return [pytest.param(shape, cl, id=f"{'x'.join(map(str, shape))}-{'cl' if cl else 'nchw'}")
            for shape, _ in shapes for cl in _layouts(shape)]


def _each_activation_on_two(shapes):
    """(shape, channels_last, activation): every activation on two of the (shape, layout) cases, taken in
    turn so every case runs some (the activations' math is shared with linear's, tested there on every
    shape; here what varies is how each is applied per tile and layout)."""
    cases = [(shape, cl) for shape, _ in shapes for cl in _layouts(shape)]
    return [pytest.param(*cases[(2 * i + j) % len(cases)], a,
                         id=f"{'x'.join(map(str, cases[(2 * i + j) % len(cases)][0]))}-"
                            f"{'cl' if cases[(2 * i + j) % len(cases)][1] else 'nchw'}-{a}")
            for i, a in enumerate(ACTIVATIONS) for j in range(2)]


# --- stats ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES + (BF16,))
@pytest.mark.parametrize("shape, channels_last", _cases(SHAPES))
def test_stats(shape, channels_last, dtype):
    x = _x(shape, dtype, channels_last, seed=1)
    mean, var = bn.batch_norm_stats(view3(x))
    expected_mean, expected_var = ref.batch_norm_stats(view3(x))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert mean.dtype == var.dtype == acc and mean.shape == var.shape == (shape[1],)
    assert_close(mean, expected_mean, torch.float64 if dtype == torch.float64 else torch.float32, name="mean")
    assert_close(var, expected_var, torch.float64 if dtype == torch.float64 else torch.float32, name="var")


@pytest.mark.parametrize("dtype, mean", [(torch.float32, 1e4), (torch.float32, 1e3), (torch.float16, 1e3),
                                         (torch.float64, 1e4)])
@pytest.mark.parametrize("shape, channels_last", _cases([SHAPES[3], SHAPES[4]]))
def test_stats_large_mean_small_std(shape, channels_last, dtype, mean):
    """No cancellation: mean 1e4 (1e3 in fp16) with std ~1, the variance to the acc dtype's precision."""
    x = _x(shape, dtype, channels_last, seed=2, mean=mean)
    got_mean, got_var = bn.batch_norm_stats(view3(x))
    expected_mean, expected_var = ref.batch_norm_stats(view3(x))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert_close(got_mean, expected_mean, acc, name="mean")
    rel = ((got_var.double() - expected_var.double()) / expected_var.double()).abs().max().item()
    assert rel < (1e-12 if acc == torch.float64 else 2e-5), rel


@pytest.mark.parametrize("shape, channels_last", _cases([SHAPES[3], SHAPES[4]]))
def test_split_reductions_are_bitwise_deterministic(shape, channels_last):
    x = _x(shape, torch.float32, channels_last, seed=3)
    plan = bn.reduction_plan(view3(x), channels_last)
    assert plan["partials"] > 1, plan  # these shapes split
    first = bn.batch_norm_stats(view3(x))
    g = _x(shape, torch.float32, channels_last, seed=4)
    mean, invstd, weight, bias = _params(shape[1], torch.float32, 5)
    args = (view3(g), view3(x), mean, invstd, weight, bias, None, None, "gelu", 0.01)
    sums = bn.batch_norm_backward_reduce(*args)
    for _ in range(2):
        again = bn.batch_norm_stats(view3(x))
        assert all(torch.equal(a, b) for a, b in zip(first, again))
        assert all(torch.equal(a, b) for a, b in zip(sums, bn.batch_norm_backward_reduce(*args)))


# --- elemt --------------------------------------------------------------------------------------------

def _residual(shape, dtype, x_channels_last, layout):
    if layout == "none":
        return None
    other = (not x_channels_last) if layout == "other layout" else x_channels_last
    return _x(shape, dtype, other and len(shape) == 4, seed=7)


ELEMT_SHAPES = [SHAPES[0], SHAPES[1], SHAPES[2], SHAPES[5]]


@pytest.mark.parametrize("shape, channels_last, activation", _each_activation_on_two(ELEMT_SHAPES))
def test_elemt_every_activation(shape, channels_last, activation):
    _check_elemt(shape, channels_last, torch.float32, activation, "same layout", True, True)


# Every option in float32; float16 and float64 (their tiles, their rounding) with all of them on.
ELEMT_OPTIONS = [(torch.float32, residual, with_mask, affine) for residual in ("none", "same layout", "other layout")
                 for with_mask, affine in ((True, True), (False, True), (False, False))]
ELEMT_OPTIONS += [(dtype, "other layout", True, True) for dtype in (torch.float16, torch.float64)]


@pytest.mark.parametrize("dtype, residual, with_mask, affine", ELEMT_OPTIONS)
@pytest.mark.parametrize("shape, channels_last", _cases([SHAPES[1], SHAPES[2]]))
def test_elemt_options(shape, channels_last, dtype, residual, with_mask, affine):
    _check_elemt(shape, channels_last, dtype, "relu", residual, with_mask, affine)


def _check_elemt(shape, channels_last, dtype, activation, residual, with_mask, affine):
    x = _x(shape, dtype, channels_last, seed=6)
    mean, invstd, weight, bias = _params(shape[1], dtype, 8, affine)
    r = _residual(shape, dtype, channels_last, residual)
    outs = {}
    for name, launchers in (("triton", bn), ("reference", ref)):
        out = torch.full_like(x, float("nan"))
        mask = torch.full(x.shape, 7, dtype=torch.uint8).contiguous(memory_format=_format(x)) if with_mask else None
        launchers.batch_norm_elemt(view3(x), mean, invstd, weight, bias, None if r is None else view3(r),
                                   activation, 0.1, view3(out), None if mask is None else view3(mask))
        outs[name] = (out, mask)
    (out, mask), (expected, expected_mask) = outs["triton"], outs["reference"]
    assert out.stride() == x.stride()
    assert_close(out, expected, dtype, name="out")
    if with_mask:
        assert torch.equal(mask, expected_mask)


def _format(t):
    return torch.channels_last if t.dim() == 4 and not t.is_contiguous() else torch.contiguous_format


# --- backward -------------------------------------------------------------------------------------------

def _backward_args(shape, channels_last, dtype, activation, residual, with_mask, affine=True):
    x = _x(shape, dtype, channels_last, seed=9)
    g = _x(shape, dtype, channels_last, seed=10, scale=0.5)
    mean, invstd, weight, bias = _params(shape[1], dtype, 11, affine)
    r = _residual(shape, dtype, channels_last, residual)
    mask = None
    if with_mask:  # the forward's mask (relu, leaky_relu)
        mask = torch.empty(x.shape, dtype=torch.uint8).contiguous(memory_format=_format(x))
        ref.batch_norm_elemt(view3(x), mean, invstd, weight, bias, None if r is None else view3(r), activation, 0.1,
                             view3(torch.empty_like(x)), view3(mask))
    return (view3(g), view3(x), mean, invstd, weight, bias, None if r is None else view3(r),
            None if mask is None else view3(mask), activation, 0.1), x, r


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_backward(shape, channels_last, dtype, activation, residual, with_mask, training=True, affine=True):
    args, x, r = _backward_args(shape, channels_last, dtype, activation, residual, with_mask, affine)
    sums = bn.batch_norm_backward_reduce(*args)
    expected_sums = ref.batch_norm_backward_reduce(*args)
    for got, want, name in zip(sums, expected_sums, ("sum_dy", "sum_dy_xmu")):
        assert got.dtype == _acc(dtype)
        # Sums of |terms| ~ count: the tolerance of the inputs' dtype, relative to the largest sum.
        assert_close(got, want, dtype, name=name)
    count = x.numel() // x.shape[1]
    mean_dy, mean_dy_xmu = (expected_sums[0] / count, expected_sums[1] / count) if training else (None, None)
    results = {}
    for name, launchers in (("triton", bn), ("reference", ref)):
        grad_input = torch.full_like(x, float("nan"))
        grad_residual = torch.full_like(r, float("nan")) if r is not None else None
        launchers.batch_norm_backward_elemt(*args, mean_dy, mean_dy_xmu, view3(grad_input),
                                            None if grad_residual is None else view3(grad_residual))
        results[name] = (grad_input, grad_residual)
    (gi, gr), (want_gi, want_gr) = results["triton"], results["reference"]
    assert_close(gi, want_gi, dtype, name="grad_input")
    if r is not None:
        assert gr.stride() == r.stride()
        assert_close(gr, want_gr, dtype, name="grad_residual")


@pytest.mark.parametrize("shape, channels_last, activation", _each_activation_on_two([SHAPES[0], SHAPES[2], SHAPES[5]]))
def test_backward_every_activation(shape, channels_last, activation):
    _check_backward(shape, channels_last, torch.float32, activation, "other layout", False)


BACKWARD_OPTIONS = [
    ("relu", "same layout", True, True, True),         # the mask replaces the residual's read
    ("leaky_relu", "other layout", True, True, True),
    ("leaky_relu", "other layout", False, True, True),  # recomputed pre with a residual in the other layout
    ("gelu", "none", False, False, True),               # eval-mode backward
    ("none", "same layout", False, True, False),        # no weight / bias
]


# Every option in float32; float16 and float64 with the mask and with the recomputed pre-activation.
@pytest.mark.parametrize("dtype, activation, residual, with_mask, training, affine",
                         [(torch.float32,) + o for o in BACKWARD_OPTIONS]
                         + [(d,) + BACKWARD_OPTIONS[i] for d in (torch.float16, torch.float64) for i in (1, 2)])
# (The split shapes' backward reduction: test_backward_reduce_writes_dy runs 512x3x7x7 in both layouts.)
@pytest.mark.parametrize("shape, channels_last", _cases([SHAPES[1], SHAPES[4]]))
def test_backward_options(shape, channels_last, dtype, activation, residual, with_mask, training, affine):
    _check_backward(shape, channels_last, dtype, activation, residual, with_mask, training, affine)


def test_backward_elemt_only_the_residual_gradient():
    args, x, r = _backward_args((3, 5, 4, 4), True, torch.float32, "silu", "same layout", False)
    grad_residual, expected = torch.full_like(r, float("nan")), torch.full_like(r, float("nan"))
    bn.batch_norm_backward_elemt(*args, None, None, None, view3(grad_residual))
    ref.batch_norm_backward_elemt(*args, None, None, None, view3(expected))
    assert_close(grad_residual, expected, torch.float32, name="grad_residual")


def _check_backward_dy_first(shape, channels_last, dtype, activation, residual, with_mask, training=True):
    """The op's path when the residual's gradient is wanted: backward_reduce writes dy into it
    (dy3=), then backward_elemt reads dy back with no activation. dy, the sums and grad_input
    against the reference's two-pass form; the sums add dy as stored, rounded to x's dtype."""
    args, x, r = _backward_args(shape, channels_last, dtype, activation, residual, with_mask)
    assert bn.batch_norm_backward_reduce.writes_dy
    dy = torch.full_like(r, float("nan"))
    sums = bn.batch_norm_backward_reduce(*args, dy3=view3(dy))
    expected_sums = ref.batch_norm_backward_reduce(*args)
    expected_dy = torch.full_like(r, float("nan"))
    ref.batch_norm_backward_elemt(*args, None, None, None, view3(expected_dy))
    assert dy.stride() == r.stride()
    assert_close(dy, expected_dy, dtype, name="dy")
    for got, want, name in zip(sums, expected_sums, ("sum_dy", "sum_dy_xmu")):
        assert_close(got, want, dtype, name=name)
    # The sums are of dy as stored: the reference's reduce over the stored dy (no activation) agrees
    # to float32 summation order, tighter than the dtype's tolerance when dy is half precision.
    stored_sums = ref.batch_norm_backward_reduce(view3(dy), *args[1:6], None, None, "none", 0.1)
    for got, want, name in zip(sums, stored_sums, ("sum_dy", "sum_dy_xmu")):
        assert_close(got, want.to(got.dtype), _acc(dtype), name=name + " of the stored dy")
    count = x.numel() // x.shape[1]
    mean_dy, mean_dy_xmu = (expected_sums[0] / count, expected_sums[1] / count) if training else (None, None)
    grad_input, expected = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    bn.batch_norm_backward_elemt(view3(dy), *args[1:6], None, None, "none", 0.1, mean_dy, mean_dy_xmu,
                                 view3(grad_input), None)
    ref.batch_norm_backward_elemt(*args, mean_dy, mean_dy_xmu, view3(expected), None)
    assert_close(grad_input, expected, dtype, name="grad_input")


DY_FIRST_OPTIONS = [
    (torch.float32, "relu", "same layout", True, True),       # ResNet's block tail: the mask
    (torch.float32, "leaky_relu", "other layout", True, False),  # dy in the residual's layout; eval
    (torch.float32, "gelu", "other layout", False, True),     # pre recomputed from x and the residual
    (torch.float16, "relu", "other layout", True, True),
    (torch.float16, "silu", "same layout", False, True),      # dy rounded to half before it is summed
    (torch.float64, "leaky_relu", "same layout", True, True),
]


@pytest.mark.parametrize("dtype, activation, residual, with_mask, training", DY_FIRST_OPTIONS)
@pytest.mark.parametrize("shape, channels_last", _cases([SHAPES[0], SHAPES[3], SHAPES[4]]))
def test_backward_reduce_writes_dy(shape, channels_last, dtype, activation, residual, with_mask, training):
    _check_backward_dy_first(shape, channels_last, dtype, activation, residual, with_mask, training)


def test_backward_reduce_writing_dy_is_bitwise_deterministic_and_sums_the_same():
    """Split reductions (both layouts) with dy3: the same bits on every run, and in float32 (where
    storing dy rounds nothing) the same sums as without it."""
    for shape, channels_last in (((512, 3, 7, 7), False), ((8, 3, 40, 40), True)):
        args, x, r = _backward_args(shape, channels_last, torch.float32, "relu", "same layout", True)
        assert bn.reduction_plan(args[1], channels_last)["partials"] > 1
        runs = []
        for _ in range(2):
            dy = torch.full_like(r, float("nan"))
            runs.append((bn.batch_norm_backward_reduce(*args, dy3=view3(dy)), dy))
        (sums, dy), (sums_again, dy_again) = runs
        assert torch.equal(dy, dy_again)
        assert all(torch.equal(a, b) for a, b in zip(sums, sums_again))
        assert all(torch.equal(a, b) for a, b in zip(sums, bn.batch_norm_backward_reduce(*args)))


def test_bf16_stand_in():
    """bf16 through the interpreter's float32 stand-in: the launchers declare what they write."""
    shape = (3, 5, 4, 4)
    x = _x(shape, torch.bfloat16, True, seed=12)
    mean, var = bn.batch_norm_stats(view3(x))
    assert mean.dtype == torch.float32
    assert_close(var, ref.batch_norm_stats(view3(x))[1], torch.bfloat16, name="var")
    _check_elemt(shape, True, torch.bfloat16, "relu", "other layout", True, True)
    _check_backward(shape, True, torch.bfloat16, "relu", "same layout", True)
    _check_backward_dy_first(shape, True, torch.bfloat16, "relu", "other layout", True)  # dy3 declared written


# --- tile shapes and plans --------------------------------------------------------------------------------

@pytest.mark.parametrize("S, block", [(1, 1), (35, 16), (49, 64), (196, 16), (784, 64), (3136, 256), (12544, 1024),
                                      (4096, 4096), (100, 16)])
def test_block_positions(S, block):
    assert bn.block_positions(S, bn_kernels.REDUCE_TILE) == block


def test_resnet_stage1_plans():
    """The split the module docstring describes, planned for an H100 (132 SMs) on a CPU tensor."""
    x = torch.empty((256, 64, 56, 56), device="meta", dtype=torch.bfloat16)
    plan = bn.reduction_plan(view3(x), False)  # NCHW: 13 position blocks of 256 per channel, no image split
    assert (plan["BLOCK_COLS"], plan["BLOCK_ROWS"], plan["grid"], plan["partials"]) == (256, 16, (832,), 13)
    x = x.contiguous(memory_format=torch.channels_last)
    plan = bn.reduction_plan(view3(x), True)
    assert (plan["BLOCK_COLS"], plan["BLOCK_ROWS"], plan["grid"], plan["partials"]) == (64, 64, (523,), 523)
    assert plan["per"] // plan["BLOCK_ROWS"] >= bn_kernels.MIN_BLOCKS_PER_SPLIT


@pytest.mark.parametrize("shape, channels_last", [((4, 3, 1200), False), ((2, 3, 33, 33), True)])
def test_wide_tiles(shape, channels_last):
    """The widest position block (1024, NCHW over S = 1200 ... masked 41%) and a 4-channel tile over
    2178 pixels (3 channels of 4 lanes), forward and backward."""
    x = _x(shape, torch.float32, channels_last, seed=13)
    for got, want in zip(bn.batch_norm_stats(view3(x)), ref.batch_norm_stats(view3(x))):
        assert_close(got, want, torch.float32)
    _check_backward(shape, channels_last, torch.float32, "tanh", "same layout", False)


def test_int64_row_indices(monkeypatch):
    """ROW64 (row indices past 2**31) forced at a small shape: the same results."""
    monkeypatch.setattr(bn, "INT32_MAX", 16)
    for channels_last in (False, True):
        x = _x((8, 3, 40, 40) if channels_last else (512, 3, 7, 7), torch.float32, channels_last, seed=14)
        assert bn.reduction_plan(view3(x), channels_last)["ROW64"]
        for got, want in zip(bn.batch_norm_stats(view3(x)), ref.batch_norm_stats(view3(x))):
            assert_close(got, want, torch.float32)
        _check_elemt(x.shape, channels_last, torch.float32, "leaky_relu", "same layout", True, True)
        _check_backward(x.shape, channels_last, torch.float32, "relu", "same layout", False)
