"""kernels/cuda/batch_norm.cu against the float64 reference launchers, on the CPU through the host
emulation, and what NVRTC makes of it for sm_80 / sm_90.

- The emulation (tests/cuda_emulation.py) runs the cupy backend's own launchers
  (fastdl.backends.cupy.batch_norm_*) with only the final launch swapped, and each result is
  compared with fastdl.backends.reference's launcher on the same inputs: stats, elemt (out and the
  relu mask), backward_reduce and backward_elemt (training and eval), on small odd shapes through
  both mappings (channels: channels_last and (N, C) input; rows: NCHW), packed (16-byte lanes) and
  element-wise, a residual in another layout than x, every activation, float32 / float16 /
  bfloat16 / float64 (the emulation rounds bfloat16 as the GPU does), half inputs with float32
  parameters, split and unsplit reductions (the split forced by a smaller minimum), and the same
  bits on a second run.
- The static checks compile every instantiation to cubins for sm_80 and sm_90 and read their
  SASS: no local memory (spills), 16-byte global accesses in the element-wise kernels and loads in
  the reductions, shared memory within a block's limit, and the compile itself well under
  conv2d.cu's minute.
"""
from __future__ import annotations

import re
import time

import pytest
import torch

from cuda_emulation import emulated_backend, emulated_functional, launches  # noqa: F401 (fixtures)
from fastdl import nvrtc
from fastdl.backends import reference
from fastdl.backends.cupy import _runtime as cupy_runtime
from fastdl.backends.cupy import batch_norm as launcher
from fastdl.testing import assert_close, make_tensor, tolerance

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
DTYPES = [F32, F16, BF16, F64]
ACTIVATIONS = ["none", "relu", "leaky_relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh"]
ACC = {F16: F32, BF16: F32, F32: F32, F64: F64}


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        memory_format = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
        return t.contiguous(memory_format=memory_format)
    return t.contiguous()


def _as3(t: torch.Tensor | None) -> torch.Tensor | None:
    """(N, C, *spatial) -> the (N, C, S) view the functional layer hands the launchers."""
    if t is None:
        return None
    t3 = t.view(t.shape[0], t.shape[1], -1)
    assert t3.data_ptr() == t.data_ptr()
    return t3


def _empty_like3(t: torch.Tensor, dtype=None) -> torch.Tensor:
    return _as3(torch.empty_like(t, dtype=dtype))  # keeps t's memory format


# (shape, layout of x, what it exercises). LANES: 4 float, 8 half / bfloat16, 2 double.
SHAPES = {
    # rows (NCHW), S = 15: not a multiple of any LANES, element-wise; 3 channels = 3 blocks
    "nchw odd": ((3, 3, 5, 3), "contiguous"),
    # rows, S = 16: packed 16-byte lanes along s for every dtype; 2 images
    "nchw packed": ((2, 5, 4, 4), "contiguous"),
    # channels (NHWC), C = 24: packed (24 % 8 == 0), 3 / 6 / 12 groups -> 4 / 8 / 16 a block
    "nhwc packed": ((2, 24, 3, 3), "channels_last"),
    # channels, C = 7: element-wise, one group per channel, 8 groups a block (one idle)
    "nhwc odd": ((3, 7, 2, 3), "channels_last"),
    # (N, C) input: strides (C, 1, 1), the channels mapping with S = 1; C = 40 > 32 groups of
    # float: two channel tiles
    "2-d": ((5, 40), "contiguous"),
    # channels_last_3d, C = 16, S = 12
    "ndhwc": ((2, 16, 2, 3, 2), "channels_last"),
}


class Case:
    """Inputs of one batch-norm call in `dtype`: x and residual in their layouts, statistics from the
    reference (acc dtype), weight / bias (x's dtype or float32), grad_out."""

    def __init__(self, shape, layout, dtype, *, residual_layout=None, weight_dtype=None, affine=True, seed=0,
                 scale=1.0, offset=0.0):
        self.dtype = dtype
        x = make_tensor(shape, F64, seed=seed, scale=scale) + offset
        self.x = _layout(x.to(dtype), layout)
        self.x3 = _as3(self.x)
        C = shape[1]
        weight_dtype = weight_dtype or dtype
        self.weight = make_tensor((C,), weight_dtype, seed=seed + 1) if affine else None
        self.bias = make_tensor((C,), weight_dtype, seed=seed + 2) if affine else None
        self.residual = (_layout(make_tensor(shape, dtype, seed=seed + 3), residual_layout)
                         if residual_layout else None)
        self.residual3 = _as3(self.residual)
        self.grad_out = _layout(make_tensor(shape, dtype, seed=seed + 4), layout)
        self.grad_out3 = _as3(self.grad_out)
        mean, var = reference.batch_norm_stats(self.x3)
        self.mean, self.invstd = mean, torch.rsqrt(var + 1e-5)


