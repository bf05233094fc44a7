"""Every autotune config of every config list runs under Triton's interpreter (issue #7), and the
prune that chooses a launch's list picks the right one.

The matmul kernels carry one config list per precision and epilogue (kernels/triton/linear.py,
CONFIG_LISTS): a launch may pick only from its own list (early_config_prune), and under the
interpreter only the list's first config runs (running every trial would run the whole kernel once
per config on the CPU). So without this file the other configs' masking and loop bounds (a 256-row
tile over 300 rows, a 64-wide reduction block over K=130) were never executed anywhere. Each test
pins one config of one list on the kernels and checks the results against the float64 reference at
a shape that is not a multiple of any block size, in that list's precision and epilogue.
"""
import contextlib

import pytest
import torch

import fastdl
from fastdl.kernels.triton import linear as linear_kernels
from fastdl.reference import linear as ref
from fastdl.testing import assert_close, make_tensor

K_ = linear_kernels
KERNELS = {name: getattr(K_, "_" + name) for name in K_.KERNELS}
LINEAR_KERNELS = ("linear_fwd", "linear_bwd_input", "linear_bwd_weight")
ACCUMULATE = "linear_grad_weight_accumulate"
LISTS = tuple(K_.CONFIG_LISTS)
# What each list runs in here: (dtype, TF32 on, activation). fp16 stands for fp16/bf16: under the
# interpreter bf16 is computed in float32 (fastdl/backends/triton/_launch.py).
RUN_AS = {
    "fp16/bf16": (torch.float16, False, "leaky_relu"),
    "fp16/bf16 heavy": (torch.float16, False, "gelu"),
    "tf32": (torch.float32, True, None),  # no activation: grad_input's transposed TF32 product
    "tf32 heavy": (torch.float32, True, "gelu"),
    "fp32": (torch.float32, False, "gelu"),
    "fp64": (torch.float64, False, "relu"),
    "fp64 heavy": (torch.float64, False, "gelu"),
}
M, K, N = 300, 130, 200  # spans several 64-blocks and part of a 256-block in every dimension


def _cases(kernels):
    """(list, index): every config of every list of these kernels at least once; a kernel whose list
    is shorter runs its configs again (index modulo its length)."""
    out = []
    for name in LISTS:
        if name not in RUN_AS or (kernels == (ACCUMULATE,) and " heavy" in name):
            continue
        longest = max(len(K_.config_tiles(k, name)) for k in kernels)
        out += [pytest.param(name, i, id=f"{name}-{i}") for i in range(longest)]
    return out


def _pin(monkeypatch, names, list_name, index):
    pinned = []
    for name in names:
        kernel = KERNELS[name]
        configs = K_.list_configs(name, list_name)
        config = configs[index % len(configs)]
        monkeypatch.setattr(kernel, "configs", [config])
        monkeypatch.setattr(kernel, "cache", {})
        monkeypatch.setattr(kernel, "best_config", None, raising=False)
        pinned.append((kernel, config))
    return pinned


def _ran(pinned):
    """Each kernel ran, with the config pinned on it (the autotuner records what it launched)."""
    for kernel, config in pinned:
        assert kernel.best_config is config


def _inputs(dtype):
    x = make_tensor((M, K), dtype, seed=1)
    w = make_tensor((N, K), dtype, seed=2, scale=K ** -0.5)
    b = make_tensor((N,), dtype, seed=3)
    g = make_tensor((M, N), dtype, seed=4)
    return x, w, b, g


