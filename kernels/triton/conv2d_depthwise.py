"""Depthwise 2-D convolution (groups == in_channels) as a direct, channels-vectorized stencil:
forward, input gradient, weight gradient (+ bias gradient).

Why not the implicit GEMM of conv2d.py: with one input channel per group the GEMM's reduction is
only R*S long and each group has K_g = K / C output channels (the channel multiplier, usually 1),
so a tensor-core tile keeps 1 of its 64 columns busy and the grid runs one group per program
column. A depthwise layer does R*S multiply-adds per output element (9 for 3x3) against 2-4 bytes
moved: it is bound by memory, and what matters is reading each operand once, 16 bytes at a time.
So these kernels use no tl.dot: FMAs on fp32 (fp64) accumulators, channels across the lanes.

Layout. Activations are channels_last (NHWC; the launcher makes them so, as the GEMM path does):
channels are contiguous (the launcher passes a channel stride of 1, which the runtime specializes)
and a program owns a tile of BLOCK_P pixels x BLOCK_C channels. Each tap (r, s) of the tile is
BLOCK_P runs of BLOCK_C contiguous channels, loaded 16 bytes at a time when C and the pixel strides
are multiples of 16 elements (the runtime's divisibility specialization proves it); the R*S taps
of neighbouring pixels overlap, so after the first the loads are served by L1. Output channel k
reads input channel k // K_G (K_G, the multiplier, is a constexpr: with K_G == 1 the channel
index is the lane's own and the loads stay contiguous). The forward and grad_input read the
weight as (R*S, K), channels contiguous (the launcher's transposed copy of K*R*S elements): one
16-byte load per thread and tap, where (K, 1, R, S)'s strides made it 8 scalar loads (bf16) beside
the two 16-byte loads of the input.

  forward      out[n, p, q, k] = act(sum_{r, s} x[n, p*sH - pt + r*dH, q*sW - pl + s*dW, k // K_G] w[k, r, s] + b[k])
               tile: BLOCK_P output pixels (flattened (n, p, q)) x BLOCK_C output channels
  grad_input   grad_x[n, h, w, c] = sum_{j < K_G} sum over the taps (r, s) that reach (h, w) of
               g[n, p, q, c*K_G + j] w[c*K_G + j, r, s]: a gather, no atomics
               tile: BLOCK_P input pixels of one stride phase x BLOCK_C input channels
  grad_weight  grad_w[k, r, s] = sum_{n, p, q} g[n, p, q, k] x[n, ih, iw, k // K_G], grad_b[k] = sum g
               tile: BLOCK_T taps x BLOCK_P output pixels x BLOCK_C channels, reduced over pixels
with g = grad_out * act'(.) computed in the prologue of every grad_out load, never stored.

The launcher routes every convolution with C / groups == 1 here, so a single-channel input with
groups = 1 (a grayscale stem) comes too, as multiplier K_G = K: the forward and grad_weight stay
vectorized over the output channels, grad_input loops over the K_G outputs of its one channel.

grad_input without zero insertion, as conv2d.py's: the input is split into sH*sW stride phases
(h % sH, w % sW) and program_id(1) is the phase; tap r reaches output row p = i + (ph + pt - r*dH) / sH
of input row h = ph + i*sH exactly when sH divides ph + pt - r*dH, the same for every pixel of the
phase, so a tap that misses is a zero-trip loop for the whole program.

grad_weight reads grad_out and x once. A program takes BLOCK_C channels, BLOCK_T taps (all of them
up to MAX_BLOCK_T = 64, i.e. 7x7; bigger kernels are split over program_id(0)) and one split of
the N*P*Q pixels (program_id(1)), and walks its pixels BLOCK_P at a time: g is loaded once per
pixel block and multiplied with the (BLOCK_T, BLOCK_P, BLOCK_C) gather of the taps' inputs into a
3-D accumulator, summed over pixels once at the end. (A program per tap, as the GEMM path does,
would read g R*S times.) Taps beyond R*S (BLOCK_T is a power of two: 16 for 3x3) are masked lanes,
never loaded. With few channels the launcher splits the pixels over programs; each split writes
fp32 (fp64) partials that conv2d.py's _sum_splits reduces in a fixed order: deterministic.

Epilogue identical to the GEMM path's: bias and the activation on the accumulator; relu /
leaky_relu write a 1-byte mask, gelu / gelu_tanh / silu the pre-activation (linear's SAVE codes).

Offsets are int64 (pixel offsets times strides): activations of a large batch pass 2**31 elements.
The flattened pixel index is int32 unless the launcher says the count may pass 2**31 (ROW64; the
count itself is the launcher's num_rows, an int64 argument then).
"""
import triton
import triton.language as tl

from .linear import _activation, _activation_grad
from .max_pool2d import _rows

