"""Record what the Triton launchers launch at GPU-sized shapes, without running anything.

The library's own launch path runs (fastdl.ops.get(op, "triton"), forward and backward through
autograd) on CPU tensors made with torch.empty, which maps memory without touching it, so an
8192 x 128256 logits tensor costs nothing. `wrap_triton` (the one place every launcher launches
through) hands each launch to `_Interceptor`, which records the kernel, its arguments and the grid
of each autotune config, and launches nothing.

Runs only where triton does not interpret (TRITON_INTERPRET=0 before triton's first import): under
the interpreter the kernels are InterpretedFunctions and `first_config_only()` cuts every config
list to one. `fastdl.inspection.compile` runs this in a subprocess set up that way.
"""
from __future__ import annotations

import contextlib
import os
import types
from dataclasses import dataclass, field

import torch

ACTIVATIONS = (None, "relu", "leaky_relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh")
# (rows, in_features, out_features): a transformer MLP's up-projection and a narrower layer.
LINEAR_SHAPES = ((8192, 4096, 4096), (4096, 1024, 4096))
# (rows, vocabulary): Llama 2, GPT-2 (50257 is not a multiple of 16), Llama 3.
CROSS_ENTROPY_SHAPES = ((8192, 32000), (8192, 50257), (8192, 128256))
LINEAR_CE_SHAPE = (8192, 4096, 128256)
# ResNet-50's stem pool (3x3, stride 2, padding 1) on its 64 x 112 x 112 input, batch 32 and 256.
MAX_POOL2D_SHAPES = ((32, 64, 112, 112), (256, 64, 112, 112))
# (name, torch dtype, TF32 on): fp32 is run both ways since torch's default for matmuls is off.
PRECISIONS = (("fp16", torch.float16, False), ("bf16", torch.bfloat16, False), ("fp32", torch.float32, False),
              ("tf32", torch.float32, True), ("fp64", torch.float64, False))
H100_SMS = 132
ARCH_CAPABILITY = {"sm_80": (8, 0), "sm_90": (9, 0)}


@dataclass
class Pointer:
    """A tensor argument as the runtime's specialization sees it: its dtype and its address modulo
    256. torch's CUDA allocations are 256-byte aligned, so only a view's offset can misalign it."""
    dtype: torch.dtype
    offset: int

    def data_ptr(self) -> int:
        return self.offset % 256


@dataclass
class Launch:
    kernel: object                 # the Autotuner or JITFunction launched
    args: tuple                    # positional arguments, tensors as Pointer
    kwargs: dict                   # constexprs and options given at the call
    grids: list[tuple[int, ...]]   # per config of the kernel's whole list (one entry without autotuning)
    case: str


@dataclass
class Variant:
    """One compile of a kernel: launches whose specialization (types, constexprs, divisibility,
    ints equal to 1) is the same."""
    name: str
    kernel: object
    args: tuple
    kwargs: dict
    cases: list[tuple[str, list[tuple[int, ...]]]] = field(default_factory=list)  # (case, grid per config of all_configs)
    arch: str | None = None  # the target its launches were captured for (None: any)

    def configs(self, arch: str | None = None) -> list:
        """The configs the autotuner can pick for this variant's launches on `arch` (its
        early_config_prune applied to its arguments, choosing for that target); [None] for a kernel
        without autotuning."""
        return pickable_configs(self.kernel, self.args, self.kwargs, ARCH_CAPABILITY.get(arch))

    def grid(self, config, case_grids: list[tuple[int, ...]]) -> tuple[int, ...]:
        """The grid of `config` (one of all_configs) in a case's grids."""
        return case_grids[next(i for i, c in enumerate(self.all_configs) if c is config)]

    @property
    def all_configs(self) -> list:
        """The kernel's whole config list, before pruning."""
        return list(getattr(self.kernel, "configs", None) or [None])

    @property
    def jit_function(self):
        return jit_function(self.kernel)


def jit_function(kernel):
    """The JITFunction of a kernel, autotuned or not."""
    from triton.runtime.autotuner import Autotuner

    return kernel.fn if isinstance(kernel, Autotuner) else kernel


