"""torch.nn.functional-compatible entry points, with fused extras (activation=), one module per op.

Everything a caller can get wrong is checked here, once, before anything is allocated or
written, with the exception type torch raises for the same mistake (the shared checks live in
_checks.py). Backends trust their inputs.

Each op's module has the op's name, and the package re-exports the function under that name, so
`fastdl.functional.linear` is the function (as torch.nn.functional.linear is); the module is
`sys.modules["fastdl.functional.linear"]`.
"""
from fastdl.functional._checks import (ACTIVATIONS, CHECK_TARGETS_ENV, FLOAT_DTYPES, _TORCH_ACTIVATIONS,  # noqa: F401
                                       check_activation)
from fastdl.functional.linear import linear  # noqa: E402
from fastdl.functional.cross_entropy import cross_entropy  # noqa: E402
from fastdl.functional.linear_cross_entropy import linear_cross_entropy  # noqa: E402
from fastdl.functional.conv2d import conv2d  # noqa: E402
from fastdl.functional.max_pool2d import max_pool2d  # noqa: E402
from fastdl.functional.batch_norm import batch_norm  # noqa: E402
from fastdl.functional.dropout import dropout  # noqa: E402

__all__ = ["linear", "cross_entropy", "linear_cross_entropy", "conv2d", "max_pool2d", "batch_norm", "dropout", "ACTIVATIONS",
           "check_activation"]
