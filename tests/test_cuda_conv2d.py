"""kernels/cuda/conv2d.cu against the float64 reference, on the CPU through the host emulation, and
what NVRTC makes of it for sm_80 / sm_90.

- The emulation (tests/cuda_emulation.py: blocks, threads, __shared__, and mma.cuh's ldmatrix /
  mma.sync by the PTX ISA's fragment layouts) runs the cupy backend's own launchers,
  fastdl.backends.cupy.conv2d_fwd / conv2d_bwd, with only the final launch swapped. fp16 / bf16 /
  TF32 run on the tensor-core tile, fp32 (cudnn.allow_tf32 off) / fp64 on the SIMT path. The
  emulation is slow (every mma is a warp-wide exchange between 32 OS threads), so each shape runs
  in one tensor-core and one SIMT precision, chosen so every precision meets several code paths.
- The static checks compile every instantiation to cubins and read their SASS: tensor cores in
  every fp16 / bf16 / TF32 kernel, no spills anywhere, 16-byte global loads where channels_last
  takes them, and the operands' cp.async copies (mma.cuh's pipeline) all 16 bytes wide.
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import cuda_emulation
from cuda_emulation import emulated_backend  # noqa: F401 (a fixture)
from fastdl.backends import common
from fastdl.backends.cupy import _runtime as cupy_runtime
from fastdl.backends.cupy import conv2d as launcher
from fastdl.reference import conv2d as ref
from fastdl.testing import assert_close, make_tensor, tolerance


@contextlib.contextmanager
def cudnn_tf32(allow: bool):
    """torch.backends.cudnn.allow_tf32 (conv's switch) set for the block."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


def _np(t):
    return None if t is None else t.detach().to("cpu", torch.float64).numpy()


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # the same values as a view with a last-dimension stride of 2
        wide = torch.zeros(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.contiguous()


def _check(backend, precision, shape, layout="contiguous", activation=None, bias=True, slope=0.1,
           needs=(True, True, True)):
    """conv2d_fwd / conv2d_bwd against the reference, `saved` as the Triton backend saves it."""
    N, C, H, W, K, R, S, stride, padding, dilation, groups = shape
    tf32 = precision == "tf32"
    dtype = torch.float32 if tf32 else precision
    x = _layout(make_tensor((N, C, H, W), dtype, seed=1), layout)
    w = _layout(make_tensor((K, C // groups, R, S), dtype, seed=2, scale=(C // groups * R * S) ** -0.5), layout)
    b = make_tensor((K,), dtype, seed=3) if bias else None
    pads = ((padding[0], padding[1]), (padding[2], padding[3]))
    with cudnn_tf32(tf32):
        out, saved = backend.conv2d_fwd(x, w, b, stride, padding, dilation, groups, activation, slope)
        expected, ctx = ref.forward(_np(x), _np(w), _np(b), stride, pads, dilation, groups, activation, slope)
        assert out.is_contiguous(memory_format=torch.channels_last if layout == "channels_last"
                                 else torch.contiguous_format)
        assert_close(out, expected, dtype, tf32, name=f"out ({activation})")
        kind = common.SAVE_KIND[common.ACTIVATION_CODES[activation]]
        if kind == common.SAVE_PREACT:
            assert saved.dtype == dtype and saved.stride() == out.stride()
            assert_close(saved, ctx["z"], dtype, tf32, name="saved pre-activation")
        elif kind == common.SAVE_MASK:
            z = torch.from_numpy(ctx["z"])
            rtol, _ = tolerance(dtype, tf32)
            clear = z.abs() > rtol * (z.abs().max() if z.numel() else 0)  # rounding cannot flip these
            assert saved.dtype == torch.uint8 and saved.stride() == out.stride()
            assert torch.equal(saved.bool()[clear], (z > 0)[clear]), "relu mask"
            # Where rounding may flip the mask, the backward follows the kernel's mask.
            flipped = saved.bool().numpy() != (ctx["z"] > 0)
            ctx = dict(ctx, z=np.where(flipped, np.where(saved.numpy() > 0, 1e-30, -1e-30), ctx["z"]))
        else:
            assert saved.numel() == 0
        g = _layout(make_tensor(out.shape, dtype, seed=4), layout)
        needs = (needs[0], needs[1], needs[2] and bias)
        grads = backend.conv2d_bwd(g, x, w, b, saved, out, stride, padding, dilation, groups, activation, slope,
                                   *needs)
    for name, got, want, needed in zip(("grad_input", "grad_weight", "grad_bias"), grads,
                                       ref.backward(_np(g), ctx), needs):
        if not needed:
            assert got is None, name
        else:
            assert_close(got, want, dtype, tf32, name=f"{name} ({activation})")


F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
KERNELS = ("conv2d_fwd", "conv2d_bwd_input", "conv2d_bwd_weight")
# (N, C, H, W, K, R, S, stride, padding (top, bottom, left, right), dilation, groups), layout,
# activation, the precisions it runs in, and what it exercises.
CASES = {
    # plain matmul: nested reduction (one position, whole 32-channel steps), 16-byte chunks of x and
    # w along C, 16-byte epilogue stores; bwd_weight's 16-byte chunks along K and C
    "1x1": ((2, 32, 5, 6, 32, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1), "channels_last", "relu", [BF16, F64]),
    # bwd_input by phases: four phases, each skipping the kernel positions that miss it; nested
    # reduction over 9 positions x 32 channels (two TF32 steps each)
    "3x3 stride 2": ((1, 32, 7, 6, 32, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), 1), "channels_last", "gelu",
                     ["tf32", F32]),
    # the stem: 3 channels, a flat (r, s, c) reduction, element loads (NCHW), the epilogue's lanes
    # along pixels
    "7x7 stride 2 pad 3 C=3": ((1, 3, 9, 9, 2, 7, 7, (2, 2), (3, 3, 3, 3), (1, 1), 1), "contiguous", "silu",
                               [F16, F64]),
    # dilation, a stride-2 view of every tensor, no bias
    "dilation 2": ((1, 8, 8, 7, 8, 3, 3, (1, 1), (2, 2, 2, 2), (2, 2), 1), "strided", "leaky_relu", [F16, F32]),
    # depthwise (one channel per group) at stride 2: the direct kernels (conv2d_depthwise.cuh)
    "depthwise": ((2, 4, 6, 5, 4, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), 4), "channels_last", "gelu_tanh", [BF16, F64]),
    # groups=4: 8 channels per group (one 16-byte fp16/bf16 chunk) at group offsets, flat reduction
    "groups=4": ((1, 32, 5, 5, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 4), "channels_last", "sigmoid", [F16, F32]),
    # an even kernel with per-side padding and unequal strides, as padding="same" / odd user padding
    "asymmetric padding": ((1, 16, 6, 7, 16, 2, 3, (1, 2), (0, 1, 2, 0), (1, 1), 1), "contiguous", "tanh",
                           ["tf32", F64]),
    # a strided 1x1 (ResNet's downsample): three of four bwd_input phases reached by no position (zeros)
    "1x1 stride 2": ((2, 16, 5, 5, 16, 1, 1, (2, 2), (0, 0, 0, 0), (1, 1), 1), "channels_last", None, [BF16, F32]),
}


def _params():
    for name, (shape, layout, activation, precisions) in CASES.items():
        for precision in precisions:
            label = precision if isinstance(precision, str) else str(precision).replace("torch.", "")
            yield pytest.param(shape, layout, activation, precision, id=f"{name}-{layout}-{activation}-{label}")


@pytest.mark.parametrize("shape, layout, activation, precision", list(_params()))
def test_emulated_conv2d_matches_reference(emulated_backend, shape, layout, activation, precision):
    _check(emulated_backend, precision, shape, layout, activation, bias=layout != "strided")


def test_each_precision_launches_its_path(emulated_backend):
    # TF32 follows cudnn.allow_tf32 (_check sets it), not the matmul flag, as torch's convolutions.
    shape = (1, 2, 3, 3, 2, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1)
    matmul_flag = torch.backends.cuda.matmul.allow_tf32
    try:
        for precision, matmul_tf32 in ((F32, True), ("tf32", False)):
            torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
            cuda_emulation.launches.clear()
            _check(emulated_backend, precision, shape, activation="relu")
            assert {p for _, p in cuda_emulation.launches} == {precision}
            assert {k for k, _ in cuda_emulation.launches} == set(KERNELS)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_flag


@pytest.mark.parametrize("precision", [BF16, F64], ids=str)
def test_emulated_weight_grad_split(emulated_backend, monkeypatch, precision):
    # 72 pixels in splits of 64 and 8: float partials, summed in split order by conv2d_sum_splits;
    # weight and bias together and each alone.
    monkeypatch.setattr(launcher, "MIN_SPLIT_PIXELS", 64)
    shape = (2, 16, 6, 6, 16, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1)
    assert launcher.weight_grad_splits(72, 1, torch.device("cpu")) == (2, 64)
    cuda_emulation.launches.clear()
    for needs in ((False, True, True), (False, True, False), (False, False, True)):
        _check(emulated_backend, precision, shape, "channels_last", "relu", needs=needs)
    assert cuda_emulation.launches.count(("conv2d_sum_splits", precision)) == 3


@pytest.mark.parametrize("precision", [F16, F64], ids=str)
def test_emulated_batch_in_runs(emulated_backend, monkeypatch, precision):
    # More pixels than one launch indexes: runs of whole images, the weight gradient's partials one
    # per run, summed by conv2d_sum_splits.
    monkeypatch.setattr(launcher, "MAX_PIXELS", 60)
    shape = (3, 8, 7, 6, 8, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1)  # 42 pixels an image: a run each
    cuda_emulation.launches.clear()
    _check(emulated_backend, precision, shape, "channels_last", "gelu")
    assert [k for k, _ in cuda_emulation.launches] == (["conv2d_fwd"] * 3 + ["conv2d_bwd_input"] * 3
                                                       + ["conv2d_bwd_weight"] * 3 + ["conv2d_sum_splits"])
    with pytest.raises(ValueError, match="pixels in one image"):
        launcher.conv2d_fwd(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 1, 1), None, (1, 1), (0, 0, 0, 0), (1, 1), 1,
                            None, 0.0)


def test_emulated_empty_batch(emulated_backend):
    shape = (0, 4, 5, 5, 6, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 2)
    cuda_emulation.launches.clear()
    _check(emulated_backend, F32, shape, activation="relu")  # zeros for grad_weight and grad_bias
    assert cuda_emulation.launches == []


def test_weight_grad_splits_fill_the_gpu():
    cpu = torch.device("cpu")
    assert launcher.weight_grad_splits(10**6, 300, cpu) == (1, 10**6)  # enough tiles: no split
    splits, length = launcher.weight_grad_splits(32 * 56 * 56, 4, cpu)  # a small weight: 2 blocks per SM
    assert splits * 4 >= 2 * 132 and length % 64 == 0 and (splits - 1) * length < 32 * 56 * 56
    assert launcher.weight_grad_splits(2000, 1, cpu) == (2, 1024)  # at least MIN_SPLIT_PIXELS a split


# ---------------------------------------------------------------------------------------------
# The binaries NVRTC makes for sm_80 and sm_90.


@pytest.fixture(scope="module", params=["sm_80", "sm_90"])
def compiled(request):
    pytest.importorskip("cuda.bindings.nvrtc", reason="NVRTC (cuda-bindings) is needed for the compile checks")
    from fastdl.inspection import sass

    return request.param, sass.instantiation_stats("conv2d", request.param)


def test_every_instantiation_compiles_without_spills(compiled):
    arch, stats = compiled
    assert set(stats) == set(cupy_runtime.NAME_EXPRESSIONS["conv2d"])
    spills = {e: s.stack for e, s in stats.items() if s.stack or s.spill_stores}
    assert not spills, f"{arch}: local memory (spills) in {spills}"


def test_tensor_cores_and_16_byte_loads(compiled):
    arch, stats = compiled
    for kernel in KERNELS:
        for args in ("__half", "__nv_bfloat16", "float, true"):
            s = stats[f"{kernel}<{args}>"]
            assert s.mma > 0 and all(op.startswith("HMMA") for op in s.mma_ops), (arch, kernel, args, s.mma_ops)
            # channels_last moves 16-byte chunks of the operands (and of the epilogue's outputs)
            assert s.global_loads_128 > 0, (arch, kernel, args)
            assert s.global_stores_128 > 0, (arch, kernel, args)
            # the operands' chunks go global -> shared by cp.async, 16 bytes a copy (LDGSTS.128)
            assert s.async_copies > 0 and set(s.async_copy_bits) == {"128"}, (arch, kernel, args, s.async_copy_bits)
        for args in ("float", "double"):
            assert stats[f"{kernel}<{args}>"].mma_ops.keys() <= {"DMMA"}, (arch, kernel, args)
