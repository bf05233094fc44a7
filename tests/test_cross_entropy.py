"""fastdl.functional.cross_entropy / nn.CrossEntropyLoss: every backend against the float64
reference, torch's semantics at the edges, errors, state_dict, torch.compile, the caller's logits
left alone, and (GPU) realistic vocabularies. linear_cross_entropy: test_linear_cross_entropy.py."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import fastdl
from fastdl.ops import cross_entropy as ce_ops
from fastdl.reference import cross_entropy as ref
from fastdl.testing import assert_close, gpu_backends, make_tensor

HAS_CUDA = torch.cuda.is_available()
REDUCTIONS = ["none", "mean", "sum"]

# (rows, C)
CPU_SHAPES = [
    (1, 1),      # one class: loss 0, gradient 0
    (5, 7),      # one block per row, odd C
    (9, 1000),   # one block of 1024 with a masked tail
    (3, 5003),   # two blocks per row (BLOCK_C 4096): the online max and sum cross a block edge
]
# (weight, ignore_index in use, label_smoothing, probability targets)
TARGET_KINDS = {
    "index": (False, False, 0.0, False),
    "index+weight+ignore+smoothing": (True, True, 0.2, False),
    "prob": (False, False, 0.0, True),
    "prob+weight+smoothing": (True, False, 0.3, True),
}


def _np(t):
    return None if t is None else t.detach().cpu().double().numpy()


def make_target(shape, C, kind, dtype, device="cpu", seed=3):
    """Class indices (every third row ignore_index=1 when asked) or a probability distribution per row."""
    _, ignore, _, prob = TARGET_KINDS[kind]
    if prob:
        return torch.softmax(make_tensor(shape, torch.float64, seed=seed, scale=2.0), dim=1).to(dtype).to(device)
    gen = torch.Generator().manual_seed(seed)
    batch = (shape[0],) + tuple(shape[2:])
    target = torch.randint(0, C, batch, generator=gen)
    if ignore and target.numel() > 1:
        target.view(-1)[::3] = 1
    return target.to(device)


def run_cross_entropy(backend, dtype, shape, kind, reduction, *, noncontiguous=False, device="cpu", scale=3.0,
                      logits=None):
    """Loss and logits gradient through fastdl, checked against the float64 reference."""
    C = shape[1]
    has_weight, ignore, smoothing, prob = TARGET_KINDS[kind]
    x = logits if logits is not None else make_tensor(shape, dtype, device, seed=1, scale=scale,
                                                      noncontiguous=noncontiguous)
    x = x.detach().requires_grad_()
    target = make_target(shape, C, kind, dtype, device)
    weight = (make_tensor((C,), torch.float64, seed=2).abs() + 0.1).to(dtype).to(device) if has_weight else None
    ignore_index = 1 if ignore else -100
    with fastdl.use_backend(backend):
        loss = fastdl.functional.cross_entropy(x, target, weight, ignore_index=ignore_index, reduction=reduction,
                                               label_smoothing=smoothing)
    # A non-uniform upstream gradient: each row of "none" scaled differently.
    grad_out = make_tensor(loss.shape, dtype, device, seed=4) if loss.dim() else torch.tensor(0.7, dtype=dtype)
    loss.backward(grad_out.to(device))
    expected, saved = ref.forward(_np(x), target.cpu().numpy() if not prob else _np(target), _np(weight),
                                  ignore_index, reduction, smoothing)
    grad_x = ref.backward(_np(grad_out), saved)[0]
    assert loss.dtype == dtype and tuple(loss.shape) == tuple(expected.shape)
    assert_close(loss, expected, dtype, name=f"{kind} {reduction} loss")
    assert_close(x.grad, grad_x, dtype, name=f"{kind} {reduction} grad_input")
    return x, loss


# --- Triton kernels through the interpreter (CPU CI) -------------------------------------------

@pytest.mark.parametrize("kind", list(TARGET_KINDS))
@pytest.mark.parametrize("shape", CPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_triton_matches_reference(dtype, shape, kind):
    for reduction in REDUCTIONS:
        run_cross_entropy("triton", dtype, shape, kind, reduction)


@pytest.mark.parametrize("kind", ["index", "prob+weight+smoothing"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_noncontiguous_logits(dtype, kind):
    run_cross_entropy("triton", dtype, (9, 1000), kind, "none", noncontiguous=True)


@pytest.mark.parametrize("input_shape", [(7,), (4, 7, 3), (2, 7, 3, 2), (1, 7, 5)])
@pytest.mark.parametrize("kind", ["index+weight+ignore+smoothing", "prob"])
def test_triton_class_dimension_layouts(input_shape, kind):
    # (C,) and (N, C, d1, ..., dk): the class dimension moves last; (1, C, d) needs no copy.
    has_weight, ignore, smoothing, prob = TARGET_KINDS[kind]
    C = input_shape[0] if len(input_shape) == 1 else input_shape[1]
    x = make_tensor(input_shape, torch.float64, seed=1, scale=3.0, requires_grad=True)
    if prob:
        target = torch.softmax(make_tensor(input_shape, torch.float64, seed=3), dim=0 if len(input_shape) == 1 else 1)
    else:
        target = torch.randint(0, C, input_shape[:1] + input_shape[2:] if len(input_shape) > 1 else (),
                               generator=torch.Generator().manual_seed(3))
    weight = make_tensor((C,), torch.float64, seed=2).abs() + 0.1 if has_weight else None
    for reduction in REDUCTIONS:
        x.grad = None
        with fastdl.use_backend("triton"):
            loss = fastdl.functional.cross_entropy(x, target, weight, reduction=reduction, label_smoothing=smoothing)
        grad_out = make_tensor(loss.shape, torch.float64, seed=4) if loss.dim() else torch.tensor(1.3, dtype=torch.float64)
        loss.backward(grad_out)
        expected, saved = ref.forward(_np(x), _np(target) if prob else target.numpy(), _np(weight), -100,
                                      reduction, smoothing)
        assert_close(loss, expected, torch.float64, name="loss")
        assert_close(x.grad, ref.backward(_np(grad_out), saved)[0], torch.float64, name="grad_input")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_triton_large_logits_and_minus_inf(dtype):
    # Magnitude 1e4 (exp would overflow without the running max) and rows holding -inf away from
    # their target, one of them -inf everywhere but two columns: finite losses and gradients.
    x = make_tensor((6, 1000), torch.float64, seed=5, scale=1e4)
    x[1, 3:] = -float("inf")
    x[4, ::2] = -float("inf")
    x = x.to(dtype)
    # A sum of six losses near 1e4 passes float16's 65504 (torch's loss overflows there too).
    for reduction in REDUCTIONS if dtype != torch.float16 else ["none", "mean"]:
        gen = torch.Generator().manual_seed(7)
        target = torch.randint(0, 1000, (6,), generator=gen)
        target[1], target[4] = 2, 5
        xx = x.clone().requires_grad_()
        with fastdl.use_backend("triton"):
            loss = fastdl.functional.cross_entropy(xx, target, reduction=reduction)
        grad_out = make_tensor(loss.shape, dtype, seed=4) if loss.dim() else torch.tensor(0.7, dtype=dtype)
        loss.backward(grad_out)
        expected, saved = ref.forward(_np(x), target.numpy(), None, -100, reduction, 0.0)
        assert torch.isfinite(loss).all() and torch.isfinite(xx.grad).all()
        assert_close(loss, expected, dtype, name="loss")
        assert_close(xx.grad, ref.backward(_np(grad_out), saved)[0], dtype, name="grad_input")


def check_infinities_and_nans_match_torch(backend):
    """Target at -inf: loss inf, gradient finite. Smoothing over a row with -inf: loss inf.
    An all -inf row: nan (even ignored, its gradient is 0 * nan), as torch. Shared with the
    emulated CUDA kernels' tests."""
    x = make_tensor((4, 6), torch.float64, seed=8)
    x[1, 2:] = -float("inf")
    x[3] = -float("inf")
    target = torch.tensor([0, 4, 1, -100])
    for smoothing in (0.0, 0.1):
        results = []
        for fn in (F.cross_entropy, fastdl.functional.cross_entropy):
            xx = x.clone().requires_grad_()
            with fastdl.use_backend(backend):
                loss = fn(xx, target, reduction="none", label_smoothing=smoothing)
            loss.backward(torch.ones(4, dtype=torch.float64))
            results.append((loss.detach(), xx.grad))
        (expected, expected_grad), (loss, grad) = results
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12, equal_nan=True)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_infinities_and_nans_where_torch_has_them(backend):
    check_infinities_and_nans_match_torch(backend)


