"""torch.library custom ops, one module per op (linear.py, cross_entropy.py, linear_cross_entropy.py, conv2d.py).

    fastdl.ops.get("cross_entropy", "triton")(logits, target, ...)  -> (loss, grad)

`get(op, backend)` returns the callable for an op on a backend; the op is defined (registered
with torch.library, autograd included) on the first `get` for that pair, so importing fastdl
registers nothing and imports neither torch._inductor nor a backend. Backends:

  triton, cupy, reference   torch.ops.fastdl.<op>_<backend>, with autograd (see _define.py)
  torch                     a plain function with the same signature and outputs, computed with
                            torch's own differentiable ops: what the functional layer runs under
                            torch.func transforms and forward-mode AD

Signatures and results (the functional layer has validated and normalized every argument):

  linear(input (M, K), weight (N, K), bias (N,) | None, activation: str, negative_slope: float)
      -> (out (M, N), saved)
  cross_entropy(logits (R, C), target (R,) int64 | (R, C), weight (C,) | None, ignore_index: int,
                label_smoothing: float, reduction: str, compute_grad: bool) -> (loss, grad)
  linear_cross_entropy(input (N, H), weight (V, H), bias (V,) | None, target, ignore_index: int,
                       label_smoothing: float, reduction: str, needs_input_grad: bool,
                       needs_weight_grad: bool, needs_bias_grad: bool)
      -> (loss, grad_input, grad_weight, grad_bias)
  max_pool2d(input (N, C, H, W), kernel_size, stride, padding, dilation (2-element lists),
             ceil_mode: bool, channels_last: bool, return_indices: bool, compute_grad: bool)
      -> (out (N, C, P, Q), saved: torch's int64 indices, uint8 window positions, or empty)
  conv2d(input (N, C, H, W), weight (K, C/groups, R, S), bias (K,) | None, stride [sH, sW],
         padding [top, bottom, left, right], dilation [dH, dW], groups: int, activation: str,
         negative_slope: float) -> (out (N, K, P, Q), saved: uint8 mask, pre-activation or empty)
  batch_norm(input (N, C, S), weight (C,) | None, bias (C,) | None, residual (N, C, S) | None,
             running_mean (C,) | None, running_var (C,) | None, training: bool, eps: float,
             activation: str, negative_slope: float, channels_last: bool, save_mask: bool)
      -> (out (N, C, S), mean, invstd, var (C,) acc dtype (var empty in eval), mask: uint8 or empty)
  dropout(input (dense, any strides), seed (2,) int64 on input's device, p: float in (0, 1)) -> out
      (out has input's strides; the mask a pure function of (seed, p, element): see ops/dropout.py)
  linear_dropout(input, weight, bias, activation, negative_slope, p: float in (0, 1), seed (2,) int64)
      -> (out (M, N) = dropout(act(linear)), saved as linear's): see ops/linear_dropout.py
"""
from __future__ import annotations

import threading

import torch

from fastdl.ops import batch_norm as _batch_norm
from fastdl.ops import conv2d as _conv2d
from fastdl.ops import cross_entropy as _cross_entropy
from fastdl.ops import dropout as _dropout
from fastdl.ops import linear as _linear
from fastdl.ops import linear_cross_entropy as _linear_cross_entropy
from fastdl.ops import linear_dropout as _linear_dropout
from fastdl.ops import max_pool2d as _max_pool2d

OP_NAMES = ("linear", "cross_entropy", "linear_cross_entropy", "max_pool2d", "conv2d", "batch_norm", "dropout", "linear_dropout")
BACKEND_NAMES = ("triton", "cupy", "reference", "torch")

_MODULES = {"linear": _linear, "cross_entropy": _cross_entropy, "linear_cross_entropy": _linear_cross_entropy,
            "max_pool2d": _max_pool2d, "conv2d": _conv2d, "batch_norm": _batch_norm,
            "dropout": _dropout, "linear_dropout": _linear_dropout}
_defined: set[tuple[str, str]] = set()
_lock = threading.Lock()


def _define(op: str, backend: str) -> str:
    """Registers torch.ops.fastdl.<op>_<backend> (with its autograd) once; returns its name."""
    if (op, backend) not in _defined:
        with _lock:  # torch.library refuses a second definition of the same name
            if (op, backend) not in _defined:
                _MODULES[op].define_op(backend)
                _defined.add((op, backend))
    return f"{op}_{backend}"


# Under torch.compile, Dynamo calls _define instead of tracing it (a definition inside a traced
# region would break the graph) and takes the name it returns as a constant: what
# torch.compiler.assume_constant_result marks, set here without it, since it imports torch._dynamo
# (over a second) at `import fastdl`. tests/test_autograd.py checks torch still uses this name.
_define._dynamo_marked_constant = True


def get(op: str, backend: str):
    """The callable of `op` on `backend` (an OpOverload, or the "torch" entry's function), defined
    on first use; thread-safe, and traceable by torch.compile (fullgraph) even on first use."""
    if op not in OP_NAMES:
        raise ValueError(f"fastdl.ops: unknown op {op!r}; expected one of {OP_NAMES}")
    if backend not in BACKEND_NAMES:
        raise ValueError(f"fastdl.ops: unknown backend {backend!r}; expected one of {BACKEND_NAMES}")
    if backend == "torch":
        return _MODULES[op].torch_composite
    return getattr(torch.ops.fastdl, _define(op, backend)).default
