"""torch.nn.functional-compatible entry points, with fused extras (activation=).

Everything a caller can get wrong is checked here, once, before anything is allocated or
written, with the exception type torch raises for the same mistake. Backends trust their inputs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdl import backends
from fastdl.ops.linear import OPS as _LINEAR_OPS

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


def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None, *, activation: str | None = None,
           negative_slope: float = 0.01) -> Tensor:
    """act(input @ weight.T + bias), with torch.nn.functional.linear's semantics and the activation fused."""
    check_activation("linear", activation)
    _check_tensor("linear", "input", input, 1)
    _check_tensor("linear", "weight", weight, 2)
    if bias is not None:
        _check_tensor("linear", "bias", bias, 3)
    if input.dim() == 0 or weight.dim() == 0:
        raise RuntimeError(f"fastdl.linear: input and weight need at least 1 dimension, got input "
                           f"{_shape(input)} and weight {_shape(weight)}")
    if weight.dim() > 2:
        raise RuntimeError(f"fastdl.linear: weight must be 1-D or 2-D, got {_shape(weight)}")
    if weight.dim() == 1 and bias is not None and input.dim() > 1:
        raise RuntimeError(f"fastdl.linear: a 1-D weight ({_shape(weight)}) takes a bias only with a 1-D input, "
                           f"got input {_shape(input)} and bias {_shape(bias)}")
    _check_same_device("linear", input, weight, bias)
    input, weight, bias = _autocast(input, weight, bias)
    _check_dense_dtypes("linear", input, weight, bias)
    in_features = input.shape[-1]
    if weight.shape[-1] != in_features:
        raise RuntimeError(f"fastdl.linear: input ({_shape(input)}) and weight ({_shape(weight)}) shapes "
                           f"cannot be multiplied: {in_features} input features, weight has {weight.shape[-1]}")
    weight_2d = weight if weight.dim() == 2 else weight.unsqueeze(0)
    out_features = weight_2d.shape[0]
    out_shape = input.shape[:-1] + ((out_features,) if weight.dim() == 2 else ())
    row_bias = None
    if bias is not None:
        try:
            ok = torch.broadcast_shapes(bias.shape, out_shape) == out_shape
        except RuntimeError:
            ok = False
        if not ok:
            raise RuntimeError(f"fastdl.linear: bias ({_shape(bias)}) does not broadcast to the output "
                               f"({_shape(input)} @ {_shape(weight)}.T -> {'x'.join(map(str, out_shape))})")
        squeezed = tuple(bias.shape[next((i for i, d in enumerate(bias.shape) if d != 1), bias.dim()):])
        if bias.numel() == 1:
            row_bias = bias.reshape(1).expand(out_features)
        elif weight.dim() == 2 and squeezed == (out_features,):
            row_bias = bias.reshape(out_features)
    backend = backends.resolve(input.device)
    op = _LINEAR_OPS[backend]
    input_2d = input.reshape(math.prod(input.shape[:-1]), in_features)
    if bias is not None and row_bias is None:
        # A bias that differs between rows cannot ride in the epilogue; add it unfused.
        z, _ = op(input_2d, weight_2d, None, "none", 0.0)
        return _TORCH_ACTIVATIONS[activation](z.reshape(out_shape) + bias, negative_slope)
    out, _ = op(input_2d, weight_2d, row_bias, activation or "none", float(negative_slope))
    return out.reshape(out_shape)


# --- cross_entropy ---------------------------------------------------------------------------------

from fastdl.ops.cross_entropy import CE_OPS as _CE_OPS, LINEAR_CE_OPS as _LINEAR_CE_OPS  # noqa: E402

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


def cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None = None, size_average=None,
                  ignore_index: int = -100, reduce=None, reduction: str = "mean",
                  label_smoothing: float = 0.0) -> Tensor:
    """torch.nn.functional.cross_entropy, computed by one fused kernel that also writes the gradient.

    Input (C,), (N, C) or (N, C, d1, ..., dk); class-index or class-probability targets; class
    weights, ignore_index, label_smoothing and reductions exactly as torch. The gradient is
    computed in the forward (only when input requires grad) and scaled by grad_output in the
    backward; the input is never written.

    Targets outside [0, C) that are not ignore_index raise IndexError on CPU tensors (and with the
    reference backend). On CUDA tensors they trip a device-side assert in the kernel, like torch's
    own CUDA kernels, because checking on the host would sync every call; set the environment
    variable FASTDL_CHECK_TARGETS=1 for a host check with an IndexError naming the value.
    """
    op = "cross_entropy"
    _check_tensor(op, "input", input, 1)
    _check_tensor(op, "target", target, 2)
    if weight is not None:
        _check_tensor(op, "weight", weight, 3)
    if not isinstance(ignore_index, int):
        raise TypeError(f"{op}(): argument 'ignore_index' (position 5) must be int, not {type(ignore_index).__name__}")
    reduction = _reduction(op, reduction, size_average, reduce)
    label_smoothing = float(label_smoothing)
    if not input.is_floating_point():
        raise NotImplementedError(f"fastdl.{op}: input dtype {input.dtype} is not supported; expected one of "
                                  f"float16, bfloat16, float32, float64")
    prob = tuple(target.shape) == tuple(input.shape)
    if input.dim() == 0:
        if prob and target.is_floating_point():
            raise IndexError(f"fastdl.{op}: input needs a class dimension, got a scalar")
        if not prob:
            raise ValueError(f"fastdl.{op}: Expected 1 or more dimensions (got 0)")
    input, weight, cast_target = _autocast(input, weight, target if prob else None, to_float32=True)
    if prob:
        target = cast_target
        if not target.is_floating_point():
            raise RuntimeError(f"fastdl.{op}: Expected floating point type for target with class probabilities, "
                               f"got {str(target.dtype).replace('torch.', '').capitalize()}")
        if ignore_index >= 0:
            raise RuntimeError(f"fastdl.{op}: ignore_index is not supported for floating point target")
    label_smoothing = _check_label_smoothing(op, label_smoothing)
    C = input.shape[0] if input.dim() == 1 else input.shape[1]
    if not prob:
        _check_index_target(op, tuple(input.shape), target)
    _check_class_weight(op, weight, C)
    _check_same_device(op, input, target, weight)
    if prob:
        # torch multiplies log_softmax(input) by target and weight: the result takes their promoted dtype.
        dtype = torch.promote_types(input.dtype, target.dtype)
        if weight is not None:
            dtype = torch.promote_types(dtype, weight.dtype)
        input, target = input.to(dtype), target.to(dtype)
        weight = None if weight is None else weight.to(dtype)
    else:
        if weight is not None and weight.dtype != input.dtype:
            raise RuntimeError(f"fastdl.{op}: expected scalar type {input.dtype} but found {weight.dtype} "
                               f"(weight of input {_shape(input)})")
        if weight is not None and weight.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(f"fastdl.{op}: not differentiable with respect to argument 'weight' for class-index "
                               f"targets (as torch's nll_loss); detach it")
    backend = backends.resolve(input.device)
    if not prob:
        _check_targets_in_range(op, target, C, ignore_index, backend)
    # Rows of C classes, class dimension last: a view for (C,), (N, C) and (1, C, d...), a copy otherwise.
    if input.dim() == 1:
        logits, rows_shape = input.unsqueeze(0), ()
    else:
        logits = input if input.dim() == 2 else input.movedim(1, -1).reshape(-1, C)
        rows_shape = (input.shape[0],) + tuple(input.shape[2:])
    if prob:
        target_rows = target.unsqueeze(0) if target.dim() == 1 else (
            target if target.dim() == 2 else target.movedim(1, -1).reshape(-1, C))
    else:
        target_rows = target.reshape(-1).long()
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, _ = _CE_OPS[backend](logits, target_rows, weight, int(ignore_index), label_smoothing, reduction,
                               compute_grad)
    return loss.reshape(rows_shape) if reduction == "none" else loss


