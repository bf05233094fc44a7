"""fastdl.functional.conv2d / fastdl.nn.Conv2d: the Triton kernels (through the interpreter) and the
reference backend against the float64 reference, torch's semantics at the edges, errors, state_dict
and padding modes, autograd beyond first order, torch.func, torch.compile, every autotune config."""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import fastdl
from fastdl.functional import _TORCH_ACTIVATIONS
from fastdl.kernels.triton import conv2d as K_
from fastdl.reference import conv2d as ref
from fastdl.testing import assert_close, make_tensor

F64 = torch.float64

# (N, C, H, W, K, R, S, stride, padding, dilation, groups, activation): the code path each exercises.
CASES = {
    # one tap; channel blocks with a remainder (C_g = 24 over 16/32-wide blocks)
    "1x1": (2, 24, 5, 6, 20, 1, 1, 1, 0, 1, 1, "relu"),
    # stride 2: grad_input's four stride phases, each skipping the taps that miss it; odd H, W
    "3x3-s2": (2, 18, 9, 10, 12, 3, 3, 2, 1, 1, 1, "gelu"),
    # the ResNet stem: C = 3 < 16, FEW_CHANNELS folds s into the channel axis (21 columns per row)
    "7x7-s2-p3-c3": (2, 3, 11, 10, 16, 7, 7, 2, 3, 1, 1, "leaky_relu"),
    # dilation 2 with padding 2 (a "same"-sized output), taps landing in the padding
    "3x3-d2": (1, 17, 9, 9, 10, 3, 3, 1, 2, 2, 1, "silu"),
    # depthwise: groups == C, one input and one output channel per group (FEW_CHANNELS, 1-wide tiles)
    "depthwise": (2, 4, 6, 5, 4, 3, 3, 1, 1, 1, 4, "tanh"),
    # groups=4: C_g = 5 (FEW_CHANNELS), K_g = 3; every group's channels offset from the others
    "groups4": (2, 20, 8, 7, 12, 3, 3, 1, 1, 1, 4, "sigmoid"),
    # groups with C_g = 16 (the plain nested-channel path), stride (2, 1), padding (1, 0)
    "groups2-s21": (2, 32, 7, 6, 16, 3, 3, (2, 1), (1, 0), 1, 2, None),
    # even kernel with padding="same": torch's asymmetric padding (1 before, 2 after)
    "4x4-same": (1, 16, 7, 6, 8, 4, 4, 1, "same", 1, 1, "gelu_tanh"),
}
LAYOUTS = ("contiguous", "channels_last", "noncontiguous")


def _layout(t, layout, seed):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "noncontiguous":  # the same values in a view with strides (.., .., .., 2)
        wide = make_tensor(t.shape[:-1] + (2 * t.shape[-1],), t.dtype, seed=seed + 50)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


def _np(t):
    return None if t is None else t.detach().double().numpy()