def check_degenerate_cases_match_torch(backend):
    """The reference's degenerate cases (no classes, every target's class weight 0, +inf, nan) through
    fastdl.functional, loss and gradient, nan where torch has nan: "mean" over a zero denominator
    was inf where torch gives nan. Shared with the emulated CUDA kernels' tests."""
    from test_reference_cross_entropy import DEGENERATE

    for case, make in sorted(DEGENERATE.items()):
        for reduction in REDUCTIONS:
            x, target, weight, smoothing = make()
            results = []
            for fn in (F.cross_entropy, fastdl.functional.cross_entropy):
                xx = x.clone().requires_grad_()
                with fastdl.use_backend(backend):
                    loss = fn(xx, target, weight, reduction=reduction, label_smoothing=smoothing)
                loss.backward(torch.full_like(loss, 0.7))
                results.append((loss.detach(), xx.grad))
            (expected, expected_grad), (loss, grad) = results
            torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12, equal_nan=True,
                                       msg=lambda m: f"{case} {reduction} loss: {m}")
            torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12, equal_nan=True,
                                       msg=lambda m: f"{case} {reduction} grad: {m}")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_degenerate_cases_where_torch_has_them(backend):
    check_degenerate_cases_match_torch(backend)


@pytest.mark.parametrize("kind", list(TARGET_KINDS))
def test_triton_leaves_the_callers_logits_alone(kind):
    x = make_tensor((9, 1000), torch.float32, seed=1, scale=3.0)
    before = x.clone()
    x_view = x.requires_grad_()
    run_cross_entropy("triton", torch.float32, (9, 1000), kind, "mean", logits=x_view)
    assert torch.equal(x.detach(), before)