def pickable_configs(kernel, args: tuple, kwargs: dict, capability: tuple[int, int] | None = None) -> list:
    """What the autotuner may pick for a launch with these arguments on a GPU of `capability`:
    Autotuner.prune_configs's early_config_prune over the kernel's configs, called as Autotuner.run
    calls it (the positional arguments by name, the keyword arguments as they are), with the
    kernels' target (fastdl.kernels.triton.target) set to `capability` (None: every target's)."""
    from fastdl.kernels.triton import target

    configs = getattr(kernel, "configs", None)
    if not configs:
        return [None]
    prune = getattr(kernel, "early_config_prune", None)
    if prune is None or len(configs) == 1:  # Autotuner.run prunes only a list of more than one
        return list(configs)
    with target.compiling_for(capability):
        return list(prune(list(configs), dict(zip(jit_function(kernel).arg_names, args)), **kwargs))


def kernel_name(kernel) -> str:
    return jit_function(kernel).fn.__name__.lstrip("_")


def _stand_in(value):
    if isinstance(value, torch.Tensor):
        return Pointer(value.dtype, value.storage_offset() * value.element_size())
    return value


def _grid_size(grid, meta) -> tuple[int, ...]:
    grid = grid(meta) if callable(grid) else grid
    return tuple(int(g) for g in grid)


class _Interceptor:
    def __init__(self, case_of):
        self.launches: list[Launch] = []
        self._case_of = case_of

    def __call__(self, kernel):
        interceptor = self

        class _Grid:
            def __getitem__(self, grid):
                def record(*args, **kwargs):
                    meta = {**dict(zip(jit_function(kernel).arg_names, args)), **kwargs}
                    stand_ins = tuple(_stand_in(a) for a in args)
                    kw = {k: _stand_in(v) for k, v in kwargs.items()}
                    configs = list(getattr(kernel, "configs", None) or [None])
                    grids = [_grid_size(grid, {**meta, **(c.kwargs if c is not None else {})}) for c in configs]
                    interceptor.launches.append(Launch(kernel, stand_ins, kw, grids, interceptor._case_of()))
                return record

        return _Grid()


@contextlib.contextmanager
def _gpu_sized_splits(sms: int = H100_SMS):
    """linear's grad_weight split count is chosen from the device's SM count, which a CPU tensor
    has not: choose it as for a CUDA tensor on an H100."""
    from fastdl.backends.triton import linear as launcher

    from fastdl.backends.triton import conv2d as conv_launcher

    original = launcher._grad_weight_splits
    conv_original = conv_launcher._grad_weight_splits
    depthwise_original = conv_launcher._depthwise_weight_splits
    props = torch.cuda.get_device_properties
    launcher._grad_weight_splits = lambda M, N, K, device: original(M, N, K, torch.device("cuda"))
    conv_launcher._grad_weight_splits = lambda M, tiles, device: conv_original(M, tiles, torch.device("cuda"))
    conv_launcher._depthwise_weight_splits = lambda M, programs, device: depthwise_original(M, programs,
                                                                                           torch.device("cuda"))
    torch.cuda.get_device_properties = lambda device=None: types.SimpleNamespace(multi_processor_count=sms)
    try:
        yield
    finally:
        launcher._grad_weight_splits = original
        conv_launcher._grad_weight_splits = conv_original
        conv_launcher._depthwise_weight_splits = depthwise_original
        torch.cuda.get_device_properties = props


def _empty(*shape, dtype, requires_grad=False):
    return torch.empty(shape, dtype=dtype).requires_grad_(requires_grad)


def _linear(M, K, N, dtype, activation, bias=True, dropout=0.0):
    from fastdl import ops

    x, w = _empty(M, K, dtype=dtype, requires_grad=True), _empty(N, K, dtype=dtype, requires_grad=True)
    b = _empty(N, dtype=dtype, requires_grad=True) if bias else None
    if dropout:  # dropout fused into the epilogue; backward's regeneration pass is the dropout kernel
        out, _ = ops.get("linear_dropout", "triton")(x, w, b, activation or "none", 0.01, dropout,
                                                     torch.zeros(2, dtype=torch.int64))
    else:
        out, _ = ops.get("linear", "triton")(x, w, b, activation or "none", 0.01)
    inputs = [t for t in (x, w, b) if t is not None]
    torch.autograd.grad(out, inputs, _empty(M, N, dtype=dtype))


