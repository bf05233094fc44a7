"""Checks every fastdl functional entry point shares, written once: torch's exception types, messages
naming the op and the shapes. Each op's module (linear.py, cross_entropy.py, ...) calls these before
anything is allocated or written; backends trust what passes them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = (None, "relu", "leaky_relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Unfused torch equivalents; used only for a bias that varies along rows (see linear()).
_TORCH_ACTIVATIONS = {
    None: lambda z, s: z,
    "relu": lambda z, s: F.relu(z),
    "leaky_relu": lambda z, s: F.leaky_relu(z, s),
    "gelu": lambda z, s: F.gelu(z),
    "gelu_tanh": lambda z, s: F.gelu(z, approximate="tanh"),
    "silu": lambda z, s: F.silu(z),
    "sigmoid": lambda z, s: torch.sigmoid(z),
    "tanh": lambda z, s: torch.tanh(z),
}


def _shape(t: Tensor) -> str:
    return "x".join(str(d) for d in t.shape) or "scalar"


def check_activation(op: str, activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"fastdl.{op}: unknown activation {activation!r}; expected one of {ACTIVATIONS}")


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

    Skipped while torch.compile traces (a data-dependent branch would break the graph); the
    kernel's device-side assert still stands guard on the GPU.
    """
    import os

    if torch.compiler.is_compiling():
        return
    if target.device.type == "cuda" and backend != "reference" and os.environ.get(CHECK_TARGETS_ENV, "0") != "1":
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= C))
    if bool(bad.any()):
        value = int(target[bad].reshape(-1)[0])
        raise IndexError(f"fastdl.{op}: Target {value} is out of bounds. (classes 0..{C - 1}, "
                         f"ignore_index={ignore_index})")


def _check_same_device(op: str, *tensors) -> None:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise RuntimeError(f"fastdl.{op}: expected all tensors to be on the same device, got "
                           f"{', '.join(sorted(str(d) for d in devices))}")