@contextlib.contextmanager
def _tf32(on):
    # torch.backends.cuda.matmul's attributes are properties of a module object: monkeypatch cannot
    # undo them.
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _linear(dtype, tf32, activation):
    """One forward + backward through the triton backend against the float64 reference."""
    x, w, b, g = _inputs(dtype)
    out, saved = ref.forward(x.double().numpy(), w.double().numpy(), b.double().numpy(), activation)
    grad_x, grad_w, grad_b = ref.backward(g.double().numpy(), saved)
    xx, ww, bb = (t.clone().requires_grad_() for t in (x, w, b))
    with fastdl.use_backend("triton"), _tf32(tf32):
        y = fastdl.functional.linear(xx, ww, bb, activation=activation)
        y.backward(g)
    for name, actual, expected in (("out", y, out), ("grad_input", xx.grad, grad_x),
                                   ("grad_weight", ww.grad, grad_w), ("grad_bias", bb.grad, grad_b)):
        assert_close(actual, expected, dtype, tf32, name=name)


@pytest.mark.parametrize("list_name, index", _cases(LINEAR_KERNELS))
def test_linear_forward_and_backward_with_every_config(monkeypatch, list_name, index):
    # Config `index` of the list pinned on all three of linear's kernels (each its own list's), so
    # one forward + backward runs it in each.
    pinned = _pin(monkeypatch, LINEAR_KERNELS, list_name, index)
    _linear(*RUN_AS[list_name])
    _ran(pinned)


@pytest.mark.parametrize("kernel, list_name, tile", [
    pytest.param(k, name, t, id=f"{k}-{name}-{'x'.join(map(str, t))}")
    for (k, name), tiles in K_.SM80_EXTRA.items() for t in tiles])
def test_linear_with_each_sm80_only_tile(monkeypatch, kernel, list_name, tile):
    # The tiles only the A100's lists have (SM80_EXTRA), which the lists above never pin.
    autotuner = KERNELS[kernel]
    config = K_.TILES.config(kernel, tile)
    monkeypatch.setattr(autotuner, "configs", [config])
    monkeypatch.setattr(autotuner, "cache", {})
    monkeypatch.setattr(autotuner, "best_config", None, raising=False)
    _linear(*RUN_AS[list_name])
    _ran([(autotuner, config)])


@pytest.mark.parametrize("list_name, index", _cases((ACCUMULATE,)))
def test_grad_weight_accumulate_with_every_config(monkeypatch, list_name, index):
    from fastdl.backends import triton as launchers

    dtype, tf32, _ = RUN_AS[list_name]
    pinned = _pin(monkeypatch, (ACCUMULATE,), list_name, index)
    x, _, _, g = _inputs(dtype)
    # The accumulators are float32 (float64 for float64), as linear_cross_entropy's are.
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    start_w, start_b = make_tensor((N, K), acc_dtype, seed=5), make_tensor((N,), acc_dtype, seed=6)
    acc_w, acc_b = start_w.clone(), start_b.clone()
    with _tf32(tf32):
        launchers.linear_grad_weight_accumulate(g, x, acc_w, acc_b)
    _ran(pinned)
    g64, x64 = g.double(), x.double()
    assert_close(acc_w, start_w.double() + g64.T @ x64, dtype, tf32, name="grad_weight")
    assert_close(acc_b, start_b.double() + g64.sum(0), dtype, tf32, name="grad_bias")
    # accumulate=False (linear_cross_entropy's first chunk): stores, whatever the buffers held.
    with _tf32(tf32):
        launchers.linear_grad_weight_accumulate(g, x, acc_w, acc_b, accumulate=False)
    assert_close(acc_w, g64.T @ x64, dtype, tf32, name="grad_weight stored")
    assert_close(acc_b, g64.sum(0), dtype, tf32, name="grad_bias stored")


# --- the lists and the prune (no kernel runs) ------------------------------------------------------

ACTIVATIONS = {"none": 0, "relu": 1, "leaky_relu": 2, "gelu": 3, "gelu_tanh": 4, "silu": 5, "sigmoid": 6, "tanh": 7}
PRECISIONS = {  # name: (dtype, INPUT_PRECISION)
    "fp16": (torch.float16, "ieee"), "bf16": (torch.bfloat16, "ieee"), "tf32": (torch.float32, "tf32"),
    "fp32": (torch.float32, "ieee"), "fp64": (torch.float64, "ieee"),
}


