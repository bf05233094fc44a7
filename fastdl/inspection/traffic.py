"""Compulsory memory traffic per op and mode, measured on the CPU: fastdl against torch eager and the floor.

For memory-bound work a GPU's time is bytes over bandwidth, so the bytes an op must move are a
measurement this machine can make without a GPU. Three counts per (op, shape, dtype, mode), for
the modes forward, backward and forward+backward (a training forward: the inputs require grad):

fastdl  For each kernel launch, the distinct bytes its loads read plus the distinct bytes its
        stores write (masked-off lanes excluded), recorded from the kernels' own loads and
        stores while the triton backend runs the op under Triton's interpreter. Distinct bytes
        are the union of the byte ranges the whole grid touched: what the launch costs if every
        byte crosses HBM once (perfect L1/L2 reuse inside the launch; a matmul's re-reads of its
        operand tiles are not counted). Plus the torch ops the launchers and the op's Python run
        outside the kernels (zero-fills, copies, .to() casts, the "mean" scale), counted as
        torch's below. The interpreter's own host copies inside a launch are not counted, and
        bf16 launchers run as they do on a GPU (without the interpreter's float32 stand-ins of
        fastdl.backends.triton._launch.interpreter_bf16), so bf16 bytes are 2 per element.
torch   The same forward and backward written with torch ops (F.linear + activation,
        F.cross_entropy, F.cross_entropy(F.linear(...)), F.max_pool2d, F.relu(F.conv2d),
        F.batch_norm (+ residual add, relu), dropout as aten.native_dropout: F.dropout's CUDA
        path, since on a CPU tensor it composes bernoulli_, div_ and mul instead), under
        a TorchDispatchMode adding, per aten op, the bytes of its tensor inputs and outputs: each
        tensor's storage span (numel x element size when contiguous; a broadcast tensor's few real
        elements), each tensor once per op. Views and allocations (torch.empty) move no bytes. An
        argument an op writes in place is read and written, except for write-only ops (zero_,
        fill_, copy_'s destination, out= arguments). Two ops read less than their inputs and are
        counted by what they read: nll_loss's forward gathers one element per row of
        log-probabilities, its backward never reads them (it zero-fills grad_input and scatters
        into it); counting their whole inputs
        would credit fastdl with passes torch does not make. max_pool2d_with_indices_backward
        likewise takes the input for its shape only (its CUDA kernels read grad_output and the
        indices, never the input's values). aten.contiguous, which a custom op's body dispatches
        undecomposed and whose schema says view, counts as the copy it is when it changes the
        layout (conv2d's NCHW operands go channels_last on the way in and back on the way out).
floor   Every tensor the computation consumes read once and every tensor it produces written
        once, nothing saved in between:
          forward           inputs + outputs
          backward          grad_outputs + inputs (everything backward needs can be recomputed
                            from them) + gradients
          forward+backward  inputs + outputs + grad_outputs + gradients (inputs read once, not
                            twice: the bound of a single pass that did both)
        The floor is not always reachable (a matmul reads its operands more than once when they
        exceed the cache), but no implementation moves less.

The backward of one run is measured after its forward (outside the count); forward+backward is
their sum. Torch ops run on the CPU here; the aten ops torch eager dispatches for these functions
are the ones it dispatches on CUDA. `report()` runs the default cases (about a minute under the
interpreter); `python -m fastdl.inspection.traffic` rewrites bench/results/traffic.json.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MODES = ("forward", "backward", "forward+backward")
JSON_PATH = Path(__file__).resolve().parents[2] / "bench" / "results" / "traffic.json"

aten = torch.ops.aten

# --- counting a torch op's bytes ---------------------------------------------------------------------

# Allocation and metadata ops: no bytes move (torch.empty leaves memory as it is).
_NO_BYTES = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
             aten.new_empty.default, aten.new_empty_strided.default, aten.empty_permuted.default,
             aten.set_.source_Storage_storage_offset, aten.set_.source_Storage, aten.set_.source_Tensor,
             aten.resize_.default}
# Ops whose written argument is not read.
_WRITE_ONLY = {aten.zero_.default, aten.fill_.Scalar, aten.fill_.Tensor, aten.copy_.default,
               aten.normal_.default, aten.uniform_.default, aten.random_.default}


def tensor_bytes(t: torch.Tensor) -> int:
    """The bytes of storage a tensor spans: numel x element size when contiguous, less for a
    broadcast (stride 0) tensor, whose repeated elements are one element of memory."""
    if t.numel() == 0:
        return 0
    span = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
    return min(span, t.numel()) * t.element_size()


def _key(t: torch.Tensor):
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _is_view(func) -> bool:
    if getattr(func, "is_view", False):
        return True
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


def aten_op_bytes(func, args, kwargs, out) -> int:
    """Bytes one aten op reads and writes (see the module docstring for the rules)."""
    if func == aten.contiguous.default and isinstance(out, torch.Tensor) and out.data_ptr() != args[0].data_ptr():
        return tensor_bytes(args[0]) + tensor_bytes(out)  # a layout change: a copy (its schema says view)
    if func in _NO_BYTES or _is_view(func):
        return 0
    written, read = {}, {}
    write_only = func in _WRITE_ONLY
    schema_args = func._schema.arguments
    values = list(args) + [kwargs.get(a.name) for a in schema_args[len(args):]]
    for spec, value in zip(schema_args, values):
        tensors = [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]
        mutated = spec.alias_info is not None and spec.alias_info.is_write
        for t in tensors:
            if mutated:
                written[_key(t)] = t
                if not (write_only and spec.name == "self") and not spec.kwarg_only:
                    read[_key(t)] = t  # read-modify-write
            else:
                read[_key(t)] = t
    if func in (aten.nll_loss_forward.default, aten.nll_loss2d_forward.default):
        self_, target = args[0], args[1]
        read.pop(_key(self_), None)
        read_bytes = target.numel() * self_.element_size()  # one gathered log-probability per row
    elif func in (aten.nll_loss_backward.default, aten.nll_loss2d_backward.default):
        read.pop(_key(args[1]), None)  # `self` gives the shape only
        read_bytes = 0
    elif func == aten.max_pool2d_with_indices_backward.default:
        read.pop(_key(args[1]), None)  # `self` gives the shape only (the kernels gather by the indices)
        read_bytes = 0
    else:
        read_bytes = 0
    for t in tree_leaves(out):
        if isinstance(t, torch.Tensor) and _key(t) not in written:
            written[_key(t)] = t
    return read_bytes + sum(map(tensor_bytes, read.values())) + sum(map(tensor_bytes, written.values()))


@dataclass
class AtenOp:
    name: str
    bytes: int


class _AtenCounter(TorchDispatchMode):
    """Adds each aten op's bytes to `ops`. A fastdl custom op is entered, not counted: its Python body
    runs under a fresh counter, so the launchers' torch ops are counted and their kernels recorded."""

    def __init__(self, ops: list, in_launch: Callable[[], bool]):
        super().__init__()
        self.ops = ops
        self.in_launch = in_launch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fastdl":
            opdef = torch._library.custom_ops.OPDEFS[func._schema.name]
            with _AtenCounter(self.ops, self.in_launch):
                return opdef._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        # Inside a launch the interpreter stages the arguments through torch ops of its own.
        if not self.in_launch():
            self.ops.append(AtenOp(str(func), aten_op_bytes(func, args, kwargs, out)))
        return out


