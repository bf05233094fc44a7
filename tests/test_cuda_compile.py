"""kernels/cuda/*.cu compile everywhere: NVRTC compiles every source for sm_80 and sm_90 with the
cupy backend's options and template instantiations; no GPU needed (needs cuda-bindings and the
NVRTC / CUDA runtime wheels). Their logic runs on the CPU in tests/test_cuda_linear.py,
tests/test_cuda_mma.py and tests/test_cuda_cross_entropy.py (the host emulation of
tests/cuda_emulation.py), and on a GPU when one is lent.
"""
from __future__ import annotations

import re

import pytest

from fastdl import nvrtc
from fastdl.backends import common
from fastdl.backends.cupy import _runtime as cupy_runtime

try:
    import cuda.bindings.nvrtc  # noqa: F401

    HAS_NVRTC = True
except ImportError:
    HAS_NVRTC = False

needs_nvrtc = pytest.mark.skipif(
    not HAS_NVRTC, reason="cuda-bindings is not installed: pip install -e .[test] (NVRTC compile checks)")

ARCHS = ["sm_80", "sm_90"]


# ---------------------------------------------------------------------------------------------
# NVRTC, no GPU needed.

# conv2d.cu compiles (its 19 instantiations, the slowest source) once per arch in
# tests/test_cuda_conv2d.py, whose SASS checks read the same cubins.
@needs_nvrtc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", [p for p in nvrtc.cuda_sources() if p.name != "conv2d.cu"], ids=lambda p: p.name)
def test_cuda_source_compiles(source, arch):
    ok, log = nvrtc.compile_source(source, arch)
    assert ok, f"{source.name} does not compile for {arch}:\n{log}"


def test_every_cuda_source_is_found():
    assert {"linear.cu", "conv2d.cu"} <= {p.name for p in nvrtc.cuda_sources()}


def test_headers_are_inlined_once_with_their_line_numbers():
    # NVRTC, CuPy and the host emulation compile one text: mma.cuh inlined where linear.cu includes
    # it, once per module (cross_entropy.cu's module has linear.cu first), #line for messages.
    for stem in ("linear", "cross_entropy", "conv2d"):
        text = nvrtc.module_source(stem)
        assert '#include "mma.cuh"' not in text and text.count('#line 1 "mma.cuh"') == 1
        include_line = nvrtc.read_source("linear").splitlines().index('#include "mma.cuh"') + 1
        assert f'#line {include_line + 1} "linear.cu"' in text


def test_tf32_instantiations_exist_for_the_linear_matmuls_only():
    expressions = cupy_runtime.NAME_EXPRESSIONS
    for kernel in cupy_runtime.LINEAR_KERNELS:
        assert f"{kernel}<float>" in expressions["linear"] and f"{kernel}<float, true>" in expressions["linear"]
    assert not any("true" in e for e in expressions["cross_entropy"])
    for kernel in cupy_runtime.CONV2D_KERNELS:  # conv2d's matmuls too (TF32 from cudnn.allow_tf32)
        assert f"{kernel}<float>" in expressions["conv2d"] and f"{kernel}<float, true>" in expressions["conv2d"]
    assert not any(e.startswith("conv2d_sum_splits") and "true" in e for e in expressions["conv2d"])


@needs_nvrtc
def test_compile_errors_come_back_with_the_log():
    ok, log = nvrtc.compile_source("__global__ void broken() { undefined_name = 1; }\n", "sm_80")
    assert not ok and "undefined_name" in log


def test_codes_match_the_cuda_source():
    defines = dict(re.findall(r"#define (ACT_\w+|SAVE_\w+) (\d+)", nvrtc.read_source("linear")))
    for name, code in common.ACTIVATION_CODES.items():
        assert int(defines[f"ACT_{(name or 'none').upper()}"]) == code
    for name in ("SAVE_NONE", "SAVE_MASK", "SAVE_PREACT"):
        assert int(defines[name]) == getattr(common, name)


def test_backend_imports_without_cupy_and_names_the_extras(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` now raises ImportError
    with pytest.raises(RuntimeError, match=r"fastdl\[cuda12\].*fastdl\[cuda13\]"):
        cupy_runtime._cupy()


def test_nvrtc_cache_keys_on_the_source_and_target(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDL_NVRTC_CACHE", str(tmp_path))
    source = 'extern "C" __global__ void bump(float* x) { x[threadIdx.x] += 1.0f; }\n'
    first = nvrtc.compile_cubin(source, "sm_80", name_expressions=())
    assert first.ok and len(list(tmp_path.glob("*.json"))) == 1
    again = nvrtc.compile_cubin(source, "sm_80", name_expressions=())
    assert (again.ok, again.cubin, again.log) == (first.ok, first.cubin, first.log)
    # Another target, or one character of the source changed: compiled anew, kept beside it.
    nvrtc.compile_cubin(source, "sm_90", name_expressions=())
    changed = nvrtc.compile_cubin(source.replace("1.0f", "2.0f"), "sm_80", name_expressions=())
    assert changed.ok and changed.cubin != first.cubin and len(list(tmp_path.glob("*.json"))) == 3
    # A failed compile is kept as a failure, with its log.
    broken = "__global__ void broken() { undefined_name = 1; }\n"
    assert nvrtc.compile_source(broken, "sm_80") == nvrtc.compile_source(broken, "sm_80")
    assert not nvrtc.compile_source(broken, "sm_80")[0]
