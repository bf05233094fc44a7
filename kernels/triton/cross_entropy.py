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

Row split (16-byte accesses on any row length): a row whose length is not a multiple of 16
elements (GPT-2's 50257) or that starts off a 16-byte boundary would make every access scalar
(the mask `cols < C` and the row start are not provably aligned), and cost registers (100 instead
of 40 on sm_90, 2 resident blocks per SM instead of 6). Each row is swept instead as an aligned
body, from its first 16-byte boundary, of whole groups of VEC elements (16 bytes), BLOCK_C at a
time with a mask that changes only every VEC columns, so every load and store of the body is 16
bytes; and its ragged ends, a head before that boundary and a tail of fewer than VEC columns,
as one masked block of 2 * VEC. The launcher promises the alignment (VEC > 1) or asks for the
element-wise sweep (VEC = 1: any strides, a base off the 16-byte grid).

Row offsets are int64: rows * C may pass 2**31 (8192 x 262144 already does). On the aligned
path a block's columns are int32 (start + offs, added in int64 and narrowed: the same
instructions once compiled), added to the body's pointer and compared with int32 scalars:
per-element int64 index arithmetic cost 8 registers, and a plain int32 addition is checked for
overflow element by element in the kernel's debug mode (kept for its device assert: more
__assertfail call sites, and instructions in the hot loops). Integer arithmetic is int64
elsewhere. Sweep 2 multiplies by 1 / s instead of dividing by s per element (the division is a
subroutine: fp64 with class weights spilled).

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
def _probability_target(t_base, w_base, cols, mask, stride_tc, stride_w, eps, eps_per_class,
                        HAS_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """T_c for probability targets over one column block: smoothed, then class-weighted (0 when
    masked). cols are relative to t_base (the row's target) and w_base (the weights)."""
    q = tl.load(t_base + cols.to(tl.int64) * stride_tc, mask=mask, other=0.0).to(ACC_DTYPE)
    if SMOOTHING:
        q = tl.where(mask, q * (1.0 - eps) + eps_per_class, 0.0)
    if HAS_WEIGHT:
        q *= tl.load(w_base + cols.to(tl.int64) * stride_w, mask=mask, other=0.0).to(ACC_DTYPE)
    return q


@triton.jit
def _row_split(row_off, C, VEC: tl.constexpr, RAGGED: tl.constexpr):
    """How a row whose first element is element `row_off` of a 16-byte-aligned base splits into a
    ragged head, an aligned body and a ragged tail (see _cross_entropy_fwd). Returns (body_off,
    lead, n_body): the body is the row's columns [lead, lead + n_body), from element body_off of
    the base on, and body_off and n_body are multiples of VEC (body_off on a 16-byte boundary);
    the head [0, min(lead, C)) and the tail [lead + n_body, C) have fewer than VEC columns each.
    All int64.

    Both are computed as (.. // VEC) * VEC, which the compiler's alignment analysis reads as a
    multiple of VEC by itself (a tl.multiple_of hint on an offset can be lost when the
    arithmetic is canonicalized); the hints are kept as documentation of the promise."""
    if RAGGED:
        body_off = (row_off + (VEC - 1)) // VEC * VEC
        lead = body_off - row_off
        n_body = tl.maximum(C - lead, 0) // VEC * VEC
    else:  # every row starts on a boundary and C % VEC == 0 (the launcher checked): all body
        body_off = row_off // VEC * VEC  # == row_off
        lead = row_off * 0  # an int64 0: arithmetic with it stays int64 (see the module docstring)
        n_body = tl.cast(C, tl.int64) // VEC * VEC  # == C
    if VEC > 1:
        body_off = tl.multiple_of(body_off, VEC)
        n_body = tl.multiple_of(n_body, VEC)
    return body_off, lead, n_body


@triton.jit
def _same_phase(body_off, row, stride_r, stride_ref, VEC: tl.constexpr):
    """The body's first element in another (R, C) tensor whose rows (stride_r) are on the same
    16-byte phase as the split tensor's (stride_ref; the launcher checked stride_r - stride_ref is
    a multiple of VEC): row * stride_r + lead, written as a visible multiple of VEC."""
    off = body_off + (row * stride_r - row * stride_ref) // VEC * VEC  # int64 (row is)
    if VEC > 1:
        off = tl.multiple_of(off, VEC)
    return off


@triton.jit
def _narrow(value, VEC: tl.constexpr):
    """An int64 column count or index of a row (magnitude below C < 2**31) as the aligned path's
    int32 columns compare with it. Narrowing keeps the multiple of VEC the compiler sees in
    n_body, so the body's mask stays constant over each 16-byte group."""
    if VEC > 1:
        value = tl.cast(value, tl.int32)
    return value


@triton.jit
def _columns(start, offs, VEC: tl.constexpr):
    """The columns of the block at `start`: start + offs, in int32 on the aligned path, added in
    int64 and narrowed (the same instructions once compiled), so that the kernel's debug mode does
    not check an int32 addition for overflow element by element (see the module docstring)."""
    if VEC > 1:
        return tl.cast(tl.cast(start, tl.int64) + offs.to(tl.int64), tl.int32)
    return start + offs


@triton.jit
def _at(body_ptr, cols, stride, VEC: tl.constexpr):
    """Pointers to a body's columns: unit stride on the aligned path (the launcher's promise), so
    the int32 columns are added as they are (pointer arithmetic is not overflow-checked); int64
    products otherwise."""
    if VEC > 1:
        return body_ptr + cols
    return body_ptr + cols * stride


@triton.jit
def _online_softmax_step(x, m, s):
    """(m, s) updated with one block of x (masked lanes -inf)."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
    return m_new, s


@triton.jit
def _grad_block(x, mask, cols, t_base, w_base, stride_tc, stride_w, target, ignored, w_target, b, inv_s,
                shift, scale, eps, eps_per_class,
                PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr,
                ACC_DTYPE: tl.constexpr):
    """Sweep 2 over one block: (gradient, the block's share of the loss's row sum). x is masked to
    0; cols are the block's offsets from t_base / w_base, and target the target's column counted
    from the same origin (so the comparison costs no per-element index arithmetic)."""
    # Masked lanes are 0 here so every product below stays finite (0 * -inf is nan).
    x_shifted = tl.where(mask, x - shift, 0.0)
    row_sum = tl.zeros((), ACC_DTYPE)
    if PROB_TARGET:
        t_dist = _probability_target(t_base, w_base, cols, mask, stride_tc, stride_w, eps, eps_per_class,
                                     HAS_WEIGHT, SMOOTHING, ACC_DTYPE)
        row_sum += tl.sum(t_dist * x_shifted, axis=0)
    else:
        t_dist = tl.where(cols == target, (1.0 - eps) * w_target, 0.0)
        if SMOOTHING:
            w = tl.where(mask, 1.0, 0.0).to(ACC_DTYPE)
            if HAS_WEIGHT:
                w = tl.load(w_base + cols.to(tl.int64) * stride_w, mask=mask, other=0.0).to(ACC_DTYPE)
            row_sum += tl.sum(w * x_shifted, axis=0)
            t_dist += tl.where(ignored, 0.0, eps_per_class * w)
    probs = tl.where(mask, tl.exp(x_shifted) * inv_s, 0.0)
    return (probs * b - t_dist) * scale, row_sum


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
    VEC: tl.constexpr = 1, RAGGED: tl.constexpr = False, GRAD_ALIGNED: tl.constexpr = False,
    TARGET_ALIGNED: tl.constexpr = False,
):
    """One program per row. The row is swept as a ragged head and tail (fewer than VEC elements
    each, one small masked block) and an aligned body of BLOCK_C blocks.

    VEC > 1 (the launcher's promise): logits' base is 16-byte aligned, stride_lc == 1 and VEC
    elements are 16 bytes, so the body, from the row's first 16-byte boundary, is loaded 16 bytes
    a thread (its mask changes only every VEC columns). RAGGED False: every row starts on a
    boundary and C % VEC == 0 (no head, no tail). GRAD_ALIGNED: the gradient's rows sit on the
    same 16-byte phase as the logits' (contiguous or in place), so its body stores are 16 bytes
    too; TARGET_ALIGNED the same for probability targets. VEC = 1: any strides, one element a
    lane. Without these a row of 50257 elements (GPT-2) lost every 128-bit access.
    """
    row = tl.program_id(0).to(tl.int64)
    # A block's columns, from its block pointers: int32 on the aligned path (unit column strides;
    # see the module docstring), int64 where a column stride multiplies them (column-major logits
    # may make cols * stride pass 2**31).
    offs = tl.arange(0, BLOCK_C)
    if VEC == 1:
        offs = offs.to(tl.int64)
    row_off = row * stride_lr
    x_row = logits_ptr + row_off
    t_row = target_ptr + row * stride_tr
    g_row = grad_ptr + row * stride_gr
    eps = tl.zeros((), ACC_DTYPE)
    if SMOOTHING:
        eps = tl.load(smoothing_ptr).to(ACC_DTYPE)
    eps_per_class = eps / C

    # The body: columns [lead, lead + n_body) from x_body, 16-byte aligned when VEC > 1.
    body_off, lead, n_body = _row_split(row_off, C, VEC, RAGGED)
    x_body = logits_ptr + body_off
    w_body = weight_ptr + lead * stride_w
    if TARGET_ALIGNED:
        t_body = target_ptr + _same_phase(body_off, row, stride_tr, stride_lr, VEC)
    else:
        t_body = t_row + lead * stride_tc
    if GRAD_ALIGNED:
        g_body = grad_ptr + _same_phase(body_off, row, stride_gr, stride_lr, VEC)
    else:
        g_body = g_row + lead * stride_gc

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
    n_cols = _narrow(n_body, VEC)
    for start in range(0, n_cols, BLOCK_C):
        cols = _columns(start, offs, VEC)
        mask = cols < n_cols
        x = tl.load(_at(x_body, cols, stride_lc, VEC), mask=mask, other=float("-inf")).to(ACC_DTYPE)
        m, s = _online_softmax_step(x, m, s)
        if PROB_TARGET:
            b += tl.sum(_probability_target(t_body, w_body, cols, mask, stride_tc, stride_w, eps, eps_per_class,
                                            HAS_WEIGHT, SMOOTHING, ACC_DTYPE), axis=0)
    # The ragged ends as one block of 2 * VEC, in columns counted from the body's first: the head's
    # r - lead < 0 for r < lead, then the tail's from n_body. Swept after the body here and before
    # it in sweep 2, so these indices are live across neither loop.
    rag = tl.arange(0, 2 * VEC).to(tl.int64)
    rag_cols = tl.where(rag < lead, rag, rag + n_body) - lead
    rag_mask = rag_cols < C - lead
    if RAGGED:
        x_rag = tl.load(x_body + rag_cols * stride_lc, mask=rag_mask, other=float("-inf")).to(ACC_DTYPE)
        m, s = _online_softmax_step(x_rag, m, s)
        if PROB_TARGET:
            b += tl.sum(_probability_target(t_body, w_body, rag_cols, rag_mask, stride_tc, stride_w, eps,
                                            eps_per_class, HAS_WEIGHT, SMOOTHING, ACC_DTYPE), axis=0)
    shift = tl.where(m == float("-inf"), 0.0, m)
    log_s = tl.log(s)
    # Sweep 2 multiplies by 1 / s: a division per element was a division subroutine per element
    # (fp64: it pushed cross_entropy_fwd with class weights into spills on sm_90).
    inv_s = 1.0 / s

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
    target_in_body = target - lead  # the target's column counted from the body's first
    if COMPUTE_GRAD or PROB_TARGET or SMOOTHING:
        if COMPUTE_GRAD:
            # Small blocks may be replicated across warps, whose reductions need no barrier: make
            # sure every warp has read x_t before any warp stores over the logits (in place).
            tl.debug_barrier()
        if RAGGED:
            x_rag = tl.load(x_body + rag_cols * stride_lc, mask=rag_mask, other=0.0).to(ACC_DTYPE)
            grad_rag, part = _grad_block(x_rag, rag_mask, rag_cols, t_body, w_body, stride_tc, stride_w,
                                         target_in_body, ignored, w_target, b, inv_s, shift, scale, eps, eps_per_class,
                                         PROB_TARGET, HAS_WEIGHT, SMOOTHING, ACC_DTYPE)
            row_sum += part
            if COMPUTE_GRAD:
                tl.store(g_body + rag_cols * stride_gc, grad_rag.to(grad_ptr.dtype.element_ty), mask=rag_mask)
        target_col = _narrow(target_in_body, VEC)
        for start in range(0, n_cols, BLOCK_C):
            cols = _columns(start, offs, VEC)
            mask = cols < n_cols
            x = tl.load(_at(x_body, cols, stride_lc, VEC), mask=mask, other=0.0).to(ACC_DTYPE)
            grad, part = _grad_block(x, mask, cols, t_body, w_body, stride_tc, stride_w, target_col, ignored,
                                     w_target, b, inv_s, shift, scale, eps, eps_per_class,
                                     PROB_TARGET, HAS_WEIGHT, SMOOTHING, ACC_DTYPE)
            row_sum += part
            if COMPUTE_GRAD:
                tl.store(_at(g_body, cols, stride_gc, VEC), grad.to(grad_ptr.dtype.element_ty), mask=mask)

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
    ACC_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr = 1, RAGGED: tl.constexpr = False,
):
    """out[r, :] = x[r, :] * scale[r]: cross-entropy's backward (grad_output per row for
    reduction='none'). Out of place, so the saved gradient x survives for a second backward; the
    bytes moved are those of an in-place scaling (one read, one write).

    Program (r, j) scales block j of row r's aligned body (see _cross_entropy_fwd: VEC > 1 promises
    x and out 16-byte aligned, unit column strides, rows on the same 16-byte phase, VEC elements of
    the narrower dtype in 16 bytes); programs (r, 0) also scale the ragged head and tail."""
    row = tl.program_id(0).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    scale = tl.load(scale_ptr + row * stride_scale).to(ACC_DTYPE)
    row_off = row * stride_xr
    body_off, lead, n_body = _row_split(row_off, C, VEC, RAGGED)
    x_body = x_ptr + body_off
    out_body = out_ptr + _same_phase(body_off, row, stride_or, stride_xr, VEC)
    mask = cols < n_body
    x = tl.load(x_body + cols * stride_xc, mask=mask, other=0.0).to(ACC_DTYPE)
    tl.store(out_body + cols * stride_oc, (x * scale).to(out_ptr.dtype.element_ty), mask=mask)
    if RAGGED:
        rag = tl.arange(0, 2 * VEC).to(tl.int64)
        rag_cols = tl.where(rag < lead, rag, rag + n_body)
        rag_mask = rag_cols < tl.where(tl.program_id(1) == 0, C, 0)  # the row's first program only
        x_rag = tl.load(x_ptr + row_off + rag_cols * stride_xc, mask=rag_mask, other=0.0).to(ACC_DTYPE)
        tl.store(out_ptr + row * stride_or + rag_cols * stride_oc, (x_rag * scale).to(out_ptr.dtype.element_ty),
                 mask=rag_mask)
