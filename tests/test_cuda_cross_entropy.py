"""kernels/cuda/cross_entropy.cu through the cupy backend: its logic on the CPU, checked on a GPU when lent.

- The host emulation (tests/cuda_emulation.py) runs the kernels through the cupy launchers, and
  through fastdl.functional with autograd, against the float64 reference: every dtype, odd C
  (1 warp to 512 threads, packed and element-wise paths), class weights, ignore_index, label
  smoothing, probability targets, per-row scales, -inf and 1e4 logits, the device assert, the
  in-place backward and the in-place grad_weight accumulation of linear_cross_entropy.
- On a GPU (marker gpu): realistic vocabularies against torch in float64, a side stream, and the
  device-side assert in a child process (it poisons the CUDA context).
NVRTC compiles cross_entropy.cu for sm_80 and sm_90 in tests/test_cuda_compile.py (every source).
"""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastdl
from cuda_emulation import EmulatedDeviceAssert, emulated_backend, emulated_functional  # noqa: F401 (fixtures)
from fastdl import nvrtc
from fastdl.backends import cupy as cupy_backend
from fastdl.backends.cupy import cross_entropy as cupy_ce
from fastdl.backends import reference as reference_backend
from fastdl.ops import cross_entropy as ce_ops
from fastdl.reference import cross_entropy as ref
from fastdl.testing import assert_close, make_tensor
from test_cross_entropy import (REDUCTIONS, TARGET_KINDS, check_degenerate_cases_match_torch,
                                check_infinities_and_nans_match_torch, make_target, run_cross_entropy)
from test_linear_cross_entropy import run_linear_cross_entropy

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _np(t):
    return None if t is None else t.detach().cpu().double().numpy()


def test_geometry_matches_the_source():
    source = nvrtc.read_source("cross_entropy")
    assert int(re.search(r"#define CE_MAX_THREADS (\d+)", source).group(1)) == cupy_ce.CE_MAX_THREADS
    assert "cross_entropy.cu" in [p.name for p in nvrtc.cuda_sources()]
    # Whole warps, at most CE_MAX_THREADS, about 16 columns a thread.
    for C, threads in [(1, 32), (7, 32), (1000, 64), (5003, 512), (262144, 512)]:
        assert cupy_ce.row_threads(C) == threads


# ---------------------------------------------------------------------------------------------
# Emulated on the CPU.