def run_conv2d(backend, dtype, case, layout="contiguous", *, has_bias=True, activation="case", negative_slope=0.1,
               seed=0):
    """Forward and every gradient through fastdl, against the float64 reference with one random grad_output."""
    N, C, H, W, K, R, S, stride, padding, dilation, groups, case_activation = case
    activation = case_activation if activation == "case" else activation
    x = _layout(make_tensor((N, C, H, W), dtype, seed=seed), layout, seed)
    w = _layout(make_tensor((K, C // groups, R, S), dtype, seed=seed + 1, scale=(C // groups * R * S) ** -0.5),
                layout, seed + 1)
    b = make_tensor((K,), dtype, seed=seed + 2) if has_bias else None
    x.requires_grad_()
    w.requires_grad_()
    if b is not None:
        b.requires_grad_()
    with fastdl.use_backend(backend):
        out = fastdl.functional.conv2d(x, w, b, stride, padding, dilation, groups, activation=activation,
                                       negative_slope=negative_slope)
    g = _layout(make_tensor(out.shape, dtype, seed=seed + 3), layout, seed + 3)
    out.backward(g)
    s, pad, d, groups = ref.normalize_args((R, S), stride, padding, dilation, groups)
    expected, saved = ref.forward(_np(x), _np(w), _np(b), s, pad, d, groups, activation, negative_slope)
    grad_x, grad_w, grad_b = ref.backward(_np(g), saved)
    assert out.dtype == dtype and out.shape == expected.shape
    # The output keeps the input's memory format, as torch's convolutions do.
    assert out.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    assert_close(out, expected, dtype, name="out")
    assert_close(x.grad, grad_x, dtype, name="grad_input")
    assert_close(w.grad, grad_w, dtype, name="grad_weight")
    if has_bias:
        assert_close(b.grad, grad_b, dtype, name="grad_bias")


# --- Triton kernels through the interpreter (CPU CI) -----------------------------------------------

# Every case channels_last (what the kernels read and write); NCHW (one layout change each way) on
# the stride-2, stem and grouped cases in fp64 below.
@pytest.mark.parametrize("case", CASES)
def test_triton_fp32_matches_reference(case):
    run_conv2d("triton", torch.float32, CASES[case], "channels_last")


@pytest.mark.parametrize("case", ["3x3-s2", "7x7-s2-p3-c3", "groups2-s21"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_triton_fp16_fp64_match_reference(dtype, case):
    run_conv2d("triton", dtype, CASES[case], "channels_last" if dtype == torch.float16 else "contiguous")


@pytest.mark.parametrize("case", ["3x3-s2", "groups4"])
def test_triton_noncontiguous_views(case):
    run_conv2d("triton", torch.float32, CASES[case], "noncontiguous")


def test_triton_bf16_matches_reference():
    # bf16 runs in float32 under the interpreter, rounded at the launcher (tests/test_interpreter_bf16.py).
    run_conv2d("triton", torch.bfloat16, CASES["3x3-s2"], "channels_last")


# 3 splits: 3x3-s2 and the stem have 2 blocks of 32 pixels (grad_weight's first fp32 tile), so one
# split is empty.
@pytest.mark.parametrize("case", ["3x3-s2", "7x7-s2-p3-c3"])
def test_triton_grad_weight_split_over_pixels(monkeypatch, case):
    from fastdl.backends.triton import conv2d as launcher

    monkeypatch.setattr(launcher, "GRAD_WEIGHT_SPLITS", 3)
    run_conv2d("triton", torch.float32, CASES[case], "channels_last")


@pytest.mark.parametrize("case, activation", [("3x3-s2", None), ("groups4", "relu")])
def test_triton_tf32_hopper_operands(monkeypatch, case, activation):
    """The TF32 backward's Hopper path (_launch.TF32_K_MAJOR forced on: TF32 computes in float32 under
    the interpreter): grad_input reads a weight copy contiguous along K, grad_weight feeds g.T from
    registers (REGISTER_A); both still match the reference."""
    from fastdl.backends.triton import _launch
    from fastdl.backends.triton import conv2d as launcher

    monkeypatch.setattr(_launch, "TF32_K_MAJOR", True)
    copies = []
    k_major_weight = launcher._k_major_weight
    monkeypatch.setattr(launcher, "_k_major_weight", lambda w, p: copies.append(k_major_weight(w, p)) or copies[-1])
    run_conv2d("triton", torch.float32, CASES[case], "channels_last", activation=activation)
    assert len(copies) == 1 and copies[0].stride(0) == 1, [c.stride() for c in copies]


@pytest.mark.parametrize("activation", [None, "relu", "sigmoid"])
def test_triton_without_bias(activation):
    run_conv2d("triton", torch.float32, CASES["1x1"], has_bias=False, activation=activation)


def test_reference_backend_matches_reference():
    run_conv2d("reference", torch.float32, CASES["3x3-s2"], "channels_last")


# --- every autotune config's block sizes under the interpreter -----------------------------------

# What each list runs in here: (dtype, TF32, activation). fp16 stands for bf16 (computed in float32
# under the interpreter); "tf32" lists run with INPUT_PRECISION="tf32" forced.
RUN_AS = {
    "fp16/bf16": (torch.float16, False, "relu"),
    "fp16/bf16 heavy": (torch.float16, False, "gelu"),
    "tf32": (torch.float32, True, None),
    "tf32 heavy": (torch.float32, True, "silu"),
    "fp32": (torch.float32, False, "leaky_relu"),
    "fp64": (torch.float64, False, "relu"),
    "fp64 heavy": (torch.float64, False, "gelu"),
    "few channels": (torch.float32, False, "relu"),
    "fp64 few channels": (torch.float64, False, "relu"),
    "fp32 few channels": (torch.float32, True, "gelu"),
}
CONV_KERNELS = {name: getattr(K_, "_" + name) for name in K_.KERNELS}
# 2x2 stride 2 on 24x23: M = 2*12*11 = 264 output pixels (and per stride phase of grad_input), a
# 256-row block and part of another; C = 40 and K = 20 span one and a part of a channel block; four
# taps (nested r, s loops of two trips), each phase of grad_input reached by one of them.
CONFIG_CASE = (2, 40, 24, 23, 20, 2, 2, 2, 0, 1, 1)
# Lists whose blocks are all <= 64 run on 1x14x20 (M = 70, a 64-block and part of another).
SMALL_CONFIG_CASE = (1, 40, 14, 20, 20, 2, 2, 2, 0, 1, 1)


# C = 3 (the "few channels" list): M = 2*10*9 = 180, FEW_CHANNELS' 9 columns per kernel row.
FEW_CONFIG_CASE = (2, 3, 10, 9, 20, 3, 3, 1, 1, 1, 1)


def _config_case(list_name):
    if list_name.endswith("few channels"):
        return FEW_CONFIG_CASE
    biggest = max(max(tile[:3]) for tile in K_.CONFIG_LISTS[list_name])
    return CONFIG_CASE if biggest > 128 else SMALL_CONFIG_CASE


def _config_cases():
    """(list, index) pairs that run every kernel's every tile once: a pair whose three tiles (one per
    kernel, index modulo its list's length) all ran in an earlier pair is left out."""
    out, seen = [], set()
    for name in K_.CONFIG_LISTS:
        longest = max(len(K_.config_tiles(k, name)) for k in K_.KERNELS)
        for i in range(longest):
            tiles = {(k, K_.config_tiles(k, name)[i % len(K_.config_tiles(k, name))]) for k in K_.KERNELS}
            if tiles - seen:
                out.append(pytest.param(name, i, id=f"{name}-{i}"))
                seen |= tiles
    return out


def test_config_cases_cover_every_tile_of_every_kernel():
    covered = {(k, K_.config_tiles(k, p.values[0])[p.values[1] % len(K_.config_tiles(k, p.values[0]))])
               for p in _config_cases() for k in K_.KERNELS}
    assert covered == {(k, t) for k in K_.KERNELS for name in K_.CONFIG_LISTS for t in K_.config_tiles(k, name)}


@pytest.mark.parametrize("list_name, index", _config_cases())
def test_every_config_of_every_list(monkeypatch, list_name, index):
    from fastdl.backends.triton import conv2d as launcher

    dtype, tf32, activation = RUN_AS[list_name]
    pinned = []
    for name, kernel in CONV_KERNELS.items():
        configs = K_.list_configs(name, list_name)
        config = configs[index % len(configs)]
        monkeypatch.setattr(kernel, "configs", [config])
        monkeypatch.setattr(kernel, "cache", {})
        monkeypatch.setattr(kernel, "best_config", None, raising=False)
        pinned.append((kernel, config))
    if tf32:
        monkeypatch.setattr(launcher, "input_precision", lambda input: "tf32")
    run_conv2d("triton", dtype, _config_case(list_name) + (activation,), "channels_last")
    for kernel, config in pinned:
        assert kernel.best_config is config


PRECISIONS = {"fp16": (torch.float16, "ieee"), "bf16": (torch.bfloat16, "ieee"), "tf32": (torch.float32, "tf32"),
              "fp32": (torch.float32, "ieee"), "fp64": (torch.float64, "ieee")}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("kernel", K_.KERNELS)
def test_prune_picks_the_launchs_list(monkeypatch, kernel, precision):
    dtype, input_precision = PRECISIONS[precision]
    few = {K_.KERNELS[kernel][1]: torch.empty(0, dtype=dtype), "C_g": 3}
    assert K_.config_list_name(kernel, few, {"INPUT_PRECISION": input_precision, "ACTIVATION": 3}) \
        == {"fp64": "fp64 few channels", "fp32": "fp32 few channels", "tf32": "fp32 few channels"}.get(
            precision, "few channels")
    for code, heavy in ((0, False), (1, False), (3, True)):
        named = {K_.KERNELS[kernel][1]: torch.empty(0, dtype=dtype), "C_g": 64}
        kwargs = {"INPUT_PRECISION": input_precision, "ACTIVATION": code}
        name = K_.config_list_name(kernel, named, kwargs)
        base = {"fp16": "fp16/bf16", "bf16": "fp16/bf16"}.get(precision, precision)
        assert name == (base + " heavy" if heavy and base != "fp32" else base)
        autotuner = CONV_KERNELS[kernel]
        tiles = K_.config_tiles(kernel, name)
        assert [K_.tile_of(c, kernel) for c in autotuner.early_config_prune(autotuner.configs, named, **kwargs)] \
            == [tiles[0]]
        monkeypatch.setattr(K_.TILES, "first_only", False)
        assert [K_.tile_of(c, kernel) for c in autotuner.early_config_prune(autotuner.configs, named, **kwargs)] \
            == list(tiles)
        monkeypatch.setattr(K_.TILES, "first_only", True)
        # the autotuner prunes once per key: the key holds what config_list_name reads besides dtypes
        assert {"ACTIVATION", "INPUT_PRECISION"} <= set(autotuner.keys)


def test_sm80_drops_its_spilling_tiles_and_keeps_a_default():
    for (kernel, name), spills in K_.SM80_SPILLS.items():
        everywhere, sm80 = K_.config_tiles(kernel, name), K_.config_tiles(kernel, name, (8, 0))
        assert set(spills) <= set(everywhere) and not set(spills) & set(sm80) and sm80
        assert K_.config_tiles(kernel, name, (9, 0)) == everywhere
    for (kernel, name), extra in K_.SM80_EXTRA.items():
        sm80 = K_.config_tiles(kernel, name, (8, 0))
        assert set(extra) <= set(sm80) and not set(extra) & set(K_.config_tiles(kernel, name, (9, 0)))
        assert not set(extra) & set(K_.SM80_SPILLS.get((kernel, name), {}))
        # the autotuner holds them, so an sm_80 prune can pick them
        assert set(extra) <= {K_.tile_of(c, kernel) for c in CONV_KERNELS[kernel].configs}


@pytest.mark.parametrize("kernel, list_name, tile", [
    pytest.param(kernel, name, tile, id=f"{kernel}-{name}-{'x'.join(map(str, tile))}")
    for (kernel, name), tiles in K_.SM80_EXTRA.items() for tile in tiles])
def test_sm80_extra_tiles_match_reference(monkeypatch, kernel, list_name, tile):
    # The sm_80-only tiles are in no list the interpreter runs: pin each on its kernel (the others at
    # their list's default) and check the whole conv against the reference.
    from fastdl.backends.triton import conv2d as launcher

    dtype, tf32, activation = RUN_AS[list_name]
    config = K_.TILES.config(kernel, tile)
    autotuner = CONV_KERNELS[kernel]
    monkeypatch.setattr(autotuner, "configs", [config])
    monkeypatch.setattr(autotuner, "cache", {})
    monkeypatch.setattr(autotuner, "best_config", None, raising=False)
    if tf32:
        monkeypatch.setattr(launcher, "input_precision", lambda input: "tf32")
    case = FEW_CONFIG_CASE if list_name.endswith("few channels") else SMALL_CONFIG_CASE
    run_conv2d("triton", dtype, case + (activation,), "channels_last")
    assert autotuner.best_config is config


def test_config_tiles_fit_shared_memory():
    # Operand tiles x stages within the A100's 163 KB per block (the compiled sizes: fastdl inspect).
    for kernel in K_.KERNELS:
        for list_name in K_.CONFIG_LISTS:
            itemsize = {"fp64": 8, "fp32": 4, "tf32": 4, "few": 4}.get(list_name.split()[0], 2)
            tiles = K_.config_tiles(kernel, list_name)
            assert len(tiles) == len(set(tiles)) >= 1
            for a, b, r, warps, stages in tiles:
                assert (a + b) * r * itemsize * stages <= 163 * 1024, (kernel, list_name, (a, b, r))
                assert warps in (4, 8) and stages >= 2


# --- torch.nn.functional.conv2d semantics --------------------------------------------------------

def _both(x, w, b, backend, **kw):
    """torch and fastdl on the same arguments, forward and backward with the same upstream gradient."""
    results = []
    for fn in (F.conv2d, fastdl.functional.conv2d):
        args = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
        args = [a if a is None or t is None else a.contiguous(memory_format=_fmt(t)).detach().requires_grad_()
                for a, t in zip(args, (x, w, b))]
        with fastdl.use_backend(backend):
            out = fn(*args, **kw)
        out.backward(make_tensor(out.shape, out.dtype, seed=9))
        results.append((out, [a.grad for a in args if a is not None]))
    return results


def _fmt(t):
    return torch.channels_last if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) \
        and not t.is_contiguous() else torch.contiguous_format


SEMANTICS = [
    # (input shape, weight shape, bias, kwargs)
    ((2, 4, 7, 8), (6, 4, 3, 3), True, dict(stride=(2, 1), padding=(1, 2))),      # tuple args
    ((2, 4, 7, 8), (6, 4, 2, 4), True, dict(padding="same", dilation=(2, 1))),    # asymmetric "same"
    ((2, 4, 7, 8), (6, 4, 3, 3), False, dict(padding="valid", stride=[2])),       # "valid", 1-element list
    ((4, 7, 8), (6, 4, 3, 3), True, dict(padding=1)),                             # unbatched (C, H, W)
    ((0, 4, 7, 8), (6, 2, 3, 3), True, dict(groups=2)),                           # empty batch: zero grads
    ((2, 6, 5, 5), (6, 1, 3, 3), True, dict(groups=6, padding=1)),                # depthwise
    ((1, 3, 3, 3), (2, 3, 3, 3), True, dict()),                                   # kernel == input: 1x1 output
]


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("input_shape, weight_shape, has_bias, kw", SEMANTICS)
def test_matches_torch_semantics(input_shape, weight_shape, has_bias, kw, backend):
    x = make_tensor(input_shape, F64, seed=1)
    w = make_tensor(weight_shape, F64, seed=2)
    b = make_tensor(weight_shape[:1], F64, seed=3) if has_bias else None
    (expected, expected_grads), (out, grads) = _both(x, w, b, backend, **kw)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_memory_format_follows_torch(backend):
    x = make_tensor((2, 4, 6, 6), F64, seed=1)
    w = make_tensor((5, 4, 3, 3), F64, seed=2)
    for fmt in (torch.channels_last, torch.contiguous_format):
        xf = x.contiguous(memory_format=fmt).requires_grad_()
        with fastdl.use_backend(backend):
            out = fastdl.functional.conv2d(xf, w, padding=1, activation="relu")
        expected = F.conv2d(xf, w, padding=1)
        assert out.stride() == expected.stride()
        out.backward(torch.ones_like(out))
        assert xf.grad.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_a_channels_last_weight_makes_the_output_channels_last_as_torch(backend):
    # torch: the output is channels_last when the input or the weight is.
    x = make_tensor((2, 4, 6, 6), F64, seed=1).requires_grad_()
    w = make_tensor((5, 4, 3, 3), F64, seed=2).contiguous(memory_format=torch.channels_last).requires_grad_()
    with fastdl.use_backend(backend):
        out = fastdl.functional.conv2d(x, w, padding=1)
    expected = F.conv2d(x, w, padding=1)
    assert out.stride() == expected.stride()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(out, (x, w), torch.ones_like(out))
    expected_grads = torch.autograd.grad(expected, (x, w), torch.ones_like(expected))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", fastdl.functional.ACTIVATIONS)
def test_nan_and_inf_propagate_like_torch(activation):
    x = make_tensor((1, 3, 5, 5), seed=1)
    x[0, 0, 0, 0] = float("nan")
    if activation != "gelu":  # torch's gelu(inf) is nan on CPU and inf on CUDA: no one answer
        x[0, 1, 2, 2], x[0, 2, 4, 1] = float("inf"), float("-inf")
    w, b = make_tensor((4, 3, 3, 3), seed=2), make_tensor((4,), seed=3)
    expected = _TORCH_ACTIVATIONS[activation](F.conv2d(x, w, b, padding=1), 0.01)
    with fastdl.use_backend("triton"):
        out = fastdl.functional.conv2d(x, w, b, padding=1, activation=activation)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_autocast_casts_like_torch():
    x, w, b = make_tensor((1, 3, 6, 6), seed=1), make_tensor((4, 3, 3, 3), seed=2), make_tensor((4,), seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.conv2d(x, w, b)
        with fastdl.use_backend("reference"):
            out = fastdl.functional.conv2d(x, w, b)
    assert out.dtype == expected.dtype == torch.bfloat16


def test_relu_saves_a_one_byte_mask():
    x = make_tensor((2, 8, 6, 6), seed=1, requires_grad=True)
    w = make_tensor((16, 8, 3, 3), seed=2, requires_grad=True)
    b = make_tensor((16,), seed=3, requires_grad=True)
    saved = []

    def pack(t):
        if t.data_ptr() not in (x.data_ptr(), w.data_ptr(), b.data_ptr()):
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), fastdl.use_backend("triton"):
        fastdl.functional.conv2d(x, w, b, padding=1, activation="relu")
    assert [(t.dtype, t.numel()) for t in saved] == [(torch.uint8, 2 * 16 * 6 * 6)]


# --- bad input: torch's exception types, messages naming op and shapes, nothing written -----------

def _t(*shape, dtype=torch.float32):
    return make_tensor(shape, dtype, seed=len(shape))


BAD_INPUTS = [
    ("weight not 4-D", lambda: ((_t(1, 3, 5, 5), _t(2, 3, 3)), {}), RuntimeError),
    ("input 2-D", lambda: ((_t(3, 5), _t(2, 3, 3, 3)), {}), RuntimeError),
    ("channels vs groups", lambda: ((_t(1, 3, 5, 5), _t(2, 3, 3, 3)), dict(groups=2)), RuntimeError),
    ("channels mismatch", lambda: ((_t(1, 4, 5, 5), _t(2, 3, 3, 3)), {}), RuntimeError),
    ("out channels vs groups", lambda: ((_t(1, 4, 5, 5), _t(3, 2, 3, 3)), dict(groups=2)), RuntimeError),
    ("input smaller than kernel", lambda: ((_t(1, 3, 2, 2), _t(2, 3, 3, 3)), {}), RuntimeError),
    ("smaller than dilated kernel", lambda: ((_t(1, 3, 4, 4), _t(2, 3, 3, 3)), dict(dilation=2)), RuntimeError),
    ("same with stride 2", lambda: ((_t(1, 3, 5, 5), _t(2, 3, 3, 3)), dict(padding="same", stride=2)), RuntimeError),
    ("zero stride", lambda: ((_t(1, 3, 5, 5), _t(2, 3, 3, 3)), dict(stride=0)), RuntimeError),
    ("zero dilation", lambda: ((_t(1, 3, 5, 5), _t(2, 3, 3, 3)), dict(dilation=(1, 0))), RuntimeError),
    ("negative padding", lambda: ((_t(1, 3, 5, 5), _t(2, 3, 3, 3)), dict(padding=-1)), RuntimeError),
    ("unknown padding string", lambda: ((_t(1, 3, 5, 5), _t(2, 3, 3, 3)), dict(padding="full")), RuntimeError),
    ("3-element stride", lambda: ((_t(1, 3, 5, 5), _t(2, 3, 3, 3)), dict(stride=(1, 1, 1))), RuntimeError),
    ("float stride", lambda: ((_t(1, 3, 5, 5), _t(2, 3, 3, 3)), dict(stride=1.5)), TypeError),
    ("bias shape", lambda: ((_t(1, 3, 5, 5), _t(2, 3, 3, 3), _t(3)), {}), RuntimeError),
    ("dtype mismatch", lambda: ((_t(1, 3, 5, 5), _t(2, 3, 3, 3, dtype=F64)), {}), RuntimeError),
    ("bias dtype", lambda: ((_t(1, 3, 5, 5), _t(2, 3, 3, 3), _t(2, dtype=F64)), {}), RuntimeError),
    ("not a tensor", lambda: (([[[[1.0]]]], _t(2, 1, 1, 1)), {}), TypeError),
]


@pytest.mark.parametrize("name, make, error", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_torch_exception_type(name, make, error):
    args, kw = make()
    with pytest.raises(error):
        F.conv2d(*args, **kw)
    before = [a.clone() if isinstance(a, torch.Tensor) else None for a in args]
    with pytest.raises(error) as info:
        fastdl.functional.conv2d(*args, **kw)
    assert "conv2d" in str(info.value)
    if name in ("weight not 4-D", "channels mismatch", "input smaller than kernel", "same with stride 2"):
        shape = args[0].shape
        assert str(list(shape)) in str(info.value) or "x".join(map(str, shape)) in str(info.value)
    for a, b in zip(args, before):
        if b is not None:
            assert torch.equal(a, b)


def test_device_mismatch_and_unknown_activation():
    x, w = make_tensor((1, 3, 5, 5)), torch.empty((2, 3, 3, 3), device="meta")
    with pytest.raises(RuntimeError, match="same device"):
        fastdl.functional.conv2d(x, w)
    with pytest.raises(ValueError, match="activation"):
        fastdl.functional.conv2d(x, make_tensor((2, 3, 3, 3)), activation="swish")
    with pytest.raises(ValueError, match="activation"):
        fastdl.nn.Conv2d(3, 2, 3, activation="softmax")
    # torch's CPU convolution takes int64; fastdl has float kernels only (as linear: RuntimeError).
    ints = torch.ones(1, 3, 5, 5, dtype=torch.int64), torch.ones(2, 3, 3, 3, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="conv2d: input dtype torch.int64 is not supported"):
        fastdl.functional.conv2d(*ints)


# --- nn.Conv2d: parameters, init, state_dict, padding modes --------------------------------------

def test_nn_conv2d_is_a_drop_in():
    torch.manual_seed(0)
    theirs = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
    torch.manual_seed(0)
    ours = fastdl.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
    assert isinstance(ours, torch.nn.Conv2d)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight", "bias"]
    for key, value in theirs.state_dict().items():  # same initialization under the same seed
        assert torch.equal(ours.state_dict()[key], value)
    fused = fastdl.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, activation="relu")
    fused.load_state_dict(theirs.state_dict())
    back = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
    back.load_state_dict(fused.state_dict())
    x = make_tensor((2, 4, 7, 7), seed=1)
    with fastdl.use_backend("reference"):
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused(x), F.relu(back(x)), rtol=1e-5, atol=1e-6)
    assert "activation='relu'" in repr(fused)
    no_bias = fastdl.nn.Conv2d(4, 6, 1, bias=False, dtype=F64)
    assert no_bias.bias is None and no_bias.weight.dtype == F64


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_nn_conv2d_padding_modes(padding_mode, backend):
    torch.manual_seed(0)
    theirs = torch.nn.Conv2d(3, 4, (3, 2), padding=(1, 2), padding_mode=padding_mode, dtype=F64)
    ours = fastdl.nn.Conv2d(3, 4, (3, 2), padding=(1, 2), padding_mode=padding_mode, dtype=F64, activation="tanh")
    ours.load_state_dict(theirs.state_dict())
    x = make_tensor((2, 3, 5, 6), F64, seed=1, requires_grad=True)
    with fastdl.use_backend(backend):
        out = ours(x)
    expected = torch.tanh(theirs(x))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    g = make_tensor(out.shape, F64, seed=2)
    got = torch.autograd.grad(out, [x, ours.weight], g)
    want = torch.autograd.grad(expected, [x, theirs.weight], g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


# --- autograd beyond first order, torch.func, torch.compile --------------------------------------

def _grad_inputs(groups=1):
    # Pre-activations at least 0.02 from 0, where relu and leaky_relu bend (finite differences step
    # 1e-6): fixed seeds, and the precondition checked.
    x = make_tensor((1, 2 * groups, 4, 4), F64, seed=21, requires_grad=True)
    w = make_tensor((2, 2, 2, 2), F64, seed=22, requires_grad=True)
    b = make_tensor((2,), F64, seed=23, requires_grad=True)
    assert F.conv2d(x, w, b, stride=(1, 2), padding=1, groups=groups).abs().min() > 0.02
    return x, w, b


@pytest.mark.parametrize("activation", ["relu", "gelu", "sigmoid", None])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gradcheck_gradgradcheck(backend, activation):
    fn = lambda x, w, b: fastdl.functional.conv2d(x, w, b, stride=(1, 2), padding=1,  # noqa: E731
                                                  activation=activation)
    # Fast mode (random projections): every check point is a launch (the interpreter, or NumPy).
    # Second order is torch's recompute for every backend: a sample of activations.
    with fastdl.use_backend(backend):
        assert gradcheck(fn, _grad_inputs(), fast_mode=True)
        if (backend, activation) in (("reference", "gelu"), ("reference", "relu"), ("triton", None)):
            assert gradgradcheck(fn, _grad_inputs(), fast_mode=True)


def test_backward_twice_with_retain_graph_doubles_the_gradient():
    x, w, b = _grad_inputs()
    with fastdl.use_backend("triton"):
        out = fastdl.functional.conv2d(x, w, b, padding=1, activation="leaky_relu")
    g = make_tensor(out.shape, F64, seed=5)
    out.backward(g, retain_graph=True)
    first = w.grad.clone()
    out.backward(g)
    torch.testing.assert_close(w.grad, 2 * first, rtol=1e-12, atol=1e-12)


def test_torch_func_and_forward_ad_run_the_torch_entry():
    x, w, b = (t.detach() for t in _grad_inputs())
    fn = lambda x, w: fastdl.functional.conv2d(x, w, b, padding="same", activation="gelu")  # noqa: E731
    torch_fn = lambda x, w: F.gelu(F.conv2d(x, w, b, padding="same"))  # noqa: E731
    close = dict(rtol=1e-10, atol=1e-12)
    loss = lambda f: (lambda x, w: f(x, w).sum())  # noqa: E731
    with fastdl.use_backend("triton"):
        torch.testing.assert_close(torch.func.grad(loss(fn), 1)(x, w), torch.func.grad(loss(torch_fn), 1)(x, w), **close)
        xs = torch.stack([x, 2 * x])
        torch.testing.assert_close(torch.func.vmap(fn, (0, None))(xs, w), torch.func.vmap(torch_fn, (0, None))(xs, w),
                                   **close)
        tx, tw = make_tensor(x.shape, F64, seed=7), make_tensor(w.shape, F64, seed=8)
        for got, want in zip(torch.func.jvp(fn, (x, w), (tx, tw)), torch.func.jvp(torch_fn, (x, w), (tx, tw))):
            torch.testing.assert_close(got, want, **close)
    out, saved = fastdl.ops.get("conv2d", "torch")(x, w, b, [1, 1], [0, 1, 0, 1], [1, 1], 1, "relu", 0.01)
    torch.testing.assert_close(out, F.relu(F.conv2d(F.pad(x, (0, 1, 0, 1)), w, b)), **close)
    assert saved.numel() == 0


def test_torch_compile_fullgraph_small_cnn():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        fastdl.nn.Conv2d(3, 8, 3, stride=2, padding=1, activation="relu"),
        fastdl.nn.Conv2d(8, 8, 3, padding=1, groups=2, padding_mode="reflect", activation="silu"),
        fastdl.nn.Conv2d(8, 4, 1),
        torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3)).double()
    x = make_tensor((2, 3, 8, 8), F64, seed=1)
    with fastdl.use_backend("reference"):
        expected = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out = compiled(x)
        out.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert all(p.grad is not None for p in model.parameters())


# --- GPU: every backend, every dtype, realistic shapes -------------------------------------------

@contextlib.contextmanager
def _cudnn_tf32(on):
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


GPU_CASES = {
    "stem": (32, 3, 224, 224, 64, 7, 7, 2, 3, 1, 1, "relu"),
    "3x3": (32, 64, 56, 56, 64, 3, 3, 1, 1, 1, 1, "relu"),
    "3x3-s2": (32, 128, 56, 56, 128, 3, 3, 2, 1, 1, 1, None),
    "1x1": (32, 256, 56, 56, 64, 1, 1, 1, 0, 1, 1, "relu"),
    "1x1-s2": (32, 256, 56, 56, 512, 1, 1, 2, 0, 1, 1, None),
    "depthwise": (8, 64, 28, 28, 64, 3, 3, 1, 1, 1, 64, "relu"),
}


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("case", GPU_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_triton_matches_reference(dtype, case, layout):
    with _cudnn_tf32(False):
        run_conv2d_gpu(dtype, GPU_CASES[case], layout)


def run_conv2d_gpu(dtype, case, layout):
    N, C, H, W, K, R, S, stride, padding, dilation, groups, activation = case
    x = make_tensor((N, C, H, W), dtype, "cuda", seed=1)
    w = make_tensor((K, C // groups, R, S), dtype, "cuda", seed=2, scale=(C // groups * R * S) ** -0.5)
    if layout == "channels_last":
        x, w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
    b = make_tensor((K,), dtype, "cuda", seed=3)
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    with fastdl.use_backend("triton"):
        out = fastdl.functional.conv2d(x, w, b, stride, padding, dilation, groups, activation=activation)
    g = make_tensor(out.shape, dtype, "cuda", seed=4)
    out.backward(g)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    z = _TORCH_ACTIVATIONS[activation](F.conv2d(x64, w64, b64, stride, padding, dilation, groups), 0.01)
    z.backward(g.double())
    for name, got, want in (("out", out, z), ("grad_input", x.grad, x64.grad), ("grad_weight", w.grad, w64.grad),
                            ("grad_bias", b.grad, b64.grad)):
        assert_close(got, want, dtype, name=name)
