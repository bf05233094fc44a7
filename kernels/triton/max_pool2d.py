"""2-D max pooling, forward and backward, on tiles of (pixels x channels).

Why it looks like this: pooling does no arithmetic worth counting; its time is bytes. For the
ResNet stem (3x3, stride 2, padding 1 on 64 x 112 x 112) the forward must read the input once
(4 bytes of input per byte of output in bf16: stride 2 in both directions) and write the output;
torch also writes an 8-byte int64 index per output element for backward, 4x the bf16 output.
Here the forward writes, for backward, the window-local tap r * KW + s of each maximum in one
byte (uint8), or nothing in inference; torch's int64 flat indices only when return_indices asks
for them (SAVE).

Layout. A program takes a tile of BLOCK_ROWS rows by BLOCK_COLS columns; what they are depends on
the layout.
  channels_last (NHWC, CHANNELS_TILE) is the fast path: rows are pixels (flattened (n, p, q) in
    the forward, (n, h, w) in the backward), columns up to MAX_BLOCK_C channels. Channels are
    contiguous (the launcher passes a channel stride of 1, which the runtime specializes), so each
    tap of a tile is BLOCK_ROWS runs of BLOCK_COLS contiguous channels, loaded 16 bytes at a time
    when C and the pixel strides are multiples of 16 elements (the runtime's divisibility
    specialization proves it).
  NCHW (any other strides) takes rows of the image: rows are (n, c, p) output rows in the forward
    ((n, c, h) input rows in the backward), columns a run of up to MAX_BLOCK_W output columns q
    (input columns w). The division of a flat index by the sizes is done once per row, not per
    element (per-element int64 division chains held 123-152 registers), and a row's stores are
    contiguous: the launcher passes ALIGN, the power of two (up to 16 bytes of elements) dividing
    the row length and the row strides, so the output's (the backward's grad_input's) stores are
    16 bytes wide where the sizes allow (Q = 56 in bf16: 8 columns, 16 bytes). The input's taps
    stride by the pooling stride along a row: those loads stay element-wide (a warp still reads
    whole lines; the other half of each line is the next tap's). Late layers' short rows (7
    columns) waste the masked tail of an 8-column tile, never a whole tile.

Forward, per window, torch's rule exactly (fastdl/reference/max_pool2d.py): scan the in-bounds
taps row-major, take a tap when it is the first in-bounds one, when it is greater than the
running maximum, or when it is NaN. So ties keep the first maximum, a NaN wins and the last NaN
in window order is the one reported, and an all -inf window reports its first in-bounds tap.
Out-of-bounds taps (the implicit -inf padding) are never loaded. (The functional layer rejects
windows with no in-bounds tap at all.) The value stored is the chosen element itself.

Backward is a gather, deterministic and free of atomics: each input element (h, w) visits the
KH x KW windows that could have chosen it, p = (h + pad_h - r * dil_h) / stride_h when that
divides exactly and 0 <= p < P (likewise q), reads their saved tap (or flat index) and adds
grad_out where the window chose this very tap. A window's saved taps and grad_out are read by
each element it covers (16-byte loads under the window's mask, selected by the hit after): once
from memory, the repeats from cache.
Sums are in ACC_DTYPE (float32; float64 for float64), rounded once.

Offsets are int64 (row, column and tap offsets times strides); the flattened row index is int32
unless the launcher says the row count may pass 2**31 (ROW64).
"""
import triton
import triton.language as tl

# Save codes: what the forward writes beside the output.
SAVE_NONE, SAVE_POS, SAVE_INDEX = 0, 1, 2
# Elements of a tile: 2048 over 4 warps is 16 a thread (two 16-byte loads a tap in bf16, four in
# fp32): enough bytes in flight without spilling the running maxima of a 3x3 window.
TILE = 2048
NUM_WARPS = 4
MAX_BLOCK_C = 64
# A register ceiling (the launch's maxnreg): without one ptxas aims at an occupancy step of its
# own and spills to reach it (8-16 B of stack in one variant or another on sm_80 and sm_90: fp32
# NCHW backward, the return_indices backward); with 128 no variant spills on either arch, and
# most take 63-88 (5-8 blocks of 128 threads per SM). 96 still spilled fp32's return_indices
# backward on sm_80.
MAX_REGISTERS = 128


# NCHW's tiles: 1024 elements over 4 warps (8 a thread), rows of up to 64 columns.
NCHW_TILE = 1024
MAX_BLOCK_W = 64