def _cross_entropy(R, C, dtype, reduction="mean", smoothing=0.0, weighted=False, probabilities=False):
    from fastdl import ops

    logits = _empty(R, C, dtype=dtype, requires_grad=True)
    target = _empty(R, C, dtype=dtype) if probabilities else torch.zeros(R, dtype=torch.int64)
    weight = torch.ones(C, dtype=dtype) if weighted else None
    loss, _ = ops.get("cross_entropy", "triton")(logits, target, weight, -100, smoothing, reduction, True)
    grad_loss = _empty(*loss.shape, dtype=loss.dtype) if loss.dim() else torch.ones((), dtype=loss.dtype)
    torch.autograd.grad(loss, [logits], grad_loss)


def _linear_cross_entropy(N, H, V, dtype):
    from fastdl import ops

    x, w = _empty(N, H, dtype=dtype, requires_grad=True), _empty(V, H, dtype=dtype, requires_grad=True)
    b = _empty(V, dtype=dtype, requires_grad=True)
    target = torch.zeros(N, dtype=torch.int64)
    loss = ops.get("linear_cross_entropy", "triton")(x, w, b, target, -100, 0.0, "mean", True, True, True)[0]
    torch.autograd.grad(loss, [x, w, b], torch.ones((), dtype=loss.dtype))


def _max_pool2d(shape, dtype, channels_last, return_indices=False):
    from fastdl import ops

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty(shape, dtype=dtype, memory_format=fmt).requires_grad_()
    out, _ = ops.get("max_pool2d", "triton")(x, [3, 3], [2, 2], [1, 1], [1, 1], False, channels_last,
                                            return_indices, True)
    torch.autograd.grad(out, [x], torch.empty(out.shape, dtype=dtype, memory_format=fmt))


# dropout on a transformer MLP's activations (8192 x 4096) and a flat tensor ending in a partial block.
DROPOUT_SHAPES = ((8192, 4096), (1000000,))


def _dropout(shape, dtype):
    from fastdl import ops

    x = _empty(*shape, dtype=dtype, requires_grad=True)
    out = ops.get("dropout", "triton")(x, torch.zeros(2, dtype=torch.int64), 0.1)
    torch.autograd.grad(out, [x], _empty(*shape, dtype=dtype))


# ResNet-50's batch-norm activations at batch 32 (N, C, H, W): a stage-1 expansion (S = 3136, NCHW rows
# 16-element aligned, as the stem's 112x112 and stage 2's 28x28 are: the same specializations) and
# stages 3-4 (S = 196 and 49: rows of 4- and 1-element alignment). Three shapes, not all five, keep
# CI's static step about 40 s shorter per arch.
BATCH_NORM_SHAPES = ((32, 256, 56, 56), (32, 1024, 14, 14), (32, 2048, 7, 7))


def _batch_norm(shape, dtype, channels_last, activation, residual):
    """The four batch-norm launchers as a training step runs them (the op's launch path: stats,
    elemt with the relu mask when a residual is added, backward_reduce (writing the residual's
    gradient dy when an activation is fused), backward_elemt), called directly on (N, C, S) views."""
    from fastdl.backends.triton import batch_norm as launchers

    N, C = shape[:2]
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def view3(t):
        return t.permute(0, 2, 3, 1).reshape(N, -1, C).permute(0, 2, 1) if channels_last else t.view(N, C, -1)

    x3, out3, g3, gi3 = (view3(torch.empty(shape, dtype=dtype, memory_format=fmt)) for _ in range(4))
    r3 = view3(torch.empty(shape, dtype=dtype, memory_format=fmt)) if residual else None
    gr3 = view3(torch.empty(shape, dtype=dtype, memory_format=fmt)) if residual else None
    mask3 = view3(torch.empty(shape, dtype=torch.uint8, memory_format=fmt)) \
        if residual and activation in ("relu", "leaky_relu") else None
    weight, bias = _empty(C, dtype=dtype), _empty(C, dtype=dtype)
    mean, var = launchers.batch_norm_stats(x3)
    launchers.batch_norm_elemt(x3, mean, var, weight, bias, r3, activation, 0.01, out3, mask3)
    if residual and activation != "none":
        # The op's path then: the reduction writes dy (the residual's gradient, dy3=), and the
        # elementwise pass reads it back with no activation.
        sum_dy, sum_dy_xmu = launchers.batch_norm_backward_reduce(g3, x3, mean, var, weight, bias, r3, mask3,
                                                                  activation, 0.01, dy3=gr3)
        launchers.batch_norm_backward_elemt(gr3, x3, mean, var, weight, bias, None, None, "none", 0.01, sum_dy,
                                            sum_dy_xmu, gi3, None)
        return
    sum_dy, sum_dy_xmu = launchers.batch_norm_backward_reduce(g3, x3, mean, var, weight, bias, r3, mask3,
                                                              activation, 0.01)
    launchers.batch_norm_backward_elemt(g3, x3, mean, var, weight, bias, r3, mask3, activation, 0.01, sum_dy,
                                        sum_dy_xmu, gi3, gr3)


