"""fastdl.functional.batch_norm: torch.nn.functional.batch_norm's semantics with a fused activation
and residual: out = act(batch_norm(input) + residual).

Layouts: contiguous input and channels_last / channels_last_3d input go to the kernels as (N, C, S)
views without a copy (S the product of the spatial sizes); anything else is copied to the memory
format torch's batch_norm gives its output (the input's suggested format), which the output keeps.

Running statistics are updated here, with torch ops, once per call and only after every check has
passed: running_mean from the batch mean, running_var from the unbiased variance var * n / (n - 1)
(n = N * S), `momentum` as given; an empty batch leaves them alone (as torch does).
"""
from __future__ import annotations

import numbers

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from fastdl import ops
from fastdl.functional._checks import (FLOAT_DTYPES, _check_same_device, _check_tensor, _shape, backend_for,
                                       check_activation, torch_function_dispatch)
from fastdl.ops.batch_norm import MASK_ACTIVATIONS, is_dense

_OP = "batch_norm"


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "Half", torch.bfloat16: "BFloat16", torch.float32: "Float",
            torch.float64: "Double"}.get(dtype, str(dtype).replace("torch.", ""))


def _check_number(name: str, value, position: int) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{_OP}(): argument '{name}' (position {position}) must be float, not {type(value).__name__}")
    return float(value)


def _check_dtypes(input: Tensor, weight, bias, running_mean, running_var) -> None:
    """torch's rule: the parameters and statistics share one dtype, the input's, or float32 with a
    float16 / bfloat16 input (RuntimeError otherwise)."""
    if input.dtype not in FLOAT_DTYPES:
        raise NotImplementedError(f"fastdl.{_OP}: \"batch_norm\" not implemented for '{_dtype_name(input.dtype)}' "
                                  f"(input {_shape(input)}); expected float16, bfloat16, float32 or float64")
    params = [(n, t) for n, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                                  ("running_var", running_var)) if t is not None]
    if not params:
        return
    param_dtype = params[0][1].dtype
    got = ", ".join(f"{n}={t.dtype}" for n, t in [("input", input)] + params)
    if param_dtype != input.dtype:
        if input.dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError(f"fastdl.{_OP}: mixed dtype: all inputs must share the same dtype ({got})")
        if any(t.dtype != torch.float32 for _, t in params):
            raise RuntimeError(f"fastdl.{_OP}: mixed dtype: with a {input.dtype} input the parameters and "
                               f"statistics must all be float32 or all {input.dtype} ({got})")
    elif any(t.dtype != input.dtype for _, t in params):
        raise RuntimeError(f"fastdl.{_OP}: expected the parameters and statistics to have the input's dtype "
                           f"{input.dtype} (or all float32 for a half input), got {got}")


