"""kernels/cuda/conv2d_depthwise.cuh's direct depthwise kernels (conv2d_dw_*: one input channel per group)
against the float64 reference, on the CPU through the host emulation, and what NVRTC makes of them
for sm_80 / sm_90.

The cupy launchers (fastdl.backends.cupy.conv2d_fwd / conv2d_bwd) route every convolution with
C/groups == 1 to these kernels; each case asserts that they, and no GEMM kernel, ran. A block is 32
channels x 64 (fp16 / bf16), 32 (fp32) or 16 (fp64) pixels, a thread owning 16 bytes of channels:
the shapes below are small but cross those tiles (several pixel tiles, a partial channel tile,
partial 16-byte runs) in the layouts that pick each load path.
"""
from __future__ import annotations

import pytest
import torch

import cuda_emulation
from cuda_emulation import emulated_backend, emulated_functional  # noqa: F401 (fixtures)
from fastdl.backends.cupy import _runtime as cupy_runtime
from fastdl.backends.cupy import conv2d as launcher
from fastdl.testing import assert_close, make_tensor
from test_cuda_conv2d import _check

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
DW_KERNELS = cupy_runtime.CONV2D_DW_KERNELS
GEMM_KERNELS = cupy_runtime.CONV2D_KERNELS


def _dw(N, C, H, W, R, stride, pad, dilation=1, multiplier=1):
    """(N, C, H, W, K, R, S, stride, padding, dilation, groups) of a depthwise convolution."""
    return (N, C, H, W, C * multiplier, R, R, (stride, stride), (pad,) * 4, (dilation, dilation), C)


# name: (shape, layout, activation, bias, precisions); what each exercises.
CASES = {
    # 3x3 s1 p1, channels_last: 16-byte loads of x, g and the saved mask, 16-byte stores of out
    # and grad_input; 32 channels = one whole channel tile; 2 x 36 pixels: 2 fp16, 3 fp32 pixel tiles
    "3x3 s1 p1": (_dw(2, 32, 6, 6, 3, 1, 1), "channels_last", "relu", True, [F16, F32]),
    # 3x3 s2 p1 on odd H, W (7 x 5): the gather skips the taps whose output is not whole (phases),
    # NCHW: a warp's lanes along pixels, element loads, gelu's pre-activation saved
    "3x3 s2 p1 odd": (_dw(1, 8, 7, 5, 3, 2, 1), "contiguous", "gelu", True, [BF16, F64]),
    # 5x5 dilation 2: 25 taps, the weight gradient in passes of 9 (fp64: 9 + 9 + 7) or of two
    # groups of 5 (fp16: 10 + 10 + 5, the last pass's second group without taps)
    "5x5 dilation 2": (_dw(1, 16, 9, 8, 5, 1, 4, dilation=2), "channels_last", "leaky_relu", False, [F16, F64]),
    # channel multiplier 2 (K = 2C): output channel k reads input k // 2, element gathers of x and
    # g (stride Kg), Kg filters per input channel in bwd_input
    "multiplier 2": (_dw(2, 4, 5, 6, 3, 1, 1, multiplier=2), "channels_last", "silu", True, [BF16, F32]),
    # C = 37: a second, partial channel tile and a partial 16-byte run at its end (element path)
    "C=37": (_dw(1, 37, 4, 5, 3, 1, 1), "channels_last", "relu", False, [F16, F64]),
    # a stride-2 view of every tensor (no 16-byte run anywhere), sigmoid through `out`
    "strided views": (_dw(1, 8, 5, 5, 3, 1, 1), "strided", "sigmoid", True, [F32]),
    # an even 4x2 kernel with per-side padding (torch's "same" puts the extra row / column at the
    # bottom / right) and unequal strides: the pad_top / pad_left offsets and P, Q from both sides
    "4x2 asymmetric": ((1, 8, 6, 7, 8, 4, 2, (1, 2), (1, 2, 0, 1), (1, 1), 8), "contiguous", "tanh", True, [F16]),
}