# Elements of a forward / grad_input tile: 2048 over 4 warps is 16 a thread (two 16-byte loads a
# tap in bf16, four in fp32), enough bytes in flight for a memory-bound stencil.
TILE = 2048
NUM_WARPS = 4
MAX_BLOCK_C = 64
# grad_weight's 3-D accumulator (taps x pixels x channels): 4096 fp32 over 4 warps is 32 registers
# a thread, plus the gathered inputs; fp64 takes half as many elements.
WEIGHT_TILE = 4096
MAX_BLOCK_T = 64
MIN_WEIGHT_PIXELS = 4  # pixels a step: fewer channels a program for 7x7 rather than 1 pixel

# Sizes that only bound masks and index arithmetic are not specialized (one binary serves every
# batch and image size), as in conv2d.py; channel counts, kernel sizes, strides and the tensors'
# strides stay specialized (they decide the 16-byte alignment and fold unit strides).
_GEOMETRY = ["num_rows", "H", "W", "P", "Q", "pad_h", "pad_w", "dil_h", "dil_w"]


def block_channels(C: int) -> int:
    """BLOCK_C for C channels: up to MAX_BLOCK_C, halved (down to 16) while the last block would
    leave more than an eighth of the tile's channels masked (C = 144: 32, not 64 (3 blocks, 48
    masked); C = 96: 32)."""
    block = min(MAX_BLOCK_C, triton.next_power_of_2(C))
    while block > 16 and triton.cdiv(C, block) * block - C > C // 8:
        block //= 2
    return block


