"""Every autotune config's block sizes run under Triton's interpreter (issue #7).

The interpreter keeps only the first config of an autotuned kernel (running every trial would run
the whole kernel once per config on the CPU), so without this file the other configs' masking and
loop bounds (a 256-row tile over 300 rows, a 64-wide reduction block over K=130) were never executed
anywhere. Each test pins one config on the kernel and checks the results against the float64
reference at a shape that is not a multiple of any block size.
"""
import pytest
import torch

import fastdl
from fastdl.kernels.triton import linear as linear_kernels
from fastdl.reference import linear as ref
from fastdl.testing import assert_close, make_tensor

# (kernel, its reduction block): the four autotuned matmuls.
KERNELS = {
    "linear_fwd": (linear_kernels._linear_fwd, "BLOCK_K"),
    "linear_bwd_input": (linear_kernels._linear_bwd_input, "BLOCK_N"),
    "linear_bwd_weight": (linear_kernels._linear_bwd_weight, "BLOCK_M"),
    "linear_grad_weight_accumulate": (linear_kernels._linear_grad_weight_accumulate, "BLOCK_M"),
}
CONFIGS = linear_kernels.matmul_configs(every=True)
M, K, N = 300, 130, 200  # spans several 64-blocks and part of a 256-block in every dimension


def _config_id(index):
    c = CONFIGS[index]
    return "x".join(str(v) for v in (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]))


def test_the_interpreter_would_otherwise_run_one_config():
    for kernel, _ in KERNELS.values():
        assert len(kernel.configs) == 1
    assert len(CONFIGS) == 8


def _pin(monkeypatch, names, index):
    pinned = []
    for name in names:
        kernel, reduction_block = KERNELS[name]
        config = linear_kernels.matmul_configs(reduction_block, every=True)[index]
        monkeypatch.setattr(kernel, "configs", [config])
        monkeypatch.setattr(kernel, "cache", {})
        monkeypatch.setattr(kernel, "best_config", None, raising=False)
        pinned.append((kernel, config))
    return pinned


def _ran(pinned):
    """Each kernel ran, with the config pinned on it (the autotuner records what it launched)."""
    for kernel, config in pinned:
        assert kernel.best_config is config


def _inputs():
    x = make_tensor((M, K), torch.float32, seed=1)
    w = make_tensor((N, K), torch.float32, seed=2, scale=K ** -0.5)
    b = make_tensor((N,), torch.float32, seed=3)
    g = make_tensor((M, N), torch.float32, seed=4)
    return x, w, b, g


@pytest.mark.parametrize("index", range(len(CONFIGS)), ids=_config_id)
def test_linear_forward_and_backward_with_every_config(monkeypatch, index):
    # Config `index` pinned on all three of linear's kernels (the same tile shape, each with its own
    # reduction block), so one forward + backward runs it in each.
    pinned = _pin(monkeypatch, ("linear_fwd", "linear_bwd_input", "linear_bwd_weight"), index)
    x, w, b, g = _inputs()
    out, saved = ref.forward(x.double().numpy(), w.double().numpy(), b.double().numpy(), "gelu")
    grad_x, grad_w, grad_b = ref.backward(g.double().numpy(), saved)
    xx, ww, bb = (t.clone().requires_grad_() for t in (x, w, b))
    with fastdl.use_backend("triton"):
        y = fastdl.functional.linear(xx, ww, bb, activation="gelu")
        y.backward(g)
    _ran(pinned)
    assert_close(y, out, torch.float32, name="out")
    assert_close(xx.grad, grad_x, torch.float32, name="grad_input")
    assert_close(ww.grad, grad_w, torch.float32, name="grad_weight")
    assert_close(bb.grad, grad_b, torch.float32, name="grad_bias")


@pytest.mark.parametrize("index", range(len(CONFIGS)), ids=_config_id)
def test_grad_weight_accumulate_with_every_config(monkeypatch, index):
    from fastdl.backends import triton as launchers

    pinned = _pin(monkeypatch, ("linear_grad_weight_accumulate",), index)
    x, _, _, g = _inputs()
    start_w, start_b = make_tensor((N, K), torch.float32, seed=5), make_tensor((N,), torch.float32, seed=6)
    acc_w, acc_b = start_w.clone(), start_b.clone()
    launchers.linear_grad_weight_accumulate(g, x, acc_w, acc_b)
    _ran(pinned)
    g64 = g.double()
    assert_close(acc_w, start_w.double() + g64.T @ x.double(), torch.float32, name="grad_weight")
    assert_close(acc_b, start_b.double() + g64.sum(0), torch.float32, name="grad_bias")
    # accumulate=False (linear_cross_entropy's first chunk): stores, whatever the buffers held.
    launchers.linear_grad_weight_accumulate(g, x, acc_w, acc_b, accumulate=False)
    assert_close(acc_w, g64.T @ x.double(), torch.float32, name="grad_weight stored")
    assert_close(acc_b, g64.sum(0), torch.float32, name="grad_bias stored")
