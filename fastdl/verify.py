"""`fastdl verify`: every op, every available backend and dtype, forward and backward, against the
float64 reference; one table row per (op, backend, dtype, shape, quantity).

Each op registers a check with `@check("op")`: a generator taking (backend, dtype, device) and
yielding rows made by `compare_row`. Without CUDA, the Triton kernels run through Triton's
interpreter and the CUDA sources are compiled with NVRTC instead of run. bf16 rows on the
interpreter check the launchers' bf16 policy (fastdl/backends/triton/_launch.py: bf16 inputs run
in float32, results rounded to bf16 at each launcher's boundary), not the GPU's bf16 arithmetic,
which only a run on a GPU checks.
"""
from __future__ import annotations

import json
import sys
import time

import torch

import fastdl
from fastdl import testing

CHECKS = {}
DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def check(op: str):
    def register(fn):
        CHECKS[op] = fn
        return fn
    return register


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def compare_row(op, backend, dtype, shape, quantity, actual, expected, tf32=False) -> dict:
    result = testing.compare(actual, expected, dtype, tf32, quantity)
    return dict(op=op, backend=backend, dtype=dtype_name(dtype) + ("/tf32" if tf32 else ""), shape=shape,
                check=quantity, max_abs=result["max_abs"], max_rel=result["max_rel"],
                status="pass" if result["ok"] else "FAIL")


def note_row(op, backend, dtype, shape, quantity, status, detail="") -> dict:
    return dict(op=op, backend=backend, dtype=dtype, shape=shape, check=quantity, max_abs=None, max_rel=None,
                status=status, detail=detail)


def _np(t):
    return None if t is None else t.detach().cpu().double().numpy()


@check("linear")
def _check_linear(backend, dtype, device):
    from fastdl.reference import linear as ref

    shapes = [(37, 29, 23), (130, 100, 65)]
    if device == "cuda":
        shapes += [(4096, 784, 256), (2048, 2048, 2048)]
    tf32 = dtype == torch.float32 and device == "cuda" and torch.backends.cuda.matmul.allow_tf32
    for M, K, N in shapes:
        for activation in ("relu", "gelu_tanh"):
            x = testing.make_tensor((M, K), dtype, device, seed=1, requires_grad=True)
            w = testing.make_tensor((N, K), dtype, device, seed=2, scale=K ** -0.5, requires_grad=True)
            b = testing.make_tensor((N,), dtype, device, seed=3, requires_grad=True)
            g = testing.make_tensor((M, N), dtype, device, seed=4)
            with fastdl.use_backend(backend):
                out = fastdl.functional.linear(x, w, b, activation=activation)
                out.backward(g)
            expected, saved = ref.forward(_np(x), _np(w), _np(b), activation, 0.01)
            grads = ref.backward(_np(g), saved)
            shape = f"{M}x{K}->{N} {activation}"
            yield compare_row("linear", backend, dtype, shape, "out", out, expected, tf32)
            for name, got, want in zip(("grad_input", "grad_weight", "grad_bias"), (x.grad, w.grad, b.grad), grads):
                yield compare_row("linear", backend, dtype, shape, name, got, want, tf32)


def _reference_vs_torch():
    """The oracle itself, against torch autograd in float64."""
    from fastdl.functional import _TORCH_ACTIVATIONS
    from fastdl.reference import linear as ref

    x = testing.make_tensor((37, 29), torch.float64, seed=1, requires_grad=True)
    w = testing.make_tensor((23, 29), torch.float64, seed=2, requires_grad=True)
    b = testing.make_tensor((23,), torch.float64, seed=3, requires_grad=True)
    g = testing.make_tensor((37, 23), torch.float64, seed=4)
    for activation in fastdl.functional.ACTIVATIONS:
        for t in (x, w, b):
            t.grad = None
        out = _TORCH_ACTIVATIONS[activation](torch.nn.functional.linear(x, w, b), 0.01)
        out.backward(g)
        expected, saved = ref.forward(_np(x), _np(w), _np(b), activation, 0.01)
        grads = ref.backward(_np(g), saved)
        shape = f"37x29->23 {activation}"
        yield compare_row("linear", "reference~torch", torch.float64, shape, "out", out, expected)
        for name, got, want in zip(("grad_input", "grad_weight", "grad_bias"), (x.grad, w.grad, b.grad), grads):
            yield compare_row("linear", "reference~torch", torch.float64, shape, name, got, want)


