"""fastdl.convert / revert on the primers' networks and on hand-written graphs: the same parameters and
state_dict, the fusions found, and the converted model's outputs, gradients and optimizer steps equal to
the original's (reference backend on CPU: float64 oracle, so float32 models agree to rounding)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdl
from fastdl import models
from fastdl.convert import convert, fused_summary, revert

TOL = dict(rtol=1e-4, atol=1e-5)  # float32 models: torch's float32 CPU kernels vs the float64 reference


def _has(name: str) -> bool:
    return hasattr(fastdl.nn, name)


def _train_steps(model, x, target, steps=3, loss_fn=F.cross_entropy):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


PRIMERS = [
    ("SimpleNN", lambda: models.SimpleNN(), (6, 64), ["fc1: Linear + activation='relu'"]),
    ("SigmoidMLP", lambda: models.SigmoidMLP(), (6, 64),
     ["layers.0: Linear + activation='sigmoid'", "layers.1: Linear + activation='sigmoid'"]),
    ("SimpleCNN", lambda: models.SimpleCNN(3, 10, 8), (2, 3, 8, 8),
     ["conv1: Conv2d + activation='relu'", "conv2: Conv2d + activation='relu'"]),
]
if _has("BatchNorm2d"):
    PRIMERS.append(("SmallResNet", lambda: models.SmallResNet(1, 10, (4, 8)), (3, 1, 8, 8), None))
if _has("Dropout"):
    PRIMERS.append(("KerasCNN", lambda: models.KerasCNN(1, 10, 28), (2, 1, 28, 28), None))


@pytest.mark.parametrize("name,make,shape,fused", PRIMERS, ids=[p[0] for p in PRIMERS])
def test_primer_networks_train_the_same(name, make, shape, fused):
    torch.manual_seed(0)
    original = make()
    twin = copy.deepcopy(original)
    converted = convert(twin)
    if fused is not None:
        assert fused_summary(converted) == fused
    assert list(converted.state_dict()) == list(original.state_dict())
    assert all(p is q for p, q in zip(converted.parameters(), twin.parameters()))
    x = torch.randn(shape)
    target = torch.randint(0, 10, (shape[0],))
    if name == "KerasCNN":  # dropout draws differ between torch and fastdl: compare in eval mode
        original.eval(), converted.eval()
    with fastdl.use_backend("reference"):
        got = _train_steps(converted, x, target)
    want = _train_steps(original, x, target)
    torch.testing.assert_close(got, want, **TOL)
    for (key, a), b in zip(converted.state_dict().items(), original.state_dict().values()):
        torch.testing.assert_close(a, b, **TOL, msg=key)


def test_input_and_parameter_gradients_match():
    torch.manual_seed(1)
    original = models.SimpleCNN(3, 10, 8)
    converted = convert(copy.deepcopy(original))
    x = torch.randn(2, 3, 8, 8)
    g = torch.randn(2, 10)
    grads = []
    for model, backend in ((converted, "reference"), (original, None)):
        xg = x.clone().requires_grad_()
        with fastdl.use_backend(backend):
            model(xg).backward(g)
        grads.append([xg.grad] + [p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **TOL)


def test_original_untouched_and_parameters_shared():
    model = models.SimpleNN()
    before = [type(m) for m in model.modules()]
    converted = convert(model)
    assert [type(m) for m in model.modules()] == before
    assert type(converted.fc1) is fastdl.nn.Linear and type(model.fc1) is nn.Linear
    assert converted.fc1.weight is model.fc1.weight
    # an optimizer made before conversion updates the converted model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with fastdl.use_backend("reference"):
        converted(torch.randn(3, 64)).sum().backward()
    w = model.fc1.weight.detach().clone()
    opt.step()
    assert not torch.equal(converted.fc1.weight, w)


def test_inplace_swaps_the_callers_modules_without_fusing_them():
    model = models.SigmoidMLP()
    x = torch.randn(4, 64)
    want = model(x)
    converted = convert(model, inplace=True)
    assert type(model.layers[0]) is fastdl.nn.Linear
    assert model.layers[0].activation is None  # the caller's forward still applies its own sigmoid
    assert converted.get_submodule("layers.0").activation == "sigmoid"
    with fastdl.use_backend("reference"):
        torch.testing.assert_close(model(x), want, **TOL)
        torch.testing.assert_close(converted(x), want, **TOL)


def test_revert_returns_the_source_and_state_dicts_load_both_ways():
    model = models.SimpleCNN(3, 10, 8)
    converted = convert(model)
    assert revert(converted) is model
    fresh = models.SimpleCNN(3, 10, 8)
    fresh.load_state_dict(converted.state_dict())
    converted.load_state_dict(fresh.state_dict())
    plain = convert(models.SimpleNN(), fuse=False)
    back = revert(fastdl.nn.Linear(3, 4))
    assert type(back) is nn.Linear
    assert type(revert(plain).fc1) is nn.Linear


def test_revert_refuses_a_fastdl_layer_with_a_fused_extra():
    with pytest.raises(ValueError, match="fastdl.revert: Linear has activation fused"):
        revert(nn.Sequential(fastdl.nn.Linear(3, 4, activation="relu")))


def test_functional_activations_and_methods_fuse():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.d, self.e = (nn.Linear(5, 5) for _ in range(5))

        def forward(self, x):
            x = torch.relu(self.a(x))
            x = F.leaky_relu(self.b(x), 0.2)
            x = self.c(x).tanh()
            x = F.gelu(self.d(x), approximate="tanh")
            return F.silu(self.e(x))

    model = Net()
    converted = convert(model)
    assert fused_summary(converted) == ["a: Linear + activation='relu'", "b: Linear + activation='leaky_relu'",
                                        "c: Linear + activation='tanh'", "d: Linear + activation='gelu_tanh'",
                                        "e: Linear + activation='silu'"]
    assert converted.b.negative_slope == 0.2
    x = torch.randn(3, 5)
    with fastdl.use_backend("reference"):
        torch.testing.assert_close(converted(x), model(x), **TOL)


def test_no_fusion_when_the_output_has_another_user_or_the_layer_is_shared():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)

        def forward(self, x):
            y = self.a(x)
            z = F.relu(self.b(x))
            return F.relu(y) + y + F.relu(self.b(z))  # y used twice; b called twice

    model = Net()
    converted = convert(model)
    assert fused_summary(converted) == []
    x = torch.randn(2, 4)
    with fastdl.use_backend("reference"):
        torch.testing.assert_close(converted(x), model(x), **TOL)


def test_untraceable_model_falls_back_to_the_swap_with_a_warning():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return F.relu(self.fc(x)) if x.sum() > 0 else self.fc(x)

    with pytest.warns(UserWarning, match="could not trace Branchy"):
        converted = convert(Branchy())
    assert type(converted.fc) is fastdl.nn.Linear and converted.fc.activation is None


def test_subclasses_are_left_alone_with_a_warning():
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(MyLinear(3, 3), nn.Linear(3, 3))
    with pytest.warns(UserWarning, match=r"0 \(.*MyLinear\)"):
        converted = convert(model)
    assert type(converted.get_submodule("0")) is MyLinear and type(converted.get_submodule("1")) is fastdl.nn.Linear


def test_a_converted_model_converts_again_and_user_fx_passes_trace_fastdl_layers():
    converted = convert(models.SimpleNN())
    again = convert(converted)
    assert fused_summary(again) == ["fc1: Linear + activation='relu'"]
    traced = torch.fx.symbolic_trace(nn.Sequential(fastdl.nn.Linear(3, 4), nn.ReLU()))
    assert any(n.target is fastdl.functional.linear for n in traced.graph.nodes)
    x = torch.randn(2, 3)
    with fastdl.use_backend("reference"):
        torch.testing.assert_close(again(x.new_ones(2, 64)), converted(x.new_ones(2, 64)), **TOL)


def test_bad_input():
    with pytest.raises(TypeError, match="fastdl.convert: expected a torch.nn.Module, got int"):
        convert(3)
    with pytest.raises(TypeError, match="fastdl.revert"):
        revert("model")
    with pytest.raises(ValueError, match="inference only"):
        convert(models.SimpleCNN(), fold_batchnorm=True)


def test_warnings_are_quiet_for_plain_models():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert(models.SimpleCNN(3, 10, 8))
