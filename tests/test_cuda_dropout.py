"""kernels/cuda/dropout.cu: NVRTC compiles it for sm_80 and sm_90 (every instantiation, no spills,
16-byte accesses), and the host emulation (tests/cuda_emulation.py) runs it through
fastdl.functional.dropout with autograd against the float64 reference, drawing the same mask as
the Triton kernel (interpreter) and the reference for the same seed."""
from __future__ import annotations

import re

import pytest
import torch

import fastdl
from cuda_emulation import emulated_backend, emulated_functional, launches  # noqa: F401 (fixtures)
from fastdl import nvrtc
from fastdl.backends.cupy import _runtime as cupy_runtime
from fastdl.backends.cupy import dropout as cupy_dropout
from fastdl.ops.dropout import draw_seed
from fastdl.reference import dropout as ref
from fastdl.testing import make_tensor
from test_dropout import CASES, make_input, run_dropout

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def test_constants_and_instantiations_match_the_source():
    source = nvrtc.read_source("dropout")
    defines = dict(re.findall(r"#define (\w+) (\w+)", source + nvrtc.module_source("dropout")))
    assert int(defines["DROPOUT_THREADS"]) == cupy_dropout.DROPOUT_THREADS
    assert int(defines["DROPOUT_PACK_BYTES"]) == cupy_dropout.PACK_BYTES
    assert int(defines["DROPOUT_UNIFORM_SHIFT"]) == 32 - ref.UNIFORM_BITS
    for name, value in (("PHILOX_M0", ref.PHILOX_M0), ("PHILOX_M1", ref.PHILOX_M1), ("PHILOX_W0", ref.PHILOX_W0),
                        ("PHILOX_W1", ref.PHILOX_W1)):
        assert int(defines[name].rstrip("u"), 16) == value
    assert set(cupy_runtime.NAME_EXPRESSIONS["dropout"]) == {
        f"dropout_apply<{cupy_runtime.CUDA_TYPES[dtype]}>" for dtype in DTYPES}


def test_packed_path_choice():
    x = torch.empty(64, dtype=torch.float16)
    assert cupy_dropout.packed(1, [(x, (0, 1))])
    assert not cupy_dropout.packed(1, [(x[1:], (0, 1))])                 # 2 bytes off a 16-byte boundary
    m = torch.empty(5, 24, dtype=torch.float32)
    assert cupy_dropout.packed(5, [(m, m.stride())])                      # rows of 96 bytes
    assert not cupy_dropout.packed(5, [(m[:, :6], (24, 1)), (m[:, :6].t(), (1, 24))])  # a column stride of 24
    odd = torch.empty(5, 6, dtype=torch.float32)
    assert not cupy_dropout.packed(5, [(odd, odd.stride())])               # rows of 24 bytes
    assert cupy_dropout.chunk(torch.bfloat16) == 8 and cupy_dropout.chunk(torch.float64) == 4


# ---------------------------------------------------------------------------------------------
# The binaries NVRTC makes for sm_80 and sm_90.

@pytest.fixture(scope="module", params=["sm_80", "sm_90"])
def compiled(request):
    pytest.importorskip("cuda.bindings.nvrtc", reason="NVRTC (cuda-bindings) is needed for the compile checks")
    from fastdl.inspection import sass

    return request.param, sass.instantiation_stats("dropout", request.param)


def test_every_instantiation_compiles_without_spills(compiled):
    arch, stats = compiled
    assert set(stats) == set(cupy_runtime.NAME_EXPRESSIONS["dropout"])
    spills = {e: s.stack for e, s in stats.items() if s.stack or s.spill_stores}
    assert not spills, f"{arch}: local memory (spills) in {spills}"


def test_16_byte_accesses(compiled):
    # The packed path: one 16-byte load and store per pack (1 per chunk for 2-byte types and float,
    # 2 for double).
    arch, stats = compiled
    for dtype in DTYPES:
        s = stats[f"dropout_apply<{cupy_runtime.CUDA_TYPES[dtype]}>"]
        assert s.global_loads_128 >= 1 and s.global_stores_128 >= 1, (arch, dtype, s)


# ---------------------------------------------------------------------------------------------
# Emulated on the CPU.

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_matches_reference(emulated_functional, dtype):
    for name, (shape, layout) in CASES.items():
        launches.clear()
        run_dropout("cupy", dtype, make_input(shape, dtype, layout), 0.3)
        assert [k for k, _ in launches] == ["dropout_apply", "dropout_apply"], (name, launches)


def test_emulated_rows_with_strides(emulated_backend):
    # dropout_rows (linear's fused dropout backward): (R, C) matrices, packed rows and strided ones.
    seed = torch.tensor([31, 4000])
    for shape, view in (((5, 24), lambda t: t), ((5, 6), lambda t: t), ((7, 40), lambda t: t[:, ::2]),
                        ((6, 9), lambda t: t.t())):
        x = view(make_tensor(shape, torch.float32, seed=2))
        out = torch.empty(x.shape)
        emulated_backend.dropout_rows(x, seed, 0.45, out)
        keep = torch.from_numpy(ref.keep_mask((31, 4000), 0.45, *x.shape))
        assert torch.equal(out, x * keep * torch.tensor(1 / 0.55, dtype=torch.float32))


def test_all_backends_draw_the_same_mask(emulated_functional):
    x = make_tensor((3, 1001), torch.float16, seed=8)
    outs = {}
    for backend in ("cupy", "triton", "reference"):
        torch.manual_seed(5)
        with fastdl.use_backend(backend):
            outs[backend] = fastdl.functional.dropout(x, 0.4)
    assert torch.equal(outs["cupy"], outs["triton"])  # same mask, same float32 scaling, one rounding
    assert torch.equal(outs["cupy"] != 0, outs["reference"] != 0)
    torch.manual_seed(5)
    keep = torch.from_numpy(ref.flat_keep_mask(tuple(draw_seed(x.device).tolist()), 0.4, x.shape))
    assert torch.equal((outs["cupy"] != 0), keep & (x != 0))


def test_emulated_special_values_and_statistics(emulated_functional):
    x = torch.tensor([float("nan"), float("inf"), -2.0, 3.0] * 64)
    torch.manual_seed(1)
    with fastdl.use_backend("cupy"):
        out = fastdl.functional.dropout(x, 0.5)
    torch.manual_seed(1)
    with fastdl.use_backend("triton"):
        want = fastdl.functional.dropout(x, 0.5)
    torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(torch.signbit(out), torch.signbit(want))
    n = 1 << 16
    with fastdl.use_backend("cupy"):
        kept = (fastdl.functional.dropout(torch.ones(n), 0.2) != 0).double().mean().item()
    assert abs(kept - 0.8) < 4 * (0.2 * 0.8 / n) ** 0.5
