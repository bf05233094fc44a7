"""fastdl.functional.max_pool2d / nn.MaxPool2d: the Triton kernels (interpreter) and the reference
backend against the float64 reference, torch's semantics at the edges (NaN, -inf, ties, ceil_mode,
return_indices, layouts), errors, the bytes kept for backward, autograd and torch.compile.
The CUDA kernels: tests/test_cuda_max_pool2d.py (host emulation) and test_cuda_compile.py (NVRTC)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastdl
from fastdl.kernels.triton import max_pool2d as pool_kernels
from fastdl.reference import max_pool2d as ref
from fastdl.testing import assert_close, make_tensor

NAN, INF = float("nan"), float("inf")

# id: (input shape, kernel_size, stride, padding, dilation, ceil_mode), the path each exercises
CASES = {
    # ResNet's stem pool, small: overlapping 3x3 windows, padding on every side; backward gathers
    # from up to 4 windows per element. C = 16: one channel block, 16-byte runs in fp16/fp32.
    "stem 3x3/2 pad 1": ((2, 16, 11, 13), 3, 2, 1, 1, False),
    # ceil_mode: the last window hangs past the bottom/right edge (partial windows).
    "ceil 2x2/2": ((1, 3, 9, 10), 2, None, 0, 1, True),
    # ceil_mode's rule: a window starting past the input and the padding is dropped (P 3, not 4).
    "ceil 3x3/3 pad 1": ((1, 4, 7, 8), 3, 3, 1, 1, True),
    # dilation and rectangular windows: taps skip rows/columns, windows starting in the padding.
    "dilated (3,2)/(2,1)": ((2, 5, 10, 9), (3, 2), (2, 1), (1, 1), (2, 3), False),
    # C = 70: two channel blocks (64 + a masked 6), odd pixel counts: masked tails everywhere.
    "70 channels 2x2/1": ((1, 70, 5, 6), 2, 1, 0, 1, False),
    # NCHW rows whose length (Q 16, W 32) and strides are multiples of 16 bytes: ALIGN 8 in fp16,
    # 4 in fp32, 2 in fp64 (vector stores of output and grad_input rows, the mask by groups).
    "aligned rows 3x3/2 pad 1": ((2, 3, 16, 32), 3, 2, 1, 1, False),
    # Non-overlapping 2x2/2 (each element in at most one window) with one channel (C = 1).
    "2x2/2 one channel": ((3, 1, 8, 6), 2, 2, 0, 1, False),
}
LAYOUTS = ("contiguous", "channels_last", "view")


def _np(t):
    return t.detach().cpu().double().numpy()


def make_input(shape, dtype, layout, seed=0):
    """Non-uniform values in the layout asked: contiguous NCHW, channels_last (NHWC), or a
    non-contiguous view (every other column of a wider NHWC tensor, permuted to NCHW)."""
    x = make_tensor(shape, dtype, seed=seed, scale=2.0)
    if layout == "channels_last":
        return x.to(memory_format=torch.channels_last)
    if layout == "view":
        N, C, H, W = shape
        wide = torch.zeros((N, H, 2 * W, C), dtype=dtype)
        wide[:, :, ::2] = x.permute(0, 2, 3, 1)
        view = wide[:, :, ::2].permute(0, 3, 1, 2)
        assert not view.is_contiguous() and not view.is_contiguous(memory_format=torch.channels_last)
        return view
    return x


def run_max_pool2d(backend, dtype, case, layout, *, return_indices=False, seed=0, grad_layout=None):
    """Forward, indices and grad_input through fastdl against the float64 reference (and torch's
    output memory format); one random grad_output."""
    shape, kernel, stride, padding, dilation, ceil_mode = case
    x = make_input(shape, dtype, layout, seed).requires_grad_()
    with fastdl.use_backend(backend):
        result = fastdl.functional.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, return_indices)
    out, indices = result if return_indices else (result, None)
    args = ref.normalize_args(kernel, stride, padding, dilation)
    expected, saved = ref.forward(_np(x), *args, ceil_mode=ceil_mode)
    g = make_tensor(out.shape, dtype, seed=seed + 1)
    if grad_layout == "channels_last":
        g = g.to(memory_format=torch.channels_last)
    elif grad_layout == "transposed":
        g = g.transpose(2, 3).contiguous().transpose(2, 3)
    out.backward(g)
    assert out.dtype == dtype and tuple(out.shape) == expected.shape
    # The maximum is a copy of an input element: equal, not close (NaN where the reference has NaN).
    np.testing.assert_array_equal(_np(out), expected)
    assert out.stride() == F.max_pool2d(x.detach(), kernel, stride, padding, dilation, ceil_mode).stride()
    if return_indices:
        assert indices.dtype == torch.int64 and indices.stride() == out.stride()
        np.testing.assert_array_equal(indices.numpy(), saved["indices"])
    assert_close(x.grad, ref.backward(_np(g), saved), dtype, name=f"{backend} {dtype} {layout} grad_input")
    return x, out


# --- Triton kernels through the interpreter (CPU CI) ----------------------------------------------

# The strided view path is dtype-independent: fp32 runs it, fp16 and fp64 the other layouts.
@pytest.mark.parametrize("dtype, case, layout", [
    pytest.param(dtype, case, layout, id=f"{dtype}-{case}-{layout}")
    for dtype in (torch.float32, torch.float16, torch.float64) for case in CASES for layout in LAYOUTS
    if dtype == torch.float32 or layout != "view"])
def test_triton_matches_reference(dtype, case, layout):
    run_max_pool2d("triton", dtype, CASES[case], layout, return_indices=case.startswith(("stem", "dilated")))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_triton_bf16(layout):
    run_max_pool2d("triton", torch.bfloat16, CASES["stem 3x3/2 pad 1"], layout)


@pytest.mark.parametrize("grad_layout", ["channels_last", "transposed"])
def test_triton_grad_output_in_another_layout(grad_layout):
    # autograd's grad_output need not have the output's strides: the gather reads it by strides.
    run_max_pool2d("triton", torch.float32, CASES["stem 3x3/2 pad 1"], "contiguous", grad_layout=grad_layout)
    run_max_pool2d("triton", torch.float32, CASES["dilated (3,2)/(2,1)"], "channels_last", grad_layout=grad_layout)


def test_triton_int64_pixel_index(monkeypatch):
    # Row counts past 2**31 take int64 row indices (ROW64); forced here at a small shape.
    from fastdl.backends.triton import max_pool2d as launcher

    monkeypatch.setattr(launcher, "INT32_MAX", 8)
    run_max_pool2d("triton", torch.float32, CASES["ceil 2x2/2"], "channels_last", return_indices=True)


def test_triton_windows_over_256_taps_save_int64_indices(monkeypatch):
    # Over MAX_BYTE_TAPS taps (a window over 16 x 16) the tap would not fit a byte, so backward
    # reads torch's flat indices; the limit is lowered here so a 3x3 window takes that path.
    from fastdl.ops import max_pool2d as pool_ops

    assert pool_ops.saved_dtype((16, 16), False) == torch.uint8 and pool_ops.saved_dtype((17, 16), False) == torch.int64
    monkeypatch.setattr(pool_ops, "MAX_BYTE_TAPS", 8)
    for layout in ("contiguous", "channels_last"):
        x, _ = run_max_pool2d("triton", torch.float32, CASES["stem 3x3/2 pad 1"], layout)


def test_block_sizes():
    # channels_last tiles up to 64 channels a block; NCHW takes rows of up to 64 columns.
    assert pool_kernels.blocks(70, 9, True) == (32, 64)
    assert pool_kernels.blocks(16, 9, True) == (128, 16)
    assert pool_kernels.blocks(3, 9, True) == (512, 4)
    assert pool_kernels.blocks(64, 56, False) == (16, 64)
    assert pool_kernels.blocks(64, 7, False) == (128, 8)
    assert pool_kernels.blocks(64, 112, False) == (16, 64)


def test_reference_backend_matches_reference():
    run_max_pool2d("reference", torch.float32, CASES["dilated (3,2)/(2,1)"], "channels_last", return_indices=True)


# --- torch's semantics at the edges ------------------------------------------------------------------

def special_values():
    """(1, 2, 6, 6) windows of 2x2/2 holding: ties (first wins), -0.0 and 0.0 (first one's sign),
    a NaN among numbers, two NaNs (the last reported), all NaN, all -inf (the first tap), +inf."""
    x = torch.tensor([
        [[1, 1, 2, 3, NAN, 5],
         [1, 0, 3, 0, 7, 8],
         [-0.0, 0.0, NAN, 1, -INF, -INF],
         [0.0, -0.0, 2, NAN, -INF, -INF],
         [NAN, NAN, INF, 1, INF, INF],
         [NAN, NAN, 0, INF, 2, 3]],
    ], dtype=torch.float64)
    return torch.cat([x, -x.flip(2)]).unsqueeze(0)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_nan_inf_ties_match_torch(backend, dtype):
    x = special_values().to(dtype)
    for layout in ("contiguous", "channels_last"):
        for kernel, stride, padding, ceil_mode in ((2, 2, 0, False), (3, 2, 1, True), (3, 1, 1, False)):
            a = x.to(memory_format=torch.channels_last) if layout == "channels_last" else x.clone()
            a.requires_grad_()
            b = x.clone().requires_grad_()
            with fastdl.use_backend(backend):
                out, idx = fastdl.functional.max_pool2d(a, kernel, stride, padding, ceil_mode=ceil_mode,
                                                        return_indices=True)
            want, want_idx = F.max_pool2d(b, kernel, stride, padding, ceil_mode=ceil_mode, return_indices=True)
            torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True)
            assert torch.equal(torch.signbit(out), torch.signbit(want))
            assert torch.equal(idx, want_idx), (kernel, stride, padding, layout)
            g = make_tensor(out.shape, dtype, seed=3)
            out.backward(g)
            want.backward(g)
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_unbatched_empty_batch_and_inference(backend):
    x = make_tensor((3, 7, 8), torch.float64, seed=1, requires_grad=True)  # (C, H, W)
    hwc = make_tensor((7, 8, 3), torch.float64, seed=2).permute(2, 0, 1)  # unbatched HWC: contiguous output
    with fastdl.use_backend(backend):
        out, idx = fastdl.functional.max_pool2d(x, 3, 2, 1, return_indices=True)
        out_hwc = fastdl.functional.max_pool2d(hwc, 2)
        empty = fastdl.functional.max_pool2d(torch.zeros((0, 4, 6, 6), requires_grad=True), 2)
        with torch.no_grad():
            inference = fastdl.functional.max_pool2d(x, 3, 2, 1)
    want, want_idx = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    assert torch.equal(out, want) and torch.equal(idx, want_idx) and torch.equal(inference, want)
    assert out_hwc.shape == (3, 3, 4) and out_hwc.is_contiguous() and torch.equal(out_hwc, F.max_pool2d(hwc, 2))
    (g,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert torch.equal(g, torch.autograd.grad(want, x, torch.ones_like(want))[0])
    assert empty.shape == (0, 4, 3, 3)
    empty.sum().backward()


def _saved_bytes(fn, x):
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() != x.data_ptr():
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_backward_keeps_one_byte_per_output():
    x = make_tensor((2, 8, 12, 12), seed=1, requires_grad=True).to(memory_format=torch.channels_last)
    theirs = _saved_bytes(lambda: F.max_pool2d(x, 3, 2, 1), x)
    with fastdl.use_backend("triton"):
        ours = _saved_bytes(lambda: fastdl.functional.max_pool2d(x, 3, 2, 1), x)
    assert ours == 2 * 8 * 6 * 6 and theirs == 8 * ours  # uint8 taps against torch's int64 indices


# --- bad input: torch's exception types, messages naming the op and the shapes, nothing written ---------

BAD = [
    ("kernel 0", lambda x: ((x, 0), {})),
    ("kernel 0 stride 1", lambda x: ((x, 0, 1), {})),
    ("stride 0", lambda x: ((x, 2, 0), {})),
    ("negative stride", lambda x: ((x, 2, -1), {})),
    ("dilation 0", lambda x: ((x, 2), {"dilation": 0})),
    ("padding over half the kernel", lambda x: ((x, 2, 1, 2), {})),
    ("negative padding", lambda x: ((x, 3, 1, -1), {})),
    ("kernel of 3 ints", lambda x: ((x, (2, 2, 2)), {})),
    ("float kernel", lambda x: ((x, 2.0), {})),
    ("2-D input", lambda x: ((x[0, 0], 2), {})),
    ("5-D input", lambda x: ((x.unsqueeze(0), 2), {})),
    ("empty channels", lambda x: ((x[:, :0], 2), {})),
    ("empty height", lambda x: ((x[:, :, :0], 2), {})),
    ("output too small", lambda x: ((x[:, :, :1, :1], 2), {})),
    ("not a tensor", lambda x: ((x.tolist(), 2), {})),
    ("integer input", lambda x: ((x.to(torch.int32), 2), {})),
]


@pytest.mark.parametrize("name,make", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_torch_exception_type(name, make):
    x = make_tensor((2, 3, 6, 6), seed=1)
    args, kwargs = make(x)
    if name == "integer input":  # torch pools integers; fastdl has float kernels only
        with pytest.raises(NotImplementedError, match="max_pool2d.*int32"):
            fastdl.functional.max_pool2d(*args, **kwargs)
        return
    with pytest.raises(Exception) as theirs:
        F.max_pool2d(*args, **kwargs)
    before = x.clone()
    with pytest.raises(type(theirs.value)) as ours:
        fastdl.functional.max_pool2d(*args, **kwargs)
    assert "max_pool2d" in str(ours.value)
    if name not in ("kernel of 3 ints", "float kernel", "not a tensor"):  # the argument forms need no input
        assert "x".join(map(str, args[0].shape)) in str(ours.value) or str(list(args[0].shape)) in str(ours.value)
    assert torch.equal(x, before)


def test_window_without_an_input_tap_is_rejected():
    # torch returns index 2 * 2 + 2 = 6 (outside the 2x2 plane) for window (0, 0) and its backward
    # writes there; fastdl says why instead.
    x = make_tensor((1, 1, 2, 2), seed=1)
    with pytest.raises(RuntimeError, match=r"max_pool2d: output row 0 pools over no element.*1x1x2x2"):
        fastdl.functional.max_pool2d(x, 2, 1, 1, 3)
    fastdl.functional.max_pool2d(make_tensor((1, 1, 4, 4), seed=1), 2, 1, 1, 3)  # every window reaches the input


# --- nn.MaxPool2d ----------------------------------------------------------------------------------------

def test_nn_max_pool2d_is_a_drop_in():
    for kwargs in (dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=2, ceil_mode=True, return_indices=True)):
        theirs, ours = torch.nn.MaxPool2d(**kwargs), fastdl.nn.MaxPool2d(**kwargs)
        assert isinstance(ours, torch.nn.MaxPool2d) and repr(ours) == repr(theirs)
        assert list(ours.state_dict()) == []
        x = make_tensor((2, 4, 9, 9), torch.float64, seed=1)
        with fastdl.use_backend("triton"):
            got = ours(x)
        want = theirs(x)
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert torch.equal(a, b)


# --- autograd and torch.compile -----------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_gradcheck_gradgradcheck(backend):
    x = make_tensor((1, 2, 7, 6), torch.float64, seed=1, requires_grad=True)
    fast = dict(fast_mode=True) if backend == "triton" else {}
    with fastdl.use_backend(backend):
        fn = lambda x: fastdl.functional.max_pool2d(x, 3, 2, 1, ceil_mode=True)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x,), **fast)
        assert torch.autograd.gradgradcheck(fn, (x,), **fast)


def test_double_backward_matches_torch():
    x = make_tensor((2, 3, 8, 7), torch.float64, seed=1, requires_grad=True)
    g = make_tensor((2, 3, 4, 4), torch.float64, seed=2, requires_grad=True)
    v = make_tensor((2, 3, 8, 7), torch.float64, seed=3)
    grads = []
    for fn in (F.max_pool2d, fastdl.functional.max_pool2d):
        with fastdl.use_backend("triton"):
            (gx,) = torch.autograd.grad(fn(x, 3, 2, 1), x, g, create_graph=True)
        grads.append(torch.autograd.grad(gx, g, v))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_torch_func_runs_the_torch_entry():
    x = make_tensor((2, 3, 6, 6), torch.float64, seed=1)
    fn = lambda x: fastdl.functional.max_pool2d(x, 2).square().sum()  # noqa: E731
    want = lambda x: F.max_pool2d(x, 2).square().sum()  # noqa: E731
    torch.testing.assert_close(torch.func.grad(fn)(x), torch.func.grad(want)(x))
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(fn))(x.unsqueeze(1)),
                               torch.func.vmap(torch.func.grad(want))(x.unsqueeze(1)))


def test_torch_compile_fullgraph_reference_backend():
    torch.manual_seed(0)
    model = torch.nn.Sequential(fastdl.nn.Linear(6, 6, activation="relu"), fastdl.nn.MaxPool2d(3, 2, 1)).double()
    x = make_tensor((2, 3, 5, 6), torch.float64, seed=1, requires_grad=True)
    with fastdl.use_backend("reference"):
        expected = model(x)
        out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
        (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(grad, torch.autograd.grad(expected.sum(), x)[0], rtol=0, atol=0)
