"""2-D max pooling, forward and backward, on tiles of (pixels x channels).

Why it looks like this: pooling does no arithmetic worth counting; its time is bytes. For the
ResNet stem (3x3, stride 2, padding 1 on 64 x 112 x 112) the forward must read the input once
(4 bytes of input per byte of output in bf16: stride 2 in both directions) and write the output;
torch also writes an 8-byte int64 index per output element for backward, 4x the bf16 output.
Here the forward writes, for backward, the window-local tap r * KW + s of each maximum in one
byte (uint8), or nothing in inference; torch's int64 flat indices only when return_indices asks
for them (SAVE).

Layout. A program takes BLOCK_PIX pixels (flattened (n, p, q) in the forward, (n, h, w) in the
backward; with the channel too for NCHW) by BLOCK_C channels. channels_last (NHWC) is the fast path: channels are contiguous
(the launcher passes a channel stride of 1, which the runtime specializes), so each tap of a
tile is BLOCK_PIX runs of BLOCK_C contiguous channels, loaded 16 bytes at a time when C and the
pixel strides are multiples of 16 elements (the runtime's divisibility specialization proves
it). NCHW (CHANNELS_TILE false) takes BLOCK_C = 1 and flattens the channel into the pixel index
instead, (n, c, p, q) with q fastest: a warp's accesses are consecutive output columns (coalesced
stores, strided input rows), and late layers' small planes (7 x 7) still fill whole tiles. Any
other strides work.

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

Offsets are int64 (pixel and tap offsets times strides); the flattened pixel index is int32
unless the launcher says the pixel count may pass 2**31 (PIX64).
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


# NCHW's tiles are single elements of (n, c, p, q), each with its own int64 row arithmetic
# (divisions by Q, P and C): 1024 of them over 4 warps (8 a thread) keep that in registers.
NCHW_TILE = 1024


def blocks(C: int, channels_tile: bool) -> tuple[int, int]:
    """(BLOCK_PIX, BLOCK_C): channels_last takes up to MAX_BLOCK_C channels a tile, NCHW one."""
    if not channels_tile:
        return NCHW_TILE, 1
    block_c = min(MAX_BLOCK_C, triton.next_power_of_2(C))
    return TILE // block_c, block_c


@triton.jit
def _tile(pid, num_pixels, C, plane, CHANNELS_TILE: tl.constexpr, PIX64: tl.constexpr, BLOCK_PIX: tl.constexpr,
          BLOCK_C: tl.constexpr):
    """A program's rows and columns: (pix, pix_ok, n, c_row, c, c_ok). pix is the row's index into
    its plane's pixels plus whole planes (pix % plane is the pixel; the caller splits it), n its
    batch index (int64); a row's channel is c_row + c (int64 c_row per row, c per column).
    CHANNELS_TILE: rows are (n, pixel) of num_pixels = N * plane, columns BLOCK_C channels, c_row 0.
    Otherwise rows are (n, c, pixel) of num_pixels = N * C * plane, one column, c = 0."""
    if CHANNELS_TILE:
        c_blocks = tl.cdiv(C, BLOCK_C)
        pid_pix = pid // c_blocks
        c = (pid % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    else:
        pid_pix = pid
        c = tl.arange(0, BLOCK_C)
    if PIX64:
        pix = pid_pix.to(tl.int64) * BLOCK_PIX + tl.arange(0, BLOCK_PIX)
    else:
        pix = pid_pix * BLOCK_PIX + tl.arange(0, BLOCK_PIX)
    if CHANNELS_TILE:
        n = (pix // plane).to(tl.int64)
        c_row = n * 0
    else:
        c_row = ((pix // plane) % C).to(tl.int64)
        n = (pix // plane // C).to(tl.int64)
    return pix, pix < num_pixels, n, c_row, c, c < C


@triton.jit
def _max_pool2d_fwd(
    input_ptr, out_ptr, saved_ptr,
    # input (N, C, H, W); out (N, C, P, Q) in the input's dtype; saved (N, C, P, Q), out's strides:
    # uint8 taps (SAVE_POS), int64 flat indices h * W + w (SAVE_INDEX), or unused (SAVE_NONE)
    C, H, W, P, Q, num_pixels,  # num_pixels = N * P * Q
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_on, stride_oc, stride_op, stride_oq,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, SAVE: tl.constexpr, CHANNELS_TILE: tl.constexpr, PIX64: tl.constexpr,
    BLOCK_PIX: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    pix, pix_ok, n, c_row, c, c_ok = _tile(pid, num_pixels, C, P * Q, CHANNELS_TILE, PIX64, BLOCK_PIX, BLOCK_C)
    q = pix % Q
    p = (pix // Q) % P
    h0 = p * stride_h - pad_h
    w0 = q * stride_w - pad_w
    # The window's first tap, as an offset into the input (negative in the padding; never loaded there).
    x_base = n * stride_xn + c_row * stride_xc + h0.to(tl.int64) * stride_xh + w0.to(tl.int64) * stride_xw
    x_chan = c.to(tl.int64) * stride_xc

    best = tl.full((BLOCK_PIX, BLOCK_C), float("-inf"), input_ptr.dtype.element_ty)
    tap = tl.full((BLOCK_PIX, BLOCK_C), -1, tl.int32)
    for r in range(KH):
        h = h0 + r * dil_h
        h_ok = pix_ok & (h >= 0) & (h < H)
        for s in range(KW):
            w = w0 + s * dil_w
            ok = (h_ok & (w >= 0) & (w < W))[:, None]
            tap_off = (r * dil_h).to(tl.int64) * stride_xh + (s * dil_w).to(tl.int64) * stride_xw
            v = tl.load(input_ptr + (x_base + tap_off)[:, None] + x_chan[None, :], mask=ok & c_ok[None, :],
                        other=float("-inf"))
            # torch's rule: the first in-bounds tap, anything greater, any NaN (v != v).
            take = ok & ((tap < 0) | (v > best) | (v != v))
            best = tl.where(take, v, best)
            tap = tl.where(take, r * KW + s, tap)

    o_off = (n * stride_on + c_row * stride_oc + p.to(tl.int64) * stride_op + q.to(tl.int64) * stride_oq)[:, None] \
        + (c.to(tl.int64) * stride_oc)[None, :]
    mask = pix_ok[:, None] & c_ok[None, :]
    tl.store(out_ptr + o_off, best, mask=mask)
    if SAVE == 1:
        tl.store(saved_ptr + o_off, tap.to(tl.uint8), mask=mask)
    if SAVE == 2:
        row = h0[:, None] + (tap // KW) * dil_h
        col = w0[:, None] + (tap % KW) * dil_w
        tl.store(saved_ptr + o_off, row.to(tl.int64) * W + col, mask=mask)


@triton.jit
def _max_pool2d_bwd(
    grad_out_ptr, saved_ptr, grad_input_ptr,
    # grad_out (N, C, P, Q); saved (N, C, P, Q) uint8 taps or int64 flat indices (SAVE_INDEX);
    # grad_input (N, C, H, W), written once per element
    C, H, W, P, Q, num_pixels,  # num_pixels = N * H * W
    stride_gn, stride_gc, stride_gp, stride_gq,
    stride_sn, stride_sc, stride_sp, stride_sq,
    stride_in, stride_ic, stride_ih, stride_iw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, SAVE_INDEX: tl.constexpr, ACC_DTYPE: tl.constexpr,
    CHANNELS_TILE: tl.constexpr, PIX64: tl.constexpr, BLOCK_PIX: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    pix, pix_ok, n, c_row, c, c_ok = _tile(pid, num_pixels, C, H * W, CHANNELS_TILE, PIX64, BLOCK_PIX, BLOCK_C)
    w = pix % W
    h = (pix // W) % H
    g_base = n * stride_gn + c_row * stride_gc
    s_base = n * stride_sn + c_row * stride_sc
    g_chan = (c.to(tl.int64) * stride_gc)[None, :]
    s_chan = (c.to(tl.int64) * stride_sc)[None, :]
    here = (h.to(tl.int64) * W + w)[:, None]  # this element's flat index, as torch's indices hold it

    acc = tl.zeros((BLOCK_PIX, BLOCK_C), ACC_DTYPE)
    for r in range(KH):
        p_num = h + pad_h - r * dil_h
        p = p_num // stride_h
        p_ok = pix_ok & (p_num >= 0) & (p_num - p * stride_h == 0) & (p < P)
        for s in range(KW):
            q_num = w + pad_w - s * dil_w
            q = q_num // stride_w
            ok = (p_ok & (q_num >= 0) & (q_num - q * stride_w == 0) & (q < Q))[:, None] & c_ok[None, :]
            pq_g = (g_base + p.to(tl.int64) * stride_gp + q.to(tl.int64) * stride_gq)[:, None]
            pq_s = (s_base + p.to(tl.int64) * stride_sp + q.to(tl.int64) * stride_sq)[:, None]
            chosen = tl.load(saved_ptr + pq_s + s_chan, mask=ok, other=0)
            if SAVE_INDEX:
                hit = ok & (chosen == here)
            else:
                hit = ok & (chosen.to(tl.int32) == r * KW + s)
            # Loaded under the window's mask (constant along the channels: 16-byte loads), not the
            # per-element hit mask (scalar loads); the distinct bytes read are the same, the
            # repeats come from cache.
            g = tl.load(grad_out_ptr + pq_g + g_chan, mask=ok, other=0.0).to(ACC_DTYPE)
            acc += tl.where(hit, g, 0.0)

    i_off = (n * stride_in + c_row * stride_ic + h.to(tl.int64) * stride_ih + w.to(tl.int64) * stride_iw)[:, None] \
        + (c.to(tl.int64) * stride_ic)[None, :]
    tl.store(grad_input_ptr + i_off, acc.to(grad_input_ptr.dtype.element_ty), mask=pix_ok[:, None] & c_ok[None, :])
