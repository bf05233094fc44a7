"""The cupy backend: CUDA C (kernels/cuda/<op>.cu) through CuPy, one launcher module per op, re-exported
here as the launcher interface fastdl.ops calls. `cupy` itself is imported on the first launch only,
so this package imports on machines without it."""
from fastdl.backends.cupy._runtime import BLOCK_COLS, BLOCK_ROWS, NAME_EXPRESSIONS, SOURCE_PRELUDES, THREADS  # noqa: F401
from fastdl.backends.cupy.linear import linear_bwd, linear_fwd, linear_grad_weight_accumulate  # noqa: F401
from fastdl.backends.cupy.cross_entropy import cross_entropy_bwd, cross_entropy_fwd  # noqa: F401
from fastdl.backends.cupy.max_pool2d import max_pool2d_bwd, max_pool2d_fwd  # noqa: F401
from fastdl.backends.cupy.conv2d import conv2d_bwd, conv2d_fwd  # noqa: F401
from fastdl.backends.cupy.batch_norm import (batch_norm_backward_elemt, batch_norm_backward_reduce,  # noqa: F401
                                          batch_norm_elemt, batch_norm_stats)
from fastdl.backends.cupy.dropout import dropout_bwd, dropout_fwd, dropout_rows  # noqa: F401
