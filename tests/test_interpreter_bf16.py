"""bf16 on the triton backend through Triton's interpreter (CPU): computed in float32 at each launcher's
boundary and rounded to bf16 (fastdl/backends/triton/_launch.py), so it agrees with the float64
reference on the same bf16-rounded inputs to bf16's tolerance. Without that policy the interpreter's
own bf16 loads and dot products gave ~1e10 where the answer is ~6."""
import inspect

import numpy as np
import pytest
import torch

import fastdl
from fastdl import testing
from fastdl.reference import cross_entropy as ref_ce
from fastdl.reference import linear as ref_linear

BF16 = torch.bfloat16
pytestmark = pytest.mark.skipif(torch.cuda.is_available() or "triton" not in fastdl.available_backends(),
                                reason="runs the triton backend on CPU tensors through Triton's interpreter")


@pytest.fixture(autouse=True)
def triton_backend():
    with fastdl.use_backend("triton"):
        yield


def np64(t):
    return None if t is None else t.detach().double().numpy()


def test_every_public_launcher_declares_its_bf16_policy():
    from fastdl.backends import triton as launchers

    names = [name for name, value in vars(launchers).items()
             if not name.startswith("_") and inspect.isfunction(value)
             and value.__module__.startswith("fastdl.backends.triton.")]
    required = {"linear_fwd", "linear_bwd", "cross_entropy_fwd", "cross_entropy_bwd", "linear_grad_weight_accumulate"}
    assert required <= set(names)
    assert {n for n in names if n.endswith(("_fwd", "_bwd"))} <= set(names)
    missing = [name for name in names if not hasattr(getattr(launchers, name), "interpreter_bf16")]
    assert not missing, f"launchers without @interpreter_bf16: {missing}"


# --- linear -------------------------------------------------------------------------------------------

def check_linear(x, w, b, activation, out, grads, g):
    expected, saved = ref_linear.forward(np64(x), np64(w), np64(b), activation, 0.01)
    testing.assert_close(out, expected, BF16, name=f"out {activation}")
    assert out.dtype == BF16
    for name, got, want in zip(("grad_input", "grad_weight", "grad_bias"), grads, ref_linear.backward(np64(g), saved)):
        if want is not None:
            assert got.dtype == BF16
            testing.assert_close(got, want, BF16, name=f"{name} {activation}")


@pytest.mark.parametrize("activation", fastdl.functional.ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_linear(activation, bias):
    x = testing.make_tensor((9, 13), BF16, seed=1, requires_grad=True)
    w = testing.make_tensor((6, 13), BF16, seed=2, scale=13 ** -0.5, requires_grad=True)
    b = testing.make_tensor((6,), BF16, seed=3, requires_grad=True) if bias else None
    g = testing.make_tensor((9, 6), BF16, seed=4)
    out = fastdl.functional.linear(x, w, b, activation=activation)
    out.backward(g)
    check_linear(x, w, b, activation, out, (x.grad, w.grad, None if b is None else b.grad), g)


def test_linear_noncontiguous_input():
    x = testing.make_tensor((7, 10), BF16, seed=1, noncontiguous=True).requires_grad_()
    w = testing.make_tensor((5, 10), BF16, seed=2, scale=10 ** -0.5, requires_grad=True)
    b = testing.make_tensor((5,), BF16, seed=3, requires_grad=True)
    g = testing.make_tensor((7, 5), BF16, seed=4)
    assert not x.is_contiguous()
    out = fastdl.functional.linear(x, w, b, activation="gelu_tanh")
    out.backward(g)
    check_linear(x, w, b, "gelu_tanh", out, (x.grad, w.grad, b.grad), g)


def test_nn_linear_bf16():
    torch.manual_seed(0)
    layer = fastdl.nn.Linear(11, 4, dtype=BF16)
    x = testing.make_tensor((3, 5, 11), BF16, seed=1, requires_grad=True)
    g = testing.make_tensor((3, 5, 4), BF16, seed=2)
    out = layer(x)
    out.backward(g)
    x2 = x.reshape(15, 11)
    check_linear(x2, layer.weight, layer.bias, None, out.reshape(15, 4),
                 (x.grad.reshape(15, 11), layer.weight.grad, layer.bias.grad), g.reshape(15, 4))


def test_linear_under_cpu_autocast():
    # Plain float32 code: autocast's CPU default is bf16, so the kernels see bf16 tensors.
    x = testing.make_tensor((8, 12), seed=1, requires_grad=True)
    w = testing.make_tensor((7, 12), seed=2, scale=12 ** -0.5, requires_grad=True)
    b = testing.make_tensor((7,), seed=3, requires_grad=True)
    g = testing.make_tensor((8, 7), seed=4)
    with torch.autocast("cpu"):
        assert torch.get_autocast_dtype("cpu") == BF16
        out = fastdl.functional.linear(x, w, b, activation="silu")
    assert out.dtype == BF16
    out.backward(g)
    xb, wb, bb, gb = (t.detach().to(BF16) for t in (x, w, b, g))
    expected, saved = ref_linear.forward(np64(xb), np64(wb), np64(bb), "silu", 0.01)
    testing.assert_close(out, expected, BF16, name="out")
    for name, got, want in zip(("grad_input", "grad_weight", "grad_bias"), (x.grad, w.grad, b.grad),
                               ref_linear.backward(np64(gb.to(BF16)), saved)):
        assert got.dtype == torch.float32
        testing.assert_close(got, want, BF16, name=name)


# --- cross_entropy ------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["index+weight+ignore", "smoothing-none", "prob"])
def test_cross_entropy(case):
    R, C = 6, 37
    x = testing.make_tensor((R, C), BF16, seed=1, scale=3.0, requires_grad=True)
    gen = torch.Generator().manual_seed(2)
    if case == "prob":
        target = torch.softmax(testing.make_tensor((R, C), torch.float64, seed=3), 1).to(BF16)
    else:
        target = torch.randint(0, C, (R,), generator=gen)
        target[::4] = -100
    weight = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).to(BF16) if case.startswith("index") else None
    smoothing = 0.0 if case.startswith("index") else 0.1
    reduction = "none" if case.startswith("smoothing") else "mean"
    loss = fastdl.functional.cross_entropy(x, target, weight, reduction=reduction, label_smoothing=smoothing)
    g = testing.make_tensor(loss.shape, BF16, seed=4) if loss.dim() else torch.ones((), dtype=BF16)
    loss.backward(g)
    expected, saved = ref_ce.forward(np64(x), np64(target) if case == "prob" else target.numpy(), np64(weight),
                                     -100, reduction, smoothing)
    assert loss.dtype == BF16 and x.grad.dtype == BF16
    testing.assert_close(loss, expected, BF16, name="loss")
    testing.assert_close(x.grad, ref_ce.backward(np64(g), saved)[0], BF16, name="grad_input")