def linear_cross_entropy(input: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None, *,
                         ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0) -> Tensor:
    """cross_entropy(linear(input, weight, bias), target, ...) without ever holding the (N, V) logits.

    input (N, H) or (H,), weight (V, H), bias (V,) or None, target (N,) class indices (or (N, V)
    probabilities, not differentiable here). The rows go through in chunks sized to a memory budget
    (fastdl.ops.cross_entropy.CHUNK_BYTES, less when little GPU memory is free): per chunk the
    logits, the fused loss + gradient written over them, then grad_input's rows and the
    accumulation of grad_weight and grad_bias. Forward and backward equal the unfused
    composition for every reduction, including "none" with a non-uniform grad_output.
    """
    op = "linear_cross_entropy"
    for position, (name, value) in enumerate((("input", input), ("weight", weight), ("target", target)), 1):
        _check_tensor(op, name, value, position)
    if bias is not None:
        _check_tensor(op, "bias", bias, 4)
    reduction = _reduction(op, reduction)
    label_smoothing = float(label_smoothing)
    if not isinstance(ignore_index, int):
        raise TypeError(f"{op}(): argument 'ignore_index' must be int, not {type(ignore_index).__name__}")
    if input.dim() not in (1, 2):
        raise RuntimeError(f"fastdl.{op}: input must be (N, H) or (H,), got {_shape(input)}; flatten the "
                           f"leading dimensions (input.flatten(0, -2), target.flatten())")
    if weight.dim() != 2:
        raise RuntimeError(f"fastdl.{op}: weight must be (V, H), got {_shape(weight)}")
    if weight.shape[1] != input.shape[-1]:
        raise RuntimeError(f"fastdl.{op}: input ({_shape(input)}) and weight ({_shape(weight)}) shapes cannot be "
                           f"multiplied: {input.shape[-1]} input features, weight has {weight.shape[1]}")
    V = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (V,):
        raise RuntimeError(f"fastdl.{op}: bias must be ({V},) for weight {_shape(weight)}, got {_shape(bias)}")
    _check_same_device(op, input, weight, bias, target)
    autocasting = input.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(input.device.type)
    input, weight, bias = _autocast(input, weight, bias)
    _check_dense_dtypes(op, input, weight, bias)
    logits_shape = tuple(input.shape[:-1]) + (V,)
    prob = tuple(target.shape) == logits_shape
    if prob:
        if not target.is_floating_point():
            raise RuntimeError(f"fastdl.{op}: Expected floating point type for target with class probabilities, "
                               f"got {str(target.dtype).replace('torch.', '').capitalize()}")
        if ignore_index >= 0:
            raise RuntimeError(f"fastdl.{op}: ignore_index is not supported for floating point target")
        if target.requires_grad and torch.is_grad_enabled():
            raise NotImplementedError(f"fastdl.{op}: probability targets are not differentiable here; use "
                                      f"cross_entropy(linear(...)) or detach the target")
        target = target.to(input.dtype)
    label_smoothing = _check_label_smoothing(op, label_smoothing)
    if not prob:
        _check_index_target(op, logits_shape, target)
    backend = backends.resolve(input.device)
    if not prob:
        _check_targets_in_range(op, target, V, ignore_index, backend)
    input_2d = input.reshape(-1, input.shape[-1])
    target_rows = target.reshape(-1, V) if prob else target.reshape(-1).long()
    grad_on = torch.is_grad_enabled()
    needs = [grad_on and t is not None and t.requires_grad for t in (input, weight, bias)]
    loss, *_ = _LINEAR_CE_OPS[backend](input_2d, weight, bias, target_rows, int(ignore_index), label_smoothing,
                                      reduction, *needs)
    if reduction == "none":
        loss = loss.reshape(logits_shape[:-1])
    # Under autocast torch would run the cross-entropy (so the loss) in float32.
    return loss.float() if autocasting and loss.dtype in (torch.float16, torch.bfloat16) else loss
