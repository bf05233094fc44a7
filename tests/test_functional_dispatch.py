"""How a call reaches its op, beyond the first plain call (issue #6): torch's function dispatch (fx
tracing, TorchFunctionModes), torch.func transforms and forward-mode AD (the op's "torch" entry),
torch.compile with bad targets, integer-like arguments, and no NumPy warnings where torch prints none.

Each test failed before the rule it checks was written into fastdl.functional._checks or the
reference backend.
"""
import warnings

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import fastdl
from fastdl.testing import make_tensor

F64 = dict(rtol=1e-10, atol=1e-12)
ACTIVATIONS = [a for a in fastdl.functional.ACTIVATIONS if a is not None]
TORCH_ACT = fastdl.functional._TORCH_ACTIVATIONS


class Head(torch.nn.Module):
    """A model holding fastdl modules and calling fastdl.functional directly, as a user's would."""

    def __init__(self):
        super().__init__()
        self.hidden = fastdl.nn.Linear(5, 6, activation="gelu", dtype=torch.float64)
        self.out = fastdl.nn.Linear(6, 4, dtype=torch.float64)
        self.loss = fastdl.nn.CrossEntropyLoss(label_smoothing=0.1)

    def forward(self, x, target):
        z = fastdl.functional.linear(self.hidden(x), self.out.weight, self.out.bias, activation="tanh")
        return self.loss(z, target) + fastdl.functional.linear_cross_entropy(x, self.hidden.weight, target)


def head_inputs():
    return make_tensor((7, 5), torch.float64, seed=3), torch.tensor([0, 3, 1, 2, 2, 0, 1])


# --- torch function dispatch -------------------------------------------------------------------

def test_fx_symbolic_trace_sees_fastdl_calls_and_runs_them():
    model = Head()
    traced = torch.fx.symbolic_trace(model)
    targets = {node.target for node in traced.graph.nodes if node.op == "call_function"}
    assert {fastdl.functional.linear, fastdl.functional.cross_entropy,
            fastdl.functional.linear_cross_entropy} <= targets
    x, target = head_inputs()
    torch.testing.assert_close(traced(x, target), model(x, target), **F64)


def test_torch_function_mode_sees_fastdl_calls():
    seen = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    x, target = head_inputs()
    with Record():
        Head()(x, target)
    assert fastdl.functional.linear in seen and fastdl.functional.cross_entropy in seen
    assert fastdl.functional.linear_cross_entropy in seen


def test_tensor_subclass_reaches_its_torch_function():
    class Tagged(torch.Tensor):
        calls = []

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            cls.calls.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    x = make_tensor((3, 4), torch.float64, seed=1).as_subclass(Tagged)
    fastdl.functional.linear(x, make_tensor((2, 4), torch.float64, seed=2))
    assert fastdl.functional.linear in Tagged.calls


# --- torch.func and forward AD -----------------------------------------------------------------

def mlp_loss(fns, x, w1, b1, w2, target, activation):
    linear, ce = fns
    return ce(linear(linear(x, w1, b1, activation), w2, None, None), target)


FASTDL = (lambda x, w, b, a: fastdl.functional.linear(x, w, b, activation=a),
          lambda z, t: fastdl.functional.cross_entropy(z, t, label_smoothing=0.1))
TORCH = (lambda x, w, b, a: TORCH_ACT[a](F.linear(x, w, b), 0.01),
         lambda z, t: F.cross_entropy(z, t, label_smoothing=0.1))


def mlp_params(seed=0):
    return (make_tensor((6, 5), torch.float64, seed=seed), make_tensor((4, 5), torch.float64, seed=seed + 1),
            make_tensor((4,), torch.float64, seed=seed + 2), make_tensor((3, 4), torch.float64, seed=seed + 3),
            torch.tensor([0, 2, 1, 1, 2, 0]))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_torch_func_grad_through_linear_and_cross_entropy(activation):
    x, w1, b1, w2, t = mlp_params()
    for argnums in (0, (1, 2, 3)):
        got = torch.func.grad(lambda *a: mlp_loss(FASTDL, *a, t, activation), argnums=argnums)(x, w1, b1, w2)
        want = torch.func.grad(lambda *a: mlp_loss(TORCH, *a, t, activation), argnums=argnums)(x, w1, b1, w2)
        torch.testing.assert_close(got, want, **F64)


