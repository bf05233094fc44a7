"""kernels/cuda/*.cu: compiled everywhere, their logic run on the CPU, checked on a GPU when lent.

- NVRTC compiles every source for sm_80 and sm_90 with the cupy backend's options and template
  instantiations; no GPU needed (needs cuda-bindings and the NVRTC / CUDA runtime wheels).
- The logic of linear.cu runs on the CPU: the source is compiled as host C++ against a small
  emulation of blocks, threads, __shared__ and __syncthreads (tests/cuda_emulation.py, shared with
  tests/test_cuda_cross_entropy.py), and driven through the cupy backend's own launchers (only the
  final launch is swapped), against the float64 reference.
- On a GPU (marker gpu): the cupy backend on a side stream against the reference backend, and
  fastdl.functional.linear with autograd for every dtype, activation and layout.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import fastdl
from cuda_emulation import emulated_backend  # noqa: F401 (a fixture)
from fastdl import nvrtc
from fastdl.backends import common
from fastdl.backends import cupy as cupy_backend
from fastdl.backends.cupy import _runtime as cupy_runtime
from fastdl.reference import linear as ref
from fastdl.testing import assert_close, make_tensor, tolerance

try:
    import cuda.bindings.nvrtc  # noqa: F401

    HAS_NVRTC = True
except ImportError:
    HAS_NVRTC = False

needs_nvrtc = pytest.mark.skipif(
    not HAS_NVRTC, reason="cuda-bindings is not installed: pip install -e .[test] (NVRTC compile checks)")

ACTIVATIONS = [None, "relu", "leaky_relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh"]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
ARCHS = ["sm_80", "sm_90"]


def _np(t):
    return None if t is None else t.detach().to("cpu", torch.float64).numpy()


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as a view with a last-dimension stride of 2, on t's device."""
    wide = torch.zeros(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


# ---------------------------------------------------------------------------------------------
# NVRTC, no GPU needed.

@needs_nvrtc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", nvrtc.cuda_sources(), ids=lambda p: p.name)
def test_cuda_source_compiles(source, arch):
    ok, log = nvrtc.compile_source(source, arch)
    assert ok, f"{source.name} does not compile for {arch}:\n{log}"


def test_every_cuda_source_is_found():
    assert "linear.cu" in [p.name for p in nvrtc.cuda_sources()]


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


# ---------------------------------------------------------------------------------------------
# linear.cu's logic on the CPU, through the host emulation of tests/cuda_emulation.py (the
# emulated_backend fixture: fastdl.backends.cupy launching into it).

def _check_backend(backend, dtype, x, w, b, g, activation, needs=(True, True, True), slope=0.1):
    """backend.linear_fwd / linear_bwd against the float64 reference; `saved` as Triton saves it."""
    out, saved = backend.linear_fwd(x, w, b, activation, slope)
    expected, ctx = ref.forward(_np(x), _np(w), _np(b), activation, slope)
    assert_close(out, expected, dtype, name=f"out ({activation})")
    kind = common.SAVE_KIND[common.ACTIVATION_CODES[activation]]
    if kind == common.SAVE_PREACT:
        assert saved.dtype == dtype
        assert_close(saved, ctx["z"], dtype, name="saved pre-activation")
    elif kind == common.SAVE_MASK:
        z = torch.from_numpy(ctx["z"])
        clear = z.abs() > 1e-2 * (z.abs().max() if z.numel() else 0)  # rounding cannot flip these
        assert saved.dtype == torch.uint8
        assert torch.equal(saved.cpu().bool()[clear], (z > 0)[clear]), "relu mask"
    else:
        assert saved.numel() == 0
    grads = backend.linear_bwd(g, x, w, b, saved, out, activation, slope,
                               needs[0], needs[1], needs[2] and b is not None)
    expected_grads = ref.backward(_np(g), ctx)
    for name, got, want, needed in zip(("grad_input", "grad_weight", "grad_bias"), grads,
                                       expected_grads, (needs[0], needs[1], needs[2] and b is not None)):
        if not needed:
            assert got is None, name
        else:
            assert_close(got, want, dtype, name=f"{name} ({activation})")


# (M, N, K) and what each exercises.
EMULATED_SHAPES = [
    (1, 1, 1),      # one element: every tile almost entirely masked
    (65, 70, 33),   # one past a tile edge in M and N, a partial reduction step in K
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_kernels_match_reference(emulated_backend, dtype):
    for (M, N, K) in EMULATED_SHAPES:
        for activation in ACTIVATIONS:
            x = make_tensor((M, K), dtype, seed=1)
            w = make_tensor((N, K), dtype, seed=2, scale=K ** -0.5)
            b = make_tensor((N,), dtype, seed=3)
            g = make_tensor((M, N), dtype, seed=4)
            _check_backend(emulated_backend, dtype, x, w, b, g, activation)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_emulated_kernels_layouts_and_flags(emulated_backend, activation):
    dtype, (M, N, K) = torch.float32, (70, 67, 45)
    x = make_tensor((M, K), dtype, seed=1)
    w = make_tensor((N, K), dtype, seed=2, scale=K ** -0.5)
    b = make_tensor((N,), dtype, seed=3)
    g = make_tensor((M, N), dtype, seed=4)
    # stride-2 views everywhere, and a bias of stride 0
    _check_backend(emulated_backend, dtype, _strided(x), _strided(w), b[:1].expand(N), _strided(g), activation)
    # transposed (column-major) operands and upstream gradient, no bias
    _check_backend(emulated_backend, dtype, x.t().contiguous().t(), w.t().contiguous().t(), None,
                   g.t().contiguous().t(), activation)
    # each gradient on its own (bias alone runs bwd_weight with K = 0)
    for needs in ((True, False, False), (False, True, False), (False, False, True)):
        _check_backend(emulated_backend, dtype, x, w, b, g, activation, needs)


@pytest.mark.parametrize("M, N, K", [
    (0, 5, 3),      # no rows: zeros for grad_weight and grad_bias
    (4, 0, 3),      # no outputs: zero grad_input
    (4, 5, 0),      # no inputs: out = act(bias), and the bias column still runs
    (3, 70, 0),     # K == 0 over two n-tiles
])
def test_emulated_kernels_empty_dimensions(emulated_backend, M, N, K):
    for activation in ("relu", "gelu", "sigmoid", None):
        x, w = make_tensor((M, K), seed=1), make_tensor((N, K), seed=2)
        b, g = make_tensor((N,), seed=3), make_tensor((M, N), seed=4)
        _check_backend(emulated_backend, torch.float32, x, w, b, g, activation)


@pytest.mark.slow
def test_emulated_kernels_many_tiles(emulated_backend):
    # More than GROUP (8) row tiles in each kernel's grid, with a partial last group.
    for (M, N, K) in [(600, 70, 20), (20, 600, 70), (70, 20, 600)]:
        x = make_tensor((M, K), torch.float64, seed=1)
        w = make_tensor((N, K), torch.float64, seed=2, scale=K ** -0.5)
        b, g = make_tensor((N,), torch.float64, seed=3), make_tensor((M, N), torch.float64, seed=4)
        _check_backend(emulated_backend, torch.float64, x, w, b, g, "gelu")


# ---------------------------------------------------------------------------------------------
# On a GPU.

def _needs_cupy():
    pytest.importorskip("cupy", reason="cupy is not installed: pip install fastdl[cuda12] or fastdl[cuda13]")


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cupy_backend_on_a_side_stream(dtype, activation):
    _needs_cupy()
    from fastdl.backends import reference as reference_backend

    M, N, K = 300, 257, 129  # odd sizes, more than GROUP row tiles
    x = make_tensor((M, K), dtype, "cuda", seed=1)
    w = make_tensor((N, K), dtype, "cuda", seed=2, scale=K ** -0.5)
    b = make_tensor((N,), dtype, "cuda", seed=3)
    g = make_tensor((M, N), dtype, "cuda", seed=4)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # The side stream is busy before it writes the input: a kernel launched on any other
        # stream would read it unwritten, and the comparison below would fail.
        torch.cuda._sleep(50_000_000)
        x_side = _strided(torch.zeros_like(x))
        x_side.copy_(x)
        out, saved = cupy_backend.linear_fwd(x_side, w, b, activation, 0.1)
        grads = cupy_backend.linear_bwd(g, x_side, w, b, saved, out, activation, 0.1, True, True, True)
    torch.cuda.synchronize()
    expected_out, _ = reference_backend.linear_fwd(x, w, b, activation, 0.1)
    expected = reference_backend.linear_bwd(g, x, w, b, None, None, activation, 0.1, True, True, True)
    assert_close(out, expected_out, dtype, name="out")
    for name, got, want in zip(("grad_input", "grad_weight", "grad_bias"), grads, expected):
        assert_close(got, want, dtype, name=name)


# (batch shape, in_features, out_features, layout) and what each exercises.
GPU_CASES = [
    ((1,), 1, 1, "contiguous"),         # one element
    ((37,), 19, 71, "contiguous"),      # odd sizes: partial tiles everywhere
    ((2, 33), 47, 65, "contiguous"),    # batched input; out_features one past a tile edge
    ((600,), 130, 70, "contiguous"),    # more than GROUP row tiles, two k-tiles
    ((600,), 130, 70, "strided"),       # stride-2 input, weight and bias
    ((37,), 19, 71, "transposed"),      # column-major weight
    ((37,), 19, 71, "scalar_bias"),     # a bias of stride 0 in the kernel
    ((37,), 19, 71, "no_bias"),         # no bias, no grad_bias
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}x{c[1]}->{c[2]}-{c[3]}")
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cupy_functional_matches_reference(dtype, activation, case):
    _needs_cupy()
    batch, in_features, out_features, layout = case
    x = make_tensor(batch + (in_features,), dtype, "cuda", seed=1)
    w = make_tensor((out_features, in_features), dtype, "cuda", seed=2, scale=in_features ** -0.5)
    b = make_tensor((out_features,), dtype, "cuda", seed=3)
    if layout == "strided":
        x, w, b = _strided(x), _strided(w), _strided(b)
    elif layout == "transposed":
        w = w.t().contiguous().t()
    elif layout == "scalar_bias":
        b = b[:1].contiguous()  # broadcast to every output: a bias of stride 0 in the kernel
    elif layout == "no_bias":
        b = None
    for t in (x, w, b):
        if t is not None:
            t.requires_grad_(True)
    grad_out = make_tensor(batch + (out_features,), dtype, "cuda", seed=4)
    with fastdl.use_backend("cupy"):
        out = fastdl.functional.linear(x, w, b, activation=activation, negative_slope=0.2)
        out.backward(grad_out)

    bias_row = None if b is None else _np(b).reshape(-1) * np.ones(out_features)
    expected, ctx = ref.forward(_np(x).reshape(-1, in_features), _np(w), bias_row, activation, 0.2)
    grad_input, grad_weight, grad_bias = ref.backward(_np(grad_out).reshape(-1, out_features), ctx)
    assert out.dtype == dtype and out.shape == batch + (out_features,)
    assert_close(out.reshape(-1, out_features), expected, dtype, name="out")
    assert_close(x.grad.reshape(-1, in_features), grad_input, dtype, name="grad_input")
    assert_close(w.grad, grad_weight, dtype, name="grad_weight")
    if layout == "scalar_bias":
        # autograd sums the per-column gradients, each rounded to dtype, of the expanded bias:
        # the rounding error scales with those terms, not with their (cancelling) sum.
        rtol, atol = tolerance(dtype)
        want = grad_bias.sum()
        bound = atol * max(1.0, np.abs(grad_bias).sum()) + rtol * abs(want)
        assert abs(b.grad.item() - want) <= bound, f"grad_bias: {b.grad.item()} vs {want} (bound {bound:.3g})"
    elif b is not None:
        assert_close(b.grad, grad_bias, dtype, name="grad_bias")


@pytest.mark.gpu
@pytest.mark.parametrize("M, N, K", [(0, 5, 3), (4, 0, 3), (4, 5, 0)])
def test_cupy_functional_empty_dimensions(M, N, K):
    _needs_cupy()
    x = make_tensor((M, K), device="cuda", seed=1, requires_grad=True)
    w = make_tensor((N, K), device="cuda", seed=2, requires_grad=True)
    b = make_tensor((N,), device="cuda", seed=3, requires_grad=True)
    with fastdl.use_backend("cupy"):
        out = fastdl.functional.linear(x, w, b, activation="gelu")
        out.backward(torch.ones_like(out))
    expected, ctx = ref.forward(_np(x), _np(w), _np(b), "gelu")
    grads = ref.backward(np.ones((M, N)), ctx)
    assert_close(out, expected, torch.float32, name="out")
    for name, got, want in zip(("grad_input", "grad_weight", "grad_bias"), (x.grad, w.grad, b.grad), grads):
        assert_close(got, want, torch.float32, name=name)
