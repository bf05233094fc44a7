"""What every Triton launcher shares: the launch wrapper, the interpreter's bf16 policy, accumulator
dtypes and the matmul input precision.

Two rules for running on CPU tensors through Triton's interpreter live here and nowhere else:

- Launches are serialized. The interpreter patches triton.language while a kernel runs, so two
  threads interpreting at once crash ("Did you forget to add @triton.jit"). `wrap_triton`, which
  every launcher launches through (``wrap_triton(kernel)[grid](...)``), holds one process-wide lock
  around each launch when interpreting; on a GPU it is torch.library.wrap_triton, unchanged, so
  torch.compile sees the kernels.
- bf16 under the interpreter is computed in float32 and rounded to bf16 at each launcher's
  boundary, which is what the GPU kernels do (fp32 accumulation, one rounding) except that the GPU
  rounds intermediates the interpreter keeps in float32 only where a launcher passes bf16 between
  kernels internally. (The interpreter's own bf16 loads and tl.dot are wrong: a linear that torch
  computes as ~6 came back as ~1e10.) Every public launcher carries `@interpreter_bf16(...)`,
  declaring which of its results are in the input's dtype and which arguments it writes; on a GPU
  the decorator calls the launcher as it is.
"""
from __future__ import annotations

import functools
import inspect
import threading
from dataclasses import dataclass

import numpy as np
import torch
import triton.language as tl

from fastdl.backends import triton_interpreting

try:  # torch >= 2.6: lets torch.compile see through the launch (torch.library.triton_op).
    from torch.library import wrap_triton as _torch_wrap_triton
except ImportError:  # pragma: no cover - older torch
    def _torch_wrap_triton(kernel):
        return kernel

ACC_DTYPE = {torch.float16: tl.float32, torch.bfloat16: tl.float32, torch.float32: tl.float32,
             torch.float64: tl.float64}

# Re-entrant: a launch that launches (an autotuner's trial runs) must not deadlock on itself.
INTERPRETER_LOCK = threading.RLock()


class _SerializedLaunch:
    """``kernel[grid](...)`` with INTERPRETER_LOCK held for the whole launch (autotuning included), and
    NumPy's floating-point warnings off."""

    def __init__(self, kernel):
        self._kernel = kernel

    def __getitem__(self, grid):
        launch = self._kernel[grid]

        def locked(*args, **kwargs):
            # The interpreter computes with NumPy: inf and nan would print RuntimeWarnings that a GPU
            # kernel (and torch) never prints.
            with INTERPRETER_LOCK, np.errstate(all="ignore"):
                return launch(*args, **kwargs)

        return locked


# Set by fastdl.inspection.capture while it records what the launchers launch (nothing runs then):
# a callable taking the kernel and returning what ``[grid](*args, **constexprs)`` is applied to.
launch_interceptor = None


def wrap_triton(kernel):
    """What every launcher launches through: ``wrap_triton(kernel)[grid](*args, **constexprs)``."""
    if launch_interceptor is not None:
        return launch_interceptor(kernel)
    wrapped = _torch_wrap_triton(kernel)
    if triton_interpreting():
        return _SerializedLaunch(wrapped)
    return wrapped


# Hopper's wgmma reads a 32-bit (TF32) operand from shared memory only K-major (contiguous along the
# reduction), and only its A operand may come from registers instead. A B operand contiguous along
# the output dimension (linear's x and w in the backward, conv2d's weight in grad_input) is copied
# into shared memory transposed by Triton, 4 bytes per cp.async against 16 for every other operand,
# each copy writing 32 rows of the swizzled shared tile at a time. A K-major copy of the operand made
# once per call (one read and one write of it: 8 bytes per element in TF32; for linear's x against
# 2 M N K flops, ~333 / N of the product's time on an H200 at 4.8 TB/s and ~400 TFLOP/s; conv2d's
# weight is small) lets every copy be 16 bytes wide (`fastdl inspect --arch sm_90`, test_inspection's
# test_tf32_backward_copies_16_bytes). sm_80's mma.sync reads either layout from shared memory: its
# copies are 16 bytes wide as they are. Which is faster at a given shape is a GPU measurement:
# `fastdl bench --op linear` times the TF32 backward both ways ("k-major copies off").
# None: on TF32 launches for compute capability 9.x; True / False: always / never (tests, benchmarks).
TF32_K_MAJOR = None


