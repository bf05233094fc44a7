"""Reference launchers: the float64 NumPy oracle behind the same interface as the GPU backends.

Runs anywhere (CUDA tensors make a round trip through host memory); results are rounded to the
input dtype once, at the end. Saves nothing for backward: it recomputes in float64 instead.

Every launcher runs under np.errstate(all="ignore"): inf and nan inputs give inf and nan results
exactly as torch's kernels do, and, as with torch, without a NumPy RuntimeWarning (`launcher`
marks them; a test checks every public launcher is marked).

One module per op (its launchers); this package re-exports them all, as the triton and cupy
backends' packages do.
"""
from __future__ import annotations

from fastdl.backends.reference._common import from_numpy, launcher, to_numpy  # noqa: F401
from fastdl.backends.reference.linear import (LINEAR_CE_BYTES_PER_LOGIT, linear_bwd, linear_fwd,  # noqa: F401
                                              linear_grad_weight_accumulate)
from fastdl.backends.reference.cross_entropy import cross_entropy_bwd, cross_entropy_fwd  # noqa: F401
from fastdl.backends.reference.max_pool2d import max_pool2d_bwd, max_pool2d_fwd  # noqa: F401
from fastdl.backends.reference.conv2d import conv2d_bwd, conv2d_fwd  # noqa: F401
from fastdl.backends.reference.batch_norm import (batch_norm_backward_elemt, batch_norm_backward_reduce,  # noqa: F401
                                                  batch_norm_elemt, batch_norm_stats)
from fastdl.backends.reference.dropout import dropout_bwd, dropout_fwd, dropout_rows  # noqa: F401