def test_triton_inplace_launcher_writes_the_gradient_over_the_logits():
    # The opt-in used by linear_cross_entropy on its own chunk buffers.
    from fastdl.backends import triton as launchers

    x = make_tensor((5, 300), torch.float32, seed=1, scale=3.0)
    target = torch.tensor([0, 299, 5, 7, 100])
    scale = torch.rand(5, generator=torch.Generator().manual_seed(1))
    loss, grad = launchers.cross_entropy_fwd(x.clone(), target, None, scale, -100, 0.1, True)
    buffer = x.clone()
    loss_inplace, grad_inplace = launchers.cross_entropy_fwd(buffer, target, None, scale, -100, 0.1, True, inplace=True)
    assert grad_inplace.data_ptr() == buffer.data_ptr()
    assert torch.equal(grad_inplace, grad) and torch.equal(loss_inplace, loss)


def test_triton_bad_target_trips_the_device_assert(monkeypatch):
    # The GPU path never checks targets on the host; the kernel asserts. The interpreter only
    # evaluates device_assert in debug mode, which the compiled kernel always has (debug=True).
    import triton.runtime.interpreter as interpreter
    from fastdl.backends import triton as launchers

    builder = interpreter.interpreter_builder
    monkeypatch.setattr(builder, "options", dataclasses.replace(builder.options, debug=True))
    x = make_tensor((3, 5), torch.float32, seed=1)
    with pytest.raises(Exception, match="target out of bounds"):
        launchers.cross_entropy_fwd(x, torch.tensor([0, 7, 1]), None, torch.ones(()), -100, 0.0, True)
    launchers.cross_entropy_fwd(x, torch.tensor([0, -100, 1]), None, torch.ones(()), -100, 0.0, True)


# --- the row split of the Triton row kernels: ragged head, aligned body, ragged tail -----------------
# With VEC elements to 16 bytes (8 fp16, 4 fp32, 2 fp64), a row starting at element row_off of an
# aligned base has lead = -row_off mod VEC head columns, then a body of whole VEC groups swept
# BLOCK_C at a time with 16-byte accesses, then fewer than VEC tail columns.

