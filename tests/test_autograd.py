"""Autograd beyond one backward, for every op: the rules in fastdl/ops/_define.py.

- gradcheck and gradgradcheck in float64 for every op and option, on the reference backend and the
  triton kernels (through the interpreter; tiny shapes, since every check point is a launch);
- a second backward through the same graph (the backward leaves what it saved intact), jacobian,
  the gradient penalty of a loss, third order;
- no zero-filled gradient for outputs nobody differentiated (materialize_grads off);
- the "torch" entries of fastdl.ops.get under torch.func (grad, vmap, jacrev) and forward AD;
- `import fastdl` defines no op and imports no torch._inductor.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck
from torch.utils._python_dispatch import TorchDispatchMode

import fastdl
from fastdl import ops
from fastdl.testing import make_tensor

F64 = torch.float64
REDUCTIONS = ["none", "mean", "sum"]
ACTIVATIONS = ["none", "relu", "leaky_relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh"]
# The interpreter runs every check point as a launch: the triton matrix is a sample of the
# reference one (each option at least once), in gradcheck's fast mode (random projections).
TRITON_FAST = dict(fast_mode=True)


def _t64(shape, seed, scale=1.0):
    return make_tensor(shape, F64, seed=seed, scale=scale, requires_grad=True)


def _checks(fn, inputs, backend, first_only=False):
    kwargs = TRITON_FAST if backend == "triton" else {}
    with fastdl.use_backend(backend):
        assert gradcheck(fn, inputs, **kwargs)
        if not first_only:
            assert gradgradcheck(fn, inputs, **kwargs)


# --- linear ---------------------------------------------------------------------------------------

def _linear_inputs(has_bias):
    # Pre-activations at least 0.05 from 0, where relu and leaky_relu bend (finite differences
    # step 1e-6): a fixed seed, and the precondition checked.
    x, w = _t64((2, 3), seed=11), _t64((4, 3), seed=12)
    b = _t64((4,), seed=13) if has_bias else None
    z = F.linear(x, w, b)
    assert z.abs().min() > 0.05
    return (x, w, b) if has_bias else (x, w)


@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_linear_gradcheck_gradgradcheck_reference(activation, has_bias):
    act = None if activation == "none" else activation
    _checks(lambda *a: fastdl.functional.linear(*a, activation=act), _linear_inputs(has_bias), "reference")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_linear_gradcheck_gradgradcheck_triton(activation):
    act = None if activation == "none" else activation
    has_bias = activation != "gelu"  # one activation without a bias
    _checks(lambda *a: fastdl.functional.linear(*a, activation=act), _linear_inputs(has_bias), "triton")


# --- cross_entropy --------------------------------------------------------------------------------

INDEX_OPTIONS = {
    "plain": dict(),
    "weight+ignore+smoothing": dict(weight=torch.tensor([0.5, 2.0, 1.0, 1.5], dtype=F64), ignore_index=2,
                                    label_smoothing=0.2),
}


def _index_case(options):
    z = _t64((3, 4), seed=21, scale=2.0)
    target = torch.tensor([1, 2, 3])  # row 1 is ignored where ignore_index=2
    return lambda z: fastdl.functional.cross_entropy(z, target, **options), (z,)


# Every option and reduction on the reference; on triton each option and reduction at least once.
INDEX_CASES = ([("reference", option, reduction) for option in INDEX_OPTIONS for reduction in REDUCTIONS]
               + [("triton", "plain", "mean")]
               + [("triton", "weight+ignore+smoothing", reduction) for reduction in REDUCTIONS])


@pytest.mark.parametrize("backend,option,reduction", INDEX_CASES)
def test_cross_entropy_index_targets(backend, option, reduction):
    fn, inputs = _index_case(dict(INDEX_OPTIONS[option], reduction=reduction))
    _checks(fn, inputs, backend)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_cross_entropy_probability_targets_differentiable_target_and_weight(backend, reduction):
    z = _t64((3, 4), seed=31, scale=2.0)
    p = torch.softmax(make_tensor((3, 4), F64, seed=32), dim=1).requires_grad_()
    w = (make_tensor((4,), F64, seed=33).abs() + 0.5).requires_grad_()
    smoothing = 0.2 if reduction != "sum" else 0.0
    _checks(lambda z, p, w: fastdl.functional.cross_entropy(z, p, weight=w, reduction=reduction,
                                                            label_smoothing=smoothing), (z, p, w), backend)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_cross_entropy_spatial_input(backend):
    z = _t64((2, 4, 2), seed=41, scale=2.0)  # (N, C, d): rows are moved and copied
    target = torch.tensor([[0, 3], [-100, 1]])
    _checks(lambda z: fastdl.functional.cross_entropy(z, target, label_smoothing=0.1), (z,), backend)


# --- linear_cross_entropy -------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_linear_cross_entropy(backend, reduction, monkeypatch):
    from fastdl.ops.linear_cross_entropy import CHUNK_ROWS_ENV

    monkeypatch.setenv(CHUNK_ROWS_ENV, "2")  # two chunks
    x, w, b = _t64((3, 3), seed=51), _t64((4, 3), seed=52), _t64((4,), seed=53)
    target = torch.tensor([0, -100, 3])
    _checks(lambda x, w, b: fastdl.functional.linear_cross_entropy(x, w, target, b, reduction=reduction,
                                                                   label_smoothing=0.1), (x, w, b), backend)


# --- a second backward, jacobian, gradient penalty, third order -----------------------------------

def _fastdl_and_torch_fns(reduction):
    """(fastdl fn, torch fn, inputs) per op, each a function of its differentiable inputs: scalar
    losses for reduction "mean", vector outputs (linear's output, per-row losses) for "none"."""
    target = torch.tensor([1, -100, 3])
    vector = reduction == "none"
    ln = lambda x, w, b: fastdl.functional.linear(x, w, b, activation="tanh")  # noqa: E731
    lt = lambda x, w, b: torch.tanh(F.linear(x, w, b))  # noqa: E731
    if not vector:
        ln, lt = (lambda f: lambda *a: (f(*a) ** 2).sum())(ln), (lambda f: lambda *a: (f(*a) ** 2).sum())(lt)
    ce = lambda z: fastdl.functional.cross_entropy(z, target, label_smoothing=0.1, reduction=reduction)  # noqa: E731
    ct = lambda z: F.cross_entropy(z, target, label_smoothing=0.1, reduction=reduction)  # noqa: E731
    lce = lambda x, w, b: fastdl.functional.linear_cross_entropy(x, w, target, b, reduction=reduction)  # noqa: E731
    lct = lambda x, w, b: F.cross_entropy(F.linear(x, w, b), target, reduction=reduction)  # noqa: E731
    dense = lambda: (_t64((3, 3), seed=61), _t64((4, 3), seed=62), _t64((4,), seed=63))  # noqa: E731
    return {"linear": (ln, lt, dense()), "cross_entropy": (ce, ct, (_t64((3, 4), seed=64, scale=2.0),)),
            "linear_cross_entropy": (lce, lct, dense())}


@pytest.mark.parametrize("name", ["linear", "cross_entropy", "linear_cross_entropy"])
def test_backward_twice_with_retain_graph_doubles_the_gradient(name):
    fn, torch_fn, inputs = _fastdl_and_torch_fns("mean")[name]
    with fastdl.use_backend("triton"):
        loss = fn(*inputs)
    loss.backward(retain_graph=True)
    loss.backward()
    expected = torch.autograd.grad(torch_fn(*inputs), inputs)
    for got, want in zip(inputs, expected):
        torch.testing.assert_close(got.grad, 2 * want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", ["linear", "cross_entropy", "linear_cross_entropy"])
def test_jacobian_equals_torchs(name):
    # Vector outputs: one backward per output element through the same graph.
    fn, torch_fn, inputs = _fastdl_and_torch_fns("none")[name]
    with fastdl.use_backend("triton"):
        got = torch.autograd.functional.jacobian(fn, inputs)
    want = torch.autograd.functional.jacobian(torch_fn, inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gradient_penalty_matches_torch(backend):
    # The example of the issue: fastdl's gradient had no graph, so loss + penalty differentiated
    # without error and without the penalty's main term.
    z = make_tensor((6, 10), seed=71, scale=2.0, requires_grad=True)
    t = torch.tensor([0, 3, 9, 1, 1, 5])
    results = []
    for ce in (fastdl.functional.cross_entropy, F.cross_entropy):
        with fastdl.use_backend(backend):
            loss = ce(z, t)
            g, = torch.autograd.grad(loss, z, create_graph=True)
            (loss + (g ** 2).sum()).backward()
        results.append(z.grad)
        z.grad = None
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-6)


def test_cross_entropy_third_order_matches_torch():
    # The Hessian-vector product is written in torch ops on the saved gradient, so it
    # differentiates again.
    z = _t64((3, 5), seed=81, scale=2.0)
    t = torch.tensor([4, -100, 0])
    v1, v2 = make_tensor((3, 5), F64, seed=82), make_tensor((3, 5), F64, seed=83)
    results = []
    for ce in (fastdl.functional.cross_entropy, F.cross_entropy):
        with fastdl.use_backend("reference"):
            g, = torch.autograd.grad(ce(z, t, label_smoothing=0.1, reduction="sum"), z, create_graph=True)
            h, = torch.autograd.grad((g * v1).sum(), z, create_graph=True)
            third, = torch.autograd.grad((h * v2).sum(), z)
        results.append((g, h, third))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


# --- materialize_grads off: no zero-filled gradient for outputs nobody differentiated --------------

class _ZeroFills(TorchDispatchMode):
    """Records every tensor of one of `shapes` that an op creates zero-filled or fills with zeros."""

    FILLS = ("zeros", "zeros_like", "new_zeros", "zero_", "fill_", "full", "full_like", "new_full", "scalar_tensor")

    def __init__(self, shapes):
        super().__init__()
        self.shapes = {tuple(s) for s in shapes}
        self.fills = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (func.overloadpacket.__name__ in self.FILLS and isinstance(out, torch.Tensor)
                and tuple(out.shape) in self.shapes):
            self.fills.append((func.overloadpacket.__name__, tuple(out.shape), out.dtype))
        return out


def _backward_fills(loss, shapes):
    mode = _ZeroFills(shapes)
    with mode:
        loss.backward()
    return mode.fills


def test_cross_entropy_backward_fills_no_logits_sized_zeros():
    x = make_tensor((6, 11), seed=1, requires_grad=True)
    with fastdl.use_backend("triton"):
        loss = fastdl.functional.cross_entropy(x, torch.arange(6))
    assert _backward_fills(loss, [(6, 11)]) == []


@pytest.mark.parametrize("activation", ["relu", "gelu"])  # a uint8 mask, a saved pre-activation
def test_linear_backward_fills_no_output_sized_zeros(activation):
    x, w = make_tensor((5, 3), seed=1, requires_grad=True), make_tensor((7, 3), seed=2, requires_grad=True)
    with fastdl.use_backend("triton"):
        out = fastdl.functional.linear(x, w, activation=activation)
    assert _backward_fills(out.sum(), [(5, 7)]) == []


def test_linear_cross_entropy_backward_fills_no_gradient_sized_zeros():
    x, w = make_tensor((5, 3), seed=1, requires_grad=True), make_tensor((7, 3), seed=2, requires_grad=True)
    b = make_tensor((7,), seed=3, requires_grad=True)
    with fastdl.use_backend("triton"):
        loss = fastdl.functional.linear_cross_entropy(x, w, torch.arange(5), b)
    assert _backward_fills(loss, [(5, 3), (7, 3), (7,)]) == []


def test_zero_fill_counter_sees_autograds_materialized_gradients():
    # The counter itself: an autograd.Function with materialize_grads on (torch's default) gets a
    # zero-filled gradient for its unused output, and the counter records it.
    class TwoOutputs(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2, x * 3

        @staticmethod
        def backward(ctx, g1, g2):
            return g1 * 2 + g2 * 3

    x = torch.ones(4, 9, requires_grad=True)
    assert _backward_fills(TwoOutputs.apply(x)[0].sum(), [(4, 9)]) != []


# --- the "torch" entries: torch.func transforms and forward AD ------------------------------------

def _torch_entry_cases():
    x, w, b = make_tensor((4, 3), F64, seed=1), make_tensor((5, 3), F64, seed=2), make_tensor((5,), F64, seed=3)
    t = torch.tensor([0, 4, -100, 2])
    lin, ce, lce = (ops.get(name, "torch") for name in ("linear", "cross_entropy", "linear_cross_entropy"))
    return {
        # name: (fastdl's "torch" entry as f(x, w) -> tensor, torch's own, x, w)
        "linear": (lambda x, w: lin(x, w, b, "gelu", 0.01)[0], lambda x, w: F.gelu(F.linear(x, w, b)), x, w),
        "cross_entropy": (lambda x, w: ce(F.linear(x, w), t, None, -100, 0.1, "mean", True)[0],
                          lambda x, w: F.cross_entropy(F.linear(x, w), t, label_smoothing=0.1), x, w),
        "linear_cross_entropy": (lambda x, w: lce(x, w, b, t, -100, 0.1, "sum", True, True, False)[0],
                                 lambda x, w: F.cross_entropy(F.linear(x, w, b), t, label_smoothing=0.1,
                                                              reduction="sum"), x, w),
    }


@pytest.mark.parametrize("name", ["linear", "cross_entropy", "linear_cross_entropy"])
def test_torch_entry_under_torch_func(name):
    fn, torch_fn, x, w = _torch_entry_cases()[name]
    close = dict(rtol=1e-10, atol=1e-12)
    scalar = (lambda f: (lambda x, w: f(x, w).sum()))
    # torch.func.grad of a loss
    for argnums in (0, 1):
        torch.testing.assert_close(torch.func.grad(scalar(fn), argnums)(x, w),
                                   torch.func.grad(scalar(torch_fn), argnums)(x, w), **close)
    # jacrev
    torch.testing.assert_close(torch.func.jacrev(fn, 1)(x, w), torch.func.jacrev(torch_fn, 1)(x, w), **close)
    # vmap over a batch of inputs, and per-sample gradients (vmap of grad)
    xs = torch.stack([x, 2 * x, x - 1])
    torch.testing.assert_close(torch.func.vmap(fn, (0, None))(xs, w), torch.func.vmap(torch_fn, (0, None))(xs, w),
                               **close)
    per_sample = lambda f: torch.func.vmap(torch.func.grad(scalar(f), 1), (0, None))  # noqa: E731
    torch.testing.assert_close(per_sample(fn)(xs, w), per_sample(torch_fn)(xs, w), **close)
    # forward-mode AD: torch.func.jvp and torch.autograd.forward_ad
    tx, tw = make_tensor(x.shape, F64, seed=7), make_tensor(w.shape, F64, seed=8)
    got, want = torch.func.jvp(fn, (x, w), (tx, tw)), torch.func.jvp(torch_fn, (x, w), (tx, tw))
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, **close)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(fn(fwAD.make_dual(x, tx), w)).tangent
    torch.testing.assert_close(tangent, torch.func.jvp(lambda x: torch_fn(x, w), (x,), (tx,))[1], **close)


def test_torch_entries_return_the_ops_outputs():
    x, w, b = make_tensor((4, 3)), make_tensor((5, 3), seed=1), make_tensor((5,), seed=2)
    t = torch.tensor([0, 4, 1, 2])
    out, saved = ops.get("linear", "torch")(x, w, b, "relu", 0.01)
    torch.testing.assert_close(out, F.relu(F.linear(x, w, b)), rtol=1e-6, atol=1e-6)
    assert saved.numel() == 0
    loss, grad = ops.get("cross_entropy", "torch")(F.linear(x, w), t, None, -100, 0.0, "none", True)
    assert loss.shape == (4,) and grad.numel() == 0
    loss, *grads = ops.get("linear_cross_entropy", "torch")(x, w, b, t, -100, 0.0, "mean", True, True, True)
    assert loss.shape == () and len(grads) == 3 and all(g.numel() == 0 for g in grads)


# --- the op table ---------------------------------------------------------------------------------

def test_ops_get_defines_each_op_once_and_rejects_unknown_names():
    for name in ops.OP_NAMES:
        for backend in ("triton", "cupy", "reference"):
            op = ops.get(name, backend)
            assert op is ops.get(name, backend)
            assert hasattr(torch.ops.fastdl, f"{name}_{backend}")
    with pytest.raises(ValueError, match="unknown op"):
        ops.get("conv3d", "triton")
    with pytest.raises(ValueError, match="unknown backend"):
        ops.get("linear", "numpy")


def test_import_fastdl_defines_no_op_and_imports_no_inductor():
    code = ("import os, sys; before = {k for k in os.environ if k.startswith('TORCHINDUCTOR')}; import fastdl; "
            "print('torch._inductor' in sys.modules, hasattr(sys.modules['torch'].ops.fastdl, 'linear_triton'), "
            "sorted({k for k in os.environ if k.startswith('TORCHINDUCTOR')} - before))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHINDUCTOR")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.split("\n")[0] == "False False []", result.stdout + result.stderr


def test_first_use_inside_torch_compile_fullgraph():
    # The op is defined while Dynamo traces its first call (fastdl.ops._define is marked as
    # torch.compiler.assume_constant_result marks; checked against torch's own marker here).
    marked = torch.compiler.assume_constant_result(lambda: None)
    assert set(vars(marked)) == {"_dynamo_marked_constant"} and ops._define._dynamo_marked_constant
    code = """if True:
        import torch, fastdl
        x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
        w = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
        t = torch.tensor([0, 2, 1, 4])
        step = lambda x, w: (fastdl.functional.cross_entropy(x, t, label_smoothing=0.1)
                             + fastdl.functional.linear(x, w, activation="tanh").sum())
        with fastdl.use_backend("reference"):
            out = torch.compile(step, fullgraph=True, backend="aot_eager")(x, w)
        out.backward()
        x2, w2 = x.detach().requires_grad_(), w.detach().requires_grad_()
        want = (torch.nn.functional.cross_entropy(x2, t, label_smoothing=0.1)
                + torch.tanh(torch.nn.functional.linear(x2, w2)).sum())
        want.backward()
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-12, atol=1e-12)
        print("ok")
    """
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
