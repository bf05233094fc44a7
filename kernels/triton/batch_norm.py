"""Batch normalization: per-channel statistics, the normalize pass with a fused activation and
residual, and the backward's reduction and elementwise passes (torch's SyncBatchNorm pieces:
batch_norm_stats, batch_norm_elemt, batch_norm_backward_reduce, batch_norm_backward_elemt; the
launchers are fastdl/backends/triton/batch_norm.py, the contract they keep is theirs).

Why it looks like this: every pass is memory-bound. The forward reads x once for the statistics
and once more for the normalize pass, which writes out (and a 1-byte relu mask instead of
re-reading the residual in backward); the backward reads grad_out and x once for the two sums and
once more for grad_input (and the residual's gradient). With an activation and a residual whose
gradient is wanted, the reduction pass writes dy = grad_out * act'(pre) (that gradient) as it sums,
and the elementwise pass reads dy and x only: ResNet's relu + residual block tail moves, per
element, 4 activation-sized accesses + 1 mask byte forward and 6 + 1 mask byte backward, against
torch eager's 7 and 6 (fastdl.inspection.traffic: bf16 0.65x forward, 0.85x forward+backward).
What matters is that every byte moves at full bandwidth: coalesced 16-byte accesses in both
layouts, and enough programs in flight even when channels are few.

Tensors are (N, C, S) strided views, each with its own three strides. Two fast layouts:
  CHANNELS_TILE (stride_c == 1, NHWC): a tile is [BLOCK_ROWS pixels x BLOCK_COLS channels], the
    pixel index r = n * S + s flattened (divided once per row, not per element); channels are
    contiguous, so with C a multiple of 16 (the runtime's divisibility specialization) a tile's
    rows are 16-byte vector accesses.
  rows (stride_s == 1, NCHW): the elementwise kernels take [BLOCK_ROWS (n, c) rows x BLOCK_COLS
    positions s]; the reductions take one channel per program and [BLOCK_ROWS images n x
    BLOCK_COLS positions s]. ALIGN (from the launcher: the power of two, up to 16 bytes, dividing
    S and every row stride) makes a row's accesses that many elements wide.
Any other strides run correctly on either path, slower.

Reductions (stats, backward_reduce) are split: a program reduces a run of PER rows (pixels for
CHANNELS_TILE, images for rows) of its channels (block) into one partial, and a second small
kernel combines each channel's partials in a fixed order (chunks in index order, a fixed tree
within a chunk): no atomics, bitwise the same result on every run. The launcher chooses the
split (see _reduction_plan there): enough programs to fill the GPU (4 per SM) when channels are
few (ResNet stage 1: 64 channels, one or a few channel blocks), at least MIN_BLOCKS_PER_SPLIT tiles
per program so a partial is worth its write, at most MAX_SPLITS partials per channel. Block sizes
are fixed by the launcher, not autotuned: where the partial boundaries fall decides the bits of
the result, so they must not depend on which config a benchmark happened to pick.

Statistics: Welford per lane (each lane of a tile keeps its own count, mean and M2 over the rows it
visits; in the full tiles every valid lane has the same count, so the update divides by a scalar),
Chan's merge across lanes (_welford_reduce: all lanes at once, with tl.sum), across partials the same. The data are
shifted by one value of the channel (x[0, c, 0]) before anything is summed: x - shift is exact for
data near it, so a channel with mean 1e4 and std 1 in float32 keeps its variance to float32
precision instead of to ulp(1e4). Sums in ACC_DTYPE (float32; float64 for float64 input).

Offsets are int64 (n * stride_n may pass 2**31); the flattened row index is int32 unless the
launcher says it may pass 2**31 (ROW64).
"""
import triton
import triton.language as tl

from .linear import _activation, _activation_grad  # noqa: F401  (the same formulas as linear's)