def _params():
    for name, (shape, layout, activation, bias, precisions) in CASES.items():
        for precision in precisions:
            label = str(precision).replace("torch.", "")
            yield pytest.param(shape, layout, activation, bias, precision, id=f"{name}-{layout}-{activation}-{label}")


def _ran_depthwise(precision, weight_grad_kernels=("conv2d_dw_bwd_weight",)):
    names = [name for name, _ in cuda_emulation.launches]
    assert set(names) >= {"conv2d_dw_fwd", "conv2d_dw_bwd_input", *weight_grad_kernels}, names
    assert not set(names) & set(GEMM_KERNELS), names
    assert {p for _, p in cuda_emulation.launches} == {precision}


@pytest.mark.parametrize("shape, layout, activation, bias, precision", list(_params()))
def test_emulated_depthwise_matches_reference(emulated_backend, shape, layout, activation, bias, precision):
    cuda_emulation.launches.clear()
    _check(emulated_backend, precision, shape, layout, activation, bias=bias)
    _ran_depthwise(precision)


def test_emulated_functional_with_autograd(emulated_functional):
    # The whole call: fastdl.functional.conv2d's normalization (padding="same", unbatched input
    # made 4-D), the op's autograd, the cupy launchers on the depthwise kernels; against the same
    # call on the reference backend (the float64 oracle).
    import fastdl

    def run(backend):
        x = make_tensor((6, 7, 5), F64, seed=1, requires_grad=True)  # unbatched (C, H, W)
        w = make_tensor((12, 1, 3, 3), F64, seed=2, requires_grad=True)  # multiplier 2
        b = make_tensor((12,), F64, seed=3, requires_grad=True)
        with fastdl.use_backend(backend):
            out = fastdl.functional.conv2d(x, w, b, padding="same", groups=6, activation="gelu")
            out.backward(make_tensor(out.shape, F64, seed=4))
        return out, x.grad, w.grad, b.grad

    cuda_emulation.launches.clear()
    got = run("cupy")
    _ran_depthwise(F64)
    for name, a, e in zip(("out", "grad_input", "grad_weight", "grad_bias"), got, run("reference")):
        assert_close(a, e.detach(), F64, name=name)


def test_misaligned_channels_last_views(emulated_backend, monkeypatch):
    # channels_last tensors whose data starts 2 bytes past a 16-byte boundary (a channel slice):
    # the kernels must take the element path (a 16-byte load there faults; the emulation reports
    # misaligned accesses).
    def sliced(t, layout):  # 8 more channels: every stride a whole number of 16-byte runs
        wide = torch.zeros(t.shape[0], t.shape[1] + 8, *t.shape[2:], dtype=t.dtype)
        wide = wide.contiguous(memory_format=torch.channels_last)
        wide[:, 1:t.shape[1] + 1] = t
        return wide[:, 1:t.shape[1] + 1]

    monkeypatch.setattr("test_cuda_conv2d._layout", sliced)
    cuda_emulation.launches.clear()
    _check(emulated_backend, F16, _dw(1, 16, 4, 4, 3, 1, 1), "channels_last", "relu", bias=True)
    _ran_depthwise(F16)


@pytest.mark.parametrize("precision", [BF16, F64], ids=str)
def test_emulated_weight_grad_split_and_runs(emulated_backend, monkeypatch, precision):
    # Pixels split across grid rows and the batch in runs of whole images: float (double) partials
    # per split and run, summed in order by conv2d_sum_splits; weight and bias together and alone.
    monkeypatch.setattr(launcher, "MIN_SPLIT_PIXELS", 64)
    monkeypatch.setattr(launcher, "MAX_PIXELS", 150)
    shape = _dw(3, 8, 9, 9, 3, 1, 1)  # 81 pixels an image: runs of one image, splits of 64 and 17
    for needs in ((True, True, True), (False, True, False), (False, False, True)):
        cuda_emulation.launches.clear()
        _check(emulated_backend, precision, shape, "channels_last", "gelu_tanh", needs=needs)
        names = [name for name, _ in cuda_emulation.launches]
        assert names.count("conv2d_dw_bwd_weight") == 3 and names[-1] == "conv2d_sum_splits", names
        assert not set(names) & set(GEMM_KERNELS), names