def _launch_args(kernel, precision, activation):
    dtype, input_precision = PRECISIONS[precision]
    named = {K_.KERNELS[kernel][1]: torch.empty(0, dtype=dtype)}
    kwargs = {"INPUT_PRECISION": input_precision, "ACC_DTYPE": None}
    if kernel != ACCUMULATE:
        kwargs["ACTIVATION"] = ACTIVATIONS[activation]
    return named, kwargs


def _expected_list(precision, activation):
    if precision == "fp32":
        return precision
    base = {"fp16": "fp16/bf16", "bf16": "fp16/bf16"}.get(precision, precision)
    return base + (" heavy" if activation in ("gelu", "gelu_tanh", "silu", "sigmoid", "tanh") else "")


@pytest.mark.parametrize("kernel, precision, activation", [
    (k, p, a) for k in K_.KERNELS for p in PRECISIONS for a in ACTIVATIONS
    if k != ACCUMULATE or a == "none"])  # linear_grad_weight_accumulate has no activation
def test_prune_picks_the_list_of_the_launch(monkeypatch, kernel, precision, activation):
    named, kwargs = _launch_args(kernel, precision, activation)
    name = K_.config_list_name(kernel, named, kwargs)
    assert name == _expected_list(precision, activation)
    autotuner = KERNELS[kernel]
    tiles = K_.config_tiles(kernel, name)
    assert len(tiles) == len(set(tiles)) >= 1
    # Under the interpreter (these tests): the list's first config only.
    picked = autotuner.early_config_prune(autotuner.configs, named, **kwargs)
    assert [K_.tile_of(c, kernel) for c in picked] == [tiles[0]]
    # With autotuning on (a GPU): the whole list, in its order, and nothing else.
    monkeypatch.setattr(K_.TILES, "first_only", False)
    picked = autotuner.early_config_prune(autotuner.configs, named, **kwargs)
    assert [K_.tile_of(c, kernel) for c in picked] == list(tiles)


@pytest.mark.parametrize("kernel", K_.KERNELS)
def test_prune_chooses_for_the_target(monkeypatch, kernel):
    """On a compute capability 8.x GPU (or while inspect compiles for sm_80) a launch picks from its
    list less the tiles that spill there (SM80_SPILLS); on sm_90, and on a CPU tensor, the whole list."""
    from fastdl.kernels.triton import target

    monkeypatch.setattr(K_.TILES, "first_only", False)
    autotuner = KERNELS[kernel]
    for precision in PRECISIONS:
        for activation in (("none",) if kernel == ACCUMULATE else ("relu", "gelu")):
            named, kwargs = _launch_args(kernel, precision, activation)
            name = K_.config_list_name(kernel, named, kwargs)
            whole = K_.config_tiles(kernel, name)
            dropped = K_.SM80_SPILLS.get((kernel, name), ())
            sm80 = tuple(t for t in whole if t not in dropped) + K_.SM80_EXTRA.get((kernel, name), ())
            assert sm80 and len(set(sm80)) == len(sm80), (kernel, name)  # never empty, no repeats
            assert K_.config_tiles(kernel, name, (8, 0)) == K_.config_tiles(kernel, name, (8, 6)) == sm80
            assert K_.config_tiles(kernel, name, (9, 0)) == K_.config_tiles(kernel, name, None) == whole
            for capability, expected in (((8, 0), sm80), ((9, 0), whole), (None, whole)):
                with target.compiling_for(capability):
                    picked = autotuner.early_config_prune(autotuner.configs, named, **kwargs)
                assert tuple(K_.tile_of(c, kernel) for c in picked) == expected, (name, capability)
    # Every dropped tile is in its list (a stale entry would hide nothing and mislead), and no extra
    # one is also dropped.
    for (k, name), tiles in K_.SM80_SPILLS.items():
        assert set(tiles) <= set(K_.config_tiles(k, name)), (k, name)
        assert not set(tiles) & set(K_.SM80_EXTRA.get((k, name), ())), (k, name)