# --- recording the kernels' loads and stores -----------------------------------------------------------

class Launch:
    """One kernel launch: the bytes its loads and stores touched, as one bitmap per byte of each
    tensor argument's storage (reads and writes apart), so repeats and overlapping element sizes
    count once. An access outside every argument's storage raises: the kernel would fault."""

    def __init__(self, kernel: str, tensors):
        self.kernel = kernel
        storages = {}
        for t in tensors:
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        self._starts = np.array(sorted(storages), dtype=np.int64)
        self._sizes = [storages[int(start)] for start in self._starts]
        self._maps = {"read": {}, "write": {}}
        self.read_bytes = self.write_bytes = 0
        self.accessed_bytes = 0  # every unmasked load and store, repeats included: no reuse at all

    @property
    def bytes(self) -> int:
        return self.read_bytes + self.write_bytes

    def touch(self, kind: str, addresses: np.ndarray, size: int) -> None:
        if addresses.size == 0:
            return
        addresses = addresses.astype(np.int64, copy=False)
        self.accessed_bytes += addresses.size * size
        which = np.searchsorted(self._starts, addresses, side="right") - 1
        for buffer in np.unique(which):
            offsets = addresses[which == buffer] - (self._starts[buffer] if buffer >= 0 else 0)
            nbytes = self._sizes[buffer] if buffer >= 0 else 0
            if buffer < 0 or offsets.max() + size > nbytes:
                raise RuntimeError(f"fastdl.inspection.traffic: {self.kernel} accesses {size}-byte elements outside "
                                   f"its tensor arguments' storage")
            bitmap = self._maps[kind].get(int(buffer))
            if bitmap is None:
                bitmap = self._maps[kind][int(buffer)] = np.zeros(nbytes, dtype=bool)
            for byte in range(size):
                bitmap[offsets + byte] = True

    def close(self) -> None:
        self.read_bytes = int(sum(int(m.sum()) for m in self._maps["read"].values()))
        self.write_bytes = int(sum(int(m.sum()) for m in self._maps["write"].values()))
        self._maps = None

    def __repr__(self):
        return f"Launch({self.kernel}, read={self.read_bytes}, write={self.write_bytes})"


