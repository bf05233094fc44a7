"""Softmax cross-entropy: loss and gradient from one program per row, in two sweeps of the row.

Why fused: the unfused path (log_softmax, then nll_loss, then their backwards) writes and reads
(rows, C) tensors four times; for a language model's head that is the largest activation of the
step. Here the forward reads the logits twice and writes the gradient once, and the backward only
scales that gradient by grad_output (into a new tensor: the saved one stays intact).

Every loss torch's cross_entropy computes is sum_c T_c (lse - x_c) for a target distribution T
(see fastdl/reference/cross_entropy.py), whose gradient is softmax(x) * B - T with B = sum_c T_c:

  sweep 1  online softmax: a running max m and a running sum s of exp(x - m), rescaled when m
           grows, so exp never overflows (logits of magnitude 1e4 are fine); a block that is all
           -inf shifts by 0 instead of -inf, so -inf entries give exp(-inf) = 0, never nan.
           Probability targets also sum B here, since the gradient needs it before sweep 2.
  sweep 2  with m and s final: grad = (exp(x - m) / s * B - T) * scale, written once; and the
           row sums the loss needs relative to m, sum_c T_c (x_c - m), computed against the final
           m so no cancellation between terms of size 1e4 creeps in.

The loss is B * log(s) - sum_c T_c (x_c - m); for a class-index target its nll part is taken
from x_t directly, so -inf entries away from the target leave the loss finite (torch's result).
Sweep 2 is skipped when neither the gradient nor a sum over the row is needed (inference on
plain class-index targets reads the row once).

Bad targets: a class index outside [0, C) that is not ignore_index trips tl.device_assert, a
device-side assert (the kernel is compiled with debug=True so the assert is kept); the read of
x_t is clamped to column 0 so a bad index never reads out of bounds even where asserts are off.
Host code never syncs to check targets in the hot path (see fastdl.functional.cross_entropy).

All pointer offsets are int64: rows * C may pass 2**31 (8192 x 262144 already does).

Also here: _scale_rows, the backward (out of place). linear_cross_entropy's in-place
grad_weight += grad.T @ x is _linear_grad_weight_accumulate in kernels/triton/linear.py.
"""
import triton
import triton.language as tl


# The column block of the row sweeps. 4096 fp32 values over 8 warps is 16 per thread: enough
# bytes in flight per SM to saturate HBM without spilling; a vocabulary of 262144 is 64 blocks.
MAX_BLOCK_C = 4096


def block_c(C: int) -> int:
    return max(16, min(MAX_BLOCK_C, triton.next_power_of_2(max(C, 1))))


def num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4 if block >= 512 else 2