def test_target_capability_of_a_launch():
    from fastdl.kernels.triton import target

    assert target.capability(torch.empty(1)) is None  # a CPU tensor: the interpreter
    assert target.capability(object()) is None  # inspect's stand-ins have no device
    with target.compiling_for((8, 0)):
        assert target.capability(torch.empty(1)) == (8, 0)
        with target.compiling_for((9, 0)):
            assert target.capability(object()) == (9, 0)
        assert target.capability(object()) == (8, 0)
    assert target.capability(object()) is None
    assert target.is_sm80_class((8, 9)) and not target.is_sm80_class((9, 0)) and not target.is_sm80_class(None)


def test_every_list_tile_is_a_config_and_the_key_holds_what_the_prune_reads():
    for kernel, autotuner in KERNELS.items():
        tiles = [K_.tile_of(c, kernel) for c in autotuner.configs]
        assert len(tiles) == len(set(tiles))
        assert set(tiles) == {t for name in LISTS for cap in (None, (8, 0)) for t in K_.config_tiles(kernel, name, cap)}
        # The autotuner prunes once per key (its values and every tensor's dtype): the key must
        # determine the list, so it holds what config_list_name reads besides the dtype.
        assert "INPUT_PRECISION" in autotuner.keys
        assert kernel == ACCUMULATE or "ACTIVATION" in autotuner.keys


@pytest.mark.parametrize("list_name", LISTS)
def test_lists_fit_both_targets_and_keep_the_big_tiles_where_they_are_clean(list_name):
    itemsize = {"fp64": 8, "fp32": 4, "tf32": 4}.get(list_name.split()[0], 2)
    for kernel in K_.KERNELS:
        for a, b, r, warps, stages in K_.config_tiles(kernel, list_name):
            # Operand tiles x stages in shared memory: within the A100's 163 KB per block (the
            # H100's is 227 KB), so one list serves both (the compiled sizes: tests/test_inspection.py).
            assert (a + b) * r * itemsize * stages <= 163 * 1024, (kernel, list_name, (a, b, r, warps, stages))
            assert warps in (4, 8) and stages >= 2
    # Where it is clean, fp16/bf16 keeps the 128x256 and 256x128 tiles tensor-core peak needs.
    # (linear_grad_weight_accumulate: both spill, 304 B, so its biggest are 128x128.)
    if list_name == "fp16/bf16":
        for kernel in LINEAR_KERNELS:
            areas = {a * b for a, b, *_ in K_.config_tiles(kernel, list_name)}
            assert 128 * 256 in areas, kernel


def test_an_interpreted_launch_runs_the_first_config_of_its_own_list(monkeypatch):
    # fp64 with GELU: each of linear's kernels runs the first tile of its "fp64 heavy" list, which is
    # not the first of the kernel's whole config list.
    for name in LINEAR_KERNELS:
        monkeypatch.setattr(KERNELS[name], "cache", {})
    x, w, b = (t.requires_grad_() for t in (make_tensor((40, 24), torch.float64, seed=1),
                                            make_tensor((20, 24), torch.float64, seed=2), make_tensor((20,), torch.float64, seed=3)))
    with fastdl.use_backend("triton"):
        fastdl.functional.linear(x, w, b, activation="gelu").sum().backward()
    for name in LINEAR_KERNELS:
        ran = K_.tile_of(KERNELS[name].best_config, name)
        assert ran == K_.config_tiles(name, "fp64 heavy")[0], name
    assert K_.config_tiles("linear_bwd_input", "fp64 heavy")[0] != K_.tile_of(KERNELS["linear_bwd_input"].configs[0],
                                                                              "linear_bwd_input")
