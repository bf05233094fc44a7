"""What every Triton launcher shares: the launch wrapper torch.compile sees through, accumulator dtypes
and the matmul input precision."""
from __future__ import annotations

import torch
import triton.language as tl

try:  # torch >= 2.6: lets torch.compile see through the launch (torch.library.triton_op).
    from torch.library import wrap_triton
except ImportError:  # pragma: no cover - older torch
    def wrap_triton(kernel):
        return kernel

ACC_DTYPE = {torch.float16: tl.float32, torch.bfloat16: tl.float32, torch.float32: tl.float32,
             torch.float64: tl.float64}


def input_precision(dtype: torch.dtype) -> str:
    # TF32 follows torch's own switch, so fastdl matches F.linear's numerics on Ampere+.
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"