def _batch_norm_cases() -> list:
    """bf16 / fp16 / fp32 in both layouts: relu + residual (the mask) at every shape; no activation
    and gelu (recomputed, with the residual read) at the stage-1 shape; fp64 with gelu there."""
    out = []
    for name, dtype, _ in PRECISIONS:
        if name == "tf32":
            continue
        for layout, channels_last in (("channels_last", True), ("NCHW", False)):
            runs = [(shape, "relu", True) for shape in BATCH_NORM_SHAPES] if name != "fp64" else []
            runs += [(BATCH_NORM_SHAPES[0], "gelu", True)] + ([(BATCH_NORM_SHAPES[0], "none", False)]
                                                              if name != "fp64" else [])
            for shape, activation, residual in runs:
                label = f"batch_norm {name} {layout} {activation}{' residual' if residual else ''} " \
                        f"{'x'.join(map(str, shape))}"
                out.append(("batch_norm", label, False, lambda s=shape, d=dtype, c=channels_last, a=activation,
                            r=residual: _batch_norm(s, d, c, a, r)))
    return out


# ResNet-50's convolutions at batch 32: (label, input (N, C, H, W), weight (K, C, R, S), stride, padding).
CONV2D_LAYERS = (
    ("stem 7x7/2", (32, 3, 224, 224), (64, 3, 7, 7), 2, 3),
    ("3x3 stage1", (32, 64, 56, 56), (64, 64, 3, 3), 1, 1),
    ("3x3/2 stage2", (32, 128, 56, 56), (128, 128, 3, 3), 2, 1),
    ("1x1 reduce stage1", (32, 256, 56, 56), (64, 256, 1, 1), 1, 0),
    ("1x1/2 downsample stage2", (32, 256, 56, 56), (512, 256, 1, 1), 2, 0),
    ("1x1 expand stage4", (32, 512, 7, 7), (2048, 512, 1, 1), 1, 0),
)


def _conv2d(input_shape, weight_shape, stride, padding, dtype, channels_last, activation, groups=1):
    from fastdl import ops

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty(input_shape, dtype=dtype, memory_format=fmt).requires_grad_()
    w = torch.empty(weight_shape, dtype=dtype, memory_format=fmt).requires_grad_()
    b = _empty(weight_shape[0], dtype=dtype, requires_grad=True)
    out, _ = ops.get("conv2d", "triton")(x, w, b, [stride] * 2, [padding] * 4, [1, 1], groups, activation or "none",
                                         0.01)
    torch.autograd.grad(out, [x, w, b], torch.empty(out.shape, dtype=dtype, memory_format=fmt))


# Depthwise convolutions at batch 32: (label, input (N, C, H, W), kernel, stride, padding). MobileNetV2's
# 3x3: stage 2's first block (96 channels, 112x112, stride 2), its second (144 at 56x56) and stage 3's
# first (144, stride 2); EfficientNet-B0's 5x5 (240 at 28x28) and ConvNeXt-T's 7x7 (96 at 56x56): the
# bigger grad_weight tap blocks (32 and 64 taps).
CONV2D_DEPTHWISE_LAYERS = (
    ("3x3/2 96x112x112", (32, 96, 112, 112), 3, 2, 1),
    ("3x3 144x56x56", (32, 144, 56, 56), 3, 1, 1),
    ("3x3/2 144x56x56", (32, 144, 56, 56), 3, 2, 1),
    ("5x5 240x28x28", (32, 240, 28, 28), 5, 1, 2),
    ("7x7 96x56x56", (32, 96, 56, 56), 7, 1, 3),
)