def _nvrtc_rows():
    try:
        from fastdl import nvrtc
    except ImportError as exc:  # pragma: no cover - helper module missing
        yield note_row("*", "cupy", "-", "-", "nvrtc compile", "not checked", str(exc))
        return
    try:
        sources = nvrtc.cuda_sources()
    except Exception as exc:  # cuda-bindings missing: say so instead of failing
        yield note_row("*", "cupy", "-", "-", "nvrtc compile", "not checked", str(exc))
        return
    for source in sources:
        for arch in ("sm_80", "sm_90"):
            try:
                ok, log = nvrtc.compile_source(source, arch)
            except Exception as exc:
                ok, log = False, str(exc)
            op = getattr(source, "stem", str(source).rsplit("/", 1)[-1].split(".")[0])
            yield note_row(op, "cupy", "-", arch, "nvrtc compile", "pass" if ok else "FAIL",
                           "" if ok else log[-2000:])


def collect(ops=None, backends=None):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    available = fastdl.available_backends()
    wanted = backends or ["triton", "cupy", "reference"]
    rows = []
    if "reference" in wanted:
        rows += list(_reference_vs_torch())
    for backend in wanted:
        if backend == "reference":
            continue  # the oracle itself: checked against torch above
        if backend == "cupy" and device == "cpu":
            rows += list(_nvrtc_rows())
            continue
        if backend not in available:
            rows.append(note_row("*", backend, "-", "-", "run", "not available", "not installed or no device"))
            continue
        for op, fn in CHECKS.items():
            if ops and op not in ops:
                continue
            for dtype in DTYPES:
                try:
                    rows += list(fn(backend, dtype, device))
                except Exception as exc:
                    rows.append(note_row(op, backend, dtype_name(dtype), "-", "run", "FAIL",
                                         f"{type(exc).__name__}: {exc}"))
    return rows


def _fmt(value):
    return "-" if value is None else f"{value:.2e}"


def print_table(rows, file=None):
    file = file or sys.stdout  # looked up per call: the caller may have redirected it
    header = ("op", "backend", "dtype", "shape", "check", "max abs", "max rel", "status")
    table = [header] + [(r["op"], r["backend"], r["dtype"], r["shape"], r["check"], _fmt(r["max_abs"]),
                         _fmt(r["max_rel"]), r["status"]) for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)), file=file)
    for r in rows:
        if r.get("detail") and r["status"] == "FAIL":
            print(f"\n{r['op']} {r['backend']} {r['dtype']} {r['shape']}: {r['detail']}", file=file)


def run(ops=None, backends=None, json_path=None) -> int:
    start = time.time()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (Triton interpreter, NVRTC)"
    print(f"fastdl {fastdl.__version__} verify on {device}; backends available: {fastdl.available_backends()}")
    rows = collect(ops, backends)
    print_table(rows)
    failed = sum(r["status"] == "FAIL" for r in rows)
    passed = sum(r["status"] == "pass" for r in rows)
    print(f"\n{passed} passed, {failed} failed, {len(rows) - passed - failed} not checked "
          f"in {time.time() - start:.1f}s")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(device=device, torch=torch.__version__, rows=rows), f, indent=1, default=str)
    return 1 if failed else 0


# --- cross_entropy ---------------------------------------------------------------------------------
# (The oracle itself is proven against torch in tests/test_reference_cross_entropy.py.)

def _has_cross_entropy(backend) -> bool:
    from fastdl import backends

    return hasattr(backends.get(backend), "cross_entropy_fwd")


