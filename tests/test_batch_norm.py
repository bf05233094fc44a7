"""fastdl.functional.batch_norm / nn.BatchNorm1d-3d: every backend that has the launchers (reference
always, triton through its interpreter) against the float64 reference, and torch's semantics:
layouts, activations and residuals, optional weight/bias and running statistics, running
statistics over several steps (momentum 0.1, None, 0), num_batches_tracked, eval after train,
half input with float32 parameters, bad input (torch's exception types, nothing written), second
backward, gradcheck / gradgradcheck, torch.func and forward AD, torch.compile, fx and state_dict."""
import math

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import fastdl
from fastdl import backends
from fastdl.ops.linear import TORCH_ACTIVATIONS
from fastdl.reference import batch_norm as ref
from fastdl.testing import assert_close, make_tensor

LAUNCHERS = ("batch_norm_stats", "batch_norm_elemt", "batch_norm_backward_reduce", "batch_norm_backward_elemt")
ACTIVATIONS = ("none", "relu", "leaky_relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh")
EPS = 1e-5


def _missing_launchers(name: str) -> list[str]:
    try:
        module = backends.get(name)
    except ImportError:
        return list(LAUNCHERS)
    return [n for n in LAUNCHERS if not hasattr(module, n)]


def _backend(name: str):
    missing = _missing_launchers(name)
    reason = f"the {name} backend has no batch-norm launchers yet ({', '.join(missing)} missing)"
    return pytest.param(name, marks=pytest.mark.skipif(bool(missing), reason=reason))


BACKENDS = [_backend("reference"), _backend("triton")]

# id: input shape, the path it exercises
SHAPES = {
    "2d (N, C)": (9, 5),                 # S = 1: one value per sample and channel
    "3d (N, C, L)": (3, 4, 7),
    "4d 7x7": (2, 3, 7, 7),              # ResNet's last stage: tiny spatial size, odd
    "5d": (2, 3, 3, 4, 5),               # channels_last_3d
    "4d 40x41 larger": (2, 3, 40, 41),   # N * S = 3280: reductions spread over many programs
}
LAYOUTS = ("contiguous", "channels_last", "view")


def _np(t):
    return None if t is None else t.detach().cpu().double().numpy()