def _element_bytes(ptrs) -> int:
    return max(1, (ptrs.get_element_ty().primitive_bitwidth + 7) // 8)


def _touched(ptrs, mask) -> np.ndarray:
    addresses = np.asarray(ptrs.data)
    if mask is None:
        return addresses.reshape(-1)
    return addresses[np.broadcast_to(np.asarray(mask.data, dtype=bool), addresses.shape)]


class _KernelRecorder:
    """Patches Triton's interpreter while active: every InterpretedFunction.run is a launch, every
    load, store and atomic adds its unmasked addresses to the launch running."""

    def __init__(self):
        self.launches: list[Launch] = []
        self.current: Optional[Launch] = None

    def in_launch(self) -> bool:
        return self.current is not None

    @contextlib.contextmanager
    def active(self):
        from triton.runtime import interpreter as interp

        builder = interp.interpreter_builder
        run = interp.InterpretedFunction.run
        recorder = self

        def launch(fn_self, *args, grid, warmup, **kwargs):
            if warmup or recorder.current is not None:
                return run(fn_self, *args, grid=grid, warmup=warmup, **kwargs)
            tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            recorder.current = Launch(fn_self.__name__, tensors)
            try:
                return run(fn_self, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                recorder.current.close()
                recorder.launches.append(recorder.current)
                recorder.current = None

        def note(kind, ptrs, mask):
            if recorder.current is not None:
                recorder.current.touch(kind, _touched(ptrs, mask), _element_bytes(ptrs))

        load, store = builder.create_masked_load, builder.create_masked_store
        rmw, cas = builder.create_atomic_rmw, builder.create_atomic_cas

        def masked_load(ptrs, mask, other, cache_policy, is_volatile):
            note("read", ptrs, mask)
            return load(ptrs, mask, other, cache_policy, is_volatile)

        def masked_store(ptrs, value, mask, cache_policy):
            note("write", ptrs, mask)
            return store(ptrs, value, mask, cache_policy)

        def atomic_rmw(op, ptr, val, mask, sem, scope):
            note("read", ptr, mask)
            note("write", ptr, mask)
            return rmw(op, ptr, val, mask, sem, scope)

        def atomic_cas(ptr, cmp, val, sem, scope):
            note("read", ptr, None)
            note("write", ptr, None)
            return cas(ptr, cmp, val, sem, scope)

        def uncounted(name):
            def refuse(*args, **kwargs):
                raise NotImplementedError(f"fastdl.inspection.traffic: {name} (tensor descriptors) is not counted yet")
            return refuse

        patches = {"create_masked_load": masked_load, "create_masked_store": masked_store,
                   "create_atomic_rmw": atomic_rmw, "create_atomic_cas": atomic_cas}
        patches.update({name: uncounted(name) for name in ("create_descriptor_load", "create_descriptor_store",
                                                           "create_descriptor_gather", "create_descriptor_scatter")
                        if hasattr(builder, name)})
        interp.InterpretedFunction.run = launch
        for name, fn in patches.items():
            setattr(builder, name, fn)  # instance attributes: create_load/create_store call these
        try:
            yield self
        finally:
            interp.InterpretedFunction.run = run
            for name in patches:
                delattr(builder, name)


@contextlib.contextmanager
def _launchers_as_on_gpu():
    """The triton launchers without @interpreter_bf16's float32 stand-ins: bf16 is loaded and stored
    as bf16, as on a GPU (the values are then the interpreter's, wrong for bf16, but no byte count
    depends on them: no kernel branches on loaded floats)."""
    from fastdl.backends import triton as launchers

    swapped = {name: value for name, value in vars(launchers).items()
               if callable(value) and hasattr(value, "interpreter_bf16") and hasattr(value, "__wrapped__")}
    for name, value in swapped.items():
        setattr(launchers, name, value.__wrapped__)
    try:
        yield
    finally:
        for name, value in swapped.items():
            setattr(launchers, name, value)


# Patching the interpreter is process-wide: one measurement at a time.
_MEASURE_LOCK = threading.Lock()


@dataclass
class Count:
    """What one side moved in one mode."""
    launches: list = field(default_factory=list)   # Launch per kernel launch
    aten_ops: list = field(default_factory=list)   # AtenOp per torch op (views included, at 0 bytes)

    @property
    def kernel_bytes(self) -> int:
        return sum(launch.bytes for launch in self.launches)

    @property
    def torch_op_bytes(self) -> int:
        return sum(op.bytes for op in self.aten_ops)

    @property
    def bytes(self) -> int:
        return self.kernel_bytes + self.torch_op_bytes

    @property
    def moving_ops(self) -> list:
        return [op for op in self.aten_ops if op.bytes > 0]

    def __add__(self, other: "Count") -> "Count":
        return Count(self.launches + other.launches, self.aten_ops + other.aten_ops)


@contextlib.contextmanager
def counting(count: Count, kernels: bool = True):
    """Count what runs inside: torch ops always, kernel launches (under the interpreter) if kernels."""
    from fastdl.backends.triton._launch import INTERPRETER_LOCK

    with contextlib.ExitStack() as stack:
        if kernels:
            stack.enter_context(INTERPRETER_LOCK)
            stack.enter_context(_launchers_as_on_gpu())
            recorder = stack.enter_context(_KernelRecorder().active())
            in_launch = recorder.in_launch
        else:
            recorder, in_launch = None, lambda: False
        stack.enter_context(_AtenCounter(count.aten_ops, in_launch))
        try:
            yield count
        finally:
            if recorder is not None:
                count.launches.extend(recorder.launches)


# --- the cases --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One op at one shape and dtype: its inputs, fastdl's call and torch's, written the same way."""
    op: str
    shape: str
    dtype: torch.dtype
    make: Callable[[], tuple]          # -> (inputs tuple, grad_output)
    fastdl_fn: Callable
    torch_fn: Callable


def _randn(*shape, dtype, generator, requires_grad=True, scale=1.0):
    # Non-uniform: a softmax over equal logits, or a relu of zeros, would test nothing.
    t = (torch.randn(*shape, generator=generator, dtype=torch.float32) * scale).to(dtype)
    return t.requires_grad_(requires_grad)


def _linear_inputs(M: int, K: int, N: int, dtype: torch.dtype) -> Callable[[], tuple]:
    """make() of a dense layer's case: ((x, w, b), grad_output)."""
    def make():
        g = torch.Generator().manual_seed(0)
        x = _randn(M, K, dtype=dtype, generator=g)
        w = _randn(N, K, dtype=dtype, generator=g, scale=K ** -0.5)
        b = _randn(N, dtype=dtype, generator=g)
        return (x, w, b), _randn(M, N, dtype=dtype, generator=g, requires_grad=False)

    return make


def linear_case(M: int, K: int, N: int, dtype: torch.dtype, activation: Optional[str] = None) -> Case:
    import fastdl

    make = _linear_inputs(M, K, N, dtype)

    torch_act = {None: lambda z: z, "relu": F.relu, "gelu": F.gelu}[activation]
    return Case("linear" + (f"+{activation}" if activation else ""), f"M={M} K={K} N={N}", dtype, make,
                lambda x, w, b: fastdl.functional.linear(x, w, b, activation=activation),
                lambda x, w, b: torch_act(F.linear(x, w, b)))


def cross_entropy_case(R: int, C: int, dtype: torch.dtype) -> Case:
    import fastdl

    def make():
        g = torch.Generator().manual_seed(0)
        logits = _randn(R, C, dtype=dtype, generator=g, scale=3.0)
        target = torch.randint(0, C, (R,), generator=g)
        return (logits, target), torch.tensor(0.75, dtype=dtype)

    return Case("cross_entropy", f"R={R} C={C}", dtype, make,
                lambda logits, target: fastdl.functional.cross_entropy(logits, target),
                lambda logits, target: F.cross_entropy(logits, target))


def linear_cross_entropy_case(N: int, H: int, V: int, dtype: torch.dtype, chunk_rows: Optional[int] = None) -> Case:
    """chunk_rows forces fastdl's chunk (FASTDL_LINEAR_CE_CHUNK_ROWS): what each extra chunk costs."""
    import fastdl
    from fastdl.ops.linear_cross_entropy import CHUNK_ROWS_ENV

    def make():
        g = torch.Generator().manual_seed(0)
        x = _randn(N, H, dtype=dtype, generator=g)
        w = _randn(V, H, dtype=dtype, generator=g, scale=H ** -0.5)
        target = torch.randint(0, V, (N,), generator=g)
        return (x, w, target), torch.tensor(0.75, dtype=dtype)

    def fastdl_fn(x, w, target):
        with _environ(CHUNK_ROWS_ENV, None if chunk_rows is None else str(chunk_rows)):
            return fastdl.functional.linear_cross_entropy(x, w, target)

    chunks = "" if chunk_rows is None else f" chunk={chunk_rows}"
    return Case("linear_cross_entropy", f"N={N} H={H} V={V}{chunks}", dtype, make, fastdl_fn,
                lambda x, w, target: F.cross_entropy(F.linear(x, w), target))


def max_pool2d_case(N: int, C: int, H: int, W: int, dtype: torch.dtype, channels_last: bool = True) -> Case:
    """ResNet's stem pool (3x3, stride 2, padding 1). torch saves an int64 index per output for
    backward; fastdl a one-byte window tap."""
    import fastdl

    def make():
        g = torch.Generator().manual_seed(0)
        x = _randn(N, C, H, W, dtype=dtype, generator=g, requires_grad=False)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = x.to(memory_format=fmt).requires_grad_()
        P, Q = (H - 1) // 2 + 1, (W - 1) // 2 + 1
        grad = _randn(N, C, P, Q, dtype=dtype, generator=g, requires_grad=False).to(memory_format=fmt)
        return (x,), grad

    layout = "channels_last" if channels_last else "NCHW"
    return Case("max_pool2d", f"{N}x{C}x{H}x{W} 3x3/2 pad 1 {layout}", dtype, make,
                lambda x: fastdl.functional.max_pool2d(x, 3, 2, 1),
                lambda x: F.max_pool2d(x, 3, 2, 1))


def conv2d_case(N: int, C: int, H: int, W: int, K: int, dtype: torch.dtype, channels_last: bool = True) -> Case:
    """A ResNet 3x3 layer (stride 1, padding 1) with its relu fused. torch eager: convolution, relu
    (and threshold_backward, convolution_backward); fastdl saves a 1-byte relu mask."""
    import fastdl

    def make():
        g = torch.Generator().manual_seed(0)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = _randn(N, C, H, W, dtype=dtype, generator=g, requires_grad=False).to(memory_format=fmt)
        w = _randn(K, C, 3, 3, dtype=dtype, generator=g, scale=(C * 9) ** -0.5, requires_grad=False)
        w = w.to(memory_format=fmt)
        b = _randn(K, dtype=dtype, generator=g)
        grad = _randn(N, K, H, W, dtype=dtype, generator=g, requires_grad=False).to(memory_format=fmt)
        return (x.requires_grad_(), w.requires_grad_(), b), grad

    layout = "channels_last" if channels_last else "NCHW"
    return Case("conv2d+relu", f"{N}x{C}x{H}x{W} -> {K} 3x3 pad 1 {layout}", dtype, make,
                lambda x, w, b: fastdl.functional.conv2d(x, w, b, 1, 1, activation="relu"),
                lambda x, w, b: F.relu(F.conv2d(x, w, b, 1, 1)))


def depthwise_conv2d_case(N: int, C: int, H: int, W: int, dtype: torch.dtype, stride: int = 1) -> Case:
    """A MobileNet depthwise 3x3 (groups == C, padding 1) with its relu fused, channels_last. torch
    eager: convolution, relu (threshold_backward, convolution_backward); fastdl: the direct depthwise
    kernels (kernels/triton/conv2d_depthwise.py), a 1-byte relu mask, the weight copied tap-major."""
    import fastdl

    P, Q = (H - 1) // stride + 1, (W - 1) // stride + 1

    def make():
        g = torch.Generator().manual_seed(0)
        fmt = torch.channels_last
        x = _randn(N, C, H, W, dtype=dtype, generator=g, requires_grad=False).to(memory_format=fmt)
        w = _randn(C, 1, 3, 3, dtype=dtype, generator=g, scale=1 / 3, requires_grad=False).to(memory_format=fmt)
        b = _randn(C, dtype=dtype, generator=g)
        grad = _randn(N, C, P, Q, dtype=dtype, generator=g, requires_grad=False).to(memory_format=fmt)
        return (x.requires_grad_(), w.requires_grad_(), b), grad

    return Case("depthwise conv2d+relu", f"{N}x{C}x{H}x{W} 3x3/{stride} pad 1 channels_last", dtype, make,
                lambda x, w, b: fastdl.functional.conv2d(x, w, b, stride, 1, 1, C, activation="relu"),
                lambda x, w, b: F.relu(F.conv2d(x, w, b, stride, 1, 1, C)))


def batch_norm_case(N: int, C: int, H: int, W: int, dtype: torch.dtype, channels_last: bool = True,
                    fused: bool = False) -> Case:
    """Training batch norm (batch statistics, affine, no running statistics), alone or as ResNet's
    block tail act(bn(x) + residual) with relu fused. torch eager: batch_norm (+ add, relu) and their
    backwards; fastdl: stats + one normalize pass (writing a 1-byte relu mask when fused), one
    reduce + one elementwise pass backward."""
    import fastdl

    def make():
        g = torch.Generator().manual_seed(0)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = _randn(N, C, H, W, dtype=dtype, generator=g, requires_grad=False).to(memory_format=fmt)
        weight = (1 + 0.1 * _randn(C, dtype=dtype, generator=g, requires_grad=False)).requires_grad_()
        bias = _randn(C, dtype=dtype, generator=g, scale=0.1)
        grad = _randn(N, C, H, W, dtype=dtype, generator=g, requires_grad=False).to(memory_format=fmt)
        inputs = (x.requires_grad_(), weight, bias)
        if fused:
            inputs += (_randn(N, C, H, W, dtype=dtype, generator=g, requires_grad=False).to(memory_format=fmt)
                       .requires_grad_(),)
        return inputs, grad

    layout = "channels_last" if channels_last else "NCHW"
    if fused:
        return Case("batch_norm+relu+residual", f"{N}x{C}x{H}x{W} train {layout}", dtype, make,
                    lambda x, w, b, r: fastdl.functional.batch_norm(x, None, None, w, b, training=True,
                                                                    activation="relu", residual=r),
                    lambda x, w, b, r: F.relu(F.batch_norm(x, None, None, w, b, training=True) + r))
    return Case("batch_norm", f"{N}x{C}x{H}x{W} train {layout}", dtype, make,
                lambda x, w, b: fastdl.functional.batch_norm(x, None, None, w, b, training=True),
                lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True))


def _torch_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """F.dropout(x, p) as torch eager runs it on a GPU: one fused native_dropout (writing a 1-byte
    mask) and native_dropout_backward. (On a CPU tensor F.dropout composes bernoulli_, div_ and mul
    instead: not what a GPU user's eager run moves.)"""
    return torch.ops.aten.native_dropout(x, p, True)[0]


def dropout_case(R: int, C: int, dtype: torch.dtype, p: float = 0.1) -> Case:
    """Dropout alone, training. torch eager: native_dropout (reads x, writes out and a bool mask)
    and native_dropout_backward (reads grad and the mask); fastdl stores no mask (Philox from a
    seed, regenerated in backward)."""
    import fastdl

    def make():
        g = torch.Generator().manual_seed(0)
        return (_randn(R, C, dtype=dtype, generator=g),), _randn(R, C, dtype=dtype, generator=g, requires_grad=False)

    return Case("dropout", f"{R}x{C} p={p}", dtype, make,
                lambda x: fastdl.functional.dropout(x, p, training=True),
                lambda x: _torch_dropout(x, p))


def linear_dropout_case(M: int, K: int, N: int, dtype: torch.dtype, p: float = 0.1) -> Case:
    """linear + relu + dropout, training: fastdl's dropout in linear's epilogue (the linear+relu
    rows at the same shape are the reference point); torch eager: F.linear, F.relu and the GPU's
    dropout (_torch_dropout)."""
    import fastdl

    return Case("linear+relu+dropout", f"M={M} K={K} N={N} p={p}", dtype, _linear_inputs(M, K, N, dtype),
                lambda x, w, b: fastdl.functional.linear(x, w, b, activation="relu", dropout=p, training=True),
                lambda x, w, b: _torch_dropout(F.relu(F.linear(x, w, b)), p))



def model_case(name: str, N: int, dtype: torch.dtype, image: int = 16) -> Case:
    """One training step's forward and backward of a primer's network (fastdl/models.py), the torch
    original against its fastdl.convert twin (the same Parameters, which are the differentiable
    inputs besides the images): every kernel and every torch op either runs, channels_last."""
    import fastdl
    from fastdl import models

    build = {"SimpleCNN": lambda: models.SimpleCNN(3, 10, image),
             "SmallResNet": lambda: models.SmallResNet(3, 10, (16, 32))}[name]
    held = {}

    def make():
        torch.manual_seed(0)
        original = build().to(dtype=dtype, memory_format=torch.channels_last)
        held["original"], held["converted"] = original, fastdl.convert(original)
        g = torch.Generator().manual_seed(0)
        x = _randn(N, 3, image, image, dtype=dtype, generator=g, requires_grad=False)
        x = x.contiguous(memory_format=torch.channels_last)
        grad = _randn(N, 10, dtype=dtype, generator=g, requires_grad=False)
        return (x, *original.parameters()), grad

    return Case(f"model {name}", f"{N}x3x{image}x{image} train channels_last", dtype, make,
                lambda x, *params: held["converted"](x), lambda x, *params: held["original"](x))

@contextlib.contextmanager
def _environ(name: str, value: Optional[str]):
    before = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if value is not None:
            if before is None:
                del os.environ[name]
            else:
                os.environ[name] = before


def default_cases() -> list[Case]:
    cases = [linear_case(256, 512, 384, dtype, activation)
             for dtype in (torch.float32, torch.float16) for activation in (None, "relu", "gelu")]
    cases += [cross_entropy_case(64, 4000, dtype) for dtype in (torch.float32, torch.bfloat16)]
    cases += [linear_cross_entropy_case(128, 256, 4000, dtype) for dtype in (torch.float32, torch.bfloat16)]
    # One chunk above; four here: what linear_cross_entropy's chunking costs per chunk.
    cases.append(linear_cross_entropy_case(128, 256, 4000, torch.bfloat16, chunk_rows=32))
    cases += [max_pool2d_case(4, 64, 32, 32, dtype, channels_last)
              for dtype, channels_last in ((torch.bfloat16, True), (torch.float32, True), (torch.float32, False))]
    cases += [conv2d_case(2, 64, 16, 16, 64, dtype, channels_last)
              for dtype, channels_last in ((torch.bfloat16, True), (torch.float32, False))]
    cases += [depthwise_conv2d_case(2, 96, 16, 16, dtype, stride)
              for dtype, stride in ((torch.bfloat16, 1), (torch.bfloat16, 2), (torch.float32, 1))]
    cases += [batch_norm_case(32, 64, 28, 28, dtype, channels_last, fused)
              for fused in (False, True) for dtype in (torch.bfloat16, torch.float32) for channels_last in (True, False)]
    cases += [dropout_case(256, 1024, dtype) for dtype in (torch.float32, torch.bfloat16)]
    cases += [linear_dropout_case(256, 512, 384, dtype) for dtype in (torch.float32, torch.float16)]
    # Whole models (issue 10): one training step, converted vs original.
    cases += [model_case(name, 4, torch.bfloat16) for name in ("SimpleCNN", "SmallResNet")]
    return cases


# --- measuring ----------------------------------------------------------------------------------------

def _run(fn, inputs, grad_output, kernels: bool) -> tuple[Count, Count, tuple]:
    """(forward count, backward count, gradients) of fn(*inputs) and autograd.grad of it."""
    forward, backward = Count(), Count()
    differentiable = [t for t in inputs if t.requires_grad]
    with counting(forward, kernels):
        out = fn(*inputs)
    with counting(backward, kernels):
        grads = torch.autograd.grad(out, differentiable, grad_output)
    return forward, backward, (out, grads)


def floor_bytes(inputs, outputs, grad_outputs, grads) -> dict:
    """The floor per mode (module docstring): each tensor read or written once."""
    total = lambda ts: sum(tensor_bytes(t) for t in ts if t is not None)
    i, o, go, g = total(inputs), total(outputs), total(grad_outputs), total(grads)
    return {"forward": i + o, "backward": go + i + g, "forward+backward": i + o + go + g}


@dataclass
class Measurement:
    case: Case
    fastdl: dict       # mode -> Count
    torch: dict        # mode -> Count
    floor: dict        # mode -> bytes


def measure(case: Case) -> Measurement:
    """Run the case on fastdl's triton backend (interpreted, kernels recorded) and on torch eager."""
    import fastdl

    with _MEASURE_LOCK:
        inputs, grad_output = case.make()
        with fastdl.use_backend("triton"):
            f_fwd, f_bwd, (out, grads) = _run(case.fastdl_fn, inputs, grad_output, kernels=True)
        inputs, grad_output = case.make()
        t_fwd, t_bwd, _ = _run(case.torch_fn, inputs, grad_output, kernels=False)
    return Measurement(case,
                       {"forward": f_fwd, "backward": f_bwd, "forward+backward": f_fwd + f_bwd},
                       {"forward": t_fwd, "backward": t_bwd, "forward+backward": t_fwd + t_bwd},
                       floor_bytes(inputs, (out,), (grad_output,), grads))


def _ratio(a: int, b: int) -> float:
    return round(a / b, 3) if b else math.nan


def rows_of(m: Measurement) -> list[dict]:
    rows = []
    for mode in MODES:
        f, t, floor = m.fastdl[mode], m.torch[mode], m.floor[mode]
        rows.append({
            "op": m.case.op, "mode": mode, "shape": m.case.shape, "dtype": str(m.case.dtype).replace("torch.", ""),
            "fastdl_bytes": f.bytes, "fastdl_kernel_bytes": f.kernel_bytes, "fastdl_torch_op_bytes": f.torch_op_bytes,
            "launches": len(f.launches), "torch_bytes": t.bytes, "torch_aten_ops": len(t.moving_ops),
            "floor_bytes": floor, "fastdl_vs_torch": _ratio(f.bytes, t.bytes),
            "fastdl_vs_floor": _ratio(f.bytes, floor), "torch_vs_floor": _ratio(t.bytes, floor),
            "fastdl_kernels": [{"kernel": launch.kernel, "read_bytes": launch.read_bytes,
                                "write_bytes": launch.write_bytes, "accessed_bytes": launch.accessed_bytes}
                               for launch in f.launches],
            "fastdl_torch_ops": [{"op": op.name, "bytes": op.bytes} for op in f.moving_ops],
            "torch_ops": [{"op": op.name, "bytes": op.bytes} for op in t.moving_ops],
        })
    return rows


def report(ops=None) -> list[dict]:
    """Rows for the default cases (`ops`: op names to keep, e.g. ["cross_entropy"]; "linear" keeps
    linear with every activation), three modes each."""
    cases = default_cases()
    if ops is not None:
        wanted = set(ops)
        cases = [c for c in cases if c.op in wanted or c.op.split("+")[0] in wanted]
    return [row for case in cases for row in rows_of(measure(case))]


def _mib(n: int) -> str:
    return f"{n / 2**20:.3f}"


def format(rows: list[dict]) -> str:  # noqa: A001 - the name the CLI calls
    """A text table of report() rows: MiB per side, launches, torch's aten ops, the ratios."""
    header = ("op", "mode", "shape", "dtype", "fastdl MiB", "launches", "torch MiB", "aten ops", "floor MiB",
              "fastdl/torch", "fastdl/floor", "torch/floor")
    table = [header] + [(r["op"], r["mode"], r["shape"], r["dtype"], _mib(r["fastdl_bytes"]), str(r["launches"]),
                         _mib(r["torch_bytes"]), str(r["torch_aten_ops"]), _mib(r["floor_bytes"]),
                         f"{r['fastdl_vs_torch']:.2f}", f"{r['fastdl_vs_floor']:.2f}", f"{r['torch_vs_floor']:.2f}")
                        for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    numeric = set(range(4, len(header)))
    lines = ["  ".join(cell.rjust(w) if i in numeric else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(rows: list[dict], path=JSON_PATH) -> Path:
    """The rows as JSON, with the method they were counted by (beside the benchmark data)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"method": "fastdl.inspection.traffic (see its docstring): distinct bytes per kernel launch under "
                     "Triton's interpreter + torch ops outside the kernels; torch eager's aten op bytes by "
                     "TorchDispatchMode; the floor reads each input and writes each output once",
           "rows": rows}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


if __name__ == "__main__":
    rows = report()
    print(format(rows))
    print(f"written to {write_json(rows)}")
