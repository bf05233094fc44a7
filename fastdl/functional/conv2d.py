"""fastdl.functional.conv2d: torch.nn.functional.conv2d's semantics with a fused activation."""
from __future__ import annotations

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from fastdl import ops
from fastdl.functional._checks import (_TORCH_ACTIVATIONS, _autocast, _check_dense_dtypes, _check_same_device,
                                       _check_tensor, _shape, backend_for, check_activation,
                                       torch_function_dispatch)
from fastdl.reference.conv2d import normalize_args


def _sizes(t: Tensor) -> str:
    return str(list(t.shape))


@torch_function_dispatch("input", "weight", "bias")
def conv2d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1, groups=1, *,
           activation: str | None = None, negative_slope: float = 0.01) -> Tensor:
    """act(conv2d(input, weight) + bias), with torch.nn.functional.conv2d's semantics and the activation
    fused: input (N, C, H, W) or unbatched (C, H, W), weight (K, C / groups, R, S), bias (K,) or None;
    stride / dilation an int or a pair, padding an int, a pair, "valid" or "same"."""
    check_activation("conv2d", activation)
    _check_tensor("conv2d", "input", input, 1)
    _check_tensor("conv2d", "weight", weight, 2)
    if bias is not None:
        _check_tensor("conv2d", "bias", bias, 3)
    if input.dim() not in (3, 4):
        raise RuntimeError(f"fastdl.conv2d: Expected 3D (unbatched) or 4D (batched) input to conv2d, but got "
                           f"input of size: {_sizes(input)}")
    if weight.dim() != 4:
        raise RuntimeError(f"fastdl.conv2d: weight must be 4-D (out_channels, in_channels / groups, kH, kW), got "
                           f"weight of size {_sizes(weight)} for input of size {_sizes(input)}")
    try:
        stride, pads, dilation, groups = normalize_args(weight.shape[2:], stride, padding, dilation, groups)
    except (TypeError, RuntimeError) as error:
        raise type(error)(f"fastdl.conv2d: {error} (input {_shape(input)}, weight {_shape(weight)})") from None
    _check_same_device("conv2d", input, weight, bias)
    input, weight, bias = _autocast(input, weight, bias)
    _check_dense_dtypes("conv2d", input, weight, bias)
    batched = input.dim() == 4
    x = input if batched else input.unsqueeze(0)
    N, C, H, W = x.shape
    K, C_g, R, S = weight.shape
    if K == 0 or K % groups:
        raise RuntimeError(f"fastdl.conv2d: Given groups={groups}, expected weight to be at least {groups} and "
                           f"divisible by {groups} at dimension 0, but got weight of size {_sizes(weight)} instead")
    if C != C_g * groups:
        raise RuntimeError(f"fastdl.conv2d: Given groups={groups}, weight of size {_sizes(weight)}, expected "
                           f"input{_sizes(x)} to have {C_g * groups} channels, but got {C} channels instead")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != K):
        raise RuntimeError(f"fastdl.conv2d: Given weight of size {_sizes(weight)}, expected bias to be "
                           f"1-dimensional with {K} elements, but got bias of size {_sizes(bias)} instead")
    (top, bottom), (left, right) = pads
    padded = (H + top + bottom, W + left + right)
    dilated = (dilation[0] * (R - 1) + 1, dilation[1] * (S - 1) + 1)
    if padded[0] < dilated[0] or padded[1] < dilated[1] or H == 0 or W == 0:
        raise RuntimeError(f"fastdl.conv2d: Calculated padded input size per channel: ({padded[0]} x {padded[1]}). "
                           f"Kernel size: ({dilated[0]} x {dilated[1]}). Kernel size can't be greater than actual "
                           f"input size (input {_shape(input)}, weight {_shape(weight)})")
    padding4 = [top, bottom, left, right]
    if suggest_memory_format(weight) == torch.channels_last and suggest_memory_format(x) != torch.channels_last:
        # torch's convolutions return channels_last when the input or the weight is; the ops follow the
        # input, so it goes in as channels_last (the Triton kernels change an NCHW input to that anyway).
        x = x.contiguous(memory_format=torch.channels_last)
    backend = backend_for(input.device, input, weight, bias)
    if N == 0 or C == 0:
        out = _empty_batch(x, weight, bias, stride, padding4, dilation, activation, negative_slope)
    else:
        out, _ = ops.get("conv2d", backend)(x, weight, bias, list(stride), padding4, list(dilation), groups,
                                            activation or "none", float(negative_slope))
    return out if batched else out.squeeze(0)


def _empty_batch(x, weight, bias, stride, padding, dilation, activation, negative_slope):
    """N == 0 (or no input channels): no kernel runs. The result carries a graph to weight and bias so
    their gradients are zeros (or, with C == 0, the bias's), as torch's."""
    N, K, P, Q = ops.conv2d.output_shape(x, weight, stride, padding, dilation)
    z = x.new_zeros((N, K, P, Q)) + weight.sum() * 0 + x.sum() * 0
    if bias is not None:
        z = z + bias.reshape(1, K, 1, 1)
    return _TORCH_ACTIVATIONS[activation](z, negative_slope)
