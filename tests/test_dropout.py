"""fastdl.functional.dropout / nn.Dropout: the Triton kernel (interpreter) and the reference backend
against the float64 reference with the mask the scheme defines (fastdl/reference/dropout.py),
dropout's statistics, torch's semantics at the edges (p = 0 and 1, training=False, inplace, NaN,
-0.0, layouts), errors, autograd (second backward, double backward, gradcheck) and torch.func.
The CUDA kernel: tests/test_cuda_dropout.py (host emulation and NVRTC)."""
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastdl
from fastdl.ops.dropout import draw_seed
from fastdl.reference import dropout as ref
from fastdl.testing import assert_close, make_tensor

BACKENDS = ["triton", "reference"]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]

# id: (shape, layout), the path each exercises
CASES = {
    # 3 x 1001: a flat count that is no multiple of 4 (the last Philox group is partial) nor of a
    # block (2048 elements: the second program's tail is masked).
    "odd flat 3x1001": ((3, 1001), "contiguous"),
    # channels_last: dense, not contiguous; elements are counted in memory order, the output keeps it.
    "channels_last 2x5x7x3": ((2, 5, 7, 3), "channels_last"),
    # a transposed (dense) view: no copy, the output is transposed too.
    "transposed 37x24": ((24, 37), "transposed"),
    # every other column: not dense, made dense first (torch.empty_like's layout).
    "strided view 6x50": ((6, 50), "strided"),
    # a 0-dim tensor: one element.
    "scalar": ((), "contiguous"),
}


def make_input(shape, dtype, layout, seed=0):
    if layout == "channels_last":
        return make_tensor(shape, dtype, seed=seed, scale=2.0).to(memory_format=torch.channels_last)
    if layout == "transposed":
        return make_tensor(shape, dtype, seed=seed, scale=2.0).t()
    if layout == "strided":
        return make_tensor(shape, dtype, seed=seed, scale=2.0, noncontiguous=True)
    return make_tensor(shape, dtype, seed=seed, scale=2.0)


def expected_keep(seed: torch.Tensor, p: float, like: torch.Tensor) -> torch.Tensor:
    """The reference mask of `like`'s elements (counted in the memory order of the dense tensor the
    op runs on: torch.empty_like's layout), in like's logical order."""
    dense = torch.empty_like(like)
    order = sorted(range(dense.dim()), key=lambda d: (-dense.stride(d), d))
    keep = ref.flat_keep_mask(tuple(seed.tolist()), p, tuple(dense.permute(order).shape) if order else ())
    inverse = sorted(range(len(order)), key=lambda i: order[i])
    keep = torch.from_numpy(np.asarray(keep))
    return keep.permute(inverse) if order else keep.reshape(())


def run_dropout(backend, dtype, x, p, seed=0):
    """fastdl's dropout forward and backward under torch.manual_seed(seed) against the reference with
    the scheme's mask for the key that call draws; returns (out, grad_input, keep)."""
    torch.manual_seed(seed)
    key = draw_seed(x.device)
    torch.manual_seed(seed)
    xx = x.detach().requires_grad_()
    with fastdl.use_backend(backend):
        out = fastdl.functional.dropout(xx, p)
    keep = expected_keep(key, p, x)
    want, saved = ref.forward(x.detach().double().numpy(), keep.numpy(), p)
    assert out.dtype == dtype and out.shape == x.shape
    assert out.stride() == torch.empty_like(x).stride()
    assert_close(out, want, dtype, name=f"{backend} out")
    g = make_tensor(x.shape, dtype, seed=seed + 7)
    out.backward(g)
    assert_close(xx.grad, ref.backward(g.double().numpy(), saved), dtype, name=f"{backend} grad_input")
    return out.detach(), xx.grad, keep


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(backend, dtype, case):
    shape, layout = CASES[case]
    x = make_input(shape, dtype, layout)
    out, grad, keep = run_dropout(backend, dtype, x, 0.3)
    nonzero = x != 0
    assert torch.equal((out != 0) & nonzero, keep & nonzero)  # the scheme's mask exactly


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_kept_fraction_within_four_sigma(p):
    n = 1 << 18
    x = torch.ones(n)
    torch.manual_seed(11)
    with fastdl.use_backend("triton"):
        kept = (fastdl.functional.dropout(x, p) != 0).double().mean().item()
    assert abs(kept - (1 - p)) < 4 * math.sqrt(p * (1 - p) / n), kept


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kept_values_scaled_exactly(dtype):
    # x * (1/(1-p)) in float32 (float64 for float64), rounded once: torch's CUDA rule (and its CPU
    # one for float32 and float64).
    p = 0.3
    x = make_tensor((4, 777), dtype, seed=5, scale=3.0)
    torch.manual_seed(2)
    with fastdl.use_backend("triton"):
        out = fastdl.functional.dropout(x, p)
    kept = out != 0
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.tensor(1.0 / (1.0 - p), dtype=acc)
    assert torch.equal(out[kept], (x[kept].to(acc) * scale).to(dtype))
    if dtype in (torch.float32, torch.float64):
        want = F.dropout(x, p)
        both = kept & (want != 0)
        assert both.any() and torch.equal(out[both], want[both])  # torch's own kept values


