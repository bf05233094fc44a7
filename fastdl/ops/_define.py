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