@check("cross_entropy")
def _check_cross_entropy(backend, dtype, device):
    from fastdl.reference import cross_entropy as ref

    if not _has_cross_entropy(backend):
        yield note_row("cross_entropy", backend, dtype_name(dtype), "-", "all", "not checked", "no launcher yet")
        return
    shapes = [(64, 1000), (8, 5003)]
    if device == "cuda":
        shapes += [(4096, 32000)]
    for R, C in shapes:
        for case in ("index+weight+ignore", "smoothing", "prob"):
            x = testing.make_tensor((R, C), dtype, device, seed=1, scale=3.0, requires_grad=True)
            gen = torch.Generator().manual_seed(2)
            if case == "prob":
                target = torch.softmax(testing.make_tensor((R, C), torch.float64, seed=3), 1).to(dtype).to(device)
            else:
                target = torch.randint(0, C, (R,), generator=gen)
                target[::5] = -100
                target = target.to(device)
            weight = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).to(dtype).to(device) \
                if case == "index+weight+ignore" else None
            smoothing = 0.1 if case != "index+weight+ignore" else 0.0
            reduction = "none" if case == "smoothing" else "mean"
            with fastdl.use_backend(backend):
                loss = fastdl.functional.cross_entropy(x, target, weight, reduction=reduction,
                                                       label_smoothing=smoothing)
            g = testing.make_tensor(loss.shape, dtype, device, seed=4) if loss.dim() else torch.ones((), dtype=dtype,
                                                                                                   device=device)
            loss.backward(g)
            expected, saved = ref.forward(_np(x), _np(target) if case == "prob" else target.cpu().numpy(),
                                          _np(weight), -100, reduction, smoothing)
            shape = f"{R}x{C} {case} {reduction}"
            yield compare_row("cross_entropy", backend, dtype, shape, "loss", loss, expected)
            yield compare_row("cross_entropy", backend, dtype, shape, "grad_input", x.grad,
                              ref.backward(_np(g), saved)[0])


@check("linear_cross_entropy")
def _check_linear_cross_entropy(backend, dtype, device):
    import os

    from fastdl.ops import linear_cross_entropy as ops
    from fastdl.reference import cross_entropy as ref

    if not _has_cross_entropy(backend):
        yield note_row("linear_cross_entropy", backend, dtype_name(dtype), "-", "all", "not checked",
                       "no launcher yet")
        return
    # (N, H, V, rows per chunk): several chunks on the small shape, the budget's choice on the big one.
    shapes = [(37, 29, 53, "16")]
    if device == "cuda":
        shapes += [(4096, 1024, 32000, None)]
    tf32 = dtype == torch.float32 and device == "cuda" and torch.backends.cuda.matmul.allow_tf32
    previous = os.environ.get(ops.CHUNK_ROWS_ENV)
    try:
        for N, H, V, rows in shapes:
            if rows is None:
                os.environ.pop(ops.CHUNK_ROWS_ENV, None)
            else:
                os.environ[ops.CHUNK_ROWS_ENV] = rows
            for reduction in ("mean", "none"):
                x = testing.make_tensor((N, H), dtype, device, seed=1, requires_grad=True)
                w = testing.make_tensor((V, H), dtype, device, seed=2, scale=3 * H ** -0.5, requires_grad=True)
                b = testing.make_tensor((V,), dtype, device, seed=3, requires_grad=True)
                target = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(4))
                target[::6] = -100
                target = target.to(device)
                with fastdl.use_backend(backend):
                    loss = fastdl.functional.linear_cross_entropy(x, w, target, b, reduction=reduction,
                                                                  label_smoothing=0.1)
                g = testing.make_tensor(loss.shape, dtype, device, seed=5) if loss.dim() else torch.ones(
                    (), dtype=dtype, device=device)
                loss.backward(g)
                expected, saved = ref.linear_forward(_np(x), _np(w), target.cpu().numpy(), _np(b), -100,
                                                     reduction, 0.1)
                grads = ref.linear_backward(_np(g), saved)
                shape = f"{N}x{H}->{V} {reduction}"
                yield compare_row("linear_cross_entropy", backend, dtype, shape, "loss", loss, expected, tf32)
                for name, got, want in zip(("grad_input", "grad_weight", "grad_bias"), (x.grad, w.grad, b.grad),
                                           grads):
                    yield compare_row("linear_cross_entropy", backend, dtype, shape, name, got, want, tf32)
    finally:
        if previous is None:
            os.environ.pop(ops.CHUNK_ROWS_ENV, None)
        else:
            os.environ[ops.CHUNK_ROWS_ENV] = previous


# --- max_pool2d ------------------------------------------------------------------------------------
# (The oracle itself is proven against torch in tests/test_reference_max_pool2d.py.)