def make_input(shape, dtype, layout, seed=0, scale=2.0, offset=0.5):
    """Non-uniform values (offset from zero, so the mean matters) in the layout asked: contiguous,
    channels_last(_3d) (4-D / 5-D), or a non-contiguous view (every other element of the last dim)."""
    x = (make_tensor(shape, torch.float64, seed=seed, scale=scale) + offset).to(dtype)
    if layout == "channels_last" and len(shape) in (4, 5):
        x = x.to(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    if layout == "view":
        wide = torch.zeros(shape[:-1] + (2 * shape[-1],), dtype=dtype)
        wide[..., ::2] = x
        x = wide[..., ::2]
        assert not x.is_contiguous()
    return x


def _torch_memory_format_like(out, x):
    expected = F.batch_norm(x.detach().float(), None, None, training=True)
    for fmt in (torch.contiguous_format, torch.channels_last, torch.channels_last_3d):
        try:
            assert out.is_contiguous(memory_format=fmt) == expected.is_contiguous(memory_format=fmt), fmt
        except RuntimeError:  # a format of another rank
            pass


def run_batch_norm(backend, dtype, shape, *, layout="contiguous", activation="relu", residual=True, affine=True,
                   training=True, running=True, param_dtype=None, residual_layout=None, slope=0.1, momentum=0.1,
                   seed=0, check=True):
    """fastdl's out, gradients (input, weight, bias, residual) and running statistics against the
    float64 reference on the same (rounded) inputs, one random upstream gradient."""
    C = shape[1]
    param_dtype = param_dtype or dtype
    x = make_input(shape, dtype, layout, seed).requires_grad_()
    w = make_tensor((C,), param_dtype, seed=seed + 1).requires_grad_() if affine else None
    b = make_tensor((C,), param_dtype, seed=seed + 2).requires_grad_() if affine else None
    r = make_input(shape, dtype, residual_layout or layout, seed + 3, scale=1.0, offset=0.0).requires_grad_() \
        if residual else None
    rm = make_tensor((C,), param_dtype, seed=seed + 4) if running else None
    rv = (make_tensor((C,), param_dtype, seed=seed + 5).abs() + 0.5).to(param_dtype) if running else None
    rm0, rv0 = (None, None) if rm is None else (rm.clone(), rv.clone())
    with fastdl.use_backend(backend):
        out = fastdl.functional.batch_norm(x, rm, rv, w, b, training, momentum, EPS,
                                           activation=None if activation == "none" else activation,
                                           negative_slope=slope, residual=r)
        g = make_tensor(shape, dtype, seed=seed + 6)
        leaves = [t for t in (x, w, b, r) if t is not None]
        grads = torch.autograd.grad(out, leaves, g)
    expected, saved = ref.forward(_np(x), _np(w), _np(b), _np(rm0), _np(rv0), training, EPS, activation, slope,
                                  _np(r))
    expected_grads = [e for e in ref.backward(_np(g), saved) if e is not None]
    if not check:
        return out, grads, (rm, rv), (expected, expected_grads)
    assert out.dtype == dtype and out.shape == x.shape
    _torch_memory_format_like(out, x)
    assert_close(out, expected, dtype, name="out")
    for name, got, want in zip(("grad_input", "grad_weight", "grad_bias", "grad_residual")[:len(leaves)] if affine
                               else ("grad_input", "grad_residual"), grads, expected_grads):
        assert got.dtype == (param_dtype if name in ("grad_weight", "grad_bias") else dtype), name
        assert_close(got, want, dtype, name=name)
    if running:
        if training:
            new_rm, new_rv = ref.update_running_stats(_np(rm0), _np(rv0), saved["mean"], saved["var"],
                                                      saved["count"], momentum)
        else:
            new_rm, new_rv = _np(rm0), _np(rv0)
        assert rm.dtype == param_dtype
        assert_close(rm, new_rm, dtype, name="running_mean")
        assert_close(rv, new_rv, dtype, name="running_var")
    return out, grads, (rm, rv), (expected, expected_grads)


# --- against the reference, per backend -------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,layout", [(s, layout) for s in SHAPES for layout in LAYOUTS
                                          if layout != "channels_last" or len(SHAPES[s]) >= 4])  # 4-D, 5-D only