def test_tf32_flag_keeps_the_float_kernels(emulated_backend):
    # No tensor cores in the depthwise kernels: float32 runs the float instantiation (exact float
    # accumulation, float32's tolerance) whatever cudnn.allow_tf32 says.
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        cuda_emulation.launches.clear()
        out, _ = emulated_backend.conv2d_fwd(torch.randn(1, 4, 3, 3), torch.randn(4, 1, 3, 3), None, (1, 1),
                                             (1, 1, 1, 1), (1, 1), 4, None, 0.0)
    finally:
        torch.backends.cudnn.allow_tf32 = before
    assert cuda_emulation.launches == [("conv2d_dw_fwd", F32)]


def test_the_header_is_inlined_once_where_conv2d_includes_it():
    # NVRTC, CuPy and the emulation compile one text (fastdl.nvrtc.module_source): the kernels come
    # from conv2d_depthwise.cuh, after everything of conv2d.cu they use.
    from fastdl import nvrtc

    text = nvrtc.module_source("conv2d")
    assert '#include "conv2d_depthwise.cuh"' not in text and text.count('#line 1 "conv2d_depthwise.cuh"') == 1
    assert text.index('#line 1 "conv2d_depthwise.cuh"') > text.index("void __launch_bounds__(THREADS) conv2d_sum_splits(")
    assert "conv2d_dw_fwd(" not in nvrtc.read_source("conv2d")


def test_grouped_convolutions_keep_the_gemm():
    assert launcher.depthwise(torch.empty(8, 1, 3, 3)) and not launcher.depthwise(torch.empty(8, 2, 3, 3))
    assert [launcher.dw_pixels(d) for d in (F16, BF16, F32, F64)] == [64, 64, 32, 16]


# ---------------------------------------------------------------------------------------------
# The binaries NVRTC makes for sm_80 and sm_90.

DW_EXPRESSIONS = tuple(e for e in cupy_runtime.NAME_EXPRESSIONS["conv2d"] if e.split("<")[0] in DW_KERNELS)


@pytest.fixture(scope="module", params=["sm_80", "sm_90"])
def compiled(request):
    pytest.importorskip("cuda.bindings.nvrtc", reason="NVRTC (cuda-bindings) is needed for the compile checks")
    from fastdl.inspection import sass

    return request.param, sass.instantiation_stats("conv2d", request.param)


def test_depthwise_instantiations_compile_without_stack(compiled):
    arch, stats = compiled
    assert len(DW_EXPRESSIONS) == 12 and set(DW_EXPRESSIONS) <= set(stats)
    local = {e: (stats[e].stack, stats[e].spill_stores) for e in DW_EXPRESSIONS
             if stats[e].stack or stats[e].spill_stores or stats[e].spill_loads}
    assert not local, f"{arch}: local memory in {local}"
    for e in DW_EXPRESSIONS:
        s = stats[e]
        assert s.mma == 0, (arch, e, s.mma_ops)  # direct kernels: no tensor cores
        # channels_last's 16-byte accesses along C: loads everywhere, stores of out and grad_input
        assert s.global_loads_128 > 0, (arch, e)
        if not e.startswith("conv2d_dw_bwd_weight"):
            assert s.global_stores_128 > 0, (arch, e)
        else:  # two 256-thread blocks per SM (fp16 / bf16 split a pass's taps between two groups)
            assert s.registers <= 128, (arch, e, s.registers)