def _check_stats(backend, case: Case):
    mean, var = backend.batch_norm_stats(case.x3)
    want_mean, want_var = reference.batch_norm_stats(case.x3)
    assert mean.dtype == var.dtype == ACC[case.dtype] and mean.shape == var.shape == (case.x.shape[1],)
    assert_close(mean, want_mean, ACC[case.dtype], name="mean")
    assert_close(var, want_var, ACC[case.dtype], name="var")
    return mean, var


def _check_elemt(backend, case: Case, activation, slope=0.01, with_mask=True):
    out3 = _empty_like3(case.x)
    mask3 = _empty_like3(case.x, torch.uint8) if with_mask else None
    args = (case.x3, case.mean, case.invstd, case.weight, case.bias, case.residual3, activation, slope)
    assert backend.batch_norm_elemt(*args, out3, mask3) is None
    want3, want_mask3 = _empty_like3(case.x), _empty_like3(case.x, torch.uint8)
    reference.batch_norm_elemt(*args, want3, want_mask3)
    assert_close(out3, want3.double(), case.dtype, name=f"out ({activation})")
    if mask3 is not None:
        assert torch.equal(mask3, want_mask3), f"mask ({activation})"
    return mask3


def _check_backward(backend, case: Case, activation, mask3=None, slope=0.01):
    args = (case.grad_out3, case.x3, case.mean, case.invstd, case.weight, case.bias, case.residual3, mask3, activation,
            slope)
    sums = backend.batch_norm_backward_reduce(*args)
    want_sums = reference.batch_norm_backward_reduce(*args)
    for name, got, want in zip(("sum_dy", "sum_dy_xmu"), sums, want_sums):
        assert got.dtype == ACC[case.dtype]
        # float32 sums of the same rounded inputs; half inputs through act' in float32
        assert_close(got, want, ACC[case.dtype] if case.dtype != BF16 else F16, name=f"{name} ({activation})")
    count = case.x3.shape[0] * case.x3.shape[2]
    mean_dy, mean_dy_xmu = want_sums[0] / count, want_sums[1] / count
    for training in (True, False):
        stats = (mean_dy, mean_dy_xmu) if training else (None, None)
        got = [_empty_like3(case.x), _empty_like3(case.x) if case.residual is not None else None]
        want = [_empty_like3(case.x), _empty_like3(case.x) if case.residual is not None else None]
        assert backend.batch_norm_backward_elemt(*args, *stats, *got) is None
        reference.batch_norm_backward_elemt(*args, *stats, *want)
        mode = "train" if training else "eval"
        assert_close(got[0], want[0].double(), case.dtype, name=f"grad_input ({activation}, {mode})")
        if got[1] is not None:
            assert_close(got[1], want[1].double(), case.dtype, name=f"grad_residual ({activation}, {mode})")
    return sums


# ---------------------------------------------------------------------------------------------
# Emulated on the CPU.

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_emulated_matches_reference(emulated_backend, shape_name, dtype):
    shape, layout = SHAPES[shape_name]
    # relu with its saved mask; gelu recomputes pre (x, statistics, weight, bias) in the backward
    case = Case(shape, layout, dtype)
    launches.clear()
    _check_stats(emulated_backend, case)
    assert [k for k, _ in launches] == ["batch_norm_stats"]  # small: one block row, no combine
    mask3 = _check_elemt(emulated_backend, case, "relu")
    _check_backward(emulated_backend, case, "relu", mask3)
    _check_backward(emulated_backend, case, "gelu")