def check_args(input, running_mean, running_var, weight, bias, training, momentum, eps, activation, negative_slope,
               residual, *, single_batch: bool = True) -> tuple[float, float, float]:
    """Every check of batch_norm's arguments, torch's exception types, nothing written; returns
    (momentum, eps, negative_slope) as floats. single_batch=False (SyncBatchNorm): one value per
    channel on this rank is fine, the check is over all ranks' values."""
    check_activation(_OP, activation)
    _check_tensor(_OP, "input", input, 1)
    for name, t, position in (("running_mean", running_mean, 2), ("running_var", running_var, 3),
                              ("weight", weight, 4), ("bias", bias, 5)):
        if t is not None:
            _check_tensor(_OP, name, t, position)
    if residual is not None and not isinstance(residual, Tensor):
        raise TypeError(f"{_OP}(): argument 'residual' must be Tensor, not {type(residual).__name__}")
    if not isinstance(training, bool):
        raise TypeError(f"{_OP}(): argument 'training' (position 6) must be bool, not {type(training).__name__}")
    momentum = _check_number("momentum", momentum, 7)
    eps = _check_number("eps", eps, 8)
    negative_slope = _check_number("negative_slope", negative_slope, 9)
    if input.dim() < 2:
        # torch's types: an IndexError where its batch-size check or channel lookup fails first (0-D
        # input in training, or 1-D without parameters or statistics), else a RuntimeError.
        given = any(t is not None for t in (running_mean, running_var, weight, bias))
        error = IndexError if training and (input.dim() == 0 or not given) else RuntimeError
        raise error(f"fastdl.{_OP}: expected input with at least 2 dimensions (N, C, ...), got {_shape(input)}")
    N, C = input.shape[:2]
    count = N * torch.Size(input.shape[2:]).numel()
    if training and count == 1 and single_batch:
        raise ValueError(f"fastdl.{_OP}: Expected more than 1 value per channel when training, got input size "
                         f"{input.size()}")
    if training and eps <= 0.0:
        raise ValueError(f"fastdl.{_OP}: batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"fastdl.{_OP}: batch_norm eps must be non-negative, but got {eps}")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"fastdl.{_OP}: running_mean and running_var must either both be None or neither be None")
    if not training and running_mean is None:
        raise RuntimeError(f"fastdl.{_OP}: running_mean must be defined in evaluation mode")
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and t.numel() != C:
            raise RuntimeError(f"fastdl.{_OP}: {name} should contain {C} elements not {t.numel()} "
                               f"(input {_shape(input)}, {name} {_shape(t)})")
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and t.dim() != 1:
            raise RuntimeError(f"fastdl.{_OP}: {name} must be 1-dimensional, got {_shape(t)} (input {_shape(input)})")
    if residual is not None and residual.shape != input.shape:
        raise RuntimeError(f"fastdl.{_OP}: the residual must have the output's shape {list(input.shape)}, got "
                           f"{list(residual.shape)}")
    _check_same_device(_OP, input, running_mean, running_var, weight, bias, residual)
    _check_dtypes(input, weight, bias, running_mean, running_var)
    if residual is not None and residual.dtype != input.dtype:
        raise RuntimeError(f"fastdl.{_OP}: the residual must have the input's dtype {input.dtype}, got "
                           f"{residual.dtype}")
    return momentum, eps, negative_slope


@torch_function_dispatch("input", "running_mean", "running_var", "weight", "bias", "residual")
def batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None = None,
               bias: Tensor | None = None, training: bool = False, momentum: float = 0.1, eps: float = 1e-05, *,
               activation: str | None = None, negative_slope: float = 0.01, residual: Tensor | None = None) -> Tensor:
    """act(batch_norm(input) + residual) with torch.nn.functional.batch_norm's semantics: input
    (N, C, *spatial) (2-D to 5-D and beyond), statistics per channel; training normalizes with the
    batch's statistics (and updates running_mean / running_var in place when given), eval with the
    running statistics. residual (input's shape and dtype) is added before the activation."""
    momentum, eps, negative_slope = check_args(input, running_mean, running_var, weight, bias, training, momentum,
                                               eps, activation, negative_slope, residual)
    N, C = input.shape[:2]
    count = N * torch.Size(input.shape[2:]).numel()
    # -- every check passed: nothing above wrote anything.

    x, w, b, residual, channels_last = layouts(input, weight, bias, residual)
    act = activation or "none"
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias, residual))
    save_mask = act in MASK_ACTIVATIONS and residual is not None and grad
    backend = backend_for(input.device, input, running_mean, running_var, weight, bias, residual)
    out, mean, _, var, _ = ops.get(_OP, backend)(x, w, b, residual, running_mean, running_var, training, eps, act,
                                                 negative_slope, channels_last, save_mask)
    if training and running_mean is not None and count > 0:
        _update_running_stats(running_mean, running_var, mean, var, count, momentum)
    return out


def layouts(input: Tensor, weight, bias, residual):
    """(x, weight, bias, residual, channels_last) as the op takes them: the input in the memory format
    torch gives batch_norm's output (channels_last(_3d) for such 4-D / 5-D input, else contiguous),
    the residual in a dense layout (contiguous if it had none), the parameters as (C,) vectors."""
    fmt = suggest_memory_format(input) if input.dim() in (4, 5) else torch.contiguous_format
    if residual is not None and not is_dense(residual):
        residual = residual.contiguous()
    C = input.shape[1]
    return (input.contiguous(memory_format=fmt), None if weight is None else weight.reshape(C),
            None if bias is None else bias.reshape(C), residual, fmt != torch.contiguous_format)


def _update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, count: int,
                          momentum: float) -> None:
    """torch's update, in the acc dtype, rounded once to the statistics' dtype."""
    with torch.no_grad():
        mean, var = mean.detach(), var.detach()
        unbiased = var * (count / (count - 1))
        running_mean.copy_(mean * momentum + running_mean.to(mean.dtype) * (1 - momentum))
        running_var.copy_(unbiased * momentum + running_var.to(var.dtype) * (1 - momentum))
