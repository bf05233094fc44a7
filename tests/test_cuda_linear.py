"""kernels/cuda/linear.cu against the float64 reference: on the CPU through the host emulation,
on a GPU when one is lent.

- The CPU: the module is compiled as host C++ against tests/cuda_emulation.py's emulation (blocks,
  threads, __shared__, __syncthreads, and mma.cuh's ldmatrix / mma.sync by the PTX ISA's fragment
  layouts) and driven through the cupy backend's own launchers (only the final launch is swapped).
  Every precision's path runs: fp16 / bf16 / TF32 on the tensor-core tile, fp32 / fp64 on SIMT.
- On a GPU (marker gpu): the cupy backend on a side stream against the reference backend, and
  fastdl.functional.linear with autograd for every dtype, activation and layout.
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import cuda_emulation
import fastdl
from cuda_emulation import emulated_backend  # noqa: F401 (a fixture)
from fastdl.backends import common
from fastdl.backends import cupy as cupy_backend
from fastdl.reference import linear as ref
from fastdl.testing import assert_close, make_tensor, tolerance

ACTIVATIONS = [None, "relu", "leaky_relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh"]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# The emulated precisions: a dtype, or "tf32" (float32 with torch.backends.cuda.matmul.allow_tf32).
PRECISIONS = [torch.float16, torch.bfloat16, "tf32", torch.float32, torch.float64]


def _np(t):
    return None if t is None else t.detach().to("cpu", torch.float64).numpy()


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as a view with a last-dimension stride of 2, on t's device."""
    wide = torch.zeros(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """The same values, contiguous, starting one element past a 16-byte boundary: no 16-byte access."""
    flat = torch.zeros(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = flat[1:].view(t.shape)
    view.copy_(t)
    return view


def _transposed(t: torch.Tensor) -> torch.Tensor:
    """The same values, column-major: the tile's other shared layout (ldmatrix .trans)."""
    return t.t().contiguous().t()


@contextlib.contextmanager
def allow_tf32(allow: bool):
    """torch.backends.cuda.matmul.allow_tf32 set for the block (a property: monkeypatch cannot undo it)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@pytest.fixture
def precision(request):
    """(dtype, tf32) for a PRECISIONS entry, with torch's TF32 switch set to match."""
    tf32 = request.param == "tf32"
    with allow_tf32(tf32):
        yield (torch.float32 if tf32 else request.param), tf32


def _ids(p):
    return p if isinstance(p, str) else str(p).replace("torch.", "")


def _check_backend(backend, dtype, x, w, b, g, activation, needs=(True, True, True), slope=0.1, tf32=False):
    """backend.linear_fwd / linear_bwd against the float64 reference; `saved` as Triton saves it."""
    out, saved = backend.linear_fwd(x, w, b, activation, slope)
    expected, ctx = ref.forward(_np(x), _np(w), _np(b), activation, slope)
    assert_close(out, expected, dtype, tf32, name=f"out ({activation})")
    kind = common.SAVE_KIND[common.ACTIVATION_CODES[activation]]
    if kind == common.SAVE_PREACT:
        assert saved.dtype == dtype
        assert_close(saved, ctx["z"], dtype, tf32, name="saved pre-activation")
    elif kind == common.SAVE_MASK:
        z = torch.from_numpy(ctx["z"])
        rtol, _ = tolerance(dtype, tf32)
        clear = z.abs() > rtol * (z.abs().max() if z.numel() else 0)  # rounding cannot flip these
        assert saved.dtype == torch.uint8
        assert torch.equal(saved.cpu().bool()[clear], (z > 0)[clear]), "relu mask"
        # Where rounding may flip the mask (|z| within the tolerance of 0: TF32's inputs carry 10
        # mantissa bits), the backward follows the kernel's mask: the reference takes its sign.
        flipped = saved.cpu().bool().numpy() != (ctx["z"] > 0)
        ctx = dict(ctx, z=np.where(flipped, np.where(saved.cpu().numpy() > 0, 1e-30, -1e-30), ctx["z"]))
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
            assert_close(got, want, dtype, tf32, name=f"{name} ({activation})")


def _inputs(M, N, K, dtype):
    x = make_tensor((M, K), dtype, seed=1)
    w = make_tensor((N, K), dtype, seed=2, scale=max(K, 1) ** -0.5)
    b = make_tensor((N,), dtype, seed=3)
    g = make_tensor((M, N), dtype, seed=4)
    return x, w, b, g


# ---------------------------------------------------------------------------------------------
# linear.cu's logic on the CPU, through the host emulation of tests/cuda_emulation.py (the
# emulated_backend fixture: fastdl.backends.cupy launching into it).

# (M, N, K) and what each exercises.
EMULATED_SHAPES = [
    (1, 1, 1),      # one element: every tile almost entirely masked
    (65, 70, 33),   # one past a tile edge in M and N, a partial reduction step in K; rows of odd
                    # length: every global access element by element
    (70, 80, 48),   # rows of whole 16-byte chunks: 16-byte operand loads and epilogue stores,
                    # partial tiles in M and N, a partial 32-step (16-bit) and whole 16-steps (TF32)
]


def test_each_precision_launches_its_path(emulated_backend):
    x, w, b, g = _inputs(3, 4, 5, torch.float32)
    for allow, expected in ((False, torch.float32), (True, "tf32")):
        cuda_emulation.launches.clear()
        with allow_tf32(allow):
            _check_backend(emulated_backend, torch.float32, x, w, b, g, "relu", tf32=allow)
        assert {p for _, p in cuda_emulation.launches} == {expected}
        assert {k for k, _ in cuda_emulation.launches} == {"linear_fwd", "linear_bwd_input", "linear_bwd_weight"}
    x16 = x.half()
    cuda_emulation.launches.clear()
    emulated_backend.linear_fwd(x16, w.half(), None, None, 0.0)  # the switch is float32's only
    assert cuda_emulation.launches == [("linear_fwd", torch.float16)]


# Every activation runs with each kind of accumulator math: float32 (the float epilogue) and float64
# (double). fp16, bfloat16 and TF32 share the float epilogue (the same template on a float
# accumulator, applied per element of the mma fragments) and differ in operand loading and the mma,
# so they run one activation per thing the backward reads (LAYOUT_ACTIVATIONS) and keep the suite
# inside its time.
FULL_ACTIVATION_PRECISIONS = (torch.float32, torch.float64)
# One activation per thing the backward reads: nothing, the mask, the pre-activation, `out`.
LAYOUT_ACTIVATIONS = [None, "relu", "gelu", "sigmoid"]


@pytest.mark.parametrize("precision", PRECISIONS, ids=_ids, indirect=True)
def test_emulated_kernels_match_reference(emulated_backend, precision, request):
    dtype, tf32 = precision
    full = request.node.callspec.params["precision"] in FULL_ACTIVATION_PRECISIONS
    for (M, N, K) in EMULATED_SHAPES:
        for activation in ACTIVATIONS if full else LAYOUT_ACTIVATIONS:
            x, w, b, g = _inputs(M, N, K, dtype)
            _check_backend(emulated_backend, dtype, x, w, b, g, activation, tf32=tf32)
            if activation in (None, "gelu"):
                _check_backend(emulated_backend, dtype, x, w, None, g, activation, tf32=tf32)


# Layouts and flags with one activation per thing the backward reads (nothing, the mask, the
# pre-activation, `out`) on the tensor-core and SIMT paths; the other precisions with the
# pre-activation (the most the backward loads) and with nothing.
@pytest.mark.parametrize("precision, activation", [
    pytest.param(p, a, id=f"{_ids(p)}-{a}") for p in PRECISIONS
    for a in (LAYOUT_ACTIVATIONS if p in (torch.float16, torch.float32) else [None, "gelu"])], indirect=["precision"])
def test_emulated_kernels_layouts_and_flags(emulated_backend, precision, activation):
    dtype, tf32 = precision
    x, w, b, g = _inputs(70, 67, 45, dtype)
    # stride-2 views everywhere, and a bias of stride 0
    _check_backend(emulated_backend, dtype, _strided(x), _strided(w), b[:1].expand(67), _strided(g), activation,
                   tf32=tf32)
    # transposed (column-major) operands and upstream gradient, no bias
    _check_backend(emulated_backend, dtype, _transposed(x), _transposed(w), None, _transposed(g), activation,
                   tf32=tf32)
    # rows of whole 16-byte chunks, but every tensor one element off a 16-byte boundary
    x, w, b, g = _inputs(40, 48, 64, dtype)
    _check_backend(emulated_backend, dtype, _misaligned(x), _misaligned(w), _misaligned(b), _misaligned(g),
                   activation, tf32=tf32)
    # the same, aligned and column-major: 16-byte chunks along M and N (the transposed shared layout)
    _check_backend(emulated_backend, dtype, _transposed(x), _transposed(w), b, _transposed(g), activation, tf32=tf32)
    # each gradient on its own (bias alone runs bwd_weight with K = 0)
    for needs in ((True, False, False), (False, True, False), (False, False, True)):
        _check_backend(emulated_backend, dtype, x, w, b, g, activation, needs, tf32=tf32)


@pytest.mark.parametrize("precision", [torch.bfloat16, "tf32", torch.float32], ids=_ids, indirect=True)
def test_emulated_grad_weight_accumulate(emulated_backend, precision):
    dtype, tf32 = precision
    M, N, K = 70, 48, 40
    x, _, _, g = _inputs(M, N, K, dtype)
    start_w, start_b = make_tensor((N, K), torch.float32, seed=5), make_tensor((N,), torch.float32, seed=6)
    expected_w = _np(start_w) + _np(g).T @ _np(x)
    expected_b = _np(start_b) + _np(g).sum(0)
    for layout in (lambda t: t, _transposed, _misaligned):
        w, b = start_w.clone(), start_b.clone()
        emulated_backend.linear_grad_weight_accumulate(layout(g), layout(x), w, b)
        assert_close(w, expected_w, dtype, tf32, name="grad_weight")
        assert_close(b, expected_b, dtype, tf32, name="grad_bias")


@pytest.mark.parametrize("M, N, K", [
    (0, 5, 3),      # no rows: zeros for grad_weight and grad_bias
    (4, 0, 3),      # no outputs: zero grad_input
    (4, 5, 0),      # no inputs: out = act(bias), and the bias column still runs
    (3, 70, 0),     # K == 0 over two n-tiles
])
@pytest.mark.parametrize("precision", [torch.float16, torch.float32], ids=_ids, indirect=True)
def test_emulated_kernels_empty_dimensions(emulated_backend, precision, M, N, K):
    dtype, tf32 = precision
    for activation in ("relu", "gelu", "sigmoid", None):
        x, w, b, g = _inputs(M, N, K, dtype)
        _check_backend(emulated_backend, dtype, x, w, b, g, activation, tf32=tf32)


@pytest.mark.slow
@pytest.mark.parametrize("precision", [torch.bfloat16, torch.float64], ids=_ids, indirect=True)
def test_emulated_kernels_many_tiles(emulated_backend, precision):
    # More than GROUP (8) row tiles in each kernel's grid, with a partial last group.
    dtype, tf32 = precision
    for (M, N, K) in [(600, 70, 20), (20, 600, 70), (70, 20, 600)]:
        x, w, b, g = _inputs(M, N, K, dtype)
        _check_backend(emulated_backend, dtype, x, w, b, g, "gelu", tf32=tf32)


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


# ---------------------------------------------------------------------------------------------
# Dropout fused into linear_fwd's epilogue: the same mask as the Triton kernel and the reference.

@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=_ids)
@pytest.mark.parametrize("shape", [(65, 70, 33), (70, 80, 48)], ids=str)  # N % 4: 2 (padded rows), 0
def test_emulated_fused_dropout(emulated_backend, dtype, shape):
    from fastdl.reference import dropout as dropout_ref

    M, N, K = shape
    x, w, b, g = _inputs(M, N, K, dtype)
    seed = torch.tensor([2**31 - 2, 77])
    for activation in ("relu", "sigmoid", None):
        out, saved = emulated_backend.linear_fwd(x, w, b, activation, 0.1, 0.35, seed)
        y, _ = ref.forward(_np(x), _np(w), _np(b), activation, 0.1)
        keep = dropout_ref.keep_mask((2**31 - 2, 77), 0.35, M, N)
        expected, _ = dropout_ref.forward(y, keep, 0.35)
        assert not ((out != 0) & ~torch.from_numpy(keep)).any()
        assert_close(out, expected, dtype, name=f"out ({activation}, dropout)")
        plain, plain_saved = emulated_backend.linear_fwd(x, w, b, activation, 0.1)
        assert torch.equal(saved, plain_saved)  # what backward reads for act' is unchanged by dropout
        # backward's regeneration pass: dropout_rows on grad_out draws the forward's mask.
        grad = torch.empty_like(g)
        emulated_backend.dropout_rows(g, seed, 0.35, grad)
        assert torch.equal(grad != 0, torch.from_numpy(keep) & (g != 0))


# ---------------------------------------------------------------------------------------------
# The binaries NVRTC makes for sm_80 and sm_90 (tests/test_inspection.py reads them too, with the
# rest of `fastdl inspect`): the tensor-core tile's operands by cp.async, 16 bytes a copy, no spills.


@pytest.fixture(scope="module", params=["sm_80", "sm_90"])
def compiled(request):
    pytest.importorskip("cuda.bindings.nvrtc", reason="NVRTC (cuda-bindings) is needed for the compile checks")
    from fastdl.inspection import sass

    return request.param, sass.instantiation_stats("linear", request.param)


def test_operands_copied_16_bytes_without_spills(compiled):
    arch, stats = compiled
    for kernel in cupy_backend._runtime.LINEAR_KERNELS:
        for args in ("__half", "__nv_bfloat16", "float, true"):
            s = stats[f"{kernel}<{args}>"]
            assert s.async_copies > 0 and set(s.async_copy_bits) == {"128"}, (arch, kernel, args, s.async_copy_bits)
        for args in ("float", "double"):  # the SIMT path copies nothing
            assert not stats[f"{kernel}<{args}>"].async_copies, (arch, kernel, args)
    spills = {e: s.stack for e, s in stats.items() if s.stack or s.spill_stores}
    assert not spills, f"{arch}: local memory (spills) in {spills}"