def max_pool2d_cases(device: str) -> list[tuple]:
    """(input shape, kernel, stride, padding, dilation, ceil_mode): small odd shapes everywhere, the
    ResNet stem pool at a GPU size on CUDA."""
    cases = [((2, 16, 11, 13), 3, 2, 1, 1, False),         # stem pool, odd sizes; 16-byte channel runs
             ((2, 5, 10, 9), (3, 2), (2, 1), (1, 1), (2, 3), False),  # dilated, rectangular
             ((1, 3, 9, 10), 2, None, 0, 1, True)]           # ceil_mode: windows hanging past the edge
    if device == "cuda":
        cases.append(((8, 64, 112, 112), 3, 2, 1, 1, False))  # ResNet-50's stem pool
    return cases


def _pair(values) -> str:
    return str(values[0]) if values[0] == values[1] else f"{values[0]},{values[1]}"


def _exact_row(op, backend, dtype, shape, quantity, actual, expected) -> dict:
    """A row for integers that must be equal (torch's indices): max_abs is the largest difference."""
    actual = actual.detach().cpu().numpy()
    same = actual.shape == expected.shape
    diff = float(abs(actual.astype("int64") - expected.astype("int64")).max()) if same and actual.size else 0.0
    return dict(op=op, backend=backend, dtype=dtype_name(dtype), shape=shape, check=quantity, max_abs=diff,
                max_rel=None, status="pass" if same and diff == 0 else "FAIL")


@check("max_pool2d")
def _check_max_pool2d(backend, dtype, device):
    from fastdl import backends
    from fastdl.reference import max_pool2d as ref

    if not hasattr(backends.get(backend), "max_pool2d_fwd"):
        yield note_row("max_pool2d", backend, dtype_name(dtype), "-", "all", "not checked", "no launcher yet")
        return
    for shape, kernel, stride, padding, dilation, ceil_mode in max_pool2d_cases(device):
        kernel_, stride_, padding_, dilation_ = ref.normalize_args(kernel, stride, padding, dilation)
        for layout in ("channels_last", "contiguous"):
            x = testing.make_tensor(shape, dtype, device, seed=1)
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            expected, saved = ref.forward(_np(x), kernel_, stride_, padding_, dilation_, ceil_mode)
            g = testing.make_tensor(expected.shape, dtype, device, seed=2)
            want_grad = ref.backward(_np(g), saved)
            label = (f"{'x'.join(map(str, shape))} k{_pair(kernel_)} s{_pair(stride_)} p{_pair(padding_)} "
                     f"d{_pair(dilation_)}{' ceil' if ceil_mode else ''} {layout}")
            # The training path (a 1-byte tap saved for backward), then return_indices (torch's int64
            # indices, which backward then reads).
            for return_indices in (False, True):
                xg = x.detach().requires_grad_()
                with fastdl.use_backend(backend):
                    result = fastdl.functional.max_pool2d(xg, kernel, stride, padding, dilation, ceil_mode,
                                                          return_indices)
                out = result[0] if return_indices else result
                out.backward(g)
                suffix = " (indices)" if return_indices else ""
                if not return_indices:
                    yield compare_row("max_pool2d", backend, dtype, label, "out", out, expected)
                else:
                    yield _exact_row("max_pool2d", backend, dtype, label, "indices", result[1], saved["indices"])
                yield compare_row("max_pool2d", backend, dtype, label, "grad_input" + suffix, xg.grad, want_grad)


# --- conv2d ----------------------------------------------------------------------------------------
# (The oracle itself is proven against torch in tests/test_conv2d.py's reference-backend cases.)