def wants_k_major(t: torch.Tensor, precision: str) -> bool:
    """Whether a launch on `t` copies its strided TF32 B operands K-major (TF32_K_MAJOR)."""
    if TF32_K_MAJOR is not None:
        return TF32_K_MAJOR
    from fastdl.kernels.triton import target

    capability = target.capability(t)
    return precision == "tf32" and capability is not None and capability[0] == 9


def input_precision(dtype: torch.dtype) -> str:
    # TF32 follows torch's own switch, so fastdl matches F.linear's numerics on Ampere+.
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


# --- bf16 under the interpreter --------------------------------------------------------------------

RESULT_KINDS = ("io", "acc", "other")


@dataclass(frozen=True)
class Bf16Policy:
    """How a launcher's bf16 call runs under the interpreter.

    results  one kind per returned tensor (a launcher returning one tensor or None declares ()
             or one kind): "io" is in the inputs' dtype (its float32 result is rounded to bf16),
             "acc" is an accumulator dtype (float32 either way, returned as is), "other" is not a
             float result (a uint8 mask) and is returned as is.
    mutates  names of the arguments the launcher may write in place (in some modes only, e.g.
             inplace=True or out=None). A bf16 one runs as a float32 copy that is copied back into
             the caller's tensor when the launch changed it, and a returned copy is replaced by the
             caller's tensor. Any other bf16 argument the launch changed is a bug: it raises. A
             name the signature lacks is allowed (an `out=` the launcher is growing): a misspelt
             name leaves the real argument undeclared, which then raises at its first write.
    """
    results: tuple[str, ...] = ()
    mutates: tuple[str, ...] = ()


def interpreter_bf16(results=(), mutates=()):
    """Declare a launcher's result dtypes and written arguments; under the interpreter, run bf16 in
    float32 (see the module docstring). Sets ``launcher.interpreter_bf16`` to its Bf16Policy."""
    results, mutates = tuple(results), tuple(mutates)
    for kind in results:
        if kind not in RESULT_KINDS:
            raise ValueError(f"fastdl: result kind {kind!r} is not one of {RESULT_KINDS}")
    policy = Bf16Policy(results, mutates)

    def decorate(launcher):
        signature = inspect.signature(launcher)

        @functools.wraps(launcher)
        def run(*args, **kwargs):
            if not triton_interpreting():
                return launcher(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            originals = {name: value for name, value in bound.arguments.items()
                         if isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16}
            if not originals:
                return launcher(*args, **kwargs)
            copies = {name: value.to(torch.float32) for name, value in originals.items()}
            bound.arguments.update(copies)
            out = launcher(*bound.args, **bound.kwargs)
            _write_back(launcher, policy, originals, copies)
            return _round_results(launcher, policy, out, originals, copies)

        run.interpreter_bf16 = policy
        return run

    return decorate


def _write_back(launcher, policy, originals, copies):
    for name, copy in copies.items():
        original = originals[name]
        # Compared bitwise: only what the launch changed is written back, and a change it did not
        # declare is a launcher bug, caught here rather than lost with the copy.
        if torch.equal(copy.to(torch.bfloat16).view(torch.int16), original.view(torch.int16)):
            continue
        if name not in policy.mutates:
            raise RuntimeError(f"fastdl internal error: {launcher.__qualname__} wrote its argument {name!r}, which its "
                               "@interpreter_bf16 does not declare in mutates=")
        # Through .data: a kernel's store leaves autograd's version counter alone, and so does this.
        original.data.copy_(copy)


def _round_results(launcher, policy, out, originals, copies):
    originals_of = {id(copy): originals[name] for name, copy in copies.items()}
    single = not isinstance(out, tuple)
    values = (out,) if single else out
    if single and out is None:
        return None
    if len(policy.results) != len(values):
        raise RuntimeError(f"fastdl internal error: {launcher.__qualname__} returned {len(values)} results but its "
                           f"@interpreter_bf16 declares {len(policy.results)} ({policy.results})")
    rounded = []
    for value, kind in zip(values, policy.results):
        if isinstance(value, torch.Tensor) and id(value) in originals_of:
            value = originals_of[id(value)]  # the caller's tensor, written back above
        elif kind == "io" and isinstance(value, torch.Tensor) and value.dtype == torch.float32:
            value = value.to(torch.bfloat16)
        rounded.append(value)
    return rounded[0] if single else tuple(rounded)