def test_cross_entropy_leaves_callers_logits_alone():
    x = testing.make_tensor((4, 9), BF16, seed=1, requires_grad=True)
    before = x.detach().clone()
    fastdl.functional.cross_entropy(x, torch.tensor([0, 3, 8, 1])).backward()
    assert torch.equal(x.detach(), before)


# --- linear_cross_entropy -----------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy(reduction, monkeypatch):
    monkeypatch.setenv("FASTDL_LINEAR_CE_CHUNK_ROWS", "3")  # 11 rows: four chunks, the last one short
    N, H, V = 11, 10, 17
    x = testing.make_tensor((N, H), BF16, seed=1, requires_grad=True)
    w = testing.make_tensor((V, H), BF16, seed=2, scale=3 * H ** -0.5, requires_grad=True)
    b = testing.make_tensor((V,), BF16, seed=3, requires_grad=True)
    target = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(4))
    target[::5] = -100
    loss = fastdl.functional.linear_cross_entropy(x, w, target, b, reduction=reduction, label_smoothing=0.1)
    g = testing.make_tensor(loss.shape, BF16, seed=5) if loss.dim() else torch.ones((), dtype=BF16)
    loss.backward(g)
    expected, saved = ref_ce.linear_forward(np64(x), np64(w), target.numpy(), np64(b), -100, reduction, 0.1)
    testing.assert_close(loss, expected, BF16, name="loss")
    for name, got, want in zip(("grad_input", "grad_weight", "grad_bias"), (x.grad, w.grad, b.grad),
                               ref_ce.linear_backward(np64(g), saved)):
        assert got.dtype == BF16
        testing.assert_close(got, np.asarray(want), BF16, name=name)


# --- the policy itself ------------------------------------------------------------------------------

def test_inplace_cross_entropy_returns_the_callers_tensor_updated():
    from fastdl.backends import triton as launchers

    logits = testing.make_tensor((5, 11), BF16, seed=1, scale=3.0)
    target = torch.tensor([0, 10, -100, 4, 7])
    expected_loss, saved = ref_ce.forward(np64(logits), target.numpy(), None, -100, "none", 0.0)
    version = logits._version
    loss_rows, grad = launchers.cross_entropy_fwd(logits, target, None, torch.ones((), dtype=torch.float32), -100, 0.0,
                                                  True, inplace=True)
    assert grad is logits and logits._version == version  # written as a kernel writes: no version bump
    assert loss_rows.dtype == torch.float32
    testing.assert_close(loss_rows, expected_loss, BF16, name="loss_rows")
    testing.assert_close(grad, ref_ce.backward(np.ones(5), saved)[0], BF16, name="grad_logits")


def test_policy_writes_back_only_what_changed_and_refuses_undeclared_writes():
    from fastdl.backends.triton._launch import interpreter_bf16

    @interpreter_bf16(results=("io", "acc"), mutates=("out",))
    def launcher(x, out, scratch, write_scratch=False):
        assert x.dtype == out.dtype == torch.float32  # the kernels only ever see float32 copies
        out.copy_(x * 3)
        if write_scratch:
            scratch.add_(1)
        return x * 2, (x * 2).sum()

    x, out, scratch = (testing.make_tensor((3, 4), BF16, seed=i) for i in range(3))
    doubled, total = launcher(x, out, scratch)
    assert doubled.dtype == BF16 and total.dtype == torch.float32
    assert torch.equal(out, (x.float() * 3).to(BF16))
    with pytest.raises(RuntimeError, match="does not declare"):
        launcher(x, out, scratch, write_scratch=True)
    assert launcher.interpreter_bf16.mutates == ("out",)


def test_on_a_gpu_launch_and_policy_are_torchs_and_the_launchers_own(monkeypatch):
    from fastdl.backends.triton import _launch
    from fastdl.kernels.triton import linear as kernels

    monkeypatch.setattr(_launch, "triton_interpreting", lambda: False)
    assert type(_launch.wrap_triton(kernels._linear_fwd)) is type(torch.library.wrap_triton(kernels._linear_fwd))
    seen = []

    @_launch.interpreter_bf16(results=("io",))
    def launcher(x):
        seen.append(x)
        return x

    x = testing.make_tensor((2, 3), BF16)
    assert launcher(x) is x and seen[0] is x
