"""fastdl: hand-written Triton and CUDA kernels for MLP/CNN layers, checked against float64 NumPy.

    import fastdl
    layer = fastdl.nn.Linear(784, 256, activation="relu")    # drop-in for torch.nn.Linear
    y = fastdl.functional.linear(x, w, b, activation="gelu")
    model = fastdl.convert(model)                            # an existing torch model on fastdl, fused
    with fastdl.use_backend("cupy"): ...     # per thread; fastdl.use_backend("cupy") alone sets it until changed
"""
import os as _os
import sys as _sys

import torch as _torch

# Without a CUDA device Triton can only run through its interpreter, and triton decides that once,
# at its first import (from fastdl, from torch or from the caller's own code). Turn it on before
# that, unless the caller chose. If triton is already imported it is too late: fastdl.backends
# then leaves triton out of available_backends() and says why on use.
if "triton" not in _sys.modules and "TRITON_INTERPRET" not in _os.environ and not _torch.cuda.is_available():
    _os.environ["TRITON_INTERPRET"] = "1"

from fastdl import ops  # noqa: E402,F401  (torch.ops.fastdl.<op>_<backend> are defined on first use: ops.get)
from fastdl import functional, nn  # noqa: E402
from fastdl.backends import available_backends, use_backend  # noqa: E402
from fastdl.convert import convert, revert  # noqa: E402

__version__ = "0.1.0"
__all__ = ["functional", "nn", "convert", "revert", "use_backend", "available_backends", "__version__"]