@triton.jit
def _probability_target(t_row, weight_ptr, cols, mask, stride_tc, stride_w, eps, eps_per_class,
                        HAS_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """T_c for probability targets over one column block: smoothed, then class-weighted (0 when masked)."""
    q = tl.load(t_row + cols * stride_tc, mask=mask, other=0.0).to(ACC_DTYPE)
    if SMOOTHING:
        q = tl.where(mask, q * (1.0 - eps) + eps_per_class, 0.0)
    if HAS_WEIGHT:
        q *= tl.load(weight_ptr + cols * stride_w, mask=mask, other=0.0).to(ACC_DTYPE)
    return q


@triton.jit(debug=True)
def _cross_entropy_fwd(
    logits_ptr, target_ptr, weight_ptr, weight_sum_ptr, smoothing_ptr, grad_scale_ptr, loss_ptr, grad_ptr,
    # logits (R, C), target (R,) int64 or (R, C) probabilities, weight (C,), weight_sum (),
    # smoothing () (label_smoothing in ACC_DTYPE: a float argument would be rounded to fp32),
    # grad_scale () or (R,), loss (R,) in ACC_DTYPE, grad (R, C) (may be logits itself)
    C,
    stride_lr, stride_lc, stride_tr, stride_tc, stride_w, stride_scale, stride_gr, stride_gc,
    ignore_index,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C).to(tl.int64)
    x_row = logits_ptr + row * stride_lr
    t_row = target_ptr + row * stride_tr
    eps = tl.zeros((), ACC_DTYPE)
    if SMOOTHING:
        eps = tl.load(smoothing_ptr).to(ACC_DTYPE)
    eps_per_class = eps / C

    ignored = False
    target = 0
    x_target = tl.zeros((), ACC_DTYPE)
    if not PROB_TARGET:
        # x_t is read before the gradient may be written over the logits (grad_ptr == logits_ptr);
        # the barrier before sweep 2 keeps every warp's read ahead of every warp's store.
        target = tl.load(t_row)
        ignored = target == ignore_index
        in_range = (target >= 0) & (target < C)
        tl.device_assert(in_range | ignored, "fastdl.cross_entropy: target out of bounds [0, C)")
        target = tl.where(in_range & (target != ignore_index), target, 0)
        x_target = tl.load(x_row + target * stride_lc).to(ACC_DTYPE)

    m = tl.full((), float("-inf"), ACC_DTYPE)
    s = tl.zeros((), ACC_DTYPE)
    b = tl.zeros((), ACC_DTYPE)  # B = sum_c T_c, summed in sweep 1 for probability targets
    for start in range(0, C, BLOCK_C):
        cols = start + offs
        mask = cols < C
        x = tl.load(x_row + cols * stride_lc, mask=mask, other=float("-inf")).to(ACC_DTYPE)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
        m = m_new
        if PROB_TARGET:
            q = _probability_target(t_row, weight_ptr, cols, mask, stride_tc, stride_w, eps, eps_per_class,
                                    HAS_WEIGHT, SMOOTHING, ACC_DTYPE)
            b += tl.sum(q, axis=0)
    shift = tl.where(m == float("-inf"), 0.0, m)
    log_s = tl.log(s)

    scale = tl.load(grad_scale_ptr + row * stride_scale).to(ACC_DTYPE)
    w_target = tl.full((), 1.0, ACC_DTYPE)
    weight_sum = tl.full((), 1.0, ACC_DTYPE) * C
    if not PROB_TARGET:
        if HAS_WEIGHT:
            w_target = tl.load(weight_ptr + target * stride_w).to(ACC_DTYPE)
            if SMOOTHING:
                weight_sum = tl.load(weight_sum_ptr).to(ACC_DTYPE)
        w_target = tl.where(ignored, 0.0, w_target)
        # torch's nll_loss multiplies an ignored row's gradient by 0 (nan stays nan).
        scale = tl.where(ignored, 0.0, scale)
        b = w_target
        if SMOOTHING:
            b = (1.0 - eps) * w_target + tl.where(ignored, 0.0, eps_per_class * weight_sum)

    row_sum = tl.zeros((), ACC_DTYPE)  # sum_c T_c (x_c - m), or sum_c w_c (x_c - m) for smoothing
    if COMPUTE_GRAD or PROB_TARGET or SMOOTHING:
        if COMPUTE_GRAD:
            # Small blocks may be replicated across warps, whose reductions need no barrier: make
            # sure every warp has read x_t before any warp stores over the logits (in place).
            tl.debug_barrier()
        g_row = grad_ptr + row * stride_gr
        for start in range(0, C, BLOCK_C):
            cols = start + offs
            mask = cols < C
            x = tl.load(x_row + cols * stride_lc, mask=mask, other=0.0).to(ACC_DTYPE)
            # Masked lanes are 0 here so every product below stays finite (0 * -inf is nan).
            x_shifted = tl.where(mask, x - shift, 0.0)
            if PROB_TARGET:
                t_dist = _probability_target(t_row, weight_ptr, cols, mask, stride_tc, stride_w, eps, eps_per_class,
                                             HAS_WEIGHT, SMOOTHING, ACC_DTYPE)
                row_sum += tl.sum(t_dist * x_shifted, axis=0)
            else:
                t_dist = tl.where(cols == target, (1.0 - eps) * w_target, 0.0)
                if SMOOTHING:
                    w = tl.where(mask, 1.0, 0.0).to(ACC_DTYPE)
                    if HAS_WEIGHT:
                        w = tl.load(weight_ptr + cols * stride_w, mask=mask, other=0.0).to(ACC_DTYPE)
                    row_sum += tl.sum(w * x_shifted, axis=0)
                    t_dist += tl.where(ignored, 0.0, eps_per_class * w)
            if COMPUTE_GRAD:
                probs = tl.where(mask, tl.exp(x_shifted) / s, 0.0)
                grad = (probs * b - t_dist) * scale
                tl.store(g_row + cols * stride_gc, grad.to(grad_ptr.dtype.element_ty), mask=mask)

    if PROB_TARGET:
        loss = b * log_s - row_sum
    else:
        # (m - x_t) first: both may be ~1e4, their difference is exact.
        loss = w_target * ((shift - x_target) + log_s)
        if SMOOTHING:
            loss = (1.0 - eps) * loss + eps_per_class * (weight_sum * log_s - row_sum)
        loss = tl.where(ignored, 0.0, loss)
    tl.store(loss_ptr + row, loss)


@triton.jit
def _scale_rows(
    x_ptr, scale_ptr, out_ptr,  # x (R, C) read, scale () or (R,), out (R, C) written
    C, stride_xr, stride_xc, stride_scale, stride_or, stride_oc,
    ACC_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[r, :] = x[r, :] * scale[r]: cross-entropy's backward (grad_output per row for
    reduction='none'). Out of place, so the saved gradient x survives for a second backward; the
    bytes moved are those of an in-place scaling (one read, one write)."""
    row = tl.program_id(0).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    mask = cols < C
    scale = tl.load(scale_ptr + row * stride_scale).to(ACC_DTYPE)
    x = tl.load(x_ptr + row * stride_xr + cols * stride_xc, mask=mask, other=0.0).to(ACC_DTYPE)
    tl.store(out_ptr + row * stride_or + cols * stride_oc, (x * scale).to(out_ptr.dtype.element_ty), mask=mask)