def _check_triton_launcher(x, target, weight=None, smoothing=0.0, compute_grad=True, inplace=False, name=""):
    """The triton launcher against the float64 reference launcher, row by row."""
    from fastdl.backends import reference as reference_backend
    from fastdl.backends import triton as launchers

    R = x.shape[0]
    scale = torch.rand(R, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.5
    want_loss, want_grad = reference_backend.cross_entropy_fwd(
        x.double(), target if target.dim() == 1 else target.double(), None if weight is None else weight.double(),
        scale, 1, smoothing, compute_grad)
    loss, grad = launchers.cross_entropy_fwd(x, target, weight, scale.to(ce_ops.acc_dtype(x.dtype)), 1, smoothing,
                                             compute_grad, inplace=inplace)
    assert_close(loss, want_loss, x.dtype, name=f"loss rows {name}")
    if compute_grad:
        assert grad.shape == x.shape
        assert_close(grad, want_grad, x.dtype, name=f"grad {name}")
    return loss, grad


VEC_OF = {torch.float16: 8, torch.float32: 4, torch.float64: 2}


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
def test_triton_row_split_picks_the_vector_width(dtype):
    from fastdl.backends.triton.cross_entropy import row_vector_width

    vec = VEC_OF[dtype]
    wide = torch.zeros((4, 64 + 16), dtype=dtype)
    assert row_vector_width(torch.zeros((4, 64), dtype=dtype)) == (vec, False)  # every row on a boundary
    assert row_vector_width(torch.zeros((4, 63), dtype=dtype)) == (vec, True)   # rows start off it
    assert row_vector_width(torch.zeros((1, 3), dtype=dtype)) == (vec, True)    # C % VEC != 0: a tail
    assert row_vector_width(wide[:, :64]) == (vec, False)                       # row stride 80: aligned
    assert row_vector_width(wide[:, :64 + 1]) == (vec, False) if vec == 1 else (vec, True)
    assert row_vector_width(wide[:, 1:65]) == (1, False)                        # base off a boundary
    assert row_vector_width(wide[:, ::2]) == (1, False)                         # column stride 2
    assert row_vector_width(wide.t()) == (1, False)                             # column-major
    # scale_rows' float32 sums into fp16: VEC of the narrower dtype
    assert row_vector_width(torch.zeros((4, 64)), torch.zeros((4, 64), dtype=torch.float16))[0] == 8


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
def test_triton_head_body_tail_boundaries(dtype):
    # C below, at and above VEC, 2 * VEC (the ragged block's size), and the 4096-column block;
    # 5 rows, so contiguous rows of odd C start at 5 different phases (leads 0..VEC-1).
    vec = VEC_OF[dtype]
    for C in (1, vec - 1, vec, vec + 1, 2 * vec - 1, 2 * vec + 1, 3 * vec + 3, 1000, 4095, 4096 + vec + 1):
        C = max(C, 1)
        x = make_tensor((5, C), dtype, seed=C, scale=3.0)
        target = torch.randint(0, C, (5,), generator=torch.Generator().manual_seed(C))
        target[1] = 1  # ignore_index 1 (when C > 1)
        target[2] = C - 1  # the target in the tail
        target[3] = 0  # the target in the head
        weight = (make_tensor((C,), torch.float64, seed=2).abs() + 0.1).to(dtype)
        prob = torch.softmax(make_tensor((5, C), torch.float64, seed=3), dim=1).to(dtype)
        for t, w, smoothing in ((target, None, 0.0), (target, weight, 0.2), (prob, None, 0.0), (prob, weight, 0.3)):
            _check_triton_launcher(x, t, w, smoothing, name=f"C={C}")
        _check_triton_launcher(x, target, None, 0.0, compute_grad=False, name=f"C={C} loss only")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
def test_triton_row_split_layouts(dtype):
    # Rows that start on every phase of an aligned base (padded row strides), a base off the
    # 16-byte grid, gradients and targets on another phase than the logits, in place.
    vec = VEC_OF[dtype]
    C = 4 * vec + 3
    base = make_tensor((6, C + 2 * vec), dtype, seed=1, scale=3.0)
    target = torch.randint(0, C, (6,), generator=torch.Generator().manual_seed(4))
    prob = torch.softmax(make_tensor((6, C), torch.float64, seed=3), dim=1).to(dtype)
    prob_padded = torch.zeros((6, C + 1), dtype=dtype)[:, :C].copy_(prob)  # another phase than the logits
    weight = (make_tensor((C,), torch.float64, seed=2).abs() + 0.1).to(dtype)
    layouts = {
        "row stride C + 1": base[:, :C + 1][:, :C].as_strided((6, C), (C + 1, 1)),
        "row stride C + 2 VEC (same phase as contiguous)": base[:, :C],
        "base off the grid": base[:, 1:C + 1],
        "column stride 2": make_tensor((6, C), dtype, seed=1, scale=3.0, noncontiguous=True),
        "column-major": base[:, :C].t().contiguous().t(),
    }
    for name, x in layouts.items():
        for t in (target, prob, prob_padded, prob.t().contiguous().t()):
            _check_triton_launcher(x, t, weight, 0.1, name=name)
        # In place (linear_cross_entropy's chunks): the gradient over the logits, same strides.
        loss, grad = _check_triton_launcher(x, target, weight, 0.1, name=name)
        # A copy of x's storage, viewed as x is: the same offsets, so the same 16-byte phases.
        buffer = torch.empty(0, dtype=dtype).set_(x.untyped_storage().clone(), x.storage_offset(), x.shape, x.stride())
        loss_inplace, grad_inplace = _check_triton_launcher(buffer, target, weight, 0.1, inplace=True, name=name)
        assert grad_inplace.data_ptr() == buffer.data_ptr()
        assert torch.equal(grad_inplace, grad) and torch.equal(loss_inplace, loss), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
def test_triton_scale_rows_head_body_tail(dtype):
    from fastdl.backends import triton as launchers

    vec = VEC_OF[dtype]
    for C in (1, vec - 1, vec + 1, 2 * vec + 1, 1023, 1025, 2048 + vec + 1):
        C = max(C, 1)
        x = make_tensor((5, C + vec), dtype, seed=C)
        scale = torch.rand(5, dtype=torch.float64) + 0.5
        cases = {
            "contiguous": (x[:, :C].contiguous(), torch.empty((5, C), dtype=dtype)),
            "padded rows, out contiguous (another phase)": (x[:, :C], torch.empty((5, C), dtype=dtype)),
            "padded rows, out on the same phase": (x[:, :C], torch.empty((5, C + vec), dtype=dtype)[:, :C]),
            "base off the grid": (x[:, 1:C + 1], torch.empty((5, C), dtype=dtype)),
            "float32 sums into the narrower dtype": (x[:, :C].to(ce_ops.acc_dtype(dtype)).contiguous(),
                                                     torch.empty((5, C), dtype=dtype)),
        }
        for name, (grad, out) in cases.items():
            before = grad.clone()
            launchers.cross_entropy_bwd(grad, scale.to(ce_ops.acc_dtype(dtype)), out)
            assert_close(out, _np(grad) * _np(scale)[:, None], dtype, name=f"C={C} {name}")
            assert torch.equal(grad, before)


def test_reference_backend_matches_reference():
    for reduction in REDUCTIONS:
        run_cross_entropy("reference", torch.float32, (9, 37), "index+weight+ignore+smoothing", reduction)
        run_cross_entropy("reference", torch.float32, (9, 37), "prob+weight+smoothing", reduction)


def test_inference_keeps_no_gradient_buffer():
    x = make_tensor((6, 50), seed=1)
    target = torch.randint(0, 50, (6,), generator=torch.Generator().manual_seed(2))
    with fastdl.use_backend("triton"):
        loss, grad = fastdl.ops.get("cross_entropy", "triton")(x, target, None, -100, 0.0, "mean", False)
    assert grad.numel() == 0
    torch.testing.assert_close(loss, F.cross_entropy(x, target), rtol=1e-5, atol=1e-6)


# --- torch.nn.functional.cross_entropy semantics ------------------------------------------------

def _both(input, target, backend="triton", **kwargs):
    """fastdl and torch on the same arguments, forward and backward with the same upstream gradient."""
    results = []
    for fn in (F.cross_entropy, fastdl.functional.cross_entropy):
        x = input.detach().clone().requires_grad_()
        t = target.detach().clone().requires_grad_(target.requires_grad)
        w = kwargs.get("weight")
        args = dict(kwargs, weight=None if w is None else w.detach().clone().requires_grad_(w.requires_grad))
        with fastdl.use_backend(backend):
            out = fn(x, t, **args)
        upstream = make_tensor(out.shape, out.dtype, seed=9) if out.dim() else torch.tensor(0.7, dtype=out.dtype)
        out.backward(upstream)
        grads = [x.grad] + ([t.grad] if t.requires_grad else []) + (
            [args["weight"].grad] if w is not None and w.requires_grad else [])
        results.append((out, grads))
    return results


def _assert_same(results, rtol=1e-10, atol=1e-10):
    (expected, expected_grads), (out, grads) = results
    assert out.dtype == expected.dtype and out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=rtol, atol=atol, equal_nan=True)
    for got, want in zip(grads, expected_grads):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=True)