def test_shapes_and_layouts(backend, shape, layout):
    run_batch_norm(backend, torch.float32, SHAPES[shape], layout=layout, seed=len(shape))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=["fp64", "fp16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_dtypes(backend, dtype, layout):
    run_batch_norm(backend, dtype, (3, 4, 5, 7), layout=layout, seed=3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
def test_activations(backend, activation, residual):
    run_batch_norm(backend, torch.float32, (2, 3, 7, 7), layout="channels_last", activation=activation,
                   residual=residual, seed=7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["none", "leaky_relu", "silu"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_eval(backend, activation, layout):
    run_batch_norm(backend, torch.float32, (2, 5, 6, 7), layout=layout, activation=activation, training=False,
                   seed=9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("running", [True, False], ids=["running", "no_running"])
def test_affine_and_running_stats(backend, affine, running):
    run_batch_norm(backend, torch.float32, (4, 3, 5), affine=affine, running=running, seed=11)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("residual_layout", ["contiguous", "view"])
def test_residual_in_another_layout(backend, residual_layout):
    """A contiguous (or strided) residual added to a channels_last input."""
    run_batch_norm(backend, torch.float32, (2, 6, 5, 4), layout="channels_last", residual_layout=residual_layout,
                   activation="gelu", seed=13)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_output_in_another_layout(backend):
    x = make_input((2, 3, 5, 4), torch.float32, "channels_last", seed=1).requires_grad_()
    w = make_tensor((3,), seed=2, requires_grad=True)
    g = make_tensor((2, 3, 4, 5), seed=3).transpose(2, 3)  # neither contiguous nor channels_last
    with fastdl.use_backend(backend):
        out = fastdl.functional.batch_norm(x, None, None, w, None, True, activation="tanh")
        got = torch.autograd.grad(out, (x, w), g)
    want = torch.autograd.grad(torch.tanh(F.batch_norm(x, None, None, w, None, True)), (x, w), g)
    for a, e in zip(got, want):
        assert_close(a, _np(e), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_mean_small_std(backend):
    """float32 data of mean 1e4 and std 1: no E[x^2] - E[x]^2 cancellation (which would be off by
    ~10 here). running_var with momentum 1 is the unbiased batch variance."""
    x = make_tensor((4, 3, 9, 10), seed=5) + 1e4
    rm, rv = torch.zeros(3), torch.ones(3)
    with fastdl.use_backend(backend):
        out = fastdl.functional.batch_norm(x, rm, rv, training=True, momentum=1.0)
    expected, saved = ref.forward(_np(x), training=True)
    n = saved["count"]
    assert_close(rv, saved["var"] * n / (n - 1), torch.float32, name="unbiased var")
    assert_close(rm, saved["mean"], torch.float32, name="mean")
    # The float32 mean itself is rounded by up to half an ulp of 1e4 (4.9e-4), as torch's saved mean.
    np.testing.assert_allclose(_np(out), expected, rtol=0, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_input_with_float32_parameters(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter computes bfloat16 wrongly (tests/test_interpreter_bf16.py); "
                    "bf16 on the Triton kernels runs on the GPU suite")
    for training in (True, False):
        run_batch_norm(backend, dtype, (3, 4, 5, 6), layout="channels_last", param_dtype=torch.float32,
                       training=training, seed=17)


def test_reference_backend_matches_torch_in_float64():
    """Semantics: the reference backend is torch's batch norm (+ residual + activation) in float64."""
    for training in (True, False):
        x = make_input((3, 4, 5, 6), torch.float64, "channels_last", seed=1).requires_grad_()
        w, b = make_tensor((4,), torch.float64, seed=2), make_tensor((4,), torch.float64, seed=3)
        r = make_tensor((3, 4, 5, 6), torch.float64, seed=4)
        stats = [make_tensor((4,), torch.float64, seed=5), make_tensor((4,), torch.float64, seed=6).abs() + 1]
        theirs_stats = [s.clone() for s in stats]
        with fastdl.use_backend("reference"):
            out = fastdl.functional.batch_norm(x, *stats, w, b, training, 0.3, 1e-3, activation="silu", residual=r)
        want = F.silu(F.batch_norm(x, *theirs_stats, w, b, training, 0.3, 1e-3) + r)
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(stats, theirs_stats, rtol=1e-12, atol=1e-12)
        g = make_tensor(out.shape, torch.float64, seed=7)
        torch.testing.assert_close(torch.autograd.grad(out, x, g), torch.autograd.grad(want, x, g),
                                   rtol=1e-10, atol=1e-12)


# --- what the op keeps ------------------------------------------------------------------------------

@pytest.mark.parametrize("activation,residual,grad,saves", [
    ("relu", True, True, True), ("leaky_relu", True, True, True), ("relu", False, True, False),
    ("relu", True, False, False), ("gelu", True, True, False)])
def test_mask_kept_only_for_relu_with_residual(activation, residual, grad, saves, monkeypatch):
    """The functional asks the op for the 1-byte mask only for relu / leaky_relu with a residual
    when a gradient is wanted; the mask holds pre > 0."""
    x3 = make_tensor((2, 3, 10), seed=1)
    r3 = make_tensor((2, 3, 10), seed=2) if residual else None
    op = fastdl.ops.get("batch_norm", "reference")
    calls = []

    def spy(*args):
        calls.append(args)
        return op(*args)

    real_get = fastdl.ops.get
    monkeypatch.setattr(fastdl.ops, "get",
                        lambda name, backend: spy if name == "batch_norm" else real_get(name, backend))
    with fastdl.use_backend("reference"):
        fastdl.functional.batch_norm(x3.clone().requires_grad_(grad), None, None, training=True,
                                     activation=activation, residual=r3)
    save_mask = calls[0][-1]
    assert save_mask == saves
    out, mean, invstd, var, mask = op(x3, None, None, r3, None, None, True, EPS, activation, 0.01, False, save_mask)
    assert (mask.numel() > 0) == saves
    if saves:
        assert mask.dtype == torch.uint8 and mask.shape == x3.shape
        pre = (x3 - mean[:, None]) * invstd[:, None] + r3
        assert torch.equal(mask.bool(), pre > 0)
    assert mean.dtype == invstd.dtype == var.dtype == torch.float32


# --- running statistics and the modules -------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.1, None, 0.0])
@pytest.mark.parametrize("module", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"])
def test_modules_follow_torch_over_several_steps(backend, momentum, module):
    shape = {"BatchNorm1d": (6, 4, 5), "BatchNorm2d": (3, 4, 5, 3), "BatchNorm3d": (2, 4, 3, 2, 3)}[module]
    torch.manual_seed(0)
    theirs = getattr(torch.nn, module)(4, momentum=momentum)
    ours = getattr(fastdl.nn, module)(4, momentum=momentum)
    with torch.no_grad():
        for m in (theirs, ours):
            m.weight.copy_(make_tensor((4,), seed=1))
            m.bias.copy_(make_tensor((4,), seed=2))
    with fastdl.use_backend(backend):
        for step in range(3):
            x = make_tensor(shape, seed=10 + step) * (step + 1) + step
            assert_close(ours(x), _np(theirs(x)), torch.float32, name=f"train step {step}")
        for name in ("running_mean", "running_var"):
            assert_close(getattr(ours, name), _np(getattr(theirs, name)), torch.float32, name=name)
        assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 3
        ours.eval()
        theirs.eval()
        x = make_tensor(shape, seed=20)
        assert_close(ours(x), _np(theirs(x)), torch.float32, name="eval after train")
    assert ours.num_batches_tracked.item() == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_options(backend):
    """affine=False, track_running_stats=False (batch statistics in eval too), bias=False, activation."""
    x = make_tensor((4, 3, 5, 5), seed=1)
    with fastdl.use_backend(backend):
        for kwargs in (dict(affine=False), dict(track_running_stats=False), dict(bias=False)):
            theirs, ours = torch.nn.BatchNorm2d(3, **kwargs), fastdl.nn.BatchNorm2d(3, **kwargs)
            assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
            assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
            for mode in ("train", "eval"):
                getattr(ours, mode)(), getattr(theirs, mode)()
                assert_close(ours(x), _np(theirs(x)), torch.float32, name=f"{kwargs} {mode}")
        act = fastdl.nn.BatchNorm2d(3, activation="leaky_relu", negative_slope=0.2)
        r = make_tensor(x.shape, seed=2)
        assert_close(act(x, r), _np(F.leaky_relu(torch.nn.BatchNorm2d(3)(x) + r, 0.2)), torch.float32)
        # A residual that broadcasts (or has another dtype) is added unfused, as `act(bn(x) + r)` would.
        for other in (r[:1], r[:, :, :1].double()):
            want = F.leaky_relu(torch.nn.BatchNorm2d(3)(x) + other, 0.2)
            got = fastdl.nn.BatchNorm2d(3, activation="leaky_relu", negative_slope=0.2)(x, other)
            assert got.dtype == want.dtype
            assert_close(got, _np(want), torch.float32)
    assert "activation='leaky_relu', negative_slope=0.2" in repr(act)
    with pytest.raises(ValueError, match="activation"):
        fastdl.nn.BatchNorm2d(3, activation="swish")
    with pytest.raises(ValueError, match="expected 4D input"):
        fastdl.nn.BatchNorm2d(3)(x[0])


def test_state_dict_round_trips():
    for kwargs in (dict(), dict(affine=False), dict(track_running_stats=False)):
        theirs = torch.nn.BatchNorm2d(5, **kwargs)
        theirs.train()(make_tensor((4, 5, 3, 3), seed=1) + 2)
        ours = fastdl.nn.BatchNorm2d(5, activation="relu", **kwargs)
        ours.load_state_dict(theirs.state_dict())
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        for key, value in theirs.state_dict().items():
            assert torch.equal(ours.state_dict()[key], value)
        back = torch.nn.BatchNorm2d(5, **kwargs)
        back.load_state_dict(ours.state_dict())
        assert isinstance(ours, torch.nn.BatchNorm2d)


def test_empty_batch():
    """N == 0 in training: empty output, running statistics untouched (torch's), zero gradients for
    weight and bias, no launch."""
    for backend in ("reference",) + (("triton",) if not _missing_launchers("triton") else ()):
        x = torch.zeros((0, 3, 4, 4)).requires_grad_()
        w, b = make_tensor((3,), seed=1, requires_grad=True), make_tensor((3,), seed=2, requires_grad=True)
        rm, rv = make_tensor((3,), seed=3), make_tensor((3,), seed=4).abs()
        before = rm.clone(), rv.clone()
        with fastdl.use_backend(backend):
            out = fastdl.functional.batch_norm(x, rm, rv, w, b, True, activation="relu",
                                               residual=torch.zeros(0, 3, 4, 4))
            out.sum().backward()
        assert out.shape == x.shape
        assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])
        assert torch.equal(w.grad, torch.zeros(3)) and torch.equal(b.grad, torch.zeros(3))
        assert x.grad.shape == x.shape


# --- bad input: torch's exception types, nothing written ----------------------------------------------

def _args():
    C = 3
    return dict(input=make_tensor((4, C, 5), seed=1), running_mean=make_tensor((C,), seed=2),
                running_var=make_tensor((C,), seed=3).abs() + 1, weight=make_tensor((C,), seed=4),
                bias=make_tensor((C,), seed=5), training=True, momentum=0.1, eps=1e-5)


BAD = [  # id, change to the arguments, whether torch.nn.functional.batch_norm takes the same call
    ("running_mean length", lambda a: a.update(running_mean=torch.zeros(4)), True),
    ("running_var length", lambda a: a.update(running_var=torch.ones(2)), True),
    ("weight length", lambda a: a.update(weight=torch.ones(4)), True),
    ("bias length", lambda a: a.update(bias=torch.ones(2)), True),
    ("one value per channel", lambda a: a.update(input=torch.ones(1, 3, 1)), True),
    ("one value per channel 2d", lambda a: a.update(input=torch.ones(1, 3)), True),
    ("1-D input training", lambda a: a.update(input=torch.ones(3)), True),
    ("1-D input eval", lambda a: a.update(input=torch.ones(3), training=False), True),
    ("running_var missing", lambda a: a.update(running_var=None), True),
    ("eval without running stats", lambda a: a.update(running_mean=None, running_var=None, training=False), True),
    ("weight dtype", lambda a: a.update(weight=a["weight"].double()), True),
    ("float64 input, float32 params", lambda a: a.update(input=a["input"].double()), True),
    ("half input, mixed params", lambda a: a.update(input=a["input"].half(), weight=a["weight"].half()), True),
    ("integer input", lambda a: a.update(input=a["input"].int(), running_mean=None, running_var=None,
                                         weight=None, bias=None), True),
    ("non-positive eps in training", lambda a: a.update(eps=0.0), True),
    ("negative eps", lambda a: a.update(eps=-1.0, training=False), True),
    ("training not a bool", lambda a: a.update(training=1), True),
    ("momentum None", lambda a: a.update(momentum=None), True),
    ("weight not a tensor", lambda a: a.update(weight=[1.0, 1.0, 1.0]), True),
    ("running stats of 2 dims", lambda a: a.update(running_mean=torch.zeros(3, 1), running_var=torch.ones(3, 1)), True),
    ("residual shape", lambda a: a.update(residual=torch.zeros(4, 3, 4)), False),
    ("residual dtype", lambda a: a.update(residual=torch.zeros(4, 3, 5, dtype=torch.float64)), False),
    ("residual not a tensor", lambda a: a.update(residual=1.0), False),
    ("unknown activation", lambda a: a.update(activation="swish"), False),
]
EXPECTED_OWN = {"residual shape": RuntimeError, "residual dtype": RuntimeError, "residual not a tensor": TypeError,
                "unknown activation": ValueError}


@pytest.mark.parametrize("name,change,torch_takes_it", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_torch_exception_type(name, change, torch_takes_it):
    args = _args()
    change(args)
    snapshot = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    if torch_takes_it:
        theirs_args = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
        with pytest.raises(Exception) as theirs:
            F.batch_norm(**theirs_args)
        expected = type(theirs.value)
    else:
        expected = EXPECTED_OWN[name]
    with fastdl.use_backend("reference"):
        with pytest.raises(expected) as ours:
            fastdl.functional.batch_norm(**args)
    assert "batch_norm" in str(ours.value)
    for k, v in snapshot.items():  # the running statistics included: nothing written
        assert torch.equal(args[k], v), k


def test_module_counts_no_batch_it_rejects():
    m = fastdl.nn.BatchNorm1d(3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.ones(1, 3))
    assert m.num_batches_tracked.item() == 0
    assert torch.equal(m.running_mean, torch.zeros(3)) and torch.equal(m.running_var, torch.ones(3))


# --- autograd, transforms, compile, fx ---------------------------------------------------------------

def _f64_inputs(shape=(3, 2, 4), seed=1):
    x = make_tensor(shape, torch.float64, seed=seed, requires_grad=True)
    w = make_tensor((shape[1],), torch.float64, seed=seed + 1, requires_grad=True)
    b = make_tensor((shape[1],), torch.float64, seed=seed + 2, requires_grad=True)
    r = make_tensor(shape, torch.float64, seed=seed + 3, requires_grad=True)
    return x, w, b, r


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_gradgradcheck(training):
    x, w, b, r = _f64_inputs()
    rm, rv = make_tensor((2,), torch.float64, seed=9), make_tensor((2,), torch.float64, seed=10).abs() + 1

    def fn(x, w, b, r):
        return fastdl.functional.batch_norm(x, rm, rv, w, b, training, 0.0, activation="gelu_tanh", residual=r)

    with fastdl.use_backend("reference"):
        assert torch.autograd.gradcheck(fn, (x, w, b, r))
        assert torch.autograd.gradgradcheck(fn, (x, w, b, r))


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward_and_double_backward_match_torch(backend):
    x, w, b, r = _f64_inputs((4, 3, 5), seed=3)
    g = make_tensor((4, 3, 5), torch.float64, seed=7)
    with fastdl.use_backend(backend):
        out = fastdl.functional.batch_norm(x, None, None, w, b, True, activation="relu", residual=r)
        first = torch.autograd.grad(out, (x, w, b, r), g, retain_graph=True)
        second = torch.autograd.grad(out, (x, w, b, r), g, retain_graph=True)
        for a, c in zip(first, second):
            assert torch.equal(a, c)
        gx = torch.autograd.grad(out, x, g, create_graph=True)[0]
        ours = torch.autograd.grad(gx.square().sum(), (x, w, b))
    want = F.relu(F.batch_norm(x, None, None, w, b, True) + r)
    gx_want = torch.autograd.grad(want, x, g, create_graph=True)[0]
    theirs = torch.autograd.grad(gx_want.square().sum(), (x, w, b))
    torch.testing.assert_close(gx, gx_want, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=1e-10)


def test_torch_func_and_forward_ad_run_the_torch_entry():
    x, w, b, r = (t.detach() for t in _f64_inputs((4, 3, 5), seed=5))

    def ours(x, w):
        return fastdl.functional.batch_norm(x, None, None, w, b, True, activation="silu", residual=r).square().sum()

    def theirs(x, w):
        return F.silu(F.batch_norm(x, None, None, w, b, True) + r).square().sum()

    F64 = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.func.grad(ours, argnums=(0, 1))(x, w),
                               torch.func.grad(theirs, argnums=(0, 1))(x, w), **F64)
    xs = torch.stack([x, x * 2 + 1])
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(ours), in_dims=(0, None))(xs, w),
                               torch.func.vmap(torch.func.grad(theirs), in_dims=(0, None))(xs, w), **F64)
    tangent = make_tensor(x.shape, torch.float64, seed=11)
    results = []
    for fn in (ours, theirs):
        with fwAD.dual_level():
            results.append(fwAD.unpack_dual(fn(fwAD.make_dual(x, tangent), w)).tangent)
    torch.testing.assert_close(results[0], results[1], **F64)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    with fwAD.dual_level():  # running statistics are updated from the primal values
        fastdl.functional.batch_norm(fwAD.make_dual(x, tangent), rm, rv, training=True)
    torch.testing.assert_close(rm, 0.1 * x.mean(dim=(0, 2)), **F64)


def test_torch_compile_fullgraph_reference_backend():
    torch.manual_seed(0)
    model = torch.nn.Sequential(fastdl.nn.Conv2d(3, 4, 3, padding=1), fastdl.nn.BatchNorm2d(4, activation="relu"))
    model = model.double()
    twin = torch.nn.Sequential(fastdl.nn.Conv2d(3, 4, 3, padding=1), fastdl.nn.BatchNorm2d(4, activation="relu"))
    twin = twin.double()
    twin.load_state_dict(model.state_dict())
    x = make_tensor((2, 3, 5, 6), torch.float64, seed=1, requires_grad=True)
    with fastdl.use_backend("reference"):
        expected = twin(x)
        out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
        (grad,) = torch.autograd.grad(out.sum() + out.square().sum(), x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, torch.autograd.grad(expected.sum() + expected.square().sum(), x)[0],
                               rtol=1e-10, atol=1e-12)
    for name in ("running_mean", "running_var", "num_batches_tracked"):  # updated once, as eager
        torch.testing.assert_close(model[1].get_buffer(name), twin[1].get_buffer(name), rtol=1e-12, atol=0)


class _Block(torch.nn.Module):
    def __init__(self, momentum=0.1):
        super().__init__()
        self.bn = fastdl.nn.BatchNorm1d(3, momentum=momentum, activation="tanh")

    def forward(self, x, r):
        return self.bn(x, residual=r)


@pytest.mark.parametrize("training,momentum", [(True, 0.1), (True, None), (False, 0.1)],
                         ids=["train", "train-cumulative", "eval"])
def test_fx_symbolic_trace_sees_batch_norm(training, momentum):
    """The traced graph calls fastdl.functional.batch_norm and, in training, counts each batch and
    takes momentum=None's factor at run time (tracing itself changes no buffer)."""
    model = _Block(momentum).double().train(training)
    twin = _Block(momentum).double().train(training)
    traced = torch.fx.symbolic_trace(model)
    assert model.bn.num_batches_tracked.item() == 0
    targets = {node.target for node in traced.graph.nodes if node.op == "call_function"}
    assert fastdl.functional.batch_norm in targets
    for step in range(3):
        x = make_tensor((5, 3, 4), torch.float64, seed=2 + step) + step
        r = make_tensor((5, 3, 4), torch.float64, seed=9)
        torch.testing.assert_close(traced(x, r), twin(x, r), rtol=0, atol=0)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(model.bn.get_buffer(name), twin.bn.get_buffer(name), rtol=0, atol=0)
    assert model.bn.num_batches_tracked.item() == (3 if training else 0)


# --- fastdl verify rows and fastdl bench cases ---------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_verify_rows_pass_and_cover_modes_layouts_and_statistics(backend):
    from fastdl import verify

    rows = [r for dtype in (torch.bfloat16, torch.float32) for r in verify._check_batch_norm(backend, dtype, "cpu")]
    assert rows and all(r["status"] == "pass" for r in rows), [r for r in rows if r["status"] != "pass"][:3]
    assert {r["check"] for r in rows} == {"out", "grad_input", "grad_weight", "grad_bias", "grad_residual",
                                          "running_mean", "running_var"}
    assert {r["shape"].rsplit(" ", 1)[1] for r in rows} == {"channels_last", "contiguous"}
    assert any(" eval relu +residual" in r["shape"] for r in rows) and any(" train none" in r["shape"] for r in rows)
    # 4-D: 2 layouts, 3-D: 1; per dtype and layout: train relu+residual (out, 4 gradients, 2 running
    # statistics), train without (out, 3 gradients, 2 statistics), eval relu+residual (out, 4 gradients).
    assert len(rows) == 2 * (2 + 1) * (7 + 6 + 5)


def test_bench_cases_and_floor():
    from fastdl import bench
    from fastdl.bench.spec import DTYPES

    spec = bench.OPS["batch_norm"]
    full = spec.workloads(False)
    assert {w.shape[0] for w in full} == {256} and (256, 64, 112, 112) in {w.shape for w in full}
    assert {(w.dtype, w.param["layout"], w.param["variant"]) for w in full} == {
        (d, lay, v) for d in ("bf16", "fp32") for lay in ("channels_last", "NCHW") for v in ("bn", "bn+relu+residual")}
    assert len({(w.dtype, w.label) for w in full}) == len(full)
    assert len(spec.workloads(True)) < len(full)
    cases = bench.cases("batch_norm")
    assert len({c.id for c in cases}) == len(cases)
    w = next(w for w in full if w.dtype == "bf16" and w.param["variant"] == "bn+relu+residual")
    A = math.prod(w.shape)
    assert DTYPES[w.dtype][0].itemsize == 2
    assert spec.cost(w, "forward") == (0.0, 6 * A + A / 8)
    assert spec.cost(w, "forward+backward") == (0.0, 6 * A + 8 * A + A / 4)


@pytest.mark.parametrize("variant", ["bn", "bn+relu+residual"])
def test_bench_functions_agree_on_cpu(variant):
    from fastdl import bench

    spec = bench.OPS["batch_norm"]
    w = next(w for w in spec.workloads(True) if w.param["variant"] == variant and w.dtype == "fp32")
    x = make_tensor((4, 6, 5, 5), seed=1).contiguous(memory_format=torch.channels_last)
    params = (make_tensor((6,), seed=2), make_tensor((6,), seed=3))
    extra = (make_tensor(x.shape, seed=4),) if variant != "bn" else ()
    stats = [(torch.zeros(6), torch.ones(6)) for _ in range(2)]
    with fastdl.use_backend("reference"):
        ours = spec.fastdl_fn(w)(x, *params, *stats[0], *extra)
    theirs = spec.torch_fn(w)(x, *params, *stats[1], *extra)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert ours.stride() == theirs.stride()
    torch.testing.assert_close(stats[0], stats[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_output_may_be_modified_in_place(channels_last):
    """The output is a tensor of its own, not a view of the op's: nn.ReLU(inplace=True) after a
    BatchNorm (torchvision's ResNets) works and differentiates as torch's does."""
    x = make_tensor((3, 4, 5, 5), seed=3)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = make_tensor((3, 4, 5, 5), seed=4)
    results = []
    for fn in (fastdl.functional.batch_norm, torch.nn.functional.batch_norm):
        xg = x.clone().requires_grad_()
        with fastdl.use_backend("reference"):
            out = fn(xg, None, None, training=True)
            out.relu_()
            out.backward(grad)
        results.append((out.detach(), xg.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_spatial_size(backend, layout):
    """ResNet's stem resolution, 112x112 (S = 12544 per image): many tiles per channel in NCHW rows,
    many pixel tiles per channel group in channels_last, split over programs and combined."""
    run_batch_norm(backend, torch.float32, (2, 3, 112, 112), layout=layout, seed=11)