def conv2d_cases(device: str) -> list[tuple]:
    """(N, C, H, W, K, R, S, stride, padding, dilation, groups, activation, note): small odd shapes
    everywhere (the 7x7/2 stem's few-channel path, a 3x3/2 through grad_input's stride phases, a 1x1/2
    downsample, depthwise (the direct kernels: groups == C, a channel multiplier of 2 with dilation));
    ResNet-50's layers and a MobileNetV2 depthwise one at batch 8 on CUDA. (Other groups and
    dilations: tests/test_conv2d.py.)"""
    cases = [(1, 3, 9, 8, 8, 7, 7, 2, 3, 1, 1, "relu", "stem C=3"),
             (1, 18, 7, 6, 12, 3, 3, 2, 1, 1, 1, "gelu", "3x3/2"),
             (1, 24, 6, 5, 16, 1, 1, 2, 0, 1, 1, None, "1x1/2 downsample"),
             (2, 19, 7, 6, 19, 3, 3, 2, 1, 1, 19, "relu", "depthwise 3x3/2"),
             (1, 6, 5, 7, 12, 3, 3, 2, 2, 2, 6, "silu", "depthwise x2 dilated")]
    if device == "cuda":
        cases += [(8, 3, 224, 224, 64, 7, 7, 2, 3, 1, 1, "relu", "ResNet-50 stem"),
                  (8, 128, 56, 56, 128, 3, 3, 2, 1, 1, 1, "relu", "ResNet-50 3x3/2"),
                  (8, 256, 56, 56, 64, 1, 1, 1, 0, 1, 1, None, "ResNet-50 1x1"),
                  (8, 144, 56, 56, 144, 3, 3, 2, 1, 1, 144, "relu", "MobileNetV2 depthwise 3x3/2")]
    return cases


