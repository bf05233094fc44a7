"""What the triton and cupy launchers share: the codes their kernels are compiled against, and the
outputs they allocate (so both return the same shapes, dtypes and empty-size results).

The CUDA source repeats the codes as #defines; tests/test_cuda_compile.py checks they agree.
"""
from __future__ import annotations

import torch

ACTIVATION_CODES = {None: 0, "relu": 1, "leaky_relu": 2, "gelu": 3, "gelu_tanh": 4,
                    "silu": 5, "sigmoid": 6, "tanh": 7}
# What linear's forward saves for backward, per activation code: relu and leaky_relu a uint8
# mask, gelu / gelu_tanh / silu the pre-activation, sigmoid / tanh / none nothing (they
# differentiate through the output, which autograd keeps anyway).
SAVE_NONE, SAVE_MASK, SAVE_PREACT = 0, 1, 2
SAVE_KIND = {0: SAVE_NONE, 1: SAVE_MASK, 2: SAVE_MASK, 3: SAVE_PREACT, 4: SAVE_PREACT,
             5: SAVE_PREACT, 6: SAVE_NONE, 7: SAVE_NONE}

ACC_DTYPE = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.float32: torch.float32,
             torch.float64: torch.float64}


def linear_outputs(input: torch.Tensor, weight: torch.Tensor, activation):
    """(activation code, out (M, N), saved (M, N) or (0, 0), whether saved is written)."""
    M, N = input.shape[0], weight.shape[0]
    code = ACTIVATION_CODES[activation]
    out = torch.empty((M, N), device=input.device, dtype=input.dtype)
    kind = SAVE_KIND[code]
    if kind == SAVE_NONE:
        return code, out, torch.empty((0, 0), device=input.device, dtype=input.dtype), False
    saved = torch.empty((M, N), device=input.device, dtype=torch.uint8 if kind == SAVE_MASK else input.dtype)
    return code, out, saved, True


def linear_backward_saved(code: int, saved: torch.Tensor, out):
    """The (M, N) tensor the backward kernels read act' from: the mask or pre-activation, or `out`
    for sigmoid and tanh; None without an activation."""
    if code == 0:
        return None
    return out if SAVE_KIND[code] == SAVE_NONE else saved


def cross_entropy_outputs(logits: torch.Tensor, compute_grad: bool, inplace: bool):
    """loss_rows (R,) in the accumulator dtype, and grad_logits: `logits` itself when inplace,
    a new (R, C) tensor, or (0, 0) without a gradient."""
    R, C = logits.shape
    loss_rows = torch.empty((R,), device=logits.device, dtype=ACC_DTYPE[logits.dtype])
    if not compute_grad:
        grad = torch.empty((0, 0), device=logits.device, dtype=logits.dtype)
    elif inplace:
        grad = logits
    else:
        grad = torch.empty((R, C), device=logits.device, dtype=logits.dtype)
    return loss_rows, grad


def check_class_targets(op: str, target: torch.Tensor, C: int, ignore_index: int) -> None:
    """IndexError naming the first class index outside [0, C) that is not ignore_index, as torch.

    Reads the targets on the host: the functional layer calls it for CPU tensors (or when asked on
    CUDA), the reference backend inside its launcher, so compiled graphs are checked too.
    """
    bad = (target != ignore_index) & ((target < 0) | (target >= C))
    if bool(bad.any()):
        value = int(target[bad].reshape(-1)[0])
        raise IndexError(f"{op}: Target {value} is out of bounds. (classes 0..{C - 1}, ignore_index={ignore_index})")
