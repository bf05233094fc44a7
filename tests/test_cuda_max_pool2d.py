"""kernels/cuda/max_pool2d.cu through the cupy backend, on the CPU: the host emulation
(tests/cuda_emulation.py) runs the kernels through fastdl.functional with autograd, against the
float64 reference, on the annotated cases of tests/test_max_pool2d.py: every dtype, the packed
channels_last path (16-byte channel groups) and the element-wise one (NCHW, views, C not a
multiple of the group, misaligned channel runs), NaN / -inf / ties against torch, return_indices
and the int64-index backward. NVRTC compiles max_pool2d.cu for sm_80 and sm_90 in
tests/test_cuda_compile.py (every source, with the backend's instantiations).
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

import fastdl
from cuda_emulation import emulated_backend, emulated_functional, launches  # noqa: F401 (fixtures)
from fastdl import nvrtc
from fastdl.backends.cupy import _runtime as cupy_runtime
from fastdl.backends.cupy import max_pool2d as cupy_pool
from fastdl.kernels.triton import max_pool2d as triton_pool
from fastdl.testing import make_tensor
from test_max_pool2d import CASES, LAYOUTS, run_max_pool2d, special_values

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def test_constants_and_instantiations_match_the_source():
    source = nvrtc.read_source("max_pool2d")
    defines = dict(re.findall(r"#define (\w+) (\d+)", source))
    assert int(defines["POOL_THREADS"]) == cupy_pool.POOL_THREADS
    assert int(defines["PACK_BYTES"]) == cupy_pool.PACK_BYTES
    for name in ("SAVE_NONE", "SAVE_POS", "SAVE_INDEX"):
        assert int(defines[name]) == getattr(cupy_pool, name) == getattr(triton_pool, name)
    assert "max_pool2d.cu" in [p.name for p in nvrtc.cuda_sources()]
    assert set(cupy_runtime.NAME_EXPRESSIONS["max_pool2d"]) == {
        f"{kernel}<{cupy_runtime.CUDA_TYPES[dtype]}>" for kernel in ("max_pool2d_fwd", "max_pool2d_bwd")
        for dtype in DTYPES}


def test_packed_path_choice():
    # 16-byte channel groups need channels_last, C a multiple of the group, aligned pixel strides.
    cl = make_tensor((2, 16, 5, 5)).to(memory_format=torch.channels_last)
    assert cupy_pool.packed(16, cl)
    assert not cupy_pool.packed(16, cl.contiguous())                          # NCHW
    assert not cupy_pool.packed(70, make_tensor((1, 70, 3, 3)).to(memory_format=torch.channels_last))  # 70 % 4
    wide = make_tensor((2, 24, 5, 5), torch.float16).to(memory_format=torch.channels_last)
    assert cupy_pool.packed(16, wide[:, 8:24])      # 16 bytes in, pixel strides of 24 halves: 16-byte groups
    assert not cupy_pool.packed(16, wide[:, 1:17])  # channel runs start 2 bytes off a 16-byte boundary
    assert not cupy_pool.packed(16, make_tensor((2, 20, 5, 5), torch.float16).to(
        memory_format=torch.channels_last)[:, :16])  # pixel strides of 20 halves: groups cross 16-byte lines
    assert cupy_pool.lanes(torch.bfloat16) == 8 and cupy_pool.lanes(torch.float64) == 2


# ---------------------------------------------------------------------------------------------
# Emulated on the CPU.

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_matches_reference(emulated_functional, dtype):
    for name, case in CASES.items():
        for layout in LAYOUTS:
            if layout == "view" and dtype not in (torch.float32, torch.float16):
                continue
            launches.clear()
            run_max_pool2d("cupy", dtype, case, layout, return_indices=name.startswith(("stem", "dilated")))
            assert [k for k, _ in launches] == ["max_pool2d_fwd", "max_pool2d_bwd"], launches


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_emulated_misaligned_and_mixed_layouts(emulated_functional, dtype):
    # A channels_last input whose channel runs start off a 16-byte boundary (the element-wise
    # path on channels_last strides), and grad_outputs in another layout than the output.
    wide = make_tensor((2, 20, 9, 8), dtype, seed=4).to(memory_format=torch.channels_last)
    x = wide[:, 1:17].detach().requires_grad_()
    with fastdl.use_backend("cupy"):
        out = fastdl.functional.max_pool2d(x, 3, 2, 1)
    want = F.max_pool2d(x.detach(), 3, 2, 1)
    assert torch.equal(out, want) and out.stride() == want.stride()
    run_max_pool2d("cupy", dtype, CASES["stem 3x3/2 pad 1"], "channels_last", grad_layout="transposed")
    run_max_pool2d("cupy", dtype, CASES["stem 3x3/2 pad 1"], "contiguous", grad_layout="channels_last")


def test_emulated_int64_index_backward(emulated_functional, monkeypatch):
    # Windows over MAX_BYTE_TAPS taps save int64 flat indices for backward (limit lowered here).
    from fastdl.ops import max_pool2d as pool_ops

    monkeypatch.setattr(pool_ops, "MAX_BYTE_TAPS", 8)
    for layout in ("contiguous", "channels_last"):
        run_max_pool2d("cupy", torch.float32, CASES["stem 3x3/2 pad 1"], layout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_emulated_nan_inf_ties_match_torch(emulated_functional, dtype):
    # C = 2: packed for float64 (2 lanes), element-wise for the others.
    x = special_values().to(dtype)
    for layout in ("contiguous", "channels_last"):
        for kernel, stride, padding, ceil_mode in ((2, 2, 0, False), (3, 2, 1, True), (3, 1, 1, False)):
            a = (x.to(memory_format=torch.channels_last) if layout == "channels_last" else x.clone()).requires_grad_()
            b = x.clone().requires_grad_()
            with fastdl.use_backend("cupy"):
                out, idx = fastdl.functional.max_pool2d(a, kernel, stride, padding, ceil_mode=ceil_mode,
                                                        return_indices=True)
            want, want_idx = F.max_pool2d(b, kernel, stride, padding, ceil_mode=ceil_mode, return_indices=True)
            torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True)
            assert torch.equal(torch.signbit(out), torch.signbit(want)) and torch.equal(idx, want_idx)
            g = make_tensor(out.shape, dtype, seed=3)
            out.backward(g)
            want.backward(g)
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-3)
