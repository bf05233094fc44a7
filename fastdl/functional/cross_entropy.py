"""fastdl.functional.cross_entropy: torch.nn.functional.cross_entropy on one fused loss + gradient kernel."""
from __future__ import annotations

import torch
from torch import Tensor

from fastdl import ops
from fastdl.functional._checks import (_autocast, _check_class_weight, _check_ignore_index, _check_index_target,
                                       _check_label_smoothing, _check_same_device, _check_targets_in_range,
                                       _check_tensor, _reduction, _shape, backend_for, torch_function_dispatch)


@torch_function_dispatch("input", "target", "weight")
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
    ignore_index = _check_ignore_index(op, ignore_index, 5)
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
    # No classes at all (every index target ignored, validated above): nothing for a kernel to do,
    # and torch's degenerate results (nan with label smoothing) come from torch's own ops.
    backend = "torch" if C == 0 else backend_for(input.device, input, target, weight)
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
    loss, _ = ops.get("cross_entropy", backend)(logits, target_rows, weight, ignore_index, label_smoothing,
                                                reduction, compute_grad)
    return loss.reshape(rows_shape) if reduction == "none" else loss