SEMANTIC_CASES = [
    # (name, input shape, target maker, kwargs)
    ("index", (6, 7), "index", {}),
    ("index 1-D input", (7,), "index", {}),
    ("index spatial", (3, 7, 2, 3), "index", {}),
    ("index 3-D", (3, 7, 4), "index", {}),
    ("weights", (6, 7), "index", dict(weight="w")),
    ("ignore_index in range", (6, 7), "index", dict(ignore_index=1)),
    ("smoothing + weights + ignore", (3, 7, 2, 3), "index", dict(weight="w", ignore_index=2, label_smoothing=0.2)),
    ("negative smoothing is 0", (6, 7), "index", dict(label_smoothing=-0.5)),
    ("smoothing 1", (6, 7), "index", dict(label_smoothing=1.0)),
    ("all ignored", (6, 7), "ignored", {}),
    ("all ignored, weights, smoothing", (6, 7), "ignored", dict(weight="w", label_smoothing=0.1)),
    ("uint8 targets", (6, 7), "uint8", {}),
    ("empty batch", (0, 7), "index", {}),
    ("prob", (6, 7), "prob", {}),
    ("prob spatial + weights + smoothing", (3, 7, 2, 3), "prob", dict(weight="w", label_smoothing=0.3)),
    ("prob 1-D", (7,), "prob", dict(weight="w")),
    ("prob empty batch", (0, 7), "prob", {}),
    ("prob differentiable target and weight", (6, 7), "prob_grad", dict(weight="w_grad", label_smoothing=0.1)),
    ("prob float32 target promotes to float64", (6, 7), "prob32", {}),
]


def _semantic_args(input_shape, target_kind, kwargs):
    C = input_shape[0] if len(input_shape) == 1 else input_shape[1]
    batch = input_shape[:1] + input_shape[2:] if len(input_shape) > 1 else ()
    gen = torch.Generator().manual_seed(3)
    if target_kind.startswith("prob"):
        target = torch.softmax(make_tensor(input_shape, torch.float64, seed=3), dim=0 if len(input_shape) == 1 else 1)
        target = target.float() if target_kind == "prob32" else target
        target.requires_grad_(target_kind == "prob_grad")
    elif target_kind == "ignored":
        target = torch.full(batch, -100)
    else:
        target = torch.randint(0, C, batch, generator=gen)
        target = target.to(torch.uint8) if target_kind == "uint8" else target
    kwargs = dict(kwargs)
    if "weight" in kwargs:
        kwargs["weight"] = (make_tensor((C,), torch.float64, seed=2).abs() + 0.1).requires_grad_(
            kwargs["weight"] == "w_grad")
    return target, kwargs


