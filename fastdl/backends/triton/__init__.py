"""The triton backend: one launcher module per op (linear.py, cross_entropy.py, ...), re-exported here
as the launcher interface fastdl.ops calls (linear_fwd, linear_bwd, cross_entropy_fwd, ...)."""
from fastdl.backends.triton.linear import linear_bwd, linear_fwd, linear_grad_weight_accumulate  # noqa: F401
from fastdl.backends.triton.cross_entropy import cross_entropy_bwd, cross_entropy_fwd  # noqa: F401
from fastdl.backends.triton.max_pool2d import max_pool2d_bwd, max_pool2d_fwd  # noqa: F401
from fastdl.backends.triton.conv2d import conv2d_bwd, conv2d_fwd  # noqa: F401
from fastdl.backends.triton.dropout import dropout_bwd, dropout_fwd, dropout_rows  # noqa: F401
from fastdl.backends.triton.batch_norm import (batch_norm_backward_elemt, batch_norm_backward_reduce,  # noqa: F401
                                            batch_norm_elemt, batch_norm_stats)
