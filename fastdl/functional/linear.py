"""fastdl.functional.linear: torch.nn.functional.linear's semantics with a fused activation."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from fastdl import ops
from fastdl.functional.dropout import check_probability
from fastdl.functional.dropout import dropout as _dropout
from fastdl.ops.dropout import draw_seed
from fastdl.functional._checks import (_TORCH_ACTIVATIONS, _autocast, _check_dense_dtypes, _check_same_device,
                                       _check_tensor, _shape, backend_for, check_activation,
                                       torch_function_dispatch)


@torch_function_dispatch("input", "weight", "bias")
def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None, *, activation: str | None = None,
           negative_slope: float = 0.01, dropout: float = 0.0, training: bool = True) -> Tensor:
    """act(input @ weight.T + bias), with torch.nn.functional.linear's semantics and the activation fused;
    dropout > 0 with training also fuses F.dropout(..., p=dropout) after the activation (its mask
    regenerated from a seed in backward, nothing per element kept: fastdl/ops/linear_dropout.py)."""
    check_activation("linear", activation)
    p = check_probability("linear", dropout)
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
    backend = backend_for(input.device, input, weight, bias)
    op = ops.get("linear", backend)
    input_2d = input.reshape(math.prod(input.shape[:-1]), in_features)
    fuse_dropout = training and 0.0 < p < 1.0
    if bias is not None and row_bias is None:
        # A bias that differs between rows cannot ride in the epilogue; add it unfused.
        z, _ = op(input_2d, weight_2d, None, "none", 0.0)
        out = _TORCH_ACTIVATIONS[activation](z.reshape(out_shape) + bias, negative_slope)
        return _dropout(out, p, training) if p else out
    if fuse_dropout:
        out, _ = ops.get("linear_dropout", backend)(input_2d, weight_2d, row_bias, activation or "none",
                                                    float(negative_slope), p, draw_seed(input.device))
        return out.reshape(out_shape)
    out, _ = op(input_2d, weight_2d, row_bias, activation or "none", float(negative_slope))
    out = out.reshape(out_shape)
    return _dropout(out, p, training) if p else out  # p = 1: out * 0, as torch's dropout