@pytest.mark.parametrize("name,input_shape,target_kind,kwargs", SEMANTIC_CASES, ids=[c[0] for c in SEMANTIC_CASES])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_matches_torch_semantics(name, input_shape, target_kind, kwargs, reduction, backend):
    x = make_tensor(input_shape, torch.float64, seed=1, scale=3.0)
    target, kwargs = _semantic_args(input_shape, target_kind, kwargs)
    _assert_same(_both(x, target, backend, reduction=reduction, **kwargs))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_1d_input_with_a_one_element_target(backend):
    # torch's forward takes a (1,) target for a (C,) input; its backward then fails ("size
    # mismatch"), so the gradient is checked against the reference.
    x = make_tensor((7,), torch.float64, seed=1, requires_grad=True)
    target = torch.tensor([4])
    for reduction in REDUCTIONS:
        x.grad = None
        with fastdl.use_backend(backend):
            loss = fastdl.functional.cross_entropy(x, target, reduction=reduction)
        expected = F.cross_entropy(x.detach(), target, reduction=reduction)
        assert loss.shape == expected.shape == ()
        torch.testing.assert_close(loss.detach(), expected, rtol=1e-12, atol=1e-12)
        loss.backward(torch.tensor(0.7, dtype=torch.float64))
        _, saved = ref.forward(_np(x), target.numpy(), None, -100, reduction, 0.0)
        assert_close(x.grad, ref.backward(0.7, saved)[0], torch.float64, name="grad_input")


