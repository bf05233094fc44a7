"""fastdl.functional.dropout: torch.nn.functional.dropout's semantics on fastdl's counter-based kernels.

Nothing per element is kept for backward (torch keeps a 1-byte bool mask): the mask is a pure
function of a key drawn per call from torch's generator, and backward regenerates it
(fastdl/ops/dropout.py has the scheme).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch._prims_common import is_non_overlapping_and_dense_or_false as is_non_overlapping_and_dense

from fastdl import ops
from fastdl.functional._checks import FLOAT_DTYPES, _check_tensor, _shape, backend_for, torch_function_dispatch
from fastdl.ops.dropout import draw_seed


def check_probability(op: str, p) -> float:
    """torch's rule: p in [0, 1], else ValueError with torch's message."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"fastdl.{op}: dropout probability has to be between 0 and 1, but got {p}")
    return float(p)


@torch_function_dispatch("input")
def dropout(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
    """torch.nn.functional.dropout: each element zeroed with probability p, the rest scaled by
    1/(1-p). training=False, p=0 and empty input return `input` itself, as torch does; p=1 is
    input * 0 (NaN stays NaN), as torch computes it. inplace writes the result into `input`."""
    op = "dropout"
    _check_tensor(op, "input", input, 1)
    p = check_probability(op, p)
    if not training or p == 0.0 or input.numel() == 0:
        return input
    if p == 1.0:
        zero = torch.zeros((), dtype=input.dtype, device=input.device)
        return input.mul_(zero) if inplace else input * zero
    if input.dtype not in FLOAT_DTYPES:
        raise RuntimeError(f"fastdl.{op}: input dtype {input.dtype} is not supported (input {_shape(input)}); "
                           f"expected one of float16, bfloat16, float32, float64")
    # The kernels walk dense memory; a tensor with gaps or broadcast strides is made dense first,
    # in the layout torch.empty_like would give it.
    dense = input if is_non_overlapping_and_dense(input) else input.clone(memory_format=torch.preserve_format)
    seed = draw_seed(input.device)
    out = ops.get(op, backend_for(input.device, input))(dense, seed, p)
    if inplace:
        return input.copy_(out)
    return out
