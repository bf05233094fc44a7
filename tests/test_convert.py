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
    ("SmallResNet", lambda: models.SmallResNet(1, 10, (4, 8)), (3, 1, 8, 8), None),
    ("KerasCNN", lambda: models.KerasCNN(1, 10, 28), (2, 1, 28, 28), None),
]


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


def test_resnet_block_fusions_and_running_statistics():
    torch.manual_seed(2)
    original = models.SmallResNet(1, 10, (4, 8))
    converted = convert(copy.deepcopy(original))
    summary = fused_summary(converted)
    assert "layers.0.bn2: BatchNorm2d + activation='relu', fused_residual=True" in summary
    assert "layers.1.bn2: BatchNorm2d + activation='relu', fused_residual=True" in summary
    assert "stem.1: BatchNorm2d + activation='relu'" in summary
    x = torch.randn(4, 1, 8, 8)
    g = torch.randn(4, 10)
    results = []
    for model, backend in ((converted, "reference"), (original, None)):
        xg = x.clone().requires_grad_()
        with fastdl.use_backend(backend):
            model(xg).backward(g)
            model.eval()
            evaluated = model(x)
            model.train()
        results.append([xg.grad, evaluated] + [p.grad for p in model.parameters()] + list(model.buffers()))
    for a, b in zip(*results):
        torch.testing.assert_close(a.double(), b.double(), **TOL)


def test_residual_that_broadcasts_runs_unfused():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x, bias):
            return F.relu(self.bn(x) + bias)  # bias (3, 1, 1) broadcasts: not a residual of the output's shape

    model = Net()
    converted = convert(copy.deepcopy(model))
    assert fused_summary(converted) == ["bn: BatchNorm2d + activation='relu', fused_residual=True"]
    x, bias = torch.randn(2, 3, 4, 4), torch.randn(3, 1, 1)
    with fastdl.use_backend("reference"):
        torch.testing.assert_close(converted(x, bias), model(x, bias), **TOL)


def test_dropout_fuses_into_the_linear_before_it():
    model = models.KerasCNN(1, 10, 28)
    converted = convert(model)
    assert "classifier.1: Linear + activation='relu', dropout=0.5" in fused_summary(converted)
    assert not any(isinstance(m, nn.Dropout) for m in converted.modules())
    x = torch.randn(2, 1, 28, 28)
    model.eval(), converted.eval()
    with fastdl.use_backend("reference"):
        torch.testing.assert_close(converted(x), model(x), **TOL)


def test_fold_batchnorm_for_inference():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1), model[1].running_var.uniform_(0.5, 2)
        model[1].weight.uniform_(0.5, 1.5), model[1].bias.uniform_(-1, 1)
    model.eval()
    converted = convert(model, fold_batchnorm=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in converted.modules())
    assert fused_summary(converted) == ["0: Conv2d + activation='relu'"]
    assert model[0].weight is not converted.get_submodule("0").weight  # the caller's conv is untouched
    x = torch.randn(2, 3, 6, 6)
    with fastdl.use_backend("reference"):
        torch.testing.assert_close(converted(x), model(x), **TOL)


def test_inplace_relu_after_batchnorm_unfused_channels_last():
    """fuse=False keeps torchvision-style nn.ReLU(inplace=True) calls on BatchNorm outputs."""
    model = models.resnet18(10).to(memory_format=torch.channels_last)
    model.layer3, model.layer4 = nn.Identity(), nn.Identity()
    model.fc = nn.Linear(128, 10)
    converted = convert(copy.deepcopy(model), fuse=False)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with fastdl.use_backend("reference"):
        out = converted(x)
        out.sum().backward()
    torch.testing.assert_close(out, model(x), **TOL)


def test_sync_batchnorm_and_cross_entropy_swap():
    model = nn.Sequential(nn.SyncBatchNorm(3), nn.CrossEntropyLoss())
    converted = convert(model, fuse=False)
    assert type(converted[0]) is fastdl.nn.SyncBatchNorm and type(converted[1]) is fastdl.nn.CrossEntropyLoss


def test_sigmoid_mlp_trains_with_mse_like_torch():
    torch.manual_seed(4)
    original = models.SigmoidMLP((64, 32, 10))
    converted = convert(copy.deepcopy(original))
    x, y = torch.rand(16, 64), F.one_hot(torch.randint(0, 10, (16,)), 10).float()
    with fastdl.use_backend("reference"):
        got = _train_steps(converted, x, y, steps=4, loss_fn=F.mse_loss)
    want = _train_steps(original, x, y, steps=4, loss_fn=F.mse_loss)
    torch.testing.assert_close(got, want, **TOL)


def test_digits_mlp_from_fastdl_nn_trains_with_adam_and_clipping():
    """The primers' MLP built from fastdl.nn (dropout 0.3 fused into each hidden Linear), CrossEntropyLoss,
    Adam and gradient clipping: the loss falls, and in eval mode it equals the same weights in torch."""
    torch.manual_seed(5)
    model = models.DigitsMLP(64, 10, dropout=0.3)
    assert [m.dropout for m in model if isinstance(m, fastdl.nn.Linear)] == [0.3, 0.3, 0.3, 0.0]
    loss_fn = fastdl.nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    losses = []
    with fastdl.use_backend("reference"):
        for _ in range(30):
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
        model.eval()
        got = model(x)
    assert losses[-1] < 0.5 * losses[0]
    twin = revert(nn.Sequential(*[fastdl.nn.Linear(m.in_features, m.out_features) if isinstance(m, fastdl.nn.Linear)
                                  else m for m in model]))
    for a, b in zip([m for m in twin if isinstance(m, nn.Linear)], [m for m in model if isinstance(m, nn.Linear)]):
        a.load_state_dict(b.state_dict())
    want = twin[4](F.relu(twin[3](F.relu(twin[2](F.relu(twin[1](x.flatten(1))))))))
    torch.testing.assert_close(got, want, **TOL)