def test_per_sample_gradients_with_vmap_and_functional_call():
    model = torch.nn.Sequential(fastdl.nn.Linear(5, 4, activation="relu", dtype=torch.float64),
                                fastdl.nn.Linear(4, 3, dtype=torch.float64))
    reference = torch.nn.Sequential(torch.nn.Linear(5, 4, dtype=torch.float64), torch.nn.ReLU(),
                                    torch.nn.Linear(4, 3, dtype=torch.float64))
    reference.load_state_dict({k.replace("1.", "2."): v for k, v in model.state_dict().items()})
    x, target = make_tensor((6, 5), torch.float64, seed=4), torch.tensor([0, 2, 1, 1, 2, 0])

    def per_sample(module, loss):
        params = {k: v.detach() for k, v in module.named_parameters()}

        def one(p, xi, ti):
            return loss(torch.func.functional_call(module, p, (xi[None],)), ti[None])

        return torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(params, x, target)

    got = per_sample(model, fastdl.functional.cross_entropy)
    want = per_sample(reference, F.cross_entropy)
    for name, grads in got.items():
        torch.testing.assert_close(grads, want[name.replace("1.", "2.")], **F64)


def test_vmap_and_jacrev_over_every_op():
    x, w1, b1, w2, t = mlp_params(seed=5)
    got = torch.func.vmap(lambda z, ti: fastdl.functional.cross_entropy(z, ti))(x @ w1.T, t)
    torch.testing.assert_close(got, torch.func.vmap(F.cross_entropy)(x @ w1.T, t), **F64)
    got = torch.func.jacrev(lambda w: fastdl.functional.linear(x, w, b1, activation="silu"))(w1)
    torch.testing.assert_close(got, torch.func.jacrev(lambda w: F.silu(F.linear(x, w, b1)))(w1), **F64)
    got = torch.func.jacrev(lambda w: fastdl.functional.linear_cross_entropy(x, w, t, reduction="none"))(w1)
    torch.testing.assert_close(got, torch.func.jacrev(lambda w: F.cross_entropy(F.linear(x, w), t,
                                                                                reduction="none"))(w1), **F64)


def test_forward_ad_counts_fastdl_terms():
    # The example: the JVP of ce(linear(x, w), t) + (x**2).sum() once counted only the torch term.
    x, w1, b1, w2, t = mlp_params(seed=6)
    tangent = make_tensor(x.shape, torch.float64, seed=9)
    results = []
    for linear, ce in (FASTDL, TORCH):
        with fwAD.dual_level():
            xd = fwAD.make_dual(x, tangent)
            y = ce(linear(xd, w1, b1, "gelu"), t) + (xd ** 2).sum()
            results.append(fwAD.unpack_dual(y).tangent)
        results.append(torch.func.jvp(lambda v: fastdl.functional.linear_cross_entropy(v, w1, t), (x,), (tangent,))[1])
    got, got_lce, want, want_lce = results
    torch.testing.assert_close(got, want, **F64)
    torch.testing.assert_close(got_lce, torch.func.jvp(lambda v: F.cross_entropy(F.linear(v, w1), t), (x,),
                                                       (tangent,))[1], **F64)


# --- compiled code rejects bad targets ---------------------------------------------------------

@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy"])
def test_compiled_bad_target_raises_index_error(op):
    torch._dynamo.reset()
    x, w = make_tensor((3, 4), torch.float32, seed=1), make_tensor((5, 4), torch.float32, seed=2)
    if op == "cross_entropy":
        fn = torch.compile(lambda t: fastdl.functional.cross_entropy(x @ w.T, t), fullgraph=True, backend="eager")
    else:
        fn = torch.compile(lambda t: fastdl.functional.linear_cross_entropy(x, w, t), fullgraph=True, backend="eager")
    with fastdl.use_backend("reference"):
        fn(torch.tensor([0, 4, 1]))  # a good target compiles and runs
        with pytest.raises(IndexError, match="Target -1 is out of bounds"):
            fn(torch.tensor([0, -1, 1]))
        with pytest.raises(IndexError, match="Target 5 is out of bounds"):
            fn(torch.tensor([5, 0, 1]))


# --- argument types ----------------------------------------------------------------------------

