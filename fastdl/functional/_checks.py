"""Checks every fastdl functional entry point shares, written once: torch's exception types, messages
naming the op and the shapes. Each op's module (linear.py, cross_entropy.py, ...) calls these before
anything is allocated or written; backends trust what passes them.
"""
from __future__ import annotations

import functools
import inspect
import operator
import os

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function

from fastdl import backends
from fastdl.backends.common import check_class_targets
from fastdl.ops.linear import TORCH_ACTIVATIONS as _BY_OP_NAME

ACTIVATIONS = (None, "relu", "leaky_relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# torch's own activations, keyed by the public names (None for none): the ops' table, for the
# unfused path (a bias that varies along rows) and for tests comparing with torch.
_TORCH_ACTIVATIONS = {None if name == "none" else name: fn for name, fn in _BY_OP_NAME.items()}

def _shape(t: Tensor) -> str:
    return "x".join(str(d) for d in t.shape) or "scalar"


def check_activation(op: str, activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"fastdl.{op}: unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def _check_ignore_index(op: str, value, position: int | None = None) -> int:
    """torch's rule for an int argument: anything with __index__ (numpy and 0-dim integer tensors
    too), but not a bool."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    where = f" (position {position})" if position else ""
    raise TypeError(f"{op}(): argument 'ignore_index'{where} must be int, not {type(value).__name__}")


def _check_tensor(op: str, name: str, value, position: int) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{op}(): argument '{name}' (position {position}) must be Tensor, "
                        f"not {type(value).__name__}")


def _check_dense_dtypes(op: str, input: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """A dense layer's tensors: one floating dtype fastdl has kernels for (torch: RuntimeError)."""
    for name, t in (("input", input), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in FLOAT_DTYPES:
            raise RuntimeError(f"fastdl.{op}: {name} dtype {t.dtype} is not supported; "
                               f"expected one of float16, bfloat16, float32, float64")
    if weight.dtype != input.dtype or (bias is not None and bias.dtype != input.dtype):
        got = ", ".join(f"{n}={t.dtype}" for n, t in (("input", input), ("weight", weight), ("bias", bias))
                        if t is not None)
        raise RuntimeError(f"fastdl.{op}: expected input, weight and bias to have the same dtype, got {got}")


def _autocast(*tensors, to_float32: bool = False):
    """Cast as torch.autocast does: to the autocast dtype for ops on its lower-precision list (linear),
    or up to float32 for ops on its float32 list (cross_entropy). float64 is never cast."""
    device_type = next(t.device.type for t in tensors if t is not None)
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return tensors
    if to_float32:
        dtype, castable = torch.float32, (torch.float16, torch.bfloat16)
    else:
        dtype, castable = torch.get_autocast_dtype(device_type), (torch.float16, torch.bfloat16, torch.float32)
    return tuple(t.to(dtype) if t is not None and t.dtype in castable else t for t in tensors)


# --- class-index and reduction checks (cross_entropy, linear_cross_entropy) ---

_REDUCTIONS = ("none", "mean", "sum")
# Set to 1 to check class-index targets on the host for CUDA tensors too: an IndexError naming the
# bad value, at the price of a device-to-host sync per call. Off, a bad target on the GPU trips the
# kernel's device-side assert instead (as torch's own CUDA kernels do), with no sync in the hot path.
CHECK_TARGETS_ENV = "FASTDL_CHECK_TARGETS"


def _reduction(op: str, reduction: str, size_average=None, reduce=None) -> str:
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"fastdl.{op}: {reduction} is not a valid value for reduction")
    return reduction


def _check_label_smoothing(op: str, label_smoothing: float) -> float:
    if label_smoothing > 1.0:
        raise RuntimeError(f"fastdl.{op}: label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    return max(label_smoothing, 0.0)  # torch treats a negative value as 0


def _check_class_weight(op: str, weight, C: int) -> None:
    if weight is not None and (weight.dim() != 1 or weight.numel() != C):
        raise RuntimeError(f"fastdl.{op}: weight tensor should be defined either for all {C} classes or no "
                           f"classes but got weight tensor of shape: {list(weight.shape)}")


def _check_index_target(op: str, input_shape: tuple, target: Tensor) -> None:
    """nll_loss's shape rules for class-index targets: a batch mismatch is a ValueError, the rest RuntimeError."""
    if len(input_shape) == 1:
        if target.dim() == 1 and target.shape[0] != 1:
            raise ValueError(f"fastdl.{op}: For 1D input, 1D target must have size 1, but got target size: "
                             f"{target.shape[0]}")
        if target.dim() > 1:
            raise RuntimeError(f"fastdl.{op}: 0D or 1D target tensor expected, multi-target not supported "
                               f"(input {_shape_of(input_shape)}, target {_shape(target)})")
    else:
        batch = target.shape[0] if target.dim() else 0
        if batch != input_shape[0]:
            raise ValueError(f"fastdl.{op}: Expected input batch_size ({input_shape[0]}) to match target "
                             f"batch_size ({batch}).")
        expected = (input_shape[0],) + tuple(input_shape[2:])
        if tuple(target.shape) != expected:
            raise RuntimeError(f"fastdl.{op}: Expected target size {list(expected)}, got {list(target.shape)} "
                               f"(input {_shape_of(input_shape)})")
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(f"fastdl.{op}: expected target dtype to be Long or Byte, but got "
                           f"{str(target.dtype).replace('torch.', '').capitalize()}")


def _shape_of(shape) -> str:
    return "x".join(str(d) for d in shape) or "scalar"


def _check_targets_in_range(op: str, target: Tensor, C: int, ignore_index: int, backend: str) -> None:
    """IndexError naming the first bad target, as torch; on CUDA only when asked (it syncs).

    Skipped while torch.compile traces (a data-dependent branch would break the graph) and under
    torch.func transforms (backend "torch": torch's own ops check). Compiled code is still guarded:
    the reference backend checks inside its launcher at run time, and the GPU kernels carry a
    device-side assert.
    """
    if torch.compiler.is_compiling() or backend == "torch":
        return
    if target.device.type == "cuda" and backend != "reference" and os.environ.get(CHECK_TARGETS_ENV, "0") != "1":
        return
    check_class_targets(f"fastdl.{op}", target, C, ignore_index)


def _check_same_device(op: str, *tensors) -> None:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise RuntimeError(f"fastdl.{op}: expected all tensors to be on the same device, got "
                           f"{', '.join(sorted(str(d) for d in devices))}")


# --- how a call reaches its op ---

def torch_function_dispatch(*tensor_params: str):
    """Make a functional entry point take part in torch's function dispatch, as torch.nn.functional's do.

    Tensor-likes that override __torch_function__ (torch.fx's Proxy, tensor subclasses) and active
    TorchFunctionModes get the call first, with the public function as `func`: so torch.fx traces a
    model holding fastdl modules as calls to fastdl.functional.<op>, and users' own fx passes and
    modes see fastdl's ops. `tensor_params` names the parameters that may carry tensors.
    """
    def decorate(fn):
        names = list(inspect.signature(fn).parameters)
        where = tuple((names.index(name), name) for name in tensor_params)

        @functools.wraps(fn)
        def dispatched(*args, **kwargs):
            relevant = tuple(args[i] if i < len(args) else kwargs.get(name) for i, name in where)
            if has_torch_function(relevant):
                return handle_torch_function(dispatched, relevant, *args, **kwargs)
            return fn(*args, **kwargs)

        return dispatched

    return decorate


def _has_tangent(tensors) -> bool:
    if _forward_ad._current_level < 0:  # no dual_level is open: the common case, one int compare
        return False
    return any(isinstance(t, Tensor) and _forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def backend_for(device: torch.device, *tensors) -> str:
    """The backend a call runs on: the selected (or default) one, or "torch" under transforms.

    fastdl's ops are torch.library custom ops with a reverse-mode autograd formula; torch.func's
    transforms (grad, vmap, jacrev, jvp, functional_call-based per-sample gradients) and
    forward-mode AD (torch.autograd.forward_ad) cannot run through those. Under them the call runs
    the op's "torch" entry (fastdl.ops.get(op, "torch")): the same computation in torch's own
    differentiable ops, so results and derivatives are torch's, never silently missing.
    """
    if torch._C._are_functorch_transforms_active() or _has_tangent(tensors):
        return "torch"
    return backends.resolve(device)