def _conv2d_cases() -> list:
    """ResNet-50's layers with relu fused in each tensor-core precision and layout (weights in the
    input's layout, as model.to(memory_format=...) leaves them); the 3x3 also without an epilogue
    and with a heavy one (gelu, and its prologue in the backward kernels); fp32 and fp64 on the stem
    and the 3x3. Each case is its own compile (its channel counts, kernel size, stride and tensor
    strides are specialized), so the list is kept to the layers that differ in those."""
    out = []
    for name, dtype, tf32 in PRECISIONS:
        layers = CONV2D_LAYERS if name in ("fp16", "bf16", "tf32") else CONV2D_LAYERS[:2]
        for layout, channels_last in (("channels_last", True), ("NCHW", False)):
            runs = [(layer, "relu") for layer in layers]
            if name in ("fp16", "bf16", "tf32"):
                runs += [(CONV2D_LAYERS[1], None), (CONV2D_LAYERS[1], "gelu")]
            for (label, x_shape, w_shape, stride, padding), activation in runs:
                out.append(("conv2d", f"conv2d {name} {layout} {activation or 'none'} {label}", tf32,
                            lambda x=x_shape, w=w_shape, s=stride, p=padding, d=dtype, c=channels_last,
                            a=activation: _conv2d(x, w, s, p, d, c, a)))
    # Depthwise (kernels/triton/conv2d_depthwise.py): MobileNetV2's 3x3 layers in bf16 channels_last
    # with relu, the stride-1 one also NCHW, with gelu (fp16), and in fp32 and fp64; the 5x5 with silu
    # (EfficientNet's) and the 7x7 without an activation (ConvNeXt's) in bf16.
    layers = CONV2D_DEPTHWISE_LAYERS
    runs = [("bf16", True, "relu", layer) for layer in layers[:3]]
    runs += [(name, channels_last, activation, layers[1]) for name, channels_last, activation in
             (("bf16", False, "relu"), ("fp16", True, "gelu"), ("fp32", True, "relu"), ("fp64", True, "relu"))]
    runs += [("bf16", True, "silu", layers[3]), ("bf16", True, None, layers[4])]
    dtypes = {name: dtype for name, dtype, _ in PRECISIONS}
    for name, channels_last, activation, (label, shape, kernel, stride, padding) in runs:
        out.append(("conv2d", f"conv2d depthwise {name} {'channels_last' if channels_last else 'NCHW'} "
                    f"{activation or 'none'} {label}", False,
                    lambda x=shape, k=kernel, s=stride, p=padding, d=dtypes[name], c=channels_last, a=activation:
                    _conv2d(x, (x[1], 1, k, k), s, p, d, c, a, groups=x[1])))
    return out


def cases() -> list[tuple[str, str, object]]:
    """(op, case label, TF32 on, a function that runs it): every launch fastdl inspect compiles."""
    out = []
    for name, dtype, tf32 in PRECISIONS:
        for M, K, N in LINEAR_SHAPES:
            for activation in ACTIVATIONS:
                out.append(("linear", f"linear {name} {activation or 'none'} {M}x{K}->{N}", tf32,
                            lambda M=M, K=K, N=N, d=dtype, a=activation: _linear(M, K, N, d, a)))
        out.append(("linear", f"linear {name} none no-bias 8192x4096->4096", tf32,
                    lambda d=dtype: _linear(8192, 4096, 4096, d, None, bias=False)))
        # dropout after relu in the epilogue (an MLP block); gelu for the heavy lists.
        for activation in ("relu", "gelu"):
            out.append(("linear", f"linear {name} {activation} dropout 8192x4096->4096", tf32,
                        lambda d=dtype, a=activation: _linear(8192, 4096, 4096, d, a, dropout=0.1)))
        # Few (N, K) tiles: grad_weight is split over rows (and _sum_splits reduces the splits).
        out.append(("linear", f"linear {name} none 16384x4096->256", tf32,
                    lambda d=dtype: _linear(16384, 4096, 256, d, None)))
    for name, dtype, _ in PRECISIONS:
        if name == "tf32":
            continue
        for R, C in CROSS_ENTROPY_SHAPES:
            out.append(("cross_entropy", f"cross_entropy {name} {R}x{C}", False,
                        lambda R=R, C=C, d=dtype: _cross_entropy(R, C, d)))
        R, C = CROSS_ENTROPY_SHAPES[0]
        for label, kw in (("reduction=none", {"reduction": "none"}), ("label_smoothing", {"smoothing": 0.1}),
                          ("weight", {"weighted": True}), ("probabilities", {"probabilities": True})):
            out.append(("cross_entropy", f"cross_entropy {name} {label} {R}x{C}", False,
                        lambda R=R, C=C, d=dtype, kw=kw: _cross_entropy(R, C, d, **kw)))
    N, H, V = LINEAR_CE_SHAPE
    for name, dtype, tf32 in PRECISIONS:
        if name in ("fp16", "bf16", "tf32"):
            out.append(("linear_cross_entropy", f"linear_cross_entropy {name} {N}x{H}->{V}", tf32,
                        lambda d=dtype: _linear_cross_entropy(N, H, V, d)))
    for name, dtype, _ in PRECISIONS:
        if name not in ("fp16", "bf16", "fp32"):
            continue
        for shape in MAX_POOL2D_SHAPES:
            for layout, channels_last in (("channels_last", True), ("NCHW", False)):
                out.append(("max_pool2d", f"max_pool2d {name} {layout} 3x3/2 pad 1 {'x'.join(map(str, shape))}", False,
                            lambda s=shape, d=dtype, c=channels_last: _max_pool2d(s, d, c)))
        # return_indices: torch's int64 indices saved instead of the one-byte taps.
        out.append(("max_pool2d", f"max_pool2d {name} channels_last return_indices 3x3/2 pad 1 32x64x112x112", False,
                    lambda d=dtype: _max_pool2d(MAX_POOL2D_SHAPES[0], d, True, return_indices=True)))
    out += _conv2d_cases()
    out += _batch_norm_cases()
    for name, dtype, _ in PRECISIONS:
        if name == "tf32":
            continue
        for shape in DROPOUT_SHAPES:
            out.append(("dropout", f"dropout {name} {'x'.join(map(str, shape))}", False,
                        lambda s=shape, d=dtype: _dropout(s, d)))
    return out