@check("conv2d")
def _check_conv2d(backend, dtype, device):
    from fastdl import backends
    from fastdl.reference import conv2d as ref

    if not hasattr(backends.get(backend), "conv2d_fwd"):
        yield note_row("conv2d", backend, dtype_name(dtype), "-", "all", "not checked", "no launcher yet")
        return
    tf32 = dtype == torch.float32 and device == "cuda" and torch.backends.cudnn.allow_tf32
    for N, C, H, W, K, R, S, stride, padding, dilation, groups, activation, note in conv2d_cases(device):
        s, pad, d, groups_ = ref.normalize_args((R, S), stride, padding, dilation, groups)
        for layout in ("channels_last", "contiguous"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            x = testing.make_tensor((N, C, H, W), dtype, device, seed=1).contiguous(memory_format=fmt)
            w = testing.make_tensor((K, C // groups, R, S), dtype, device, seed=2,
                                    scale=(C // groups * R * S) ** -0.5).contiguous(memory_format=fmt)
            b = testing.make_tensor((K,), dtype, device, seed=3)
            for t in (x, w, b):
                t.requires_grad_()
            with fastdl.use_backend(backend):
                out = fastdl.functional.conv2d(x, w, b, stride, padding, dilation, groups, activation=activation)
            g = testing.make_tensor(tuple(out.shape), dtype, device, seed=4).contiguous(memory_format=fmt)
            out.backward(g)
            expected, saved = ref.forward(_np(x), _np(w), _np(b), s, pad, d, groups_, activation)
            grads = ref.backward(_np(g), saved)
            label = (f"{N}x{C}x{H}x{W} k{K}x{R}x{S} s{_pair(s)} p{padding} "
                     f"d{_pair(d)} g{groups} {activation or 'none'} ({note}) {layout}")
            yield compare_row("conv2d", backend, dtype, label, "out", out, expected, tf32)
            for name, got, want in zip(("grad_input", "grad_weight", "grad_bias"), (x.grad, w.grad, b.grad), grads):
                yield compare_row("conv2d", backend, dtype, label, name, got, want, tf32)


# --- batch_norm ------------------------------------------------------------------------------------
# (The oracle itself is proven against torch in tests/test_reference_batch_norm.py.)

def batch_norm_cases(device: str) -> list[tuple]:
    """(input shape, note): small odd shapes everywhere; ResNet-50's first and last stages on CUDA."""
    cases = [((2, 5, 7, 7), "7x7"), ((3, 4, 9), "(N, C, L)")]
    if device == "cuda":
        cases += [((32, 64, 56, 56), "ResNet-50 stage 1"), ((32, 2048, 7, 7), "ResNet-50 stage 4")]
    return cases


@check("batch_norm")
def _check_batch_norm(backend, dtype, device):
    from fastdl import backends
    from fastdl.reference import batch_norm as ref

    if not hasattr(backends.get(backend), "batch_norm_stats"):
        yield note_row("batch_norm", backend, dtype_name(dtype), "-", "all", "not checked", "no launcher yet")
        return
    # Half inputs with float32 parameters and statistics, as mixed-precision training keeps them.
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    for shape, note in batch_norm_cases(device):
        C = shape[1]
        layouts = ("channels_last", "contiguous") if len(shape) == 4 else ("contiguous",)
        for layout in layouts:
            for training, activation, residual in ((True, "relu", True), (True, None, False), (False, "relu", True)):
                fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                x = (testing.make_tensor(shape, dtype, device, seed=1, scale=2.0) + 0.5).contiguous(memory_format=fmt)
                w = testing.make_tensor((C,), param_dtype, device, seed=2)
                b = testing.make_tensor((C,), param_dtype, device, seed=3)
                r = testing.make_tensor(shape, dtype, device, seed=4).contiguous(memory_format=fmt) if residual \
                    else None
                rm = testing.make_tensor((C,), param_dtype, device, seed=5)
                rv = testing.make_tensor((C,), param_dtype, device, seed=6).abs() + 0.5
                rm0, rv0 = _np(rm).copy(), _np(rv).copy()  # before the call updates them in place
                for t in (x, w, b, r):
                    if t is not None:
                        t.requires_grad_()
                with fastdl.use_backend(backend):
                    out = fastdl.functional.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, activation=activation,
                                                       residual=r)
                g = testing.make_tensor(shape, dtype, device, seed=7).contiguous(memory_format=fmt)
                out.backward(g)
                expected, saved = ref.forward(_np(x), _np(w), _np(b), rm0, rv0, training, 1e-5, activation, 0.01,
                                              _np(r))
                grads = ref.backward(_np(g), saved)
                label = (f"{'x'.join(map(str, shape))} {'train' if training else 'eval'} "
                         f"{activation or 'none'}{' +residual' if residual else ''} ({note}) {layout}")
                yield compare_row("batch_norm", backend, dtype, label, "out", out, expected)
                names = ("grad_input", "grad_weight", "grad_bias", "grad_residual")
                for name, got, want in zip(names, (x.grad, w.grad, b.grad, None if r is None else r.grad), grads):
                    if want is not None:
                        yield compare_row("batch_norm", backend, dtype, label, name, got, want)
                if training:
                    new_rm, new_rv = ref.update_running_stats(rm0, rv0, saved["mean"], saved["var"], saved["count"],
                                                              0.1)
                    yield compare_row("batch_norm", backend, dtype, label, "running_mean", rm, new_rm)
                    yield compare_row("batch_norm", backend, dtype, label, "running_var", rv, new_rv)


# --- dropout ---------------------------------------------------------------------------------------
# (The oracle itself: tests/test_reference_dropout.py, Philox against Random123's known answers.)
# Each row draws its mask from torch.manual_seed(DROPOUT_SEED): the backend's kernel and the
# reference regenerate it from the same key (fastdl/ops/dropout.py), so out and the gradients
# compare element by element with the float64 reference.

DROPOUT_SEED, DROPOUT_P = 1234, 0.3


def dropout_cases(device: str) -> list[tuple]:
    """(input shape, layout, note): small odd shapes everywhere; a transformer MLP's activations on CUDA."""
    cases = [((3, 1001), "contiguous", "partial Philox group and block"),
             ((2, 6, 5, 7), "channels_last", "counted in memory order")]
    if device == "cuda":
        cases.append(((8192, 4096), "contiguous", "MLP activations"))
    return cases


def dropout_linear_cases(device: str) -> list[tuple]:
    """(M, K, N): N not a multiple of 4 (a row's last Philox group is partial) and one that is."""
    cases = [(37, 29, 23), (33, 20, 64)]
    if device == "cuda":
        cases.append((2048, 1024, 2048))
    return cases


def _key(device: str) -> tuple[int, int]:
    """The key the next fastdl dropout call draws after torch.manual_seed(DROPOUT_SEED)."""
    from fastdl.ops.dropout import draw_seed

    torch.manual_seed(DROPOUT_SEED)
    return tuple(int(v) for v in draw_seed(torch.device(device)).cpu())


def _mask_row(op, backend, dtype, shape, out, keep, x) -> dict:
    """Elements where out's zeros and the reference's mask disagree (x != 0: a kept zero is zero)."""
    import numpy as np

    got = out.detach().cpu().float().numpy() != 0
    nonzero = x.detach().cpu().float().numpy() != 0
    wrong = int(np.count_nonzero((got != keep) & nonzero))
    return dict(op=op, backend=backend, dtype=dtype_name(dtype), shape=shape, check="mask", max_abs=float(wrong),
                max_rel=None, status="pass" if wrong == 0 and got.shape == keep.shape else "FAIL")


def _kept_fraction_row(backend, device) -> dict:
    """Kept fraction of a large-ish tensor within 4 sigma of 1 - p (the binomial's sigma)."""
    import math

    n = 1 << (24 if device == "cuda" else 17)
    x = torch.ones(n, device=device)
    torch.manual_seed(DROPOUT_SEED + 1)
    with fastdl.use_backend(backend):
        kept = (fastdl.functional.dropout(x, DROPOUT_P) != 0).double().mean().item()
    sigma = math.sqrt(DROPOUT_P * (1 - DROPOUT_P) / n)
    deviation = abs(kept - (1 - DROPOUT_P))
    return dict(op="dropout", backend=backend, dtype="float32", shape=f"{n} p={DROPOUT_P}",
                check="kept fraction", max_abs=deviation, max_rel=deviation / (1 - DROPOUT_P),
                status="pass" if deviation < 4 * sigma else "FAIL",
                detail=f"kept {kept:.5f}, {deviation / sigma:.2f} sigma from {1 - DROPOUT_P}")


@check("dropout")
def _check_dropout(backend, dtype, device):
    from fastdl import backends
    from fastdl.reference import dropout as ref
    from fastdl.reference import linear as linear_ref

    if not hasattr(backends.get(backend), "dropout_fwd"):
        yield note_row("dropout", backend, dtype_name(dtype), "-", "all", "not checked", "no launcher yet")
        return
    p = DROPOUT_P
    for shape, layout, note in dropout_cases(device):
        x = testing.make_tensor(shape, dtype, device, seed=1, scale=2.0)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        g = testing.make_tensor(shape, dtype, device, seed=2)
        key = _key(device)
        torch.manual_seed(DROPOUT_SEED)
        with fastdl.use_backend(backend):
            out = fastdl.functional.dropout(x, p)
        out.backward(g)
        # The mask in x's memory order (the op runs on the dense tensor as it is laid out).
        order = sorted(range(x.dim()), key=lambda d: (-x.stride(d), d))
        keep = ref.flat_keep_mask(key, p, tuple(shape[d] for d in order))
        keep = keep.transpose(sorted(range(len(order)), key=lambda i: order[i]))
        expected, saved = ref.forward(_np(x), keep, p)
        label = f"{'x'.join(map(str, shape))} p={p} {layout} ({note})"
        yield _mask_row("dropout", backend, dtype, label, out, keep, x)
        yield compare_row("dropout", backend, dtype, label, "out", out, expected)
        yield compare_row("dropout", backend, dtype, label, "grad_input", x.grad, ref.backward(_np(g), saved))
    # linear + relu + dropout fused into the epilogue: the (M, N) output's mask, row by row.
    tf32 = dtype == torch.float32 and device == "cuda" and torch.backends.cuda.matmul.allow_tf32
    for M, K, N in dropout_linear_cases(device):
        x = testing.make_tensor((M, K), dtype, device, seed=3, requires_grad=True)
        w = testing.make_tensor((N, K), dtype, device, seed=4, scale=K ** -0.5, requires_grad=True)
        b = testing.make_tensor((N,), dtype, device, seed=5, requires_grad=True)
        g = testing.make_tensor((M, N), dtype, device, seed=6)
        key = _key(device)
        torch.manual_seed(DROPOUT_SEED)
        with fastdl.use_backend(backend):
            out = fastdl.functional.linear(x, w, b, activation="relu", dropout=p, training=True)
        out.backward(g)
        keep = ref.keep_mask(key, p, M, N)
        y, linear_saved = linear_ref.forward(_np(x), _np(w), _np(b), "relu", 0.01)
        expected, saved = ref.forward(y, keep, p)
        grads = linear_ref.backward(ref.backward(_np(g), saved), linear_saved)
        label = f"linear {M}x{K}->{N} relu p={p}"
        yield compare_row("dropout", backend, dtype, label, "out", out, expected, tf32)
        for name, got, want in zip(("grad_input", "grad_weight", "grad_bias"), (x.grad, w.grad, b.grad), grads):
            yield compare_row("dropout", backend, dtype, label, name, got, want, tf32)
    if dtype == torch.float32:  # the mask does not depend on the dtype: one statistics row per backend
        yield _kept_fraction_row(backend, device)
