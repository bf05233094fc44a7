"""Float64 NumPy oracle: explicit forward(...) -> (out, saved) and backward(grad_out, saved) -> grads."""
