"""Depthwise conv2d (groups == in_channels) on the Triton backend: the direct stencil kernels of
kernels/triton/conv2d_depthwise.py, run through the interpreter from fastdl.functional.conv2d,
against the float64 reference (forward, grad_input, grad_weight, grad_bias with one random
grad_output). Every test also checks that the depthwise kernels ran and the implicit GEMM did not,
so a routing change in fastdl/backends/triton/conv2d.py fails here.

The kernels' block sizes are not autotuned: the launcher picks them from the channel count and the
kernel size (conv2d_depthwise.blocks / weight_blocks), so the shapes below are chosen to run the
tile shapes that matter: 8-, 16- and 32-wide channel blocks with and without a masked remainder,
16- and 32-tap grad_weight blocks, several tap blocks (MAX_BLOCK_T lowered), split pixel
reductions and the int64 row index (ROW64, forced).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastdl
from fastdl.backends.triton import conv2d as launcher
from fastdl.kernels.triton import conv2d_depthwise as _dw
from fastdl.reference import conv2d as ref
from fastdl.testing import assert_close, make_tensor
from test_conv2d import run_conv2d

DEPTHWISE = {"conv2d_depthwise_fwd", "conv2d_depthwise_bwd_input", "conv2d_depthwise_bwd_weight"}

# (N, C, H, W, K, R, S, stride, padding, dilation, groups, activation): the code path each exercises.
CASES = {
    # stride 1, padding 1: one phase, every tap reaches every pixel; relu's uint8 mask; 8-channel blocks
    "3x3-s1-p1": (2, 8, 6, 7, 8, 3, 3, 1, 1, 1, 8, "relu"),
    # stride 2 on odd H, W: grad_input's four stride phases, each skipping the taps that miss it;
    # leaky_relu's mask
    "3x3-s2-p1-odd": (2, 16, 9, 11, 16, 3, 3, 2, 1, 1, 16, "leaky_relu"),
    # 5x5 dilation 2: taps landing in the padding, a 32-tap grad_weight block with 25 used; gelu's
    # pre-activation saved
    "5x5-d2": (1, 12, 11, 10, 12, 5, 5, 1, 4, 2, 12, "gelu"),
    # channel multiplier 2 (K = 2C): output channel k reads input channel k // 2, grad_input sums two
    # outputs per channel (K_G loop); stride (2, 1); sigmoid differentiates through the output
    "multiplier2": (2, 6, 7, 6, 12, 3, 3, (2, 1), 1, 1, 6, "sigmoid"),
    # even kernel with padding="same": torch's asymmetric padding (1 before, 2 after); no activation
    "4x4-same": (1, 8, 7, 6, 8, 4, 4, 1, "same", 1, 8, None),
    # C = 37: 16-wide channel blocks, the last with 5 channels (the masked remainder); silu
    "C37": (1, 37, 5, 6, 37, 3, 3, 1, 1, 1, 37, "silu"),
    # one input channel, groups = 1 (C / groups == 1 as well): multiplier K_G = K = 5, 1-wide
    # grad_input blocks; tanh
    "C1-groups1": (2, 1, 6, 5, 5, 3, 3, 1, 1, 1, 1, "tanh"),
}


@pytest.fixture
def launched(monkeypatch):
    """Names of the kernels the conv2d launchers launch (recorded at wrap_triton)."""
    names = []
    wrap = launcher.wrap_triton

    def recording(kernel):
        names.append(getattr(kernel, "fn", kernel).__name__.lstrip("_"))
        return wrap(kernel)

    monkeypatch.setattr(launcher, "wrap_triton", recording)
    return names


def _check_routed(launched, sum_splits=False):
    assert DEPTHWISE <= set(launched), launched
    assert not {"conv2d_fwd", "conv2d_bwd_input", "conv2d_bwd_weight"} & set(launched), launched
    assert ("sum_splits" in launched) == sum_splits, launched


@pytest.mark.parametrize("case", CASES)
def test_fp32_channels_last(launched, case):
    # (C = 1: channels_last is contiguous's memory, and torch's output is contiguous then.)
    run_conv2d("triton", torch.float32, CASES[case], "contiguous" if CASES[case][1] == 1 else "channels_last")
    _check_routed(launched)


# fp16 on channels_last (the fast path), fp64 on NCHW (one layout change each way).
@pytest.mark.parametrize("dtype, case, layout", [
    (torch.float16, "3x3-s2-p1-odd", "channels_last"),
    (torch.float16, "multiplier2", "channels_last"),
    (torch.float64, "5x5-d2", "contiguous"),
    (torch.float64, "4x4-same", "contiguous"),
])
def test_fp16_fp64(launched, dtype, case, layout):
    run_conv2d("triton", dtype, CASES[case], layout)
    _check_routed(launched)


def test_bf16(launched):
    # bf16 runs in float32 under the interpreter, rounded at the launcher (tests/test_interpreter_bf16.py).
    run_conv2d("triton", torch.bfloat16, CASES["3x3-s1-p1"], "channels_last")
    _check_routed(launched)


@pytest.mark.parametrize("case", ["3x3-s2-p1-odd", "multiplier2"])
def test_noncontiguous_view(launched, case):
    run_conv2d("triton", torch.float32, CASES[case], "noncontiguous")
    _check_routed(launched)


@pytest.mark.parametrize("activation", [None, "relu"])
def test_without_bias(launched, activation):
    run_conv2d("triton", torch.float32, CASES["C37"], "channels_last", has_bias=False, activation=activation)
    _check_routed(launched)


def test_grad_weight_split_over_pixels_and_taps(monkeypatch, launched):
    # 5x5: 25 taps in four 8-tap blocks (grad_bias from block 0 only); 110 pixels in four 32-pixel
    # blocks over 3 splits of two blocks, so the last split is empty and writes zero partials.
    monkeypatch.setattr(launcher, "GRAD_WEIGHT_SPLITS", 3)
    monkeypatch.setattr(_dw, "MAX_BLOCK_T", 8)
    assert _dw.weight_blocks(12, 25, 4) == (8, 32, 16)
    run_conv2d("triton", torch.float32, CASES["5x5-d2"], "channels_last")
    _check_routed(launched, sum_splits=True)


def test_int64_row_index(monkeypatch, launched):
    monkeypatch.setattr(launcher, "INT32_MAX", 16)  # every launch takes ROW64
    run_conv2d("triton", torch.float32, CASES["3x3-s2-p1-odd"], "channels_last")
    _check_routed(launched)


def test_unbatched(launched):
    C, K = 10, 20  # multiplier 2
    x = make_tensor((C, 7, 9), torch.float32, seed=5).requires_grad_()
    w = make_tensor((K, 1, 3, 3), torch.float32, seed=6).requires_grad_()
    b = make_tensor((K,), torch.float32, seed=7).requires_grad_()
    with fastdl.use_backend("triton"):
        out = fastdl.functional.conv2d(x, w, b, 2, 1, groups=C, activation="relu")
    g = make_tensor(out.shape, torch.float32, seed=8)
    out.backward(g)
    stride, padding, dilation, groups = ref.normalize_args((3, 3), 2, 1, 1, C)
    expected, saved = ref.forward(x.detach().double().numpy()[None], w.detach().double().numpy(),
                                  b.detach().double().numpy(), stride, padding, dilation, groups, "relu", 0.01)
    grad_x, grad_w, grad_b = ref.backward(g.double().numpy()[None], saved)
    assert out.shape == expected.shape[1:]
    assert_close(out, expected[0], torch.float32, name="out")
    assert_close(x.grad, grad_x[0], torch.float32, name="grad_input")
    assert_close(w.grad, grad_w, torch.float32, name="grad_weight")
    assert_close(b.grad, grad_b, torch.float32, name="grad_bias")
    _check_routed(launched)


def test_empty_batch():
    # N == 0: no kernel runs (fastdl.functional); torch's shapes and zero weight / bias gradients.
    x = torch.empty((0, 6, 5, 5)).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = make_tensor((6, 1, 3, 3), torch.float32, seed=1).requires_grad_()
    b = make_tensor((6,), torch.float32, seed=2).requires_grad_()
    with fastdl.use_backend("triton"):
        out = fastdl.functional.conv2d(x, w, b, 1, 1, groups=6)
    out.sum().backward()
    assert out.shape == F.conv2d(x.detach(), w.detach(), None, 1, 1, groups=6).shape == (0, 6, 5, 5)
    assert x.grad.shape == x.shape and not w.grad.any() and not b.grad.any()


def test_block_choice():
    # The channel block leaves at most an eighth of its channels masked, down to 16 wide.
    assert [_dw.block_channels(c) for c in (3, 8, 37, 64, 96, 144, 192, 960)] == [4, 8, 16, 64, 32, 32, 64, 64]
    assert _dw.blocks(144) == (_dw.TILE // 32, 32)
    # 3x3 takes 16-tap blocks, 7x7 64 (with 4 pixels a step); fp64 halves the tile.
    assert _dw.weight_blocks(144, 9, 2) == (16, 8, 32)
    assert _dw.weight_blocks(960, 49, 2) == (64, 4, 16)
    assert _dw.weight_blocks(960, 9, 8) == (16, 4, 32)