# (rows, C) and the block each gets.
EMULATED_SHAPES = [
    (1, 1),      # one class: loss 0, gradient 0; 31 idle threads
    (5, 7),      # one warp; 14-byte fp16 rows: most rows start off a 16-byte boundary (head, tail)
    (9, 1000),   # two warps: the reduction across warps through shared memory
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_functional_matches_reference(emulated_functional, dtype):
    for shape in EMULATED_SHAPES:
        for kind in TARGET_KINDS:
            for reduction in REDUCTIONS:
                run_cross_entropy("cupy", dtype, shape, kind, reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_sixteen_warps(emulated_functional, dtype):
    # C = 5003: 512 threads, 16 warps' partial (m, s) pairs combined; rows of 5003 elements start
    # at every alignment, so the packed sweeps have heads and tails.
    for kind in ("index+weight+ignore+smoothing", "prob"):
        run_cross_entropy("cupy", dtype, (3, 5003), kind, "none")


def _check_launcher(backend, x, target, weight=None, scale=None, ignore_index=-100, smoothing=0.0,
                    compute_grad=True, name=""):
    """backend.cross_entropy_fwd against the reference launcher (the float64 oracle per row)."""
    dtype = x.dtype
    R = x.shape[0]
    scale = scale if scale is not None else torch.rand(R, generator=torch.Generator().manual_seed(5)) + 0.5
    loss, grad = backend.cross_entropy_fwd(x, target, weight, scale.to(ce_ops.acc_dtype(x.dtype)), ignore_index,
                                           smoothing, compute_grad)
    want_loss, want_grad = reference_backend.cross_entropy_fwd(x.double(), target if target.dim() == 1 else
                                                               target.double(), None if weight is None
                                                               else weight.double(), scale.double(),
                                                               ignore_index, smoothing, compute_grad)
    assert loss.dtype == ce_ops.acc_dtype(x.dtype)
    assert_close(loss, want_loss, dtype, name=f"loss rows {name}")
    if compute_grad:
        assert grad.dtype == x.dtype and grad.shape == x.shape
        assert_close(grad, want_grad, dtype, name=f"grad {name}")
    else:
        assert grad.numel() == 0
    return loss, grad


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_emulated_layouts(emulated_backend, dtype):
    R, C = 6, 300
    base = make_tensor((R, C + 3), dtype, seed=1, scale=3.0)
    target = make_target((R, C), C, "index", dtype)
    prob = make_target((R, C), C, "prob", dtype)
    weight = (make_tensor((C,), torch.float64, seed=2).abs() + 0.1).to(dtype)
    layouts = {
        "contiguous": base[:, :C].contiguous(),
        "offset view (rows off the 16-byte grid)": base[:, 3:],
        "stride 2 (element-wise sweeps)": make_tensor((R, C), dtype, seed=1, scale=3.0, noncontiguous=True),
        "column-major": base[:, :C].t().contiguous().t(),
    }
    for name, x in layouts.items():
        for t in (target, prob, prob.t().contiguous().t()):
            _check_launcher(emulated_backend, x, t, weight, smoothing=0.1, name=name)
            _check_launcher(emulated_backend, x, t, None, compute_grad=False, name=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_head_body_tail_boundaries(emulated_backend, dtype):
    # sweep_row's split: a head up to the row's first 16-byte boundary, 16-byte packs, a tail.
    # Odd C puts the 5 contiguous rows on different phases; C around one pack, two packs and one
    # pack per thread of the block (row_threads) moves the body's end across every thread.
    pack = 16 // torch.empty((), dtype=dtype).element_size()
    for C in (1, pack - 1, pack + 1, 2 * pack + 1, 32 * pack - 1, 32 * pack + 3, 1025):
        C = max(C, 1)
        x = make_tensor((5, C), dtype, seed=C, scale=3.0)
        target = torch.randint(0, C, (5,), generator=torch.Generator().manual_seed(C))
        target[2], target[3] = C - 1, 0  # in the tail, in the head
        prob = make_target((5, C), C, "prob", dtype)
        weight = (make_tensor((C,), torch.float64, seed=2).abs() + 0.1).to(dtype)
        for t, w, smoothing in ((target, None, 0.0), (target, weight, 0.2), (prob, weight, 0.3)):
            _check_launcher(emulated_backend, x, t, w, smoothing=smoothing, name=f"C={C}")
        # In place, as linear_cross_entropy's chunks: the packed stores land on the packed loads.
        scale = torch.rand(5, generator=torch.Generator().manual_seed(5)).to(ce_ops.acc_dtype(dtype)) + 0.5
        loss, grad = emulated_backend.cross_entropy_fwd(x, target, weight, scale, -100, 0.2, True)
        buffer = x.clone()
        loss_inplace, grad_inplace = emulated_backend.cross_entropy_fwd(buffer, target, weight, scale, -100, 0.2,
                                                                        True, inplace=True)
        assert grad_inplace.data_ptr() == buffer.data_ptr()
        assert torch.equal(grad_inplace, grad) and torch.equal(loss_inplace, loss), C


def test_emulated_scales_and_ignore_index(emulated_backend):
    x = make_tensor((7, 33), torch.float64, seed=1, scale=3.0)
    target = make_target((7, 33), 33, "index", torch.float64)
    target[2] = 5
    for ignore_index in (-100, 5, int(target[0])):
        # a scalar, one per row, one per row at stride 2
        for scale in (torch.tensor(0.25, dtype=torch.float64), torch.rand(7, dtype=torch.float64),
                      torch.arange(14.0, dtype=torch.float64)[::2]):
            for smoothing in (0.0, 0.3):
                _check_launcher(emulated_backend, x, target, None, scale, ignore_index, smoothing)
                _check_launcher(emulated_backend, x, target, x[0].abs() + 0.1, scale, ignore_index, smoothing)


def test_emulated_loss_only(emulated_backend):
    # compute_grad=False: nothing written but the loss rows; plain index rows skip sweep 2.
    x = make_tensor((5, 40), torch.float32, seed=1, scale=3.0)
    for kind in TARGET_KINDS:
        has_weight, _, smoothing, _ = TARGET_KINDS[kind]
        weight = x[0].abs() + 0.1 if has_weight else None
        _check_launcher(emulated_backend, x, make_target((5, 40), 40, kind, torch.float32), weight,
                        smoothing=smoothing, compute_grad=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_emulated_large_logits_and_minus_inf(emulated_functional, dtype):
    # Magnitude 1e4 (exp would overflow without the running max) and rows holding -inf away from
    # their target, one of them -inf everywhere but two columns: finite losses and gradients.
    x = make_tensor((6, 1000), torch.float64, seed=5, scale=1e4)
    x[1, 3:] = -float("inf")
    x[4, ::2] = -float("inf")
    x = x.to(dtype)
    target = torch.randint(0, 1000, (6,), generator=torch.Generator().manual_seed(7))
    target[1], target[4] = 2, 5
    for reduction in ("none", "mean"):
        xx = x.clone().requires_grad_()
        with fastdl.use_backend("cupy"):
            loss = fastdl.functional.cross_entropy(xx, target, reduction=reduction)
        grad_out = make_tensor(loss.shape, dtype, seed=4) if loss.dim() else torch.tensor(0.7, dtype=dtype)
        loss.backward(grad_out)
        expected, saved = ref.forward(_np(x), target.numpy(), None, -100, reduction, 0.0)
        assert torch.isfinite(loss).all() and torch.isfinite(xx.grad).all()
        assert_close(loss, expected, dtype, name="loss")
        assert_close(xx.grad, ref.backward(_np(grad_out), saved)[0], dtype, name="grad_input")


def test_emulated_degenerate_cases_where_torch_has_them(emulated_functional):
    check_degenerate_cases_match_torch("cupy")


def test_emulated_infinities_and_nans_where_torch_has_them(emulated_functional):
    check_infinities_and_nans_match_torch("cupy")
    # Every row ignored under "mean": the loss is 0 / 0, the gradient scale 1 / 0; ignored rows
    # are scaled by 0 instead, so the gradient is 0, as torch's.
    x = make_tensor((3, 6), torch.float64, seed=8, requires_grad=True)
    with fastdl.use_backend("cupy"):
        loss = fastdl.functional.cross_entropy(x, torch.full((3,), -100), reduction="mean")
    loss.backward()
    assert loss.isnan() and torch.equal(x.grad, torch.zeros_like(x))


def test_emulated_inplace_writes_the_gradient_over_the_logits(emulated_backend):
    for x in (make_tensor((5, 300), torch.bfloat16, seed=1, scale=3.0),
              make_tensor((5, 300), torch.float32, seed=1, scale=3.0, noncontiguous=True)):
        target = torch.tensor([0, 299, 5, 7, 100])
        scale = torch.rand(5, generator=torch.Generator().manual_seed(1))
        loss, grad = emulated_backend.cross_entropy_fwd(x.clone(), target, None, scale, -100, 0.1, True)
        buffer = x.clone()
        loss_inplace, grad_inplace = emulated_backend.cross_entropy_fwd(buffer, target, None, scale, -100, 0.1, True,
                                                                        inplace=True)
        assert grad_inplace.data_ptr() == buffer.data_ptr()
        assert torch.equal(grad_inplace, grad) and torch.equal(loss_inplace, loss)


def test_emulated_bad_target_trips_the_device_assert(emulated_backend):
    x = make_tensor((3, 5), torch.float32, seed=1)
    for bad in (7, 5, -1):
        with pytest.raises(EmulatedDeviceAssert, match=r"target out of bounds \[0, C\)"):
            emulated_backend.cross_entropy_fwd(x, torch.tensor([0, bad, 1]), None, torch.ones(()), -100, 0.0, True)
    emulated_backend.cross_entropy_fwd(x, torch.tensor([0, -100, 1]), None, torch.ones(()), -100, 0.0, True)
    emulated_backend.cross_entropy_fwd(x, torch.tensor([0, 7, 1]), None, torch.ones(()), 7, 0.0, True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_scale_rows(emulated_backend, monkeypatch, dtype):
    # Two rows per grid row (the row walk past gridDim.y), several column blocks per row.
    monkeypatch.setattr(cupy_ce, "MAX_GRID_Y", 2)
    monkeypatch.setattr(cupy_ce, "SCALE_ROWS_PACKS", 1)
    x = lambda: make_tensor((5, 2500), dtype, seed=1)  # noqa: E731
    odd = lambda: make_tensor((5, 2501), dtype, seed=1)  # noqa: E731
    cases = {
        "odd C: contiguous rows on every 16-byte phase (head, packs, tail)": (odd(), torch.rand(5)),
        "odd C, one row": (odd()[0], torch.tensor(1.5)),
        "scalar": (x(), torch.tensor(0.3)),
        "per row, in the gradient's dtype": (x(), make_tensor((5,), dtype, seed=2)),
        "offset view (rows off the 16-byte grid)": (x()[:, 3:], torch.rand(5, dtype=torch.float64)),
        "column-major": (x().t().contiguous().t(), make_tensor((5,), seed=2)),
        "one row (1-D)": (x()[0], torch.tensor(-2.0, dtype=dtype)),
        "stride 3, scale at stride 2": (x()[:, ::3], torch.arange(10.0)[::2]),
    }
    for name, (grad, scale) in cases.items():
        want = _np(grad) * (_np(scale)[:, None] if scale.dim() else _np(scale))
        before = grad.clone()
        # Out of place, into a contiguous tensor, one with strides of its own, and one whose rows sit
        # on another 16-byte phase than grad's (element-wise fallback).
        shifted = torch.empty(grad.numel() + 1, dtype=dtype)[1:].view(grad.shape)
        for out in (torch.empty(grad.shape, dtype=dtype), make_tensor(grad.shape, dtype, seed=9, noncontiguous=True),
                    shifted):
            result = emulated_backend.cross_entropy_bwd(grad, scale, out)
            assert result is out
            assert_close(out, want, dtype, name=name)
            assert torch.equal(grad, before), f"{name}: the saved gradient was written"
    # linear_cross_entropy's float32 sums, scaled and rounded into the weight's dtype.
    sums, scale = make_tensor((5, 300), ce_ops.acc_dtype(dtype), seed=4), make_tensor((5,), seed=5)
    out = emulated_backend.cross_entropy_bwd(sums, scale, torch.empty((5, 300), dtype=dtype))
    assert out.dtype == dtype
    assert_close(out, _np(sums) * _np(scale)[:, None], dtype, name="float32 sums into the weight's dtype")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_linear_grad_weight_accumulate(emulated_backend, dtype):
    acc = ce_ops.acc_dtype(dtype)
    for (M, N, K) in [(70, 67, 45), (3, 5, 0), (1, 1, 1)]:
        g, x = make_tensor((M, N), dtype, seed=1), make_tensor((M, K), dtype, seed=2)
        # The kernel adds into float32 (float64) sums: linear_cross_entropy rounds them once, at the end.
        w0, b0 = make_tensor((N, K), acc, seed=3), make_tensor((N,), acc, seed=4)
        want_w = _np(w0) + _np(g).T @ _np(x)
        want_b = _np(b0) + _np(g).sum(0)
        for layout in ("contiguous", "strided"):
            gg, xx = (g, x) if layout == "contiguous" else (g.t().contiguous().t(), make_tensor(
                (M, K), dtype, seed=2, noncontiguous=True))
            w, b = w0.clone(), b0.clone()
            emulated_backend.linear_grad_weight_accumulate(gg, xx, w, b)
            assert_close(w, want_w, dtype, name=f"grad_weight ({layout})")
            assert_close(b, want_b, dtype, name=f"grad_bias ({layout})")
            if dtype != acc:  # added in the accumulator's precision, not rounded to the input's dtype
                torch.testing.assert_close(w, torch.from_numpy(want_w).to(acc), rtol=1e-5, atol=1e-4)
        # No bias; and a grad_weight / bias of other dtypes through the temporaries.
        w = w0.clone()
        emulated_backend.linear_grad_weight_accumulate(g, x, w, None)
        assert_close(w, want_w, dtype, name="grad_weight (no bias)")
        for w_dtype in (dtype, torch.float64):
            w, b = w0.to(w_dtype, copy=True), b0.to(dtype, copy=True)
            want_w, want_b = _np(w) + _np(g).T @ _np(x), _np(b) + _np(g).sum(0)
            emulated_backend.linear_grad_weight_accumulate(g, x, w, b)
            assert_close(w, want_w, dtype, name=f"grad_weight ({w_dtype})")
            assert_close(b, want_b, dtype, name="grad_bias (input's dtype)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_emulated_linear_cross_entropy(emulated_functional, monkeypatch, dtype):
    # Chunks of linear_fwd, the in-place cross-entropy, linear_bwd and the accumulation.
    for reduction in ("mean", "none"):
        run_linear_cross_entropy("cupy", dtype, (37, 29, 53, 16), reduction, monkeypatch, label_smoothing=0.1)


# ---------------------------------------------------------------------------------------------
# On a GPU.

def _needs_cupy():
    pytest.importorskip("cupy", reason="cupy is not installed: pip install fastdl[cuda12] or fastdl[cuda13]")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cupy_cross_entropy_on_a_side_stream(dtype):
    _needs_cupy()
    R, C = 300, 5003
    x = make_tensor((R, C), dtype, "cuda", seed=1, scale=3.0)
    target = make_target((R, C), C, "index", dtype, "cuda")
    target[::5] = -100
    weight = (make_tensor((C,), torch.float64, seed=2).abs() + 0.1).to(dtype).cuda()
    scale = torch.rand(R, generator=torch.Generator().manual_seed(5)).to(ce_ops.acc_dtype(dtype)).cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # The side stream is busy before it writes the input: a kernel launched on any other
        # stream would read it unwritten, and the comparison below would fail.
        torch.cuda._sleep(50_000_000)
        x_side = torch.zeros_like(x)
        x_side.copy_(x)
        loss, grad = cupy_backend.cross_entropy_fwd(x_side, target, weight, scale, -100, 0.1, True)
        scaled = cupy_backend.cross_entropy_bwd(grad, scale, torch.empty_like(grad))
    torch.cuda.synchronize()
    want_loss, want_grad = reference_backend.cross_entropy_fwd(x, target, weight, scale, -100, 0.1, True)
    want_scaled = reference_backend.cross_entropy_bwd(want_grad, scale, torch.empty_like(want_grad))
    assert_close(loss, want_loss, dtype, name="loss rows")
    assert_close(grad, want_grad, dtype, name="grad")
    assert_close(scaled, want_scaled, dtype, name="grad * scale")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["index", "index+weight+ignore+smoothing", "prob", "prob+weight+smoothing"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cupy_functional_large_vocabulary(dtype, kind):
    # N = 8192 rows of V = 32000: 512 threads a row, packed sweeps; against torch in float64.
    _needs_cupy()
    N, V = 8192, 32000
    has_weight, ignore, smoothing, prob = TARGET_KINDS[kind]
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = (torch.randn((N, V), device="cuda", generator=gen) * 4.0).to(dtype)
    if prob:
        target = torch.softmax(torch.randn((N, V), device="cuda", generator=gen) * 2.0, dim=1).to(dtype)
    else:
        target = torch.randint(0, V, (N,), device="cuda", generator=gen)
        if ignore:
            target[::7] = 1
    weight = (torch.rand(V, device="cuda", generator=gen) + 0.5).to(dtype) if has_weight else None
    for reduction in ("mean", "none"):
        x64 = x.double().requires_grad_()
        expected = F.cross_entropy(x64, target.double() if prob else target,
                                   None if weight is None else weight.double(), ignore_index=1 if ignore else -100,
                                   reduction=reduction, label_smoothing=smoothing)
        grad_out = (torch.rand(expected.shape, device="cuda", dtype=torch.float64, generator=gen) + 0.5
                    if expected.dim() else torch.tensor(1.3, dtype=torch.float64, device="cuda"))
        expected.backward(grad_out)
        xx = x.clone().requires_grad_()
        with fastdl.use_backend("cupy"):
            loss = fastdl.functional.cross_entropy(xx, target, weight, ignore_index=1 if ignore else -100,
                                                   reduction=reduction, label_smoothing=smoothing)
        loss.backward(grad_out.to(dtype))
        assert_close(loss, expected.detach(), dtype, name=f"{kind} {reduction} loss")
        assert_close(xx.grad, x64.grad, dtype, name=f"{kind} {reduction} grad_input")
        assert torch.equal(xx.detach(), x)
        del x64, xx, expected, loss


@pytest.mark.gpu
def test_cupy_bad_target_trips_the_device_assert():
    # In a child process: a device-side assert leaves the CUDA context unusable.
    _needs_cupy()
    script = (
        "import torch\n"
        "from fastdl.backends import cupy as b\n"
        "x = torch.randn(3, 5, device='cuda')\n"
        "b.cross_entropy_fwd(x, torch.tensor([0, 7, 1], device='cuda'), None, torch.ones((), device='cuda'),"
        " -100, 0.0, True)\n"
        "torch.cuda.synchronize()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "target out of bounds" in output or "device-side assert" in output, output