def blocks(C: int, width: int, channels_tile: bool) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_COLS): channels_last takes up to MAX_BLOCK_C channels a tile; NCHW takes
    rows of `width` columns (Q in the forward, W in the backward), up to MAX_BLOCK_W of them."""
    limit = MAX_BLOCK_C if channels_tile else MAX_BLOCK_W
    block_cols = min(limit, triton.next_power_of_2(C if channels_tile else width))
    return (TILE if channels_tile else NCHW_TILE) // block_cols, block_cols


@triton.jit
def _rows(pid_rows, num_rows, ROW64: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """A program's row indices (int64 when the launcher says the row count may pass 2**31) and their mask."""
    if ROW64:
        row = pid_rows.to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    else:
        row = pid_rows * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    return row, row < num_rows


@triton.jit
def _max_pool2d_fwd(
    input_ptr, out_ptr, saved_ptr,
    # input (N, C, H, W); out (N, C, P, Q) in the input's dtype; saved (N, C, P, Q), out's strides:
    # uint8 taps (SAVE_POS), int64 flat indices h * W + w (SAVE_INDEX), or unused (SAVE_NONE)
    C, H, W, P, Q, num_rows,  # num_rows = N * P * Q (CHANNELS_TILE) or N * C * P
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_on, stride_oc, stride_op, stride_oq,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, SAVE: tl.constexpr, CHANNELS_TILE: tl.constexpr, ROW64: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    pid = tl.program_id(0)
    # Per tile: row offsets x_row / o_row (int64, [BLOCK_ROWS]) and column offsets x_col / o_col
    # ([BLOCK_COLS]) into the input (at the window's first tap: negative in the padding, never
    # loaded there) and the output; h0 per row; w0, the window's first column, as [BLOCK_ROWS, 1]
    # (a pixel's) or [1, BLOCK_COLS] (a column's).
    if CHANNELS_TILE:
        col_blocks = tl.cdiv(C, BLOCK_COLS)
        row, row_ok = _rows(pid // col_blocks, num_rows, ROW64, BLOCK_ROWS)
        c = (pid % col_blocks) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        col_ok = c < C
        q = row % Q
        p = (row // Q) % P
        n = (row // Q // P).to(tl.int64)
        w0 = (q * stride_w - pad_w)[:, None]
        x_row = n * stride_xn + (q * stride_w - pad_w).to(tl.int64) * stride_xw
        x_col = c.to(tl.int64) * stride_xc
        o_row = n * stride_on + p.to(tl.int64) * stride_op + q.to(tl.int64) * stride_oq
        o_col = c.to(tl.int64) * stride_oc
    else:
        col_blocks = tl.cdiv(Q, BLOCK_COLS)
        row, row_ok = _rows(pid // col_blocks, num_rows, ROW64, BLOCK_ROWS)
        q = (pid % col_blocks) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        # q < Q, written so the mask is constant over ALIGN columns (ALIGN divides Q): vector stores.
        col_ok = q // ALIGN < Q // ALIGN
        p = row % P
        n = (row // P // C).to(tl.int64)
        c = ((row // P) % C).to(tl.int64)
        w0 = (q * stride_w - pad_w)[None, :]
        x_row = n * stride_xn + c * stride_xc
        x_col = (q * stride_w - pad_w).to(tl.int64) * stride_xw
        o_row = tl.multiple_of(n * stride_on + c * stride_oc + p.to(tl.int64) * stride_op, ALIGN)
        o_col = q.to(tl.int64) * stride_oq
    h0 = p * stride_h - pad_h
    x_row += h0.to(tl.int64) * stride_xh

    best = tl.full((BLOCK_ROWS, BLOCK_COLS), float("-inf"), input_ptr.dtype.element_ty)
    tap = tl.full((BLOCK_ROWS, BLOCK_COLS), -1, tl.int32)
    for r in range(KH):
        h = h0 + r * dil_h
        h_ok = (row_ok & (h >= 0) & (h < H))[:, None]
        for s in range(KW):
            w = w0 + s * dil_w
            ok = h_ok & (w >= 0) & (w < W) & col_ok[None, :]
            tap_off = (r * dil_h).to(tl.int64) * stride_xh + (s * dil_w).to(tl.int64) * stride_xw
            v = tl.load(input_ptr + (x_row + tap_off)[:, None] + x_col[None, :], mask=ok, other=float("-inf"))
            # torch's rule: the first in-bounds tap, anything greater, any NaN (v != v).
            take = ok & ((tap < 0) | (v > best) | (v != v))
            best = tl.where(take, v, best)
            tap = tl.where(take, r * KW + s, tap)

    o_off = o_row[:, None] + o_col[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    tl.store(out_ptr + o_off, best, mask=mask)
    if SAVE == 1:
        tl.store(saved_ptr + o_off, tap.to(tl.uint8), mask=mask)
    if SAVE == 2:
        tap_h = h0[:, None] + (tap // KW) * dil_h
        tap_w = w0 + (tap % KW) * dil_w
        tl.store(saved_ptr + o_off, tap_h.to(tl.int64) * W + tap_w, mask=mask)


@triton.jit
def _max_pool2d_bwd(
    grad_out_ptr, saved_ptr, grad_input_ptr,
    # grad_out (N, C, P, Q); saved (N, C, P, Q) uint8 taps or int64 flat indices (SAVE_INDEX);
    # grad_input (N, C, H, W), written once per element
    C, H, W, P, Q, num_rows,  # num_rows = N * H * W (CHANNELS_TILE) or N * C * H
    stride_gn, stride_gc, stride_gp, stride_gq,
    stride_sn, stride_sc, stride_sp, stride_sq,
    stride_in, stride_ic, stride_ih, stride_iw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, SAVE_INDEX: tl.constexpr, ACC_DTYPE: tl.constexpr,
    CHANNELS_TILE: tl.constexpr, ROW64: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    pid = tl.program_id(0)
    # Per tile, as in the forward: row offsets (g_row, s_row, i_row) and column offsets into
    # grad_out, saved and grad_input; h per row; w as [BLOCK_ROWS, 1] or [1, BLOCK_COLS].
    if CHANNELS_TILE:
        col_blocks = tl.cdiv(C, BLOCK_COLS)
        row, row_ok = _rows(pid // col_blocks, num_rows, ROW64, BLOCK_ROWS)
        c = (pid % col_blocks) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        col_ok = c < C
        w = (row % W)[:, None]
        h = (row // W) % H
        n = (row // W // H).to(tl.int64)
        g_row = n * stride_gn
        s_row = n * stride_sn
        g_col = c.to(tl.int64) * stride_gc
        s_col = c.to(tl.int64) * stride_sc
    else:
        col_blocks = tl.cdiv(W, BLOCK_COLS)
        row, row_ok = _rows(pid // col_blocks, num_rows, ROW64, BLOCK_ROWS)
        w_col = (pid % col_blocks) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        col_ok = w_col // ALIGN < W // ALIGN  # w < W, constant over ALIGN columns: vector stores
        w = w_col[None, :]
        h = row % H
        n = (row // H // C).to(tl.int64)
        c = ((row // H) % C).to(tl.int64)
        g_row = n * stride_gn + c * stride_gc
        s_row = n * stride_sn + c * stride_sc
        i_row = tl.multiple_of(n * stride_in + c * stride_ic + h.to(tl.int64) * stride_ih, ALIGN)
        i_col = w_col.to(tl.int64) * stride_iw

    if SAVE_INDEX:
        here = h.to(tl.int64)[:, None] * W + w  # this element's flat index, as torch's indices hold it
    acc = tl.zeros((BLOCK_ROWS, BLOCK_COLS), ACC_DTYPE)
    for r in range(KH):
        p_num = h + pad_h - r * dil_h
        p = p_num // stride_h
        p_ok = (row_ok & (p_num >= 0) & (p_num - p * stride_h == 0) & (p < P))[:, None]
        gp = (g_row + p.to(tl.int64) * stride_gp)[:, None]
        sp = (s_row + p.to(tl.int64) * stride_sp)[:, None]
        for s in range(KW):
            q_num = w + pad_w - s * dil_w
            q = q_num // stride_w
            ok = p_ok & (q_num >= 0) & (q_num - q * stride_w == 0) & (q < Q) & col_ok[None, :]
            if CHANNELS_TILE:
                g_off = gp + q.to(tl.int64) * stride_gq + g_col[None, :]
                s_off = sp + q.to(tl.int64) * stride_sq + s_col[None, :]
            else:
                g_off = gp + q.to(tl.int64) * stride_gq
                s_off = sp + q.to(tl.int64) * stride_sq
            chosen = tl.load(saved_ptr + s_off, mask=ok, other=0)
            if SAVE_INDEX:
                hit = ok & (chosen == here)
            else:
                hit = ok & (chosen.to(tl.int32) == r * KW + s)
            # Loaded under the window's mask (constant along the channels: 16-byte loads on
            # channels_last), not the per-element hit mask (scalar loads); the distinct bytes read
            # are the same, the repeats come from cache.
            g = tl.load(grad_out_ptr + g_off, mask=ok, other=0.0).to(ACC_DTYPE)
            acc += tl.where(hit, g, 0.0)

    if CHANNELS_TILE:  # (here, not before the loop: fewer registers held through it)
        i_row = n * stride_in + h.to(tl.int64) * stride_ih + (row % W).to(tl.int64) * stride_iw
        i_col = c.to(tl.int64) * stride_ic
    tl.store(grad_input_ptr + i_row[:, None] + i_col[None, :], acc.to(grad_input_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])