@pytest.mark.parametrize("backend", BACKENDS)
def test_fresh_mask_per_call_and_same_mask_per_seed(backend):
    x = torch.ones(4096)
    with fastdl.use_backend(backend):
        torch.manual_seed(3)
        a, b = fastdl.functional.dropout(x, 0.5), fastdl.functional.dropout(x, 0.5)
        torch.manual_seed(3)
        c = fastdl.functional.dropout(x, 0.5)
    assert 0.4 < ((a != 0) == (b != 0)).double().mean() < 0.6  # consecutive calls: independent masks
    assert torch.equal(a, c)                                    # the same seed: the same mask


def test_backends_draw_the_same_mask():
    # triton (interpreter), the reference and the "torch" entry (forward AD, torch.func) for one
    # seed; the CUDA kernel joins them in tests/test_cuda_dropout.py.
    x = make_tensor((3, 1001), torch.float32, seed=8)
    outs = {}
    for backend in BACKENDS:
        torch.manual_seed(5)
        with fastdl.use_backend(backend):
            outs[backend] = fastdl.functional.dropout(x, 0.4)
    torch.manual_seed(5)
    outs["torch"] = fastdl.ops.get("dropout", "torch")(x, draw_seed(x.device), 0.4)
    masks = [o != 0 for o in outs.values()]
    assert all(torch.equal(m, masks[0]) for m in masks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_and_backward_masks_equal(backend):
    x = make_tensor((5, 300), torch.float32, seed=1, requires_grad=True)
    g = make_tensor((5, 300), torch.float32, seed=2)
    torch.manual_seed(9)
    with fastdl.use_backend(backend):
        out = fastdl.functional.dropout(x, 0.6)
    (grad,) = torch.autograd.grad(out, x, g)
    assert torch.equal(out != 0, grad != 0)
    kept = out != 0
    assert_close(grad[kept], (g[kept].double() / 0.4), torch.float32)


def test_grad_out_in_another_layout():
    # The mask is in the input's memory order: a grad_out of other strides (an expanded ones from
    # .sum(), a transposed one) is put in that layout first.
    x = make_input((6, 10), torch.float32, "transposed").requires_grad_()
    torch.manual_seed(4)
    with fastdl.use_backend("triton"):
        out = fastdl.functional.dropout(x, 0.5)
    out.sum().backward(retain_graph=True)
    assert torch.equal(x.grad, (out != 0).float() * 2.0)
    x.grad = None
    g = make_tensor(out.shape, torch.float32, seed=3)
    out.backward(g.contiguous())
    assert torch.equal(x.grad, g * (out != 0) * 2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_values_follow_torch(backend):
    # The mask multiplies: a dropped NaN or inf is NaN, a dropped negative value is -0.0.
    x = torch.tensor([float("nan"), float("inf"), float("-inf"), -2.0, 3.0] * 200)
    torch.manual_seed(6)
    with fastdl.use_backend(backend):
        out = fastdl.functional.dropout(x, 0.5)
    torch.manual_seed(6)
    keep = expected_keep(draw_seed(x.device), 0.5, x)
    want = x * keep.float() * 2.0
    assert torch.equal(torch.isnan(out), torch.isnan(want))
    assert torch.equal(out[~torch.isnan(out)], want[~torch.isnan(want)])
    assert torch.equal(torch.signbit(out), torch.signbit(want))


def test_p_zero_one_eval_and_empty_as_torch():
    x = make_tensor((3, 4), torch.float32, requires_grad=True)
    for kwargs in ({"p": 0.0}, {"p": 0.5, "training": False}, {"p": 0.0, "inplace": True}):
        assert fastdl.functional.dropout(x, **kwargs) is x and F.dropout(x, **kwargs) is x
    empty = torch.empty(0, 3)
    assert fastdl.functional.dropout(empty, 0.5) is empty
    special = torch.tensor([1.0, -1.0, float("nan"), float("inf")], requires_grad=True)
    out, want = fastdl.functional.dropout(special, 1.0), F.dropout(special, 1.0)
    torch.testing.assert_close(out, want, equal_nan=True, rtol=0, atol=0)
    assert torch.equal(torch.signbit(out), torch.signbit(want)) and out.requires_grad
    out.sum().backward()
    assert torch.equal(special.grad, torch.zeros(4))
    ints = torch.arange(4)
    assert torch.equal(fastdl.functional.dropout(ints, 1.0), F.dropout(ints, 1.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace(backend):
    x = make_tensor((3, 333), torch.float32, seed=2)
    with fastdl.use_backend(backend):
        torch.manual_seed(1)
        want = fastdl.functional.dropout(x, 0.25)
        y = x.clone()
        torch.manual_seed(1)
        assert fastdl.functional.dropout(y, 0.25, inplace=True) is y
        assert torch.equal(y, want)
        # Through autograd on a non-leaf, as torch allows; a leaf raises torch's RuntimeError.
        leaf = x.clone().requires_grad_()
        h = leaf * 1.0
        torch.manual_seed(1)
        out = fastdl.functional.dropout(h, 0.25, inplace=True)
        assert out is h and torch.equal(out, want)
        out.backward(torch.ones_like(out))
        assert torch.equal(leaf.grad, (want != 0).float() / 0.75)
        with pytest.raises(RuntimeError, match="leaf Variable"):
            fastdl.functional.dropout(leaf, 0.25, inplace=True)


def test_bad_input_raises_torch_types_and_writes_nothing():
    x = make_tensor((2, 3), torch.float32)
    before = x.clone()
    for p in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"fastdl\.dropout: dropout probability has to be between 0 and 1, "
                                             rf"but got {p}"):
            fastdl.functional.dropout(x, p, inplace=True)
        with pytest.raises(ValueError):
            F.dropout(x, p)
    assert torch.equal(x, before)
    with pytest.raises(TypeError, match="must be Tensor"):
        fastdl.functional.dropout([1.0, 2.0], 0.5)
    with pytest.raises(RuntimeError, match=r"fastdl\.dropout: input dtype torch.int64 .*\(input 4\)"):
        fastdl.functional.dropout(torch.arange(4), 0.5)
    with pytest.raises(RuntimeError):
        F.dropout(torch.arange(4), 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_and_double_backward(backend):
    x = make_tensor((4, 50), torch.float64, seed=3, requires_grad=True)
    g = make_tensor((4, 50), torch.float64, seed=4, requires_grad=True)
    torch.manual_seed(2)
    with fastdl.use_backend(backend):
        out = fastdl.functional.dropout(x, 0.3)
    first = torch.autograd.grad(out, x, g, retain_graph=True)[0]
    second = torch.autograd.grad(out, x, g, retain_graph=True)[0]
    assert torch.equal(first, second)
    # grad_input = g * keep / (1-p) is linear in g: its derivative with respect to g is the mask again.
    (grad_x,) = torch.autograd.grad(out, x, g, create_graph=True)
    (grad_g,) = torch.autograd.grad(grad_x, g, torch.ones_like(grad_x))
    assert torch.equal(grad_g, (out != 0).double() / 0.7)


def test_gradcheck_on_the_reference_with_a_fixed_seed():
    op = fastdl.ops.get("dropout", "reference")
    seed = torch.tensor([123, 456])
    x = make_tensor((3, 7), torch.float64, seed=1, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: op(t, seed, 0.4), (x,))
    assert torch.autograd.gradgradcheck(lambda t: op(t, seed, 0.4), (x,))


def test_torch_func_and_forward_ad_draw_the_kernels_mask():
    x = make_tensor((3, 41), torch.float64, seed=2)
    torch.manual_seed(7)
    with fastdl.use_backend("reference"):
        want = fastdl.functional.dropout(x, 0.5)
    torch.manual_seed(7)
    grad = torch.func.grad(lambda t: fastdl.functional.dropout(t, 0.5).sum())(x)
    assert torch.equal(grad, (want != 0).double() * 2.0)
    tangent = make_tensor((3, 41), torch.float64, seed=3)
    torch.manual_seed(7)
    out, jvp = torch.func.jvp(lambda t: fastdl.functional.dropout(t, 0.5), (x,), (tangent,))
    assert torch.equal(out, want) and torch.equal(jvp, tangent * (want != 0) * 2.0)


def test_nn_dropout_is_torch_dropout():
    m = fastdl.nn.Dropout(0.25)
    assert isinstance(m, torch.nn.Dropout) and repr(m) == repr(torch.nn.Dropout(0.25))
    assert m.state_dict() == {} and m.p == 0.25
    x = make_tensor((4, 64), torch.float32)
    torch.manual_seed(1)
    with fastdl.use_backend("triton"):
        out = m(x)
        torch.manual_seed(1)
        assert torch.equal(out, fastdl.functional.dropout(x, 0.25))
    m.eval()
    assert m(x) is x
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
        fastdl.nn.Dropout(1.5)


def test_fx_traces_the_functional_call():
    traced = torch.fx.symbolic_trace(torch.nn.Sequential(fastdl.nn.Dropout(0.1)))
    assert any(n.target is fastdl.functional.dropout for n in traced.graph.nodes)


# --- torch.compile and fx -------------------------------------------------------------------------

class _Block(torch.nn.Module):
    """An MLP block as users write it: Linear with dropout fused, then a separate Dropout."""

    def __init__(self):
        super().__init__()
        self.fc1 = fastdl.nn.Linear(9, 16, activation="relu", dropout=0.3)
        self.fc2 = fastdl.nn.Linear(16, 5)
        self.drop = fastdl.nn.Dropout(0.4)

    def forward(self, x):
        return self.drop(self.fc2(self.fc1(x)))


def _run_seeded(fn, seed, *tensors):
    """fn(*tensors) under torch.manual_seed(seed): its output and the gradients of out.square().sum()."""
    torch.manual_seed(seed)
    out = fn(*tensors)
    leaves = [t for t in tensors if t.requires_grad]
    params = list(fn.parameters()) if isinstance(fn, torch.nn.Module) else []
    grads = torch.autograd.grad(out.square().sum(), leaves + params)
    return out, grads


def test_torch_compile_fullgraph_functional_dropout():
    # The key is drawn by torch.randint inside the graph, from torch's generator as in eager: the
    # same seed gives eager's mask, a new call a new one.
    x = make_tensor((6, 37), torch.float64, seed=1, requires_grad=True)

    def fn(t):
        return fastdl.functional.dropout(torch.tanh(t), 0.3) * 2.0

    with fastdl.use_backend("reference"):
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        compiled(x)  # compiles
        want, want_grads = _run_seeded(fn, 21, x)
        out, grads = _run_seeded(compiled, 21, x)
        other = compiled(x)
    assert torch.equal(out, want) and (out == 0).any()
    torch.testing.assert_close(grads, want_grads, rtol=1e-12, atol=1e-12)
    assert not torch.equal(other == 0, out == 0)


def test_torch_compile_fullgraph_linear_dropout_and_nn_dropout():
    torch.manual_seed(0)
    model = _Block().double()
    x = make_tensor((7, 9), torch.float64, seed=2, requires_grad=True)
    with fastdl.use_backend("reference"):
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        compiled(x)
        want, want_grads = _run_seeded(model, 5, x)
        out, grads = _run_seeded(compiled, 5, x)
        model.eval()
        assert torch.equal(compiled(x), model.fc2(model.fc1(x)))  # eval: recompiled, no dropout
    assert torch.equal(out, want) and (out == 0).any()
    torch.testing.assert_close(grads, want_grads, rtol=1e-12, atol=1e-12)


def test_fx_traces_linear_dropout_and_nn_dropout():
    torch.manual_seed(0)
    model = _Block().double()
    traced = torch.fx.symbolic_trace(model)
    calls = [n for n in traced.graph.nodes if n.op == "call_function"]
    assert [n.target for n in calls] == [fastdl.functional.linear, fastdl.functional.linear,
                                         fastdl.functional.dropout]
    assert calls[0].kwargs["dropout"] == 0.3 and calls[0].kwargs["training"] is True
    x = make_tensor((7, 9), torch.float64, seed=3, requires_grad=True)
    with fastdl.use_backend("reference"):
        want, want_grads = _run_seeded(model, 8, x)
        out, grads = _run_seeded(traced, 8, x)
    assert torch.equal(out, want) and (out == 0).any()
    torch.testing.assert_close(grads, want_grads, rtol=0, atol=0)


# --- fastdl verify rows and fastdl bench cases -----------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_verify_rows_pass_and_cover_masks_linear_and_statistics(backend):
    from fastdl import verify

    rows = [r for dtype in (torch.bfloat16, torch.float32) for r in verify._check_dropout(backend, dtype, "cpu")]
    assert rows and all(r["status"] == "pass" for r in rows), [r for r in rows if r["status"] != "pass"][:3]
    alone = [r for r in rows if not r["shape"].startswith("linear")]
    fused = [r for r in rows if r["shape"].startswith("linear")]
    assert {r["check"] for r in alone} == {"mask", "out", "grad_input", "kept fraction"}
    assert {r["check"] for r in fused} == {"out", "grad_input", "grad_weight", "grad_bias"}
    assert any("channels_last" in r["shape"] for r in alone)
    # per dtype: 2 shapes x (mask, out, grad_input) + 2 linear shapes x 4; one kept-fraction row (float32).
    assert len(rows) == 2 * (2 * 3 + 2 * 4) + 1
    # A wrong key makes the mask rows fail: they compare something.
    real_key = verify._key
    try:
        verify._key = lambda device: tuple(k + 1 for k in real_key(device))
        wrong = list(verify._check_dropout(backend, torch.float32, "cpu"))
    finally:
        verify._key = real_key
    assert {r["check"] for r in wrong if r["status"] == "FAIL"} >= {"mask", "out", "grad_input", "grad_weight"}


def test_bench_cases_and_floor():
    from fastdl import bench
    from fastdl.bench.spec import DTYPES

    spec = bench.OPS["dropout"]
    full = spec.workloads(False)
    assert {w.group for w in full} == {"dropout", "linear+relu", "linear+relu+dropout"}
    assert {w.dtype for w in full if w.group == "dropout"} == {"bf16", "fp16", "fp32"}
    assert len({(w.dtype, w.label) for w in full}) == len(full)
    # Every fused workload has its linear+relu twin (same dtype and shape), which the overhead needs.
    fused = {(w.dtype, w.shape) for w in full if w.group == "linear+relu+dropout"}
    assert fused and fused == {(w.dtype, w.shape) for w in full if w.group == "linear+relu"}
    quick = spec.workloads(True)
    assert len(quick) < len(full) and {w.group for w in quick} == {w.group for w in full}
    cases = bench.cases("dropout")
    assert len({c.id for c in cases}) == len(cases)
    w = next(w for w in full if w.group == "dropout" and w.dtype == "bf16")
    n = math.prod(w.shape)
    assert DTYPES[w.dtype][0].itemsize == 2
    assert spec.cost(w, "forward") == spec.cost(w, "backward") == (0.0, 4 * n)  # read x / write out
    assert spec.cost(w, "forward+backward") == (0.0, 8 * n)
    # Dropout in the epilogue adds nothing to linear + relu's floor (the mask is regenerated).
    for mode in ("forward", "backward", "forward+backward"):
        plain = next(v for v in full if v.group == "linear+relu")
        twin = next(v for v in full if v.group == "linear+relu+dropout" and (v.dtype, v.shape) ==
                    (plain.dtype, plain.shape))
        assert spec.cost(twin, mode) == spec.cost(plain, mode) and spec.cost(plain, mode)[0] > 0


@pytest.mark.parametrize("group", ["dropout", "linear+relu", "linear+relu+dropout"])
def test_bench_functions_pass_the_check_and_a_wrong_output_fails(group):
    """The bench's own check on CPU: fastdl's output (reference backend) and torch's pass it, a
    wrong scale, a mask that keeps too much and a NaN fail it."""
    from fastdl import bench
    from fastdl.bench.spec import CHECK_TOLERANCE

    spec = bench.OPS["dropout"]
    w = next(w for w in spec.workloads(True) if w.group == group and w.dtype == "bf16")
    w = dataclasses.replace(w, dtype="fp32")
    if group == "dropout":
        inputs = (make_tensor((64, 300), seed=1, scale=2.0),)
    else:
        inputs = (make_tensor((64, 40), seed=1), make_tensor((48, 40), seed=2, scale=40 ** -0.5),
                  make_tensor((48,), seed=3))
    torch.manual_seed(0)
    with fastdl.use_backend("reference"):
        ours = spec.fastdl_fn(w)(*inputs)
    theirs = spec.torch_fn(w)(*inputs)
    tol = CHECK_TOLERANCE["fp32"]
    assert spec.check(w, inputs, ours) <= tol and spec.check(w, inputs, theirs) <= tol
    assert not spec.check(w, inputs, ours * 1.01) <= tol
    assert math.isnan(spec.check(w, inputs, ours.masked_fill(ours != 0, float("nan"))))
    if group != "linear+relu":
        undropped = inputs[0] if group == "dropout" else F.relu(F.linear(*inputs))
        assert spec.check(w, inputs, undropped / (1 - w.param["p"])) == math.inf  # nothing dropped


def test_bench_fused_overhead_pairs_the_groups():
    from fastdl.bench.dropout import fused_overhead

    def record(group, provider, ms, mode="forward+backward"):
        return dict(group=group, provider=provider, dtype="bf16", shape=[8, 8, 8], mode=mode, ms=ms)

    records = [record("linear+relu", "fastdl-triton", 2.0), record("linear+relu+dropout", "fastdl-triton", 2.1),
               record("linear+relu", "torch", 3.0), record("linear+relu+dropout", "torch", 4.5),
               record("linear+relu+dropout", "fastdl-cupy", 1.0), record("dropout", "torch", 1.0)]
    got = {(r["provider"], r["mode"]): r["ratio"] for r in fused_overhead(records)}
    assert got == {("fastdl-triton", "forward+backward"): pytest.approx(1.05), ("torch", "forward+backward"): 1.5}


def test_bench_prepared_check_uses_the_ops_check():
    # What `fastdl bench` records as check / max_rel_err_vs_torch for dropout: its own check, not a
    # comparison with torch's output (another mask), run on the first input copy.
    from types import SimpleNamespace

    from fastdl import bench
    from fastdl.bench import timing

    spec = bench.OPS["dropout"]
    w = dataclasses.replace(next(w for w in spec.workloads(True) if w.group == "dropout"), dtype="fp32")
    inputs = (make_tensor((16, 500), seed=4, scale=2.0),)
    torch.manual_seed(1)
    with fastdl.use_backend("reference"):
        out = spec.fastdl_fn(w)(*inputs)
    prepared = SimpleNamespace(case=bench.Case(w, "fastdl-triton", "forward"), inputs=[inputs], first_output=out)
    assert timing.Prepared.check(prepared) <= bench.CHECK_TOLERANCE["fp32"]
    prepared.first_output = out * 1.5
    assert timing.Prepared.check(prepared) > 0.1