def test_legacy_size_average_and_reduce_map_like_torch():
    x = make_tensor((6, 7), torch.float64, seed=1)
    target = torch.randint(0, 7, (6,), generator=torch.Generator().manual_seed(3))
    with pytest.warns(UserWarning):
        for size_average, reduce in ((False, None), (None, False), (True, True)):
            expected = F.cross_entropy(x, target, size_average=size_average, reduce=reduce)
            out = fastdl.functional.cross_entropy(x, target, size_average=size_average, reduce=reduce)
            torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_autocast_runs_in_float32_like_torch():
    x = make_tensor((6, 7), torch.bfloat16, seed=1)
    target = torch.randint(0, 7, (6,), generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.cross_entropy(x, target)
        out = fastdl.functional.cross_entropy(x, target)
    assert out.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


# --- bad input: torch's exception types, messages naming the op, nothing written --------------

def _x():
    return make_tensor((3, 5), seed=1)


BAD_INPUTS = [
    ("target out of bounds", lambda: (_x(), torch.tensor([0, 7, 1])), {}, IndexError),
    ("negative target", lambda: (_x(), torch.tensor([0, -3, 1])), {}, IndexError),
    ("out of bounds, spatial", lambda: (make_tensor((2, 5, 3)), torch.tensor([[0, 7, 2], [0, 1, 1]])), {},
     IndexError),
    ("out of bounds, smoothing", lambda: (_x(), torch.tensor([0, 7, 1])), dict(label_smoothing=0.1), IndexError),
    ("batch mismatch", lambda: (_x(), torch.tensor([0, 1])), {}, ValueError),
    ("batch mismatch, spatial", lambda: (make_tensor((2, 5, 3)), torch.zeros(3, 3, dtype=torch.long)), {},
     ValueError),
    ("spatial size mismatch", lambda: (make_tensor((2, 5, 3)), torch.zeros(2, 4, dtype=torch.long)), {},
     RuntimeError),
    ("1-D input, 2 targets", lambda: (make_tensor((5,)), torch.tensor([0, 1])), {}, ValueError),
    ("prob target shape mismatch", lambda: (_x(), torch.rand(3, 4)), {}, RuntimeError),
    ("prob target batch mismatch", lambda: (_x(), torch.rand(2, 5)), {}, ValueError),
    ("integer prob target", lambda: (_x(), torch.ones(3, 5, dtype=torch.long)), {}, RuntimeError),
    ("prob target with ignore_index >= 0", lambda: (_x(), torch.rand(3, 5)), dict(ignore_index=1), RuntimeError),
    ("float class indices", lambda: (_x(), torch.tensor([0.0, 1.0, 2.0])), {}, RuntimeError),
    ("int32 class indices", lambda: (_x(), torch.tensor([0, 1, 2], dtype=torch.int32)), {}, RuntimeError),
    ("wrong weight length", lambda: (_x(), torch.tensor([0, 1, 2])), dict(weight=torch.ones(4)), RuntimeError),
    ("wrong weight length, prob", lambda: (_x(), torch.rand(3, 5)), dict(weight=torch.ones(4)), RuntimeError),
    ("weight dtype", lambda: (_x(), torch.tensor([0, 1, 2])), dict(weight=torch.ones(5, dtype=torch.float64)),
     RuntimeError),
    ("unknown reduction", lambda: (_x(), torch.tensor([0, 1, 2])), dict(reduction="avg"), ValueError),
    ("label_smoothing > 1", lambda: (_x(), torch.tensor([0, 1, 2])), dict(label_smoothing=1.5), RuntimeError),
    ("integer input", lambda: (torch.ones(3, 5, dtype=torch.long), torch.tensor([0, 1, 2])), {},
     NotImplementedError),
    ("0-D input", lambda: (torch.tensor(1.0), torch.tensor(0)), {}, RuntimeError),
    ("target not a tensor", lambda: (_x(), [0, 1, 2]), {}, TypeError),
    ("float ignore_index", lambda: (_x(), torch.tensor([0, 1, 2])), dict(ignore_index=1.5), TypeError),
]


@pytest.mark.parametrize("name,make,kwargs,error", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_torch_exception_type(name, make, kwargs, error):
    args = make()
    with pytest.raises(error):
        F.cross_entropy(*args, **kwargs)
    x = args[0].requires_grad_() if args[0].is_floating_point() else args[0]
    before = x.detach().clone()
    with pytest.raises(error) as info:
        fastdl.functional.cross_entropy(*args, **kwargs)
    message = str(info.value)
    assert "cross_entropy" in message
    if error is IndexError:
        assert "Target 7 is out of bounds" in message or "Target -3 is out of bounds" in message
    assert torch.equal(x.detach(), before) and getattr(x, "grad", None) is None


def test_weight_requiring_grad_with_class_indices_raises_like_torch():
    x, target, w = _x(), torch.tensor([0, 1, 2]), torch.rand(5, requires_grad=True)
    with pytest.raises(RuntimeError):
        F.cross_entropy(x, target, weight=w)
    with pytest.raises(RuntimeError, match="weight"):
        fastdl.functional.cross_entropy(x, target, weight=w)


def test_device_mismatch_raises_runtime_error():
    x, target = _x(), torch.tensor([0, 1, 2], device="meta")
    with pytest.raises(RuntimeError, match="same device"):
        fastdl.functional.cross_entropy(x, target)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_second_backward_through_the_same_graph_gives_torchs_result(reduction):
    # The backward writes grad_output * saved gradient to a new tensor, so the saved one survives
    # (it was scaled in place, and torch's version counter refused a second backward).
    x = make_tensor((4, 9), seed=1, requires_grad=True)
    target = torch.tensor([0, 1, -100, 3])
    with fastdl.use_backend("triton"):
        loss = fastdl.functional.cross_entropy(x, target, reduction=reduction)
    grad_out = make_tensor(loss.shape, seed=2) if loss.dim() else torch.tensor(0.7)
    loss.backward(grad_out, retain_graph=True)
    first = x.grad.clone()
    loss.backward(grad_out)
    x_ref = x.detach().clone().requires_grad_()
    F.cross_entropy(x_ref, target, reduction=reduction).backward(grad_out)
    torch.testing.assert_close(first, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, 2 * x_ref.grad, rtol=1e-5, atol=1e-6)


# --- nn.CrossEntropyLoss ---------------------------------------------------------------------------

def test_nn_cross_entropy_loss_is_a_drop_in():
    weight = torch.rand(7) + 0.1
    kwargs = dict(weight=weight, ignore_index=2, reduction="sum", label_smoothing=0.1)
    theirs, ours = torch.nn.CrossEntropyLoss(**kwargs), fastdl.nn.CrossEntropyLoss(**kwargs)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight"]
    assert repr(ours) == repr(theirs)
    plain = fastdl.nn.CrossEntropyLoss(weight=torch.ones(7))
    plain.load_state_dict(theirs.state_dict())
    assert torch.equal(plain.weight, weight)
    x = make_tensor((6, 7), seed=1, requires_grad=True)
    target = torch.randint(0, 7, (6,), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours(x, target), theirs(x, target), rtol=1e-5, atol=1e-5)
    legacy = fastdl.nn.CrossEntropyLoss(reduce=False)
    assert legacy.reduction == "none" and legacy(x, target).shape == (6,)
    assert fastdl.nn.CrossEntropyLoss().to(torch.float64)(x.double(), target).dtype == torch.float64


# --- torch.compile -------------------------------------------------------------------------------

def test_torch_compile_fullgraph_reference_backend():
    x = make_tensor((6, 9), torch.float64, seed=1, requires_grad=True)
    w = make_tensor((11, 9), torch.float64, seed=2, requires_grad=True)
    target = torch.randint(0, 11, (6,), generator=torch.Generator().manual_seed(3))
    loss_fn = fastdl.nn.CrossEntropyLoss(label_smoothing=0.1)

    def step(x, w, target):
        logits = x @ w.T
        return loss_fn(logits, target) + fastdl.functional.linear_cross_entropy(x, w, target, reduction="none").sum()

    with fastdl.use_backend("reference"):
        expected = step(x, w, target)
        expected_grads = torch.autograd.grad(expected, (x, w))
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        out = compiled(x, w, target)
        grads = torch.autograd.grad(out, (x, w))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# --- GPU: realistic vocabularies, every backend with a cross-entropy launcher ---------------------

def _gpu_backends():
    return gpu_backends("cross_entropy_fwd", ["triton", "cupy", "reference"])


def _gpu_logits(N, V, dtype, seed, scale=4.0, requires_grad=False):
    """make_tensor's non-uniform rows and columns, drawn on the GPU (a billion float64 values on
    the host would take tens of GB and minutes)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn((N, V), device="cuda", generator=gen)
    x.mul_(torch.exp(0.5 * torch.randn((N, 1), device="cuda", generator=gen)))
    x.add_(0.2 * torch.randn((V,), device="cuda", generator=gen)).mul_(scale)
    return x.to(dtype).requires_grad_(requires_grad)


# Big shapes compare against torch's float64 cross_entropy on the GPU, not the NumPy reference (too
# slow at 8192 x 128256): tests/test_reference_cross_entropy.py proves the reference equal to torch
# in float64 to 1e-12 for every semantic used here, which makes torch float64 a faithful proxy.
@pytest.mark.gpu
@pytest.mark.parametrize("V", [32000, 128256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("backend", [b for b in _gpu_backends() if b != "reference"])
def test_gpu_large_vocabulary_matches_float64(backend, dtype, V):
    N = 8192
    x = _gpu_logits(N, V, dtype, seed=1)
    target = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(2)).cuda()
    target[::7] = -100
    weight = (torch.rand(V, generator=torch.Generator().manual_seed(3)) + 0.5).to(dtype).cuda()
    for kwargs in (dict(reduction="mean"), dict(reduction="none", label_smoothing=0.1, weight=weight)):
        x64 = x.double().requires_grad_()
        w64 = kwargs.get("weight")
        expected = F.cross_entropy(x64, target, **dict(kwargs, weight=None if w64 is None else w64.double()))
        grad_out = make_tensor(expected.shape, torch.float64, "cuda", seed=4) if expected.dim() else torch.tensor(
            1.0, dtype=torch.float64, device="cuda")
        expected.backward(grad_out)
        xx = x.clone().requires_grad_()
        with fastdl.use_backend(backend):
            loss = fastdl.functional.cross_entropy(xx, target, **kwargs)
        loss.backward(grad_out.to(dtype))
        assert_close(loss, expected.detach(), dtype, name="loss")
        assert_close(xx.grad, x64.grad, dtype, name="grad_input")
        assert torch.equal(xx.detach(), x)
        del x64, xx, expected, loss


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b in _gpu_backends() if b != "reference"])
def test_gpu_largest_vocabulary_past_int32_offsets(backend):
    # 8200 x 262144 bf16 logits: rows past 8192 start beyond element 2**31 (int64 offsets).
    N, V = 8200, 262144
    x = _gpu_logits(N, V, torch.bfloat16, seed=1, requires_grad=True)
    target = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(2)).cuda()
    with fastdl.use_backend(backend):
        loss = fastdl.functional.cross_entropy(x, target, reduction="none", label_smoothing=0.05)
    loss.backward(torch.ones_like(loss))
    rows = torch.tensor([0, 4097, 8191, 8192, 8199], device="cuda")
    x64 = x.detach()[rows].double().requires_grad_()
    expected = F.cross_entropy(x64, target[rows], reduction="none", label_smoothing=0.05)
    expected.backward(torch.ones_like(expected))
    assert_close(loss[rows], expected.detach(), torch.bfloat16, name="loss")
    assert_close(x.grad[rows], x64.grad, torch.bfloat16, name="grad_input")


@pytest.mark.gpu
def test_gpu_checked_mode_raises_index_error(monkeypatch):
    from fastdl.functional import CHECK_TARGETS_ENV

    monkeypatch.setenv(CHECK_TARGETS_ENV, "1")
    x = make_tensor((3, 5), device="cuda")
    with pytest.raises(IndexError, match="Target 7 is out of bounds"):
        fastdl.functional.cross_entropy(x, torch.tensor([0, 7, 1], device="cuda"))


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph_triton_backend():
    x = make_tensor((64, 1000), device="cuda", seed=1, requires_grad=True)
    target = torch.randint(0, 1000, (64,), device="cuda")
    with fastdl.use_backend("triton"):
        expected = fastdl.functional.cross_entropy(x, target, label_smoothing=0.1)
        out = torch.compile(lambda a, t: fastdl.functional.cross_entropy(a, t, label_smoothing=0.1),
                            fullgraph=True)(x, target)
        out.backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
