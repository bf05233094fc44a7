"""Reference launchers of linear: the same interface as fastdl/backends/triton/linear.py."""
from __future__ import annotations

from fastdl.backends.reference._common import from_numpy, launcher, to_numpy
from fastdl.backends.reference.dropout import keep_rows
from fastdl.reference import dropout as _dropout
from fastdl.reference import linear as _linear

# What one linear_cross_entropy chunk holds per logit here, for its chunk size (fastdl.ops.
# linear_cross_entropy sizes chunks by it): linear_fwd's float64 z and its copy in the input's dtype,
# cross_entropy_fwd's float64 logits, log-probabilities, probabilities, target distribution and
# gradient (with one expression temporary), then linear_bwd's recomputed float64 z: about 8 float64
# arrays of the chunk's shape alive at the peak. Sized by the input's itemsize instead, a chunk's
# temporaries were 16x the budget (1.4 GB of RSS growth at N=1024, V=32000, where torch's unfused
# path grows by 375 MB).
LINEAR_CE_BYTES_PER_LOGIT = 64



@launcher
def linear_fwd(input, weight, bias, activation, negative_slope, dropout=0.0, seed=None):
    out, _ = _linear.forward(to_numpy(input), to_numpy(weight), to_numpy(bias), activation, negative_slope)
    if dropout:
        out = _dropout.forward(out, keep_rows(seed, dropout, *out.shape), dropout)[0]
    return from_numpy(out, input), input.new_empty((0, 0))


@launcher
def linear_bwd(grad_out, input, weight, bias, saved, out, activation, negative_slope,
               needs_input_grad, needs_weight_grad, needs_bias_grad):
    _, ctx = _linear.forward(to_numpy(input), to_numpy(weight), to_numpy(bias), activation, negative_slope)
    grad_input, grad_weight, grad_bias = _linear.backward(to_numpy(grad_out), ctx)
    return (from_numpy(grad_input, input) if needs_input_grad else None,
            from_numpy(grad_weight, weight) if needs_weight_grad else None,
            from_numpy(grad_bias, weight) if needs_bias_grad else None)


@launcher
def linear_grad_weight_accumulate(grad_out, input, grad_weight, grad_bias, accumulate=True):
    g = to_numpy(grad_out)
    start_weight = to_numpy(grad_weight) if accumulate else 0.0
    grad_weight.copy_(from_numpy(start_weight + g.T @ to_numpy(input), grad_weight))
    if grad_bias is not None:
        start_bias = to_numpy(grad_bias) if accumulate else 0.0
        grad_bias.copy_(from_numpy(start_bias + g.sum(axis=0), grad_bias))