# Elements of an elementwise tile: 2048 over 4 warps (16 a thread: two 16-byte accesses per tensor
# in bf16, four in fp32); 1024 in fp64 (the same 128 bytes a thread), which keeps the GELU
# derivative's double math clear of spills.
ELEMENTWISE_TILE = 2048
ELEMENTWISE_TILE_FP64 = 1024
ELEMENTWISE_WARPS = 4
# Reduction tiles: 4096 over 8 warps (16 lanes of Welford state a thread, 8 KB of bf16 in flight a
# program per step); 2048 in fp64.
REDUCE_TILE = 4096
REDUCE_TILE_FP64 = 2048
REDUCE_WARPS = 8
MAX_BLOCK_C = 64          # channels of a CHANNELS_TILE tile: 128 bytes of bf16 per pixel row
MIN_BLOCK_S = 16
PROGRAMS_PER_SM = 4
MIN_BLOCKS_PER_SPLIT = 4
MAX_SPLITS = 1024
# The combine kernels: [COMBINE_BLOCK_P partials x COMBINE_BLOCK_C channels] per step.
COMBINE_BLOCK_C = 8
COMBINE_BLOCK_P = 256


@triton.jit
def _welford_combine(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s merge of two (count, mean, M2); either count may be 0."""
    n = n_a + n_b
    w = tl.where(n > 0, n_b / tl.maximum(n, 1.0), 0.0)
    delta = mean_b - mean_a
    return n, mean_a + delta * w, m2_a + m2_b + delta * delta * n_a * w


@triton.jit
def _welford_reduce(count, mean, m2, axis: tl.constexpr):
    """Chan's merge of many (count, mean, M2) along `axis` at once: mean = sum(n_i mean_i) / n,
    M2 = sum(M2_i + n_i (mean_i - mean)^2); tl.sum's fixed tree (deterministic, and two plain sums
    where a tl.reduce with a tuple combine would be interpreted one element at a time)."""
    n = tl.sum(count, axis)
    merged_mean = tl.sum(count * mean, axis) / tl.maximum(n, 1.0)
    deviation = mean - tl.expand_dims(merged_mean, axis)
    return n, merged_mean, tl.sum(m2 + count * deviation * deviation, axis)


@triton.jit
def _rows(first, BLOCK: tl.constexpr, ROW64: tl.constexpr):
    # (One return: a jit function's returns must agree in type, even under a constexpr if.)
    if ROW64:
        rows = first.to(tl.int64) + tl.arange(0, BLOCK)
    else:
        rows = first + tl.arange(0, BLOCK)
    return rows


@triton.jit
def _offsets(n, a, b, stride_n, stride_c, stride_s, CHANNELS_TILE: tl.constexpr, ALIGN: tl.constexpr):
    """[rows, cols] int64 offsets. CHANNELS_TILE: a = s per row, b = c per column; otherwise
    a = c per row (or one channel), b = s per column."""
    if CHANNELS_TILE:
        row = n.to(tl.int64) * stride_n + a.to(tl.int64) * stride_s
        col = b.to(tl.int64) * stride_c
    else:
        row = tl.multiple_of(n.to(tl.int64) * stride_n + a.to(tl.int64) * stride_c, ALIGN)
        col = b.to(tl.int64) * stride_s
    return row[:, None] + col[None, :]


@triton.jit
def _per_channel(ptr, c, c_ok, other, ACC_DTYPE: tl.constexpr, CHANNELS_TILE: tl.constexpr):
    """A (C,) parameter at channels c, as a row [1, cols] (CHANNELS_TILE) or a column [rows, 1]."""
    v = tl.load(ptr + c, mask=c_ok, other=other).to(ACC_DTYPE)
    if CHANNELS_TILE:
        tile = v[None, :]
    else:
        tile = v[:, None]
    return tile


@triton.jit
def _scale_shift(invstd, weight_ptr, bias_ptr, c, c_ok, ACC_DTYPE: tl.constexpr, CHANNELS_TILE: tl.constexpr,
                 HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """(invstd * weight, bias) per channel: pre = (x - mean) * scale + shift."""
    scale = invstd
    if HAS_WEIGHT:
        scale = invstd * _per_channel(weight_ptr, c, c_ok, 1.0, ACC_DTYPE, CHANNELS_TILE)
    shift = tl.zeros_like(scale)
    if HAS_BIAS:
        shift = _per_channel(bias_ptr, c, c_ok, 0.0, ACC_DTYPE, CHANNELS_TILE)
    return scale, shift


@triton.jit
def _dy(grad, x, mean, scale, shift, residual, saved_mask, negative_slope,
        ACTIVATION: tl.constexpr, USE_MASK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """grad_out * act'(pre): from the forward's mask (relu, leaky_relu), or with pre recomputed;
    torch's conventions at pre == 0 (relu' = 0, leaky_relu' = negative_slope)."""
    dy = grad
    if ACTIVATION != 0:
        if USE_MASK:
            dy = _activation_grad(grad, saved_mask, negative_slope, ACTIVATION)
        else:
            pre = (x - mean) * scale + shift
            if HAS_RESIDUAL:
                pre += residual
            if ACTIVATION == 1 or ACTIVATION == 2:
                saved = (pre > 0).to(tl.int8)
            elif ACTIVATION == 6 or ACTIVATION == 7:
                saved = _activation(pre, negative_slope, ACTIVATION)  # sigmoid, tanh: from the output
            else:
                saved = pre
            dy = _activation_grad(grad, saved, negative_slope, ACTIVATION)
    return dy