@pytest.mark.parametrize("ignore_index", [np.int64(1), np.int32(1), torch.tensor(1), 1])
def test_ignore_index_takes_integer_likes(ignore_index):
    x, t = make_tensor((4, 3), torch.float64, seed=1), torch.tensor([0, 1, 2, 1])
    want = F.cross_entropy(x, t, ignore_index=ignore_index)
    torch.testing.assert_close(fastdl.functional.cross_entropy(x, t, ignore_index=ignore_index), want, **F64)
    w = make_tensor((3, 5), torch.float64, seed=2)
    got = fastdl.functional.linear_cross_entropy(make_tensor((4, 5), torch.float64, seed=3), w, t,
                                                 ignore_index=ignore_index)
    assert got.isfinite()


@pytest.mark.parametrize("ignore_index", [True, 1.0, "1"])
def test_ignore_index_rejects_what_torch_rejects(ignore_index):
    x, t = make_tensor((4, 3), torch.float64, seed=1), torch.tensor([0, 1, 2, 1])
    with pytest.raises(TypeError):
        F.cross_entropy(x, t, ignore_index=ignore_index)
    with pytest.raises(TypeError, match="ignore_index"):
        fastdl.functional.cross_entropy(x, t, ignore_index=ignore_index)
    with pytest.raises(TypeError, match="ignore_index"):
        fastdl.functional.linear_cross_entropy(x, make_tensor((5, 3), torch.float64, seed=2), t,
                                               ignore_index=ignore_index)


# --- no NumPy warnings where torch prints none --------------------------------------------------

SPECIALS = torch.tensor([[float("inf"), -float("inf"), float("nan"), 1.0], [1e308, -1e308, 0.0, -2.0]],
                        dtype=torch.float64)


@pytest.mark.parametrize("activation", fastdl.functional.ACTIVATIONS)
def test_reference_backend_warns_no_more_than_torch(activation):
    w = torch.eye(4, dtype=torch.float64)
    with fastdl.use_backend("reference"), warnings.catch_warnings():
        warnings.simplefilter("error")
        x = SPECIALS.clone().requires_grad_()
        out = fastdl.functional.linear(x, w, activation=activation)
        out.backward(torch.ones_like(out))
        z = SPECIALS.clone().requires_grad_()
        fastdl.functional.cross_entropy(z, torch.tensor([0, 2]), label_smoothing=0.1).backward()
    want = TORCH_ACT[activation](F.linear(SPECIALS, w), 0.01)
    torch.testing.assert_close(out.detach(), want, equal_nan=True, **F64)


def test_every_reference_launcher_is_quiet():
    from fastdl.backends import reference

    launchers = [name for name in dir(reference) if name.endswith(("_fwd", "_bwd", "_accumulate"))]
    assert len(launchers) >= 5
    assert all(getattr(getattr(reference, name), "fastdl_launcher", False) for name in launchers), launchers


def test_triton_interpreter_warns_no_more_than_torch():
    z = SPECIALS.clone().requires_grad_()
    with fastdl.use_backend("triton"), warnings.catch_warnings():
        warnings.simplefilter("error")
        fastdl.functional.cross_entropy(z, torch.tensor([0, 2]), label_smoothing=0.1).backward()
        fastdl.functional.linear(SPECIALS, torch.eye(4, dtype=torch.float64), activation="gelu")


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_no_classes_give_torchs_results(backend, reduction):
    # Every target ignored and no classes at all: torch's eps / C makes every loss nan with label
    # smoothing (the kernels' empty-row path returned 0, the reference raised ZeroDivisionError).
    x = make_tensor((3, 4), torch.float64, seed=1)
    w, t = torch.zeros((0, 4), dtype=torch.float64), torch.full((3,), -100)
    for smoothing in (0.0, 0.1):
        with fastdl.use_backend(backend):
            got = fastdl.functional.linear_cross_entropy(x, w, t, reduction=reduction, label_smoothing=smoothing)
            got_ce = fastdl.functional.cross_entropy(x @ w.T, t, reduction=reduction, label_smoothing=smoothing)
        want = F.cross_entropy(x @ w.T, t, reduction=reduction, label_smoothing=smoothing)
        torch.testing.assert_close(got, want, equal_nan=True, **F64)
        torch.testing.assert_close(got_ce, want, equal_nan=True, **F64)