@pytest.mark.parametrize("dtype", [F32, F16, F64], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_emulated_every_activation(emulated_backend, layout, dtype):
    # packed lanes for every dtype (C = 8 channels_last, S = 8 NCHW), a residual in the other layout: read
    # element-wise across the lanes
    other = "contiguous" if layout == "channels_last" else "channels_last"
    shape = (2, 8, 2, 2) if layout == "channels_last" else (2, 3, 2, 4)  # few blocks: the emulation is slow
    case = Case(shape, layout, dtype, residual_layout=other, seed=3)
    for activation in ACTIVATIONS:
        slope = -0.2 if activation == "leaky_relu" else 0.01  # any slope, negative too
        mask3 = _check_elemt(emulated_backend, case, activation, slope, with_mask=activation in ("relu", "leaky_relu"))
        _check_backward(emulated_backend, case, activation, slope=slope)  # pre recomputed, residual read
        if mask3 is not None:
            _check_backward(emulated_backend, case, activation, mask3, slope=slope)  # act' from the mask


@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
def test_emulated_half_with_float32_parameters(emulated_backend, dtype):
    for shape, layout in (SHAPES["nhwc packed"], SHAPES["nchw odd"]):
        case = Case(shape, layout, dtype, weight_dtype=F32, residual_layout=layout, seed=5)
        mask3 = _check_elemt(emulated_backend, case, "leaky_relu")
        _check_backward(emulated_backend, case, "leaky_relu", mask3)
        _check_backward(emulated_backend, case, "silu")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_emulated_without_weight_bias_and_outputs(emulated_backend, layout):
    case = Case((2, 12, 3, 4), layout, F32, affine=False, residual_layout=layout, seed=7)
    _check_elemt(emulated_backend, case, "tanh", with_mask=False)
    _check_backward(emulated_backend, case, "tanh")
    # grad_input alone (no residual gradient wanted) and grad_residual alone
    args = (case.grad_out3, case.x3, case.mean, case.invstd, None, None, case.residual3, None, "sigmoid", 0.01)
    count = case.x3.shape[0] * case.x3.shape[2]
    sums = reference.batch_norm_backward_reduce(*args)
    stats = (sums[0] / count, sums[1] / count)
    for outputs in ((True, False), (False, True)):
        got = [_empty_like3(case.x) if o else None for o in outputs]
        want = [_empty_like3(case.x) if o else None for o in outputs]
        emulated_backend.batch_norm_backward_elemt(*args, *stats, *got)
        reference.batch_norm_backward_elemt(*args, *stats, *want)
        for g, w in zip(got, want):
            if g is not None:
                assert_close(g, w.double(), F32, name="grad")


def _force_split(monkeypatch, steps=1):
    monkeypatch.setattr(launcher, "MIN_SPLIT_STEPS", steps)


# Shapes of more items than a block's step (256 rows-mapping items of up to 8 lanes, 8-32 channels
# mapping rows), so that a split of one step makes several block rows; the last split partial.
SPLIT_SHAPES = {
    "nchw packed": ((9, 2, 16, 16), "contiguous"),  # 288 / 576 / 1152 half / float / double items
    "nchw odd": ((21, 2, 5, 3), "contiguous"),      # 315 items, 2 splits
    "nhwc packed": ((14, 24, 3, 3), "channels_last"),
    "2-d": ((35, 40), "contiguous"),
}


@pytest.mark.parametrize("dtype", [F32, F16, F64], ids=str)
@pytest.mark.parametrize("shape_name", list(SPLIT_SHAPES))
def test_emulated_split_reductions(emulated_backend, monkeypatch, shape_name, dtype):
    # A split of one thread step: several block rows, partials combined in split order (the counts
    # the combine gives each split must match what each block read). At most 3 block rows: the
    # element-wise kernels, one step a block row, stride over the rest of the chunks.
    shape, layout = SPLIT_SHAPES[shape_name]
    case = Case(shape, layout, dtype, residual_layout=layout, seed=11)
    _force_split(monkeypatch)
    monkeypatch.setattr(launcher, "ELEMT_STEPS", 1)
    monkeypatch.setattr(launcher, "MAX_GRID_Y", 3)
    g = launcher.Geometry(case.x3)
    splits, chunk = g.reduce_split()
    assert 1 < splits <= 3 and (splits - 1) * chunk < g.items <= splits * chunk
    (_, rows), elemt_chunk = g.elemt_grid()
    assert rows == min(3, -(-g.items // elemt_chunk))
    launches.clear()
    mean, var = _check_stats(emulated_backend, case)
    mask3 = _check_elemt(emulated_backend, case, "relu")
    _check_backward(emulated_backend, case, "relu", mask3)
    sums = _check_backward(emulated_backend, case, "silu")
    assert [k for k, _ in launches][:2] == ["batch_norm_stats", "batch_norm_stats_combine"]
    assert "batch_norm_backward_reduce_combine" in [k for k, _ in launches]
    # Deterministic: the same bits again.
    again = emulated_backend.batch_norm_stats(case.x3)
    assert torch.equal(again[0], mean) and torch.equal(again[1], var)
    args = (case.grad_out3, case.x3, case.mean, case.invstd, case.weight, case.bias, case.residual3, None, "silu",
            0.01)
    for first, second in zip(sums, emulated_backend.batch_norm_backward_reduce(*args)):
        assert torch.equal(first, second)


def test_emulated_stats_without_cancellation(emulated_backend, monkeypatch):
    # mean 1e4, standard deviation ~1 in float32: sum and sum of squares would lose the variance
    # (1e8 +- 1 in 24 bits); Welford / Chan keeps it to float32's rounding of the inputs.
    for layout, shape in (("contiguous", (4, 3, 6, 5)), ("channels_last", (4, 16, 3, 5))):
        for steps in (launcher.MIN_SPLIT_STEPS, 1):
            _force_split(monkeypatch, steps)
            case = Case(shape, layout, F32, offset=1e4, seed=13)
            mean, var = emulated_backend.batch_norm_stats(case.x3)
            want_mean, want_var = reference.batch_norm_stats(case.x3)
            assert (want_var > 0.1).all()
            torch.testing.assert_close(mean.double(), want_mean.double(), rtol=1e-6, atol=0)
            torch.testing.assert_close(var.double(), want_var.double(), rtol=1e-3, atol=0)


def test_emulated_misaligned_views(emulated_backend):
    # channels_last x whose channel runs start off a 16-byte boundary (the element-wise loads of the
    # packed mapping) and an NCHW x sliced along s (S = 16, rows 2 elements off alignment).
    wide = _layout(make_tensor((2, 20, 3, 3), F16, seed=17), "channels_last")
    x = wide[:, 1:17]
    x3 = x.as_strided((2, 16, 9), (x.stride(0), 1, 20), x.storage_offset())
    g = launcher.Geometry(x3)
    assert g.channels and g.packed and not g.vec(x3)
    mean, var = emulated_backend.batch_norm_stats(x3)
    want = reference.batch_norm_stats(x3)
    assert_close(mean, want[0], F32, name="mean")
    assert_close(var, want[1], F32, name="var")
    wide = make_tensor((2, 3, 18), F32, seed=19)
    x3 = wide[:, :, 2:]
    g = launcher.Geometry(x3)
    assert not g.channels and g.packed and not g.vec(x3)
    out3, want3 = torch.empty(2, 3, 16), torch.empty(2, 3, 16)
    mean, var = reference.batch_norm_stats(x3)
    for backend, out in ((emulated_backend, out3), (reference, want3)):
        backend.batch_norm_elemt(x3, mean, torch.rsqrt(var + 1e-5), None, None, None, "gelu", 0.01, out, None)
    assert_close(out3, want3.double(), F32, name="out")


# ---------------------------------------------------------------------------------------------
# Launch geometry.

def test_constants_and_instantiations_match_the_source():
    source = nvrtc.read_source("batch_norm")
    defines = dict(re.findall(r"#define (BN_\w+) (\d+)", source))
    assert int(defines["BN_THREADS"]) == launcher.BN_THREADS
    assert int(defines["BN_PACK_BYTES"]) == launcher.BN_PACK_BYTES
    assert int(defines["BN_MAX_GROUPS"]) == launcher.BN_MAX_GROUPS
    for name in ("X", "RESIDUAL", "OUT", "MASK", "GRAD_OUT", "GRAD_INPUT", "GRAD_RESIDUAL"):
        assert int(defines[f"BN_VEC_{name}"]) == getattr(launcher, f"VEC_{name}")
    assert "batch_norm.cu" in [p.name for p in nvrtc.cuda_sources()]
    assert cupy_runtime.SOURCE_PRELUDES["batch_norm"] == ("linear",)  # linear.cu's activations
    assert set(cupy_runtime.NAME_EXPRESSIONS["batch_norm"]) == (
        {f"{k}<{cupy_runtime.CUDA_TYPES[d]}>" for k in cupy_runtime.BATCH_NORM_KERNELS for d in DTYPES}
        | {f"{k}<{t}>" for k in cupy_runtime.BATCH_NORM_COMBINES for t in ("float", "double")})


def test_mapping_choice():
    cl = _as3(_layout(make_tensor((2, 64, 5, 5), BF16), "channels_last"))
    g = launcher.Geometry(cl)
    assert g.channels and g.packed and g.tile_groups == 8 and g.grid_x == 1 and g.step == 32 and g.vec(cl)
    g = launcher.Geometry(_as3(make_tensor((2, 64, 7, 7), F32)))  # NCHW, S = 49: element-wise rows
    assert not g.channels and not g.packed and g.grid_x == 64 and g.items == 98
    g = launcher.Geometry(_as3(make_tensor((2, 64, 8, 8), F32)))  # NCHW, S = 64: packed rows
    assert not g.channels and g.packed and g.items == 2 * 64 // 4
    g = launcher.Geometry(_as3(make_tensor((2, 2048, 7, 7), F16).contiguous(memory_format=torch.channels_last)))
    assert g.channels and g.tile_groups == 32 and g.grid_x == 2048 // 256
    g = launcher.Geometry(_as3(make_tensor((8, 1, 4, 4), F32).contiguous(memory_format=torch.channels_last)))
    assert not g.channels  # C = 1: strides (S, 1, 1), the rows mapping along s
    g = launcher.Geometry(make_tensor((8, 6), F32).view(8, 6, 1))
    assert g.channels and not g.packed and g.tile_groups == 8


def test_reductions_fill_the_gpu():
    # ResNet-50 at batch 256: stage 1 (C = 64, 56x56) and stage 4 (C = 2048, 7x7), both layouts
    cases = [((256, 64, 56, 56), BF16), ((256, 2048, 7, 7), BF16), ((256, 64, 56, 56), F32)]
    for shape, dtype in cases:
        for memory_format in (torch.contiguous_format, torch.channels_last):
            x3 = _as3(torch.empty(shape, dtype=dtype).contiguous(memory_format=memory_format))
            g = launcher.Geometry(x3)
            splits, chunk = g.reduce_split()
            assert g.grid_x * splits >= launcher.REDUCE_BLOCKS // 2, (shape, memory_format, g.grid_x, splits)
            assert chunk % g.step == 0 and chunk >= g.step * launcher.MIN_SPLIT_STEPS
            assert (splits - 1) * chunk < g.items <= splits * chunk
    g = launcher.Geometry(_as3(torch.empty((2, 64, 5, 5)).contiguous(memory_format=torch.channels_last)))
    assert g.reduce_split()[0] == 1  # small: one block row, no partials


# ---------------------------------------------------------------------------------------------
# The binaries NVRTC makes for sm_80 and sm_90.

@pytest.fixture(scope="module", params=["sm_80", "sm_90"])
def compiled(request):
    pytest.importorskip("cuda.bindings.nvrtc", reason="NVRTC (cuda-bindings) is needed for the compile checks")
    from fastdl.inspection import sass

    start = time.perf_counter()
    stats = sass.instantiation_stats("batch_norm", request.param)
    return request.param, stats, time.perf_counter() - start


def test_every_instantiation_compiles_without_spills(compiled):
    arch, stats, elapsed = compiled
    assert set(stats) == set(cupy_runtime.NAME_EXPRESSIONS["batch_norm"])
    spills = {e: s.stack for e, s in stats.items() if s.stack or s.spill_stores}
    assert not spills, f"{arch}: local memory (spills) in {spills}"
    assert elapsed < 60, f"{arch}: {elapsed:.0f} s (cached compiles take none)"


def test_16_byte_accesses(compiled):
    from fastdl.inspection import sass

    arch, stats, _ = compiled
    for dtype in DTYPES:
        t = cupy_runtime.CUDA_TYPES[dtype]
        for kernel in ("batch_norm_elemt", "batch_norm_backward_elemt"):
            assert stats[f"{kernel}<{t}>"].global_loads_128 > 0 and stats[f"{kernel}<{t}>"].global_stores_128 > 0
        for kernel in ("batch_norm_stats", "batch_norm_backward_reduce"):
            s = stats[f"{kernel}<{t}>"]
            assert s.global_loads_128 > 0, (arch, kernel, dtype)
            assert s.static_shared <= sass.DEVICES[arch].shared_per_block


# ---------------------------------------------------------------------------------------------
# Whole fastdl.functional.batch_norm calls (forward, autograd, running statistics) on the
# emulated kernels: the op's use of the launchers (tests/test_batch_norm.py's checks).

@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_emulated_functional_training_and_eval(emulated_functional, layout, dtype):
    from test_batch_norm import run_batch_norm

    for training in (True, False):
        launches.clear()
        run_batch_norm("cupy", dtype, (2, 8, 3, 4), layout=layout, activation="relu", training=training)
        kernels = [k for k, _ in launches]
        assert kernels[-2:] == ["batch_norm_backward_reduce", "batch_norm_backward_elemt"], kernels
        assert ("batch_norm_stats" in kernels) == training