def blocks(C: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C) of the forward (C: output channels) and grad_input (C: input channels)."""
    block_c = block_channels(C)
    return TILE // block_c, block_c


def weight_blocks(K: int, taps: int, itemsize: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_P, BLOCK_C) of grad_weight for K channels and R*S taps: all taps up to
    MAX_BLOCK_T, then channels, leaving at least MIN_WEIGHT_PIXELS pixels a step (7x7: 64 taps x 4
    pixels x 16 channels)."""
    tile = WEIGHT_TILE // 2 if itemsize == 8 else WEIGHT_TILE
    block_t = min(MAX_BLOCK_T, triton.next_power_of_2(taps))
    block_c = max(1, min(block_channels(K), tile // (block_t * MIN_WEIGHT_PIXELS)))
    return block_t, max(1, tile // (block_t * block_c)), block_c


def _jit(fn):
    return triton.jit(fn, do_not_specialize=_GEOMETRY)


# --- forward ----------------------------------------------------------------------------------------

@_jit
def _conv2d_depthwise_fwd(
    x_ptr, w_ptr, bias_ptr, out_ptr, saved_ptr,  # x (N, C, H, W), w (R*S, K), bias (K,), out/saved (N, K, P, Q)
    num_rows, H, W, K, P, Q, R, S,  # num_rows = N * P * Q (the launcher's: int64 when it passes 2**31)
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wt, stride_wk, stride_bias,
    stride_on, stride_ok, stride_op, stride_oq,  # out's strides; saved has out's layout
    negative_slope,
    K_G: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, SAVE: tl.constexpr,
    ACC_DTYPE: tl.constexpr, ROW64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Tile (BLOCK_P output pixels, BLOCK_C output channels); channel blocks vary fastest."""
    col_blocks = tl.cdiv(K, BLOCK_C)
    pid = tl.program_id(0)
    m, m_ok = _rows(pid // col_blocks, num_rows, ROW64, BLOCK_P)
    k = (pid % col_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    k_ok = k < K
    if K_G == 1:
        c = k
    else:
        c = k // K_G
    q = m % Q
    p = (m // Q) % P
    n = (m // Q // P).to(tl.int64)
    ih0 = p * stride_h - pad_h
    iw0 = q * stride_w - pad_w
    # The window's first tap per pixel (negative in the padding: never loaded there).
    x_pix = n * stride_xn + ih0.to(tl.int64) * stride_xh + iw0.to(tl.int64) * stride_xw
    x_chan = c.to(tl.int64) * stride_xc
    w_chan = w_ptr + k * stride_wk
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC_DTYPE)
    for r in range(0, R):
        ih = ih0 + r * dil_h
        row_ok = m_ok & (ih >= 0) & (ih < H)
        for s in range(0, S):
            iw = iw0 + s * dil_w
            ok = row_ok & (iw >= 0) & (iw < W)
            tap = (r * dil_h).to(tl.int64) * stride_xh + (s * dil_w).to(tl.int64) * stride_xw
            x = tl.load(x_ptr + (x_pix + tap)[:, None] + x_chan[None, :], mask=ok[:, None] & k_ok[None, :],
                        other=0.0)
            w = tl.load(w_chan + (r * S + s) * stride_wt, mask=k_ok, other=0.0)
            acc += x.to(ACC_DTYPE) * w.to(ACC_DTYPE)[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + k * stride_bias, mask=k_ok, other=0.0)
        acc += bias.to(ACC_DTYPE)[None, :]
    out = _activation(acc, negative_slope, ACTIVATION)
    offs = (n * stride_on + p.to(tl.int64) * stride_op + q.to(tl.int64) * stride_oq)[:, None] \
        + (k.to(tl.int64) * stride_ok)[None, :]
    mask = m_ok[:, None] & k_ok[None, :]
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    if SAVE == 1:
        tl.store(saved_ptr + offs, (acc > 0).to(tl.uint8), mask=mask)
    elif SAVE == 2:
        tl.store(saved_ptr + offs, acc.to(saved_ptr.dtype.element_ty), mask=mask)


# --- grad_input ---------------------------------------------------------------------------------------

@_jit
def _conv2d_depthwise_bwd_input(
    grad_out_ptr, saved_ptr, w_ptr, grad_input_ptr,  # grad_out/saved (N, K, P, Q), w (R*S, K), grad_input (N, C, H, W)
    num_rows, H, W, C, P, Q, R, S,  # num_rows = N * cdiv(H, sH) * cdiv(W, sW): pixels per stride phase
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    stride_gn, stride_gk, stride_gp, stride_gq,
    stride_sn, stride_sk, stride_sp, stride_sq,
    stride_wt, stride_wk,
    stride_in, stride_ic, stride_ih, stride_iw,
    negative_slope,
    K_G: tl.constexpr, ACTIVATION: tl.constexpr, ACC_DTYPE: tl.constexpr, ROW64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Tile (BLOCK_P input pixels of stride phase program_id(1), BLOCK_C input channels). Every input
    element belongs to exactly one program, which writes it (zero where no tap reaches it)."""
    rows_ph = tl.cdiv(H, stride_h)
    cols_ph = tl.cdiv(W, stride_w)
    phase = tl.program_id(1)
    ph = phase // stride_w
    pw = phase % stride_w
    col_blocks = tl.cdiv(C, BLOCK_C)
    pid = tl.program_id(0)
    m, m_ok = _rows(pid // col_blocks, num_rows, ROW64, BLOCK_P)
    c = (pid % col_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    j = m % cols_ph
    i = (m // cols_ph) % rows_ph
    n = (m // cols_ph // rows_ph).to(tl.int64)
    h = ph + i * stride_h
    w = pw + j * stride_w
    m_ok = m_ok & (h < H) & (w < W)
    g_image = n * stride_gn
    s_image = n * stride_sn
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC_DTYPE)
    for r in range(0, R):
        # Tap r reaches this phase's rows iff sH divides ph + pt - r*dH; output row p = i + that / sH.
        t_h = ph + pad_h - r * dil_h
        hits_h = (t_h % stride_h) == 0
        p = i + t_h // stride_h  # exact where it hits, so truncation and floor agree
        p_ok = m_ok & (p >= 0) & (p < P)
        for s in range(0, S):
            t_w = pw + pad_w - s * dil_w
            hits = hits_h & ((t_w % stride_w) == 0)
            q = j + t_w // stride_w
            ok = (p_ok & (q >= 0) & (q < Q))[:, None] & c_ok[None, :]
            g_pix = g_image + p.to(tl.int64) * stride_gp + q.to(tl.int64) * stride_gq
            s_pix = s_image + p.to(tl.int64) * stride_sp + q.to(tl.int64) * stride_sq
            for jj in range(0, tl.where(hits, K_G, 0)):  # zero trips for a tap that misses
                if K_G == 1:
                    k = c  # not c + jj: the loop counter would hide the channels' 16-byte alignment
                else:
                    k = c * K_G + jj
                grad = tl.load(grad_out_ptr + g_pix[:, None] + (k.to(tl.int64) * stride_gk)[None, :], mask=ok,
                               other=0.0).to(ACC_DTYPE)
                if ACTIVATION != 0:
                    saved = tl.load(saved_ptr + s_pix[:, None] + (k.to(tl.int64) * stride_sk)[None, :], mask=ok,
                                    other=0)
                    grad = _activation_grad(grad, saved.to(ACC_DTYPE), negative_slope, ACTIVATION)
                wt = tl.load(w_ptr + (r * S + s) * stride_wt + k * stride_wk, mask=c_ok, other=0.0)
                acc += grad * wt.to(ACC_DTYPE)[None, :]
    offs = (n * stride_in + h.to(tl.int64) * stride_ih + w.to(tl.int64) * stride_iw)[:, None] \
        + (c.to(tl.int64) * stride_ic)[None, :]
    tl.store(grad_input_ptr + offs, acc.to(grad_input_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


# --- grad_weight (and grad_bias) ------------------------------------------------------------------

@_jit
def _conv2d_depthwise_bwd_weight(
    grad_out_ptr, saved_ptr, x_ptr, grad_weight_ptr, grad_bias_ptr,
    # grad_out/saved (N, K, P, Q), x (N, C, H, W); grad_weight (K, 1, R, S) and grad_bias (K,), or
    # with splits fp32 (fp64) partials (splits, K, 1, R, S) and (splits, K)
    num_rows, H, W, K, P, Q, R, S,  # num_rows = N * P * Q
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    stride_gn, stride_gk, stride_gp, stride_gq,
    stride_sn, stride_sk, stride_sp, stride_sq,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wsplit, stride_wk, stride_wr, stride_ws, stride_bsplit,
    negative_slope,
    K_G: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    ROW64: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Tile (BLOCK_T taps, BLOCK_C channels) of split program_id(1) of the N*P*Q pixels;
    program_id(0) is channel block + col_blocks * tap block. Each split writes its partial sums
    at grad_weight_ptr + split * stride_wsplit (with one split, grad_weight itself); grad_bias is
    summed by the programs of tap block 0."""
    col_blocks = tl.cdiv(K, BLOCK_C)
    tap_block = tl.program_id(0) // col_blocks
    k = (tl.program_id(0) % col_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    k_ok = k < K
    if K_G == 1:
        c = k
    else:
        c = k // K_G
    t = tap_block * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < R * S
    r = t // S
    s = t % S
    tap_h = r * dil_h
    tap_w = s * dil_w
    tap = tap_h.to(tl.int64) * stride_xh + tap_w.to(tl.int64) * stride_xw
    x_chan = c.to(tl.int64) * stride_xc
    g_chan = k.to(tl.int64) * stride_gk
    s_chan = k.to(tl.int64) * stride_sk
    M = num_rows
    split = tl.program_id(1)
    blocks_per_split = tl.cdiv(tl.cdiv(M, BLOCK_P), tl.num_programs(1))
    if ROW64:
        m_start = split.to(tl.int64) * blocks_per_split * BLOCK_P
    else:
        m_start = split * blocks_per_split * BLOCK_P
    m_end = tl.minimum(M, m_start + blocks_per_split * BLOCK_P)
    acc = tl.zeros((BLOCK_T, BLOCK_P, BLOCK_C), dtype=ACC_DTYPE)
    bias_acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC_DTYPE)
    for mb in range(0, tl.cdiv(m_end - m_start, BLOCK_P)):
        m = m_start + mb * BLOCK_P + tl.arange(0, BLOCK_P)
        m_ok = m < m_end
        q = m % Q
        p = (m // Q) % P
        n = (m // Q // P).to(tl.int64)
        g_mask = m_ok[:, None] & k_ok[None, :]
        g_pix = n * stride_gn + p.to(tl.int64) * stride_gp + q.to(tl.int64) * stride_gq
        grad = tl.load(grad_out_ptr + g_pix[:, None] + g_chan[None, :], mask=g_mask, other=0.0).to(ACC_DTYPE)
        if ACTIVATION != 0:
            s_pix = n * stride_sn + p.to(tl.int64) * stride_sp + q.to(tl.int64) * stride_sq
            saved = tl.load(saved_ptr + s_pix[:, None] + s_chan[None, :], mask=g_mask, other=0)
            grad = _activation_grad(grad, saved.to(ACC_DTYPE), negative_slope, ACTIVATION)
        if HAS_BIAS:
            bias_acc += grad
        ih0 = p * stride_h - pad_h
        iw0 = q * stride_w - pad_w
        x_pix = n * stride_xn + ih0.to(tl.int64) * stride_xh + iw0.to(tl.int64) * stride_xw
        ih = ih0[None, :] + tap_h[:, None]
        iw = iw0[None, :] + tap_w[:, None]
        ok = t_ok[:, None] & m_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)  # (BLOCK_T, BLOCK_P)
        x = tl.load(x_ptr + (x_pix[None, :] + tap[:, None])[:, :, None] + x_chan[None, None, :],
                    mask=ok[:, :, None] & k_ok[None, None, :], other=0.0)
        acc += x.to(ACC_DTYPE) * grad[None, :, :]
    grad_weight = tl.sum(acc, axis=1)
    offs = split.to(tl.int64) * stride_wsplit + (r * stride_wr + s * stride_ws)[:, None] + (k * stride_wk)[None, :]
    tl.store(grad_weight_ptr + offs, grad_weight.to(grad_weight_ptr.dtype.element_ty),
             mask=t_ok[:, None] & k_ok[None, :])
    if HAS_BIAS:
        if tap_block == 0:
            tl.store(grad_bias_ptr + split.to(tl.int64) * stride_bsplit + k,
                     tl.sum(bias_acc, axis=0).to(grad_bias_ptr.dtype.element_ty), mask=k_ok)
