"""One custom op per (op, backend), so the backend chosen at call time is part of the traced graph.

The triton variant is a `torch.library.triton_op` where torch has it, which lets torch.compile see
the Triton launches inside; the others are opaque `custom_op`s with a registered fake.
"""
from __future__ import annotations

import torch

BACKEND_NAMES = ("triton", "cupy", "reference")


def define(name: str, backend: str, fn, fake):
    qualname = f"fastdl::{name}_{backend}"
    if backend == "triton" and hasattr(torch.library, "triton_op"):
        return torch.library.triton_op(qualname, fn, mutates_args=())
    op = torch.library.custom_op(qualname, fn, mutates_args=())
    op.register_fake(fake)
    return op


def or_empty(grads, like):
    """An op cannot return None: gradients nobody asked for come back as empty tensors."""
    return tuple(g if g is not None else like.new_empty((0,)) for g in grads)


def fake_dense_grads(input, weight, needs_input_grad: bool, needs_weight_grad: bool, needs_bias_grad: bool):
    """Fake (grad_input, grad_weight, grad_bias) of a dense layer, empty where not needed."""
    empty = input.new_empty((0,))
    return (input.new_empty(input.shape) if needs_input_grad else empty,
            weight.new_empty(weight.shape) if needs_weight_grad else empty,
            weight.new_empty((weight.shape[0],)) if needs_bias_grad else empty)