def capture(ops: list[str] | None = None, only: list[str] | None = None, arch: str | None = None) -> list[Launch]:
    """Every launch of every case (of `ops`, default all; with `only`, the cases whose label starts
    with one of those strings), in order, as the launchers make them for a GPU of `arch` (what
    they choose by the target: linear's K-major TF32 operands on sm_90)."""
    from fastdl import backends
    from fastdl.backends.triton import _launch
    from fastdl.kernels.triton import target

    if backends.triton_interpreting():
        raise RuntimeError("fastdl.inspection.capture needs triton imported with TRITON_INTERPRET=0 "
                           "(fastdl inspect runs it in such a subprocess)")
    if os.environ.get("FASTDL_AUTOTUNE") == "0":
        raise RuntimeError("FASTDL_AUTOTUNE=0 cuts every autotune config list to one; unset it to inspect")
    current = [""]
    interceptor = _Interceptor(lambda: current[0])
    tf32_before = torch.backends.cuda.matmul.allow_tf32
    conv_tf32_before = torch.backends.cudnn.allow_tf32  # conv2d's TF32 switch, as torch's convolutions'
    _launch.launch_interceptor = interceptor
    try:
        with _gpu_sized_splits(), target.compiling_for(ARCH_CAPABILITY.get(arch)):
            for op, label, tf32, run in cases():
                if (ops and op not in ops) or (only and not label.startswith(tuple(only))):
                    continue
                current[0] = label
                torch.backends.cuda.matmul.allow_tf32 = tf32
                torch.backends.cudnn.allow_tf32 = tf32
                run()
    finally:
        _launch.launch_interceptor = None
        torch.backends.cuda.matmul.allow_tf32 = tf32_before
        torch.backends.cudnn.allow_tf32 = conv_tf32_before
    return interceptor.launches


def variants(launches: list[Launch], backend, arch: str | None = None) -> list[Variant]:
    """Launches grouped by the specialization triton's runtime computes for them on `backend` (its
    own binder: pointer alignment, divisibility by 16, ints equal to 1, i32 or i64); `arch`: the
    target they were captured for (capture's)."""
    from triton.runtime.jit import create_function_from_signature

    binders, found = {}, {}
    for launch in launches:
        fn = jit_function(launch.kernel)
        if id(fn) not in binders:
            binders[id(fn)] = create_function_from_signature(fn.signature, fn.params, backend)
        configs = getattr(launch.kernel, "configs", None)
        config_kwargs = configs[0].all_kwargs() if configs else {}  # the same for every config here
        _, specialization, options = binders[id(fn)](*launch.args, **launch.kwargs, **config_kwargs)
        key = (id(launch.kernel), repr(specialization), repr(sorted(options.items())))
        variant = found.get(key)
        if variant is None:
            variant = found[key] = Variant(kernel_name(launch.kernel), launch.kernel, launch.args, launch.kwargs,
                                           arch=arch)
        variant.cases.append((launch.case, launch.grids))
    return list(found.values())
