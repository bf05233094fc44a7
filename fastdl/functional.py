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


def _autocast(*tensors):
    """Cast as torch.autocast casts F.linear: floating tensors other than float64 go to the autocast dtype."""
    device_type = next(t.device.type for t in tensors if t is not None)
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


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
    devices = {t.device for t in (input, weight, bias) if t is not None}
    if len(devices) > 1:
        raise RuntimeError(f"fastdl.linear: expected all tensors to be on the same device, got "
                           f"{', '.join(sorted(str(d) for d in devices))}")
    input, weight, bias = _autocast(input, weight, bias)
    for name, t in (("input", input), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in FLOAT_DTYPES:
            raise RuntimeError(f"fastdl.linear: {name} dtype {t.dtype} is not supported; "
                               f"expected one of float16, bfloat16, float32, float64")
    if weight.dtype != input.dtype or (bias is not None and bias.dtype != input.dtype):
        got = ", ".join(f"{n}={t.dtype}" for n, t in (("input", input), ("weight", weight), ("bias", bias))
                        if t is not None)
        raise RuntimeError(f"fastdl.linear: expected input, weight and bias to have the same dtype, got {got}")
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