@triton.jit
def _elementwise_tile(pid, N, C, S, CHANNELS_TILE: tl.constexpr, ROW64: tl.constexpr, ALIGN: tl.constexpr,
                      BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """(n [rows], a [rows], b [cols], c, c_ok, mask [rows, cols]) of an elementwise program: see
    _offsets for a and b; c / c_ok are the channels of the columns (CHANNELS_TILE) or rows."""
    if CHANNELS_TILE:
        col_blocks = tl.cdiv(C, BLOCK_COLS)
        r = _rows((pid // col_blocks) * BLOCK_ROWS, BLOCK_ROWS, ROW64)
        row_ok = r < N * S
        c = (pid % col_blocks) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        c_ok = c < C
        n = r // S
        a = r % S
        b = c
        mask = row_ok[:, None] & c_ok[None, :]
    else:
        col_blocks = tl.cdiv(S, BLOCK_COLS)
        r = _rows((pid // col_blocks) * BLOCK_ROWS, BLOCK_ROWS, ROW64)
        c_ok = r < N * C
        n = r // C
        c = r % C
        a = c
        b = (pid % col_blocks) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        # b < S, written so the mask is constant over ALIGN columns (ALIGN divides S): vector accesses.
        mask = c_ok[:, None] & (b // ALIGN < S // ALIGN)[None, :]
    return n, a, b, c, c_ok, mask


@triton.jit
def _batch_norm_elemt(
    x_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, residual_ptr, out_ptr, mask_ptr,
    # x, residual, out (N, C, S) in x's dtype; mask (N, C, S) uint8; mean, invstd (C,) acc dtype;
    # weight, bias (C,) in x's dtype or float32
    N, C, S, negative_slope,
    stride_xn, stride_xc, stride_xs, stride_rn, stride_rc, stride_rs,
    stride_on, stride_oc, stride_os, stride_mn, stride_mc, stride_ms,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_MASK: tl.constexpr,
    ACTIVATION: tl.constexpr, ACC_DTYPE: tl.constexpr, CHANNELS_TILE: tl.constexpr, ROW64: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    """out = act((x - mean) * invstd * weight + bias (+ residual)), rounded once; mask = pre > 0."""
    n, a, b, c, c_ok, mask = _elementwise_tile(tl.program_id(0), N, C, S, CHANNELS_TILE, ROW64, ALIGN,
                                               BLOCK_ROWS, BLOCK_COLS)
    mean = _per_channel(mean_ptr, c, c_ok, 0.0, ACC_DTYPE, CHANNELS_TILE)
    invstd = _per_channel(invstd_ptr, c, c_ok, 0.0, ACC_DTYPE, CHANNELS_TILE)
    scale, shift = _scale_shift(invstd, weight_ptr, bias_ptr, c, c_ok, ACC_DTYPE, CHANNELS_TILE, HAS_WEIGHT, HAS_BIAS)
    x = tl.load(x_ptr + _offsets(n, a, b, stride_xn, stride_xc, stride_xs, CHANNELS_TILE, ALIGN),
                mask=mask, other=0.0).to(ACC_DTYPE)
    # (x - mean) first: exact for x near the mean, where x * scale - mean * scale would cancel.
    pre = (x - mean) * scale + shift
    if HAS_RESIDUAL:
        pre += tl.load(residual_ptr + _offsets(n, a, b, stride_rn, stride_rc, stride_rs, CHANNELS_TILE, ALIGN),
                       mask=mask, other=0.0).to(ACC_DTYPE)
    out = _activation(pre, negative_slope, ACTIVATION)
    tl.store(out_ptr + _offsets(n, a, b, stride_on, stride_oc, stride_os, CHANNELS_TILE, ALIGN),
             out.to(out_ptr.dtype.element_ty), mask=mask)
    if HAS_MASK:
        tl.store(mask_ptr + _offsets(n, a, b, stride_mn, stride_mc, stride_ms, CHANNELS_TILE, ALIGN),
                 (pre > 0).to(tl.uint8), mask=mask)


@triton.jit
def _batch_norm_backward_elemt(
    grad_out_ptr, x_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, residual_ptr, mask_ptr,
    mean_dy_ptr, mean_dy_xmu_ptr, grad_input_ptr, grad_residual_ptr,
    # grad_out, x, residual, grad_input, grad_residual (N, C, S) in x's dtype; mask uint8;
    # mean, invstd, mean_dy, mean_dy_xmu (C,) acc dtype; weight, bias (C,)
    N, C, S, negative_slope,
    stride_gn, stride_gc, stride_gs, stride_xn, stride_xc, stride_xs, stride_rn, stride_rc, stride_rs,
    stride_mn, stride_mc, stride_ms, stride_in, stride_ic, stride_is, stride_qn, stride_qc, stride_qs,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, USE_MASK: tl.constexpr,
    TRAINING: tl.constexpr, WRITE_GRAD_INPUT: tl.constexpr, WRITE_GRAD_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr, ACC_DTYPE: tl.constexpr, CHANNELS_TILE: tl.constexpr, ROW64: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    """dy = grad_out * act'(pre); grad_residual = dy; grad_input =
    (dy - mean_dy - (x - mean) * invstd^2 * mean_dy_xmu) * invstd * weight (TRAINING), dy * invstd * weight (eval)."""
    n, a, b, c, c_ok, mask = _elementwise_tile(tl.program_id(0), N, C, S, CHANNELS_TILE, ROW64, ALIGN,
                                               BLOCK_ROWS, BLOCK_COLS)
    mean = _per_channel(mean_ptr, c, c_ok, 0.0, ACC_DTYPE, CHANNELS_TILE)
    invstd = _per_channel(invstd_ptr, c, c_ok, 0.0, ACC_DTYPE, CHANNELS_TILE)
    scale, shift = _scale_shift(invstd, weight_ptr, bias_ptr, c, c_ok, ACC_DTYPE, CHANNELS_TILE, HAS_WEIGHT, HAS_BIAS)
    grad = tl.load(grad_out_ptr + _offsets(n, a, b, stride_gn, stride_gc, stride_gs, CHANNELS_TILE, ALIGN),
                   mask=mask, other=0.0).to(ACC_DTYPE)
    x = tl.load(x_ptr + _offsets(n, a, b, stride_xn, stride_xc, stride_xs, CHANNELS_TILE, ALIGN),
                mask=mask, other=0.0).to(ACC_DTYPE)
    residual = x
    if HAS_RESIDUAL:  # read only to recompute pre (no mask saved, an activation)
        residual = tl.load(residual_ptr + _offsets(n, a, b, stride_rn, stride_rc, stride_rs, CHANNELS_TILE, ALIGN),
                           mask=mask, other=0.0).to(ACC_DTYPE)
    saved_mask = grad
    if USE_MASK:
        saved_mask = tl.load(mask_ptr + _offsets(n, a, b, stride_mn, stride_mc, stride_ms, CHANNELS_TILE, ALIGN),
                             mask=mask, other=0)
    dy = _dy(grad, x, mean, scale, shift, residual, saved_mask, negative_slope, ACTIVATION, USE_MASK, HAS_RESIDUAL)
    if WRITE_GRAD_RESIDUAL:
        tl.store(grad_residual_ptr + _offsets(n, a, b, stride_qn, stride_qc, stride_qs, CHANNELS_TILE, ALIGN),
                 dy.to(grad_residual_ptr.dtype.element_ty), mask=mask)
    if WRITE_GRAD_INPUT:
        if TRAINING:
            mean_dy = _per_channel(mean_dy_ptr, c, c_ok, 0.0, ACC_DTYPE, CHANNELS_TILE)
            projection = invstd * invstd * _per_channel(mean_dy_xmu_ptr, c, c_ok, 0.0, ACC_DTYPE, CHANNELS_TILE)
            grad_input = (dy - mean_dy - (x - mean) * projection) * scale
        else:
            grad_input = dy * scale
        tl.store(grad_input_ptr + _offsets(n, a, b, stride_in, stride_ic, stride_is, CHANNELS_TILE, ALIGN),
                 grad_input.to(grad_input_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reduction_program(pid, num_rows, C, S, PER, CHANNELS_TILE: tl.constexpr, ALIGN: tl.constexpr,
                       BLOCK_COLS: tl.constexpr):
    """A reduction program's channels, columns and run of rows: (c, c_ok, cols, col_ok, lo, hi,
    partial index); num_rows is N * S (CHANNELS_TILE) or N. CHANNELS_TILE: columns are channels c, rows pixels in [lo, hi) of N * S, and
    the program is partial pid // channel blocks. Rows: one channel c, columns positions s of one
    block, rows images in [lo, hi) of N; partial (split * S blocks + s block)."""
    if CHANNELS_TILE:
        col_blocks = tl.cdiv(C, BLOCK_COLS)
        split = pid // col_blocks
        c = (pid % col_blocks) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        c_ok = c < C
        cols = c
        col_ok = c_ok
        lo = split.to(tl.int64) * PER
        hi = tl.minimum(lo + PER, num_rows)
        partial = split
    else:
        s_blocks = tl.cdiv(S, BLOCK_COLS)
        s_block = pid % s_blocks
        c = (pid // s_blocks) % C
        c_ok = c < C
        split = pid // s_blocks // C
        cols = s_block * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        col_ok = cols // ALIGN < S // ALIGN  # cols < S, constant over ALIGN columns
        lo = split.to(tl.int64) * PER
        hi = tl.minimum(lo + PER, num_rows)
        partial = split * s_blocks + s_block
    return c, c_ok, cols, col_ok, lo, hi, partial


@triton.jit
def _reduction_offsets(r, cols, c, S, stride_n, stride_c, stride_s, CHANNELS_TILE: tl.constexpr,
                       ROW64: tl.constexpr, ALIGN: tl.constexpr):
    """Offsets of rows r (pixels, or images of channel c) x columns (channels, or positions)."""
    if CHANNELS_TILE:
        if not ROW64:
            r = r.to(tl.int32)
        offs = _offsets(r // S, r % S, cols, stride_n, stride_c, stride_s, True, 1)
    else:
        row = tl.multiple_of(r * stride_n + c.to(tl.int64) * stride_c, ALIGN)
        offs = row[:, None] + (cols.to(tl.int64) * stride_s)[None, :]
    return offs


@triton.jit
def _shift(x_ptr, c, c_ok, stride_xc, ACC_DTYPE: tl.constexpr):
    """x[0, c, 0]: the value each channel's data are shifted by before they are summed."""
    return tl.load(x_ptr + c.to(tl.int64) * stride_xc, mask=c_ok, other=0.0).to(ACC_DTYPE)


@triton.jit
def _batch_norm_stats(
    x_ptr, count_ptr, mean_ptr, m2_ptr,
    # x (N, C, S). FINAL: mean_ptr, m2_ptr are the results mean and (biased) var (C,); otherwise
    # count, mean (of x - x[0, c, 0]) and M2 partials (P, C), acc dtype
    num_rows, C, S, PER,  # num_rows: N * S (CHANNELS_TILE) or N; PER of them a program, a multiple of BLOCK_ROWS
    stride_xn, stride_xc, stride_xs,
    ACC_DTYPE: tl.constexpr, CHANNELS_TILE: tl.constexpr, FINAL: tl.constexpr, ROW64: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    c, c_ok, cols, col_ok, lo, hi, partial = _reduction_program(tl.program_id(0), num_rows, C, S, PER, CHANNELS_TILE,
                                                                ALIGN, BLOCK_COLS)
    shift = _shift(x_ptr, c, c_ok, stride_xc, ACC_DTYPE)
    if CHANNELS_TILE:
        shift_tile = shift[None, :]
    else:
        shift_tile = shift
    mean = tl.zeros((BLOCK_ROWS, BLOCK_COLS), ACC_DTYPE)
    m2 = tl.zeros((BLOCK_ROWS, BLOCK_COLS), ACC_DTYPE)
    full = ((hi - lo) // BLOCK_ROWS).to(tl.int32)
    # Full tiles: every valid lane takes one value per step, so they share the count k.
    for k in range(full):
        r = lo + k * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        offs = _reduction_offsets(r, cols, c, S, stride_xn, stride_xc, stride_xs, CHANNELS_TILE, ROW64, ALIGN)
        x = tl.load(x_ptr + offs, mask=col_ok[None, :], other=0.0).to(ACC_DTYPE) - shift_tile
        delta = x - mean
        mean += delta * (tl.full((), 1.0, ACC_DTYPE) / (k + 1))
        m2 += delta * (x - mean)
    count = tl.where(col_ok[None, :], full.to(ACC_DTYPE), 0.0) + tl.zeros((BLOCK_ROWS, BLOCK_COLS), ACC_DTYPE)
    # The run's last, partial tile (a masked no-op when there is none): per-lane counts.
    r = lo + full.to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    ok = (r < hi)[:, None] & col_ok[None, :]
    offs = _reduction_offsets(r, cols, c, S, stride_xn, stride_xc, stride_xs, CHANNELS_TILE, ROW64, ALIGN)
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(ACC_DTYPE) - shift_tile
    count = tl.where(ok, count + 1.0, count)
    delta = x - mean
    mean = tl.where(ok, mean + delta / tl.maximum(count, 1.0), mean)
    m2 = tl.where(ok, m2 + delta * (x - mean), m2)

    count, mean, m2 = _welford_reduce(count, mean, m2, 0)
    if not CHANNELS_TILE:
        count, mean, m2 = _welford_reduce(count, mean, m2, 0)
    if FINAL:
        tl.store(mean_ptr + c, mean + shift, mask=c_ok)
        tl.store(m2_ptr + c, m2 / count, mask=c_ok)
    else:
        at = partial.to(tl.int64) * C + c
        tl.store(count_ptr + at, count, mask=c_ok)
        tl.store(mean_ptr + at, mean, mask=c_ok)
        tl.store(m2_ptr + at, m2, mask=c_ok)


@triton.jit
def _batch_norm_stats_combine(
    x_ptr, count_ptr, partial_mean_ptr, partial_m2_ptr, mean_ptr, var_ptr,
    # partials (P, C) from _batch_norm_stats; mean, var (C,) acc dtype; x for the shift x[0, c, 0]
    C, P, stride_xc,
    ACC_DTYPE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Each channel's partials merged in a fixed order: chunks of BLOCK_P in index order, a fixed
    tree within a chunk."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    count = tl.zeros((BLOCK_C,), ACC_DTYPE)
    mean = tl.zeros((BLOCK_C,), ACC_DTYPE)
    m2 = tl.zeros((BLOCK_C,), ACC_DTYPE)
    for first in range(0, P, BLOCK_P):
        p = first + tl.arange(0, BLOCK_P)
        ok = (p < P)[:, None] & c_ok[None, :]
        at = p.to(tl.int64)[:, None] * C + c[None, :]
        chunk_count, chunk_mean, chunk_m2 = _welford_reduce(tl.load(count_ptr + at, mask=ok, other=0.0),
                                                            tl.load(partial_mean_ptr + at, mask=ok, other=0.0),
                                                            tl.load(partial_m2_ptr + at, mask=ok, other=0.0), 0)
        count, mean, m2 = _welford_combine(count, mean, m2, chunk_count, chunk_mean, chunk_m2)
    tl.store(mean_ptr + c, mean + _shift(x_ptr, c, c_ok, stride_xc, ACC_DTYPE), mask=c_ok)
    tl.store(var_ptr + c, m2 / count, mask=c_ok)


@triton.jit
def _batch_norm_backward_reduce(
    grad_out_ptr, x_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, residual_ptr, mask_ptr, dy_ptr,
    sum_dy_ptr, sum_dy_xmu_ptr,
    # grad_out, x, residual, dy (N, C, S); mask uint8. FINAL: sum_dy, sum_dy_xmu (C,) results; otherwise
    # their partials (P, C), acc dtype
    num_rows, C, S, PER, negative_slope,  # as _batch_norm_stats's
    stride_gn, stride_gc, stride_gs, stride_xn, stride_xc, stride_xs, stride_rn, stride_rc, stride_rs,
    stride_mn, stride_mc, stride_ms, stride_dn, stride_dc, stride_ds,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, USE_MASK: tl.constexpr,
    WRITE_DY: tl.constexpr, ACTIVATION: tl.constexpr, ACC_DTYPE: tl.constexpr, CHANNELS_TILE: tl.constexpr,
    FINAL: tl.constexpr, ROW64: tl.constexpr, ALIGN: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """The sums of dy = grad_out * act'(pre) and dy * (x - mean). WRITE_DY: dy is also stored, in
    dy's dtype, and the sums take it as stored (the value the elementwise pass then reads back)."""
    c, c_ok, cols, col_ok, lo, hi, partial = _reduction_program(tl.program_id(0), num_rows, C, S, PER, CHANNELS_TILE,
                                                                ALIGN, BLOCK_COLS)
    if CHANNELS_TILE:
        mean = _per_channel(mean_ptr, c, c_ok, 0.0, ACC_DTYPE, True)
        invstd = _per_channel(invstd_ptr, c, c_ok, 0.0, ACC_DTYPE, True)
        scale, shift = _scale_shift(invstd, weight_ptr, bias_ptr, c, c_ok, ACC_DTYPE, True, HAS_WEIGHT, HAS_BIAS)
    else:  # one channel: scalars
        mean = tl.load(mean_ptr + c).to(ACC_DTYPE)
        scale = tl.load(invstd_ptr + c).to(ACC_DTYPE)
        if HAS_WEIGHT:
            scale = scale * tl.load(weight_ptr + c).to(ACC_DTYPE)
        shift = tl.zeros_like(scale)
        if HAS_BIAS:
            shift = tl.load(bias_ptr + c).to(ACC_DTYPE)
    sum_dy = tl.zeros((BLOCK_ROWS, BLOCK_COLS), ACC_DTYPE)
    sum_dy_xmu = tl.zeros((BLOCK_ROWS, BLOCK_COLS), ACC_DTYPE)
    steps = tl.cdiv(hi - lo, BLOCK_ROWS).to(tl.int32)
    for k in range(steps):
        r = lo + k * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        ok = (r < hi)[:, None] & col_ok[None, :]
        grad = tl.load(grad_out_ptr + _reduction_offsets(r, cols, c, S, stride_gn, stride_gc, stride_gs,
                                                         CHANNELS_TILE, ROW64, ALIGN),
                       mask=ok, other=0.0).to(ACC_DTYPE)
        xmu = tl.load(x_ptr + _reduction_offsets(r, cols, c, S, stride_xn, stride_xc, stride_xs,
                                                 CHANNELS_TILE, ROW64, ALIGN),
                      mask=ok, other=0.0).to(ACC_DTYPE) - mean
        residual = xmu
        if HAS_RESIDUAL:
            residual = tl.load(residual_ptr + _reduction_offsets(r, cols, c, S, stride_rn, stride_rc, stride_rs,
                                                                 CHANNELS_TILE, ROW64, ALIGN),
                               mask=ok, other=0.0).to(ACC_DTYPE)
        saved_mask = grad
        if USE_MASK:
            saved_mask = tl.load(mask_ptr + _reduction_offsets(r, cols, c, S, stride_mn, stride_mc, stride_ms,
                                                               CHANNELS_TILE, ROW64, ALIGN),
                                 mask=ok, other=0)
        dy = _dy(grad, xmu, 0.0, scale, shift, residual, saved_mask, negative_slope, ACTIVATION, USE_MASK,
                 HAS_RESIDUAL)
        dy = tl.where(ok, dy, 0.0)
        if WRITE_DY:
            stored = dy.to(dy_ptr.dtype.element_ty)
            tl.store(dy_ptr + _reduction_offsets(r, cols, c, S, stride_dn, stride_dc, stride_ds, CHANNELS_TILE,
                                                 ROW64, ALIGN),
                     stored, mask=ok)
            dy = stored.to(ACC_DTYPE)
        sum_dy += dy
        sum_dy_xmu += dy * xmu

    total_dy = tl.sum(sum_dy, 0)
    total_dy_xmu = tl.sum(sum_dy_xmu, 0)
    if not CHANNELS_TILE:
        total_dy = tl.sum(total_dy, 0)
        total_dy_xmu = tl.sum(total_dy_xmu, 0)
    at = c
    if not FINAL:
        at = partial.to(tl.int64) * C + c
    tl.store(sum_dy_ptr + at, total_dy, mask=c_ok)
    tl.store(sum_dy_xmu_ptr + at, total_dy_xmu, mask=c_ok)


@triton.jit
def _batch_norm_sum_partials(
    partial_dy_ptr, partial_dy_xmu_ptr, sum_dy_ptr, sum_dy_xmu_ptr,  # partials (P, C) -> sums (C,)
    C, P, ACC_DTYPE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Each channel's partial sums added in a fixed order (chunks in index order, a fixed tree within)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    sum_dy = tl.zeros((BLOCK_C,), ACC_DTYPE)
    sum_dy_xmu = tl.zeros((BLOCK_C,), ACC_DTYPE)
    for first in range(0, P, BLOCK_P):
        p = first + tl.arange(0, BLOCK_P)
        ok = (p < P)[:, None] & c_ok[None, :]
        at = p.to(tl.int64)[:, None] * C + c[None, :]
        sum_dy += tl.sum(tl.load(partial_dy_ptr + at, mask=ok, other=0.0), 0)
        sum_dy_xmu += tl.sum(tl.load(partial_dy_xmu_ptr + at, mask=ok, other=0.0), 0)
    tl.store(sum_dy_ptr + c, sum_dy, mask=c_ok)
    tl.store(sum_dy_xmu_ptr + c, sum_dy_xmu, mask=c_ok)
