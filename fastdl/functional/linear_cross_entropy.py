"""fastdl.functional.linear_cross_entropy: cross_entropy(linear(...)) in row chunks, never holding the logits."""
from __future__ import annotations

import torch
from torch import Tensor

from fastdl import ops
from fastdl.functional._checks import (_autocast, _check_dense_dtypes, _check_ignore_index, _check_index_target,
                                       _check_label_smoothing, _check_same_device, _check_targets_in_range,
                                       _check_tensor, _reduction, _shape, backend_for, torch_function_dispatch)


@torch_function_dispatch("input", "weight", "target", "bias")
def linear_cross_entropy(input: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None, *,
                         ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0) -> Tensor:
    """cross_entropy(linear(input, weight, bias), target, ...) without ever holding the (N, V) logits.

    input (N, H) or (H,), weight (V, H), bias (V,) or None, target (N,) class indices (or (N, V)
    probabilities, not differentiable here). The rows go through in chunks sized to a memory budget
    (fastdl.ops.linear_cross_entropy.CHUNK_BYTES, less when little GPU memory is free): per chunk the
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
    ignore_index = _check_ignore_index(op, ignore_index)
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
    # No classes (every index target ignored): nothing for a kernel to do; torch's degenerate results
    # (nan with label smoothing) come from torch's own ops, as in cross_entropy.
    backend = "torch" if V == 0 else backend_for(input.device, input, weight, bias, target)
    if not prob:
        _check_targets_in_range(op, target, V, ignore_index, backend)
    input_2d = input.reshape(-1, input.shape[-1])
    target_rows = target.reshape(-1, V) if prob else target.reshape(-1).long()
    grad_on = torch.is_grad_enabled()
    needs = [grad_on and t is not None and t.requires_grad for t in (input, weight, bias)]
    loss, *_ = ops.get("linear_cross_entropy", backend)(input_2d, weight, bias, target_rows, ignore_index,
                                                        label_smoothing, reduction, *needs)
    if reduction == "none":
        loss = loss.reshape(logits_shape[:-1])
    # Under autocast torch would run the cross-entropy (so the loss) in float32.
    return loss.float() if autocasting and loss.dtype in (torch.float16, torch.bfloat16) else loss
