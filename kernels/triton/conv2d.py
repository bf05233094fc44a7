"""2-D convolution with a fused activation as implicit GEMM: forward, input gradient, weight gradient.

The im2col matrix is never built: each program computes, for the rows of its tile, which input
pixel each (r, s) kernel position reads, and loads the operand tile straight from the input with
a mask for the padding. Per group g (G = groups, C_g = C / G input and K_g = K / G output channels):

  forward      out[m, k] = act(sum_{r, s, c} x[n, c, p*sH - pt + r*dH, q*sW - pl + s*dW] * w[k, c, r, s] + b[k])
               M = N*P*Q output pixels (m = (n, p, q)) x K_g output channels, reduced over C_g*R*S
  grad_input   grad_x[n, c, h, w] = sum over the (k, r, s) whose tap lands on (h, w) of g[n, k, p, q] * w[k, c, r, s]
               input pixels x C_g input channels, reduced over K_g*R*S
  grad_weight  grad_w[k, c, r, s] = sum_{n, p, q} g[n, k, p, q] * x[n, c, ih, iw]: K_g x C_g per (r, s),
               reduced over M (split across programs when the weight has too few tiles to fill the GPU)
with g = grad_out * act'(.) computed in the prologue of every grad_out load, never stored.

Loop order: kernel rows r, kernel columns s, then blocks of channels, as three NESTED loops. A
single loop over (r, s, channel block) with (r, s) derived from its counter is what PyTorch
Inductor's Triton conv template did, and it miscompiled at num_warps >= 8 (pytorch issue 173068,
triton-lang/triton#1254). Channels innermost: on channels_last (NHWC) input a channel block of one
(r, s) is contiguous, so the operand tiles are copied 16 bytes at a time; NCHW goes by strides.

Few channels (C_g < 16, the first layer of an image network with C = 3): a channel block of 16 or
more would be mostly padding (3 of 16 columns used, and R*S of those blocks per pixel). With
FEW_CHANNELS the loop over s folds into the channel axis: the reduction (forward) or column
(grad_weight) index j runs over S*C_g with s = j // C_g and c = j % C_g, so a 7x7 stem reads
21 useful columns of one 32-wide block per kernel row instead of 3 of 16 in each of 7 blocks. On
NHWC input with dW = 1 those 21 values are contiguous in memory ((iw0 + s)*C + c = iw0*C + j).

grad_input without zero insertion: for stride > 1 only some taps reach a given input pixel. The
input is split into sH*sW phases (h % sH, w % sW); within a phase the taps that reach its pixels
are the same for all of them, and tap r reaches output row p = i + (ph + pt - r*dH) / sH for input
row h = ph + i*sH. So each program takes pixels of one phase and skips the taps that miss it (a
zero-trip loop): no masked-off multiply-adds, no copy of grad_out.

Epilogue (forward): bias and the activation on the fp32 (fp64) accumulator; relu / leaky_relu
write a 1-byte mask, gelu / gelu_tanh / silu the pre-activation (the SAVE codes of linear).

Pointer offsets are int64: the activations of a large batch pass 2**31 elements.
"""
import triton
import triton.language as tl

from .linear import _activation, _activation_grad, _from_registers, _grouped_tile, _sum_splits  # noqa: F401
from .matmul_tiles import TileLists

# Channels per group below which FEW_CHANNELS folds s into the channel axis (tl.dot's minimum K).
FEW_CHANNELS_BELOW = 16

# --- autotune config lists -------------------------------------------------------------------------
#
# Tiles as linear's: (outer0, outer1, reduction block, warps, stages), with the blocks named as in
# linear: BLOCK_M output (or input) pixels, BLOCK_N output channels, BLOCK_K input channels. The
# forward tiles (BLOCK_M, BLOCK_N) and reduces BLOCK_K, grad_input tiles (BLOCK_M, BLOCK_K) and
# reduces BLOCK_N, grad_weight tiles (BLOCK_N, BLOCK_K) and reduces BLOCK_M. The first tile of a
# list is its default (the interpreter's, and FASTDL_AUTOTUNE=0's). Lists are short on purpose:
# the reduction per (r, s) is only C_g (64..512 in a ResNet) long, so deep K tiles and more stages
# buy little, and every entry is compiled for sm_80 and sm_90 by `fastdl inspect --configs all`.
KERNELS = {  # kernel name -> (its reduction block, the pointer whose dtype the dot's operands have)
    "conv2d_fwd": ("BLOCK_K", "x_ptr"),
    "conv2d_bwd_input": ("BLOCK_N", "w_ptr"),
    "conv2d_bwd_weight": ("BLOCK_M", "x_ptr"),
}
HEAVY_EPILOGUES = (3, 4, 5, 6, 7)

# From `fastdl inspect --arch sm_90 --configs all` at ResNet-50's layers (spills per thread noted):
# 256x128x32 spills 155-166 B in the forward and 21-90 B in grad_input, 256x128 in grad_weight
# 55-67 B; grad_input's 128x64x32 with 4 warps 4-10 B (relu, gelu), its 128x128x64 6-11 B.
_16 = ((128, 64, 32, 4, 3), (128, 128, 32, 8, 3), (64, 64, 32, 4, 4), (128, 128, 64, 8, 3))
_TF32 = ((128, 128, 32, 8, 3), (64, 64, 32, 4, 4), (128, 64, 32, 4, 3))
_FP32 = ((64, 64, 32, 4, 3), (128, 64, 32, 8, 3))  # FFMA
_FP64 = ((64, 64, 32, 8, 3), (32, 64, 16, 4, 3))
_FP64_BWD = ((32, 32, 16, 4, 3), (32, 64, 16, 8, 3))  # 64x64x32 and 32x64x32 spill 14-64 B (DMMA)
CONFIG_LISTS = {
    "fp16/bf16": _16,
    "fp16/bf16 heavy": _16[:1] + _16[2:],  # 128x128x32 with 8 warps: 1 B with gelu
    "tf32": _TF32[:2],  # 128x64x32 with 4 warps: 3 B
    "tf32 heavy": _TF32[1:2],  # 128x128x32 with gelu: 17 B
    "fp32": _FP32,
    "fp64": _FP64,
    "fp64 heavy": _FP64_BWD,
    # C / groups < 16 (the stem's 3 channels): FEW_CHANNELS' per-column index math and gather, or
    # (grad_input) a channel tile mostly beyond C_g; 128-row tiles spilled 268-916 B there.
    "few channels": ((64, 64, 32, 4, 4), (64, 32, 32, 4, 3)),
    "fp64 few channels": ((32, 32, 16, 4, 3), (32, 64, 16, 4, 3)),  # fp64 stem: 64x64x32 324 B, 64x32x32 26 B
    # 4-byte stem (fp32, TF32; FFMA or mma with FEW_CHANNELS' per-column index math): 64x64x32
    # spilled 100-181 B on sm_80; 64x32x32 80 B (sm_80) / 168 B (sm_90), 32x32x32 72 B with 4 warps
    # (fp32, sm_90) and 24 B with 8 (TF32, sm_90), 64x32x16/8 warps 16 B (TF32, sm_80): 16-deep tiles
    # or 16 output channels a tile are clean on both.
    "fp32 few channels": ((32, 32, 16, 4, 3), (64, 16, 32, 8, 3), (32, 32, 16, 8, 2), (32, 16, 16, 4, 3)),
}
# fp32 grad_weight (FFMA) spilled 456-494 B at 64x64x32 / 128x64x32, grad_input 2 B at 64x64x32 w4;
# TF32 grad_input with gelu 4 B at 64x64x32; fp64 grad_input 4 B at 32x64x16 w8; the stem's
# grad_weight 149 B / 4 B at 64x64x32 / 64x32x32.
KERNEL_LISTS = {
    ("conv2d_fwd", "tf32"): _TF32[1:2],  # 128x128x32/8 warps: 2-5 B at the 1x1 layers
    ("conv2d_bwd_input", "fp16/bf16"): ((128, 128, 32, 8, 3), (64, 64, 32, 4, 4)),
    ("conv2d_bwd_input", "fp16/bf16 heavy"): ((128, 128, 32, 8, 3), (64, 64, 32, 4, 4)),
    ("conv2d_bwd_input", "tf32"): ((64, 32, 32, 4, 3),),  # 128x64 79 B, 128x128 10 B, 64x64x32 10 B (3x3/2)
    ("conv2d_bwd_input", "tf32 heavy"): ((64, 32, 32, 4, 3),),
    ("conv2d_bwd_input", "fp32"): ((128, 64, 32, 8, 3), (64, 32, 32, 4, 3)),
    ("conv2d_bwd_input", "fp64"): _FP64_BWD[:1],
    ("conv2d_bwd_input", "fp64 heavy"): _FP64_BWD[:1],
    ("conv2d_bwd_weight", "fp32"): ((32, 32, 32, 8, 3), (64, 32, 16, 4, 3)),
    ("conv2d_bwd_weight", "few channels"): ((32, 32, 32, 4, 3), (32, 64, 16, 4, 3)),
    # the 4-byte stem's grad_weight: 32x32x16 with 3 stages 8 B (TF32; 4 warps sm_90, 8 warps both),
    # 32x16x16 8 B (TF32, sm_80); grad_input: 64x32x32 24-48 B and 32x32x32 8-24 B on both archs,
    # 64x16x32 8-48 B; a 16-channel tile covers C = 3
    ("conv2d_bwd_weight", "fp32 few channels"): ((32, 32, 32, 8, 3), (32, 32, 16, 8, 2)),
    ("conv2d_bwd_input", "fp32 few channels"): ((32, 16, 16, 4, 3), (32, 32, 16, 4, 3), (32, 32, 16, 8, 2)),
    ("conv2d_bwd_input", "fp64 few channels"): ((32, 64, 16, 4, 3),),  # 32x32x16: 5 B
    ("conv2d_bwd_input", "few channels"): ((64, 16, 32, 4, 3), (32, 16, 32, 4, 3)),
    ("conv2d_bwd_weight", "fp16/bf16 heavy"): _16[1:3],  # 128x128x64: 13 B with gelu, 128x64x32/4: 1 B
    ("conv2d_bwd_weight", "tf32"): _TF32[:2],  # 128x64x32/4 warps: 1 B (3x3/2)
    ("conv2d_bwd_weight", "fp64"): _FP64_BWD,
}


# Tiles that spill on sm_80 (mma.sync keeps operand fragments in registers; `fastdl inspect --arch
# sm_80 --configs all --op conv2d`, bytes per thread, worst variant): a launch on a compute
# capability 8.x GPU (target.py) picks from its list without them (plus SM80_EXTRA), so the next
# tile is its default there.
SM80_SPILLS = {
    ("conv2d_bwd_input", "fp16/bf16"): {(64, 64, 32, 4, 4): 24},  # relu 3x3
    ("conv2d_bwd_weight", "fp16/bf16"): {(128, 128, 32, 8, 3): 8},  # relu, 1x1 and 3x3
    ("conv2d_bwd_weight", "fp16/bf16 heavy"): {(128, 128, 32, 8, 3): 46},
    ("conv2d_fwd", "fp16/bf16 heavy"): {(128, 64, 32, 4, 3): 13, (128, 128, 64, 8, 3): 48},
    ("conv2d_bwd_input", "fp16/bf16 heavy"): {(128, 128, 32, 8, 3): 16, (64, 64, 32, 4, 4): 24},
    ("conv2d_bwd_input", "tf32 heavy"): {(64, 32, 32, 4, 3): 8},
    ("conv2d_bwd_input", "few channels"): {(32, 16, 32, 4, 3): 16},
    ("conv2d_bwd_weight", "few channels"): {(32, 64, 16, 4, 3): 16},
    ("conv2d_bwd_input", "fp64 few channels"): {(32, 64, 16, 4, 3): 40},
}
# Tiles compiled clean on sm_80 where the list had spilled down to nothing (every variant of the list
# at ResNet-50's layers): a launch there picks from its list less SM80_SPILLS plus these.
SM80_EXTRA = {
    # grad_out * GELU'(z) on the (BLOCK_M, BLOCK_N) tile: 64x32x32 with 4 warps 16 B, 8 warps clean
    ("conv2d_bwd_input", "fp16/bf16 heavy"): ((64, 64, 32, 8, 3), (64, 32, 32, 8, 3)),
    # with relu: 64x64x32/8 warps 8-32 B (1x1, 3x3), 64x32x32/8 clean in every variant
    ("conv2d_bwd_input", "fp16/bf16"): ((64, 32, 32, 8, 3),),
    # 64x32x32/8 warps 24 B, 32x32x32/4 32 B; a 16-deep reduction is clean
    ("conv2d_bwd_input", "tf32 heavy"): ((64, 32, 16, 4, 3),),
    # the fp64 stem's grad_input: 32x32x16, 32x16x16 and 16x32x16 with 3 stages 8-16 B; 2 stages clean
    ("conv2d_bwd_input", "fp64 few channels"): ((32, 16, 16, 4, 2), (32, 32, 16, 4, 2)),
}


def _config_list_name(kernel: str, named_args: dict, kwargs: dict) -> str:
    """The list a launch picks from: its operand precision and whether its epilogue / prologue is heavy."""
    itemsize = named_args[KERNELS[kernel][1]].dtype.itemsize
    heavy = kwargs.get("ACTIVATION", 0) in HEAVY_EPILOGUES
    if named_args.get("C_g", FEW_CHANNELS_BELOW) < FEW_CHANNELS_BELOW:
        return {8: "fp64 few channels", 4: "fp32 few channels"}.get(itemsize, "few channels")
    if itemsize == 8:
        return "fp64" + (" heavy" if heavy else "")
    if itemsize == 4 and kwargs.get("INPUT_PRECISION", "ieee") == "ieee":
        return "fp32"
    return ("fp16/bf16" if itemsize == 2 else "tf32") + (" heavy" if heavy else "")


TILES = TileLists(KERNELS, CONFIG_LISTS, KERNEL_LISTS, _config_list_name, SM80_SPILLS, SM80_EXTRA)
# The names tests, the inspection and the launchers use.
config_list_name, config_tiles, tile_of = TILES.list_name, TILES.config_tiles, TILES.tile_of
list_configs, _autotune = TILES.list_configs, TILES.autotune


# Sizes that only bound masks and index arithmetic are not specialized (divisibility by 16, == 1):
# one binary serves every batch size and image size. Channel counts, kernel sizes, strides and the
# tensors' strides stay specialized: they decide the 16-byte alignment of the operand rows and fold
# 1x1 kernels and unit strides.
_GEOMETRY = ["N", "H", "W", "P", "Q", "pad_h", "pad_w", "dil_h", "dil_w"]


def _jit(fn):
    return triton.jit(fn, do_not_specialize=_GEOMETRY)


# --- forward ----------------------------------------------------------------------------------------

@_autotune("conv2d_fwd", key=["N", "C_g", "H", "W", "K_g", "P", "Q", "R", "S", "stride_h", "stride_w",
                              "ACTIVATION", "HAS_BIAS", "FEW_CHANNELS", "INPUT_PRECISION"])
@_jit
def _conv2d_fwd(
    x_ptr, w_ptr, bias_ptr, out_ptr, saved_ptr,  # x (N, C, H, W), w (K, C_g, R, S), bias (K,), out/saved (N, K, P, Q)
    N, C_g, H, W, K_g, P, Q, R, S,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wk, stride_wc, stride_wr, stride_ws, stride_bias,
    stride_on, stride_ok, stride_op, stride_oq,  # out's strides; saved has out's layout
    negative_slope,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, SAVE: tl.constexpr, FEW_CHANNELS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """Tile (BLOCK_M output pixels, BLOCK_N output channels of group program_id(1))."""
    M = N * P * Q
    group = tl.program_id(1).to(tl.int64)
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K_g, BLOCK_N), GROUP)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    q = offs_m % Q
    p = (offs_m // Q) % P
    n = offs_m // (P * Q)
    m_ok = offs_m < M
    n_ok = offs_n < K_g
    ih0 = p * stride_h - pad_h
    iw0 = q * stride_w - pad_w
    x_image = x_ptr + n * stride_xn + group * C_g * stride_xc
    w_rows = w_ptr + (group * K_g + offs_n).to(tl.int64) * stride_wk
    if FEW_CHANNELS:
        s_taps = 1
        span = S * C_g  # j = s * C_g + c
    else:
        s_taps = S
        span = C_g
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for r in range(0, R):
        ih = ih0 + r * dil_h
        row_ok = m_ok & (ih >= 0) & (ih < H)
        x_row = x_image + ih * stride_xh
        for s in range(0, s_taps):
            if FEW_CHANNELS:
                x_pix = x_row
            else:
                iw = iw0 + s * dil_w
                pix_ok = row_ok & (iw >= 0) & (iw < W)
                x_pix = x_row + iw * stride_xw
            w_tap = w_rows + r * stride_wr + s * stride_ws
            for kb in range(0, tl.cdiv(span, BLOCK_K)):
                j = kb * BLOCK_K + offs_k
                if FEW_CHANNELS:
                    # The (BLOCK_M, BLOCK_K) index math in int32 (an offset within one image row);
                    # in int64 it spilled 268 B on sm_90.
                    s_j = j // C_g
                    c_j = j % C_g
                    iw_j = iw0.to(tl.int32)[:, None] + (s_j * dil_w)[None, :]
                    x_mask = row_ok[:, None] & (iw_j >= 0) & (iw_j < W) & (j < span)[None, :]
                    x_ptrs = x_pix[:, None] + iw_j * stride_xw + (c_j * stride_xc)[None, :]
                    w_ptrs = w_tap[None, :] + (c_j * stride_wc + s_j * stride_ws)[:, None]
                else:
                    x_mask = pix_ok[:, None] & (j < span)[None, :]
                    x_ptrs = x_pix[:, None] + (j * stride_xc)[None, :]
                    w_ptrs = w_tap[None, :] + (j * stride_wc)[:, None]
                x = tl.load(x_ptrs, mask=x_mask, other=0.0)
                w = tl.load(w_ptrs, mask=(j < span)[:, None] & n_ok[None, :], other=0.0)
                acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + (group * K_g + offs_n) * stride_bias, mask=n_ok, other=0.0)
        acc += bias.to(ACC_DTYPE)[None, :]
    out = _activation(acc, negative_slope, ACTIVATION)
    offs_o = (n * stride_on + p * stride_op + q * stride_oq)[:, None] + ((group * K_g + offs_n) * stride_ok)[None, :]
    tile_mask = m_ok[:, None] & n_ok[None, :]
    tl.store(out_ptr + offs_o, out.to(out_ptr.dtype.element_ty), mask=tile_mask)
    if SAVE == 1:
        tl.store(saved_ptr + offs_o, (acc > 0).to(tl.uint8), mask=tile_mask)
    elif SAVE == 2:
        tl.store(saved_ptr + offs_o, acc.to(saved_ptr.dtype.element_ty), mask=tile_mask)


# --- grad_input ---------------------------------------------------------------------------------------

@_autotune("conv2d_bwd_input", key=["N", "C_g", "H", "W", "K_g", "P", "Q", "R", "S", "stride_h", "stride_w",
                                    "ACTIVATION", "INPUT_PRECISION"])  # C_g < 16 picks "few channels"
@_jit
def _conv2d_bwd_input(
    grad_out_ptr, saved_ptr, w_ptr, grad_input_ptr,  # grad_out/saved (N, K, P, Q), w (K, C_g, R, S), grad_input (N, C, H, W)
    N, C_g, H, W, K_g, P, Q, R, S,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    stride_gn, stride_gk, stride_gp, stride_gq,
    stride_sn, stride_sk, stride_sp, stride_sq,
    stride_wk, stride_wc, stride_wr, stride_ws,
    stride_in, stride_ic, stride_ih, stride_iw,
    negative_slope,
    ACTIVATION: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """Tile (BLOCK_M input pixels of one stride phase, BLOCK_K input channels); program_id(1) is
    group * sH * sW + phase. Every input pixel belongs to exactly one program, which writes it
    (zeros where no tap reaches it)."""
    rows_ph = tl.cdiv(H, stride_h)
    cols_ph = tl.cdiv(W, stride_w)
    M = N * rows_ph * cols_ph
    phases = stride_h * stride_w
    group = (tl.program_id(1) // phases).to(tl.int64)
    phase = tl.program_id(1) % phases
    ph = phase // stride_w
    pw = phase % stride_w
    pid_m, pid_c = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(C_g, BLOCK_K), GROUP)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    j = offs_m % cols_ph
    i = (offs_m // cols_ph) % rows_ph
    n = offs_m // (rows_ph * cols_ph)
    h = ph + i * stride_h
    w = pw + j * stride_w
    m_ok = (offs_m < M) & (h < H) & (w < W)
    c_ok = offs_c < C_g
    g_image = grad_out_ptr + n * stride_gn + group * K_g * stride_gk
    s_image = saved_ptr + n * stride_sn + group * K_g * stride_sk
    w_cols = w_ptr + group * K_g * stride_wk + offs_c * stride_wc
    k_blocks = tl.cdiv(K_g, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC_DTYPE)
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
            pix_ok = p_ok & (q >= 0) & (q < Q)
            g_pix = g_image + p * stride_gp + q * stride_gq
            s_pix = s_image + p * stride_sp + q * stride_sq
            w_tap = w_cols + r * stride_wr + s * stride_ws
            for kb in range(0, tl.where(hits, k_blocks, 0)):  # zero trips for a tap that misses
                k = kb * BLOCK_N + offs_n
                g_mask = pix_ok[:, None] & (k < K_g)[None, :]
                grad = tl.load(g_pix[:, None] + (k * stride_gk)[None, :], mask=g_mask, other=0.0)
                if ACTIVATION != 0:
                    saved = tl.load(s_pix[:, None] + (k * stride_sk)[None, :], mask=g_mask, other=0)
                    grad = _activation_grad(grad.to(ACC_DTYPE), saved.to(ACC_DTYPE), negative_slope, ACTIVATION)
                wt = tl.load(w_tap[None, :] + (k.to(tl.int64) * stride_wk)[:, None],
                             mask=(k < K_g)[:, None] & c_ok[None, :], other=0.0)
                acc = tl.dot(grad.to(wt.dtype), wt, acc, input_precision=INPUT_PRECISION)
    offs_i = (n * stride_in + h * stride_ih + w * stride_iw)[:, None] + ((group * C_g + offs_c) * stride_ic)[None, :]
    tl.store(grad_input_ptr + offs_i, acc.to(grad_input_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


# --- grad_weight (and grad_bias) ------------------------------------------------------------------

@_autotune("conv2d_bwd_weight", key=["N", "C_g", "H", "W", "K_g", "P", "Q", "R", "S", "stride_h", "stride_w",
                                     "ACTIVATION", "HAS_BIAS", "FEW_CHANNELS", "INPUT_PRECISION", "REGISTER_A"])
@_jit
def _conv2d_bwd_weight(
    grad_out_ptr, saved_ptr, x_ptr, grad_weight_ptr, grad_bias_ptr,
    N, C_g, H, W, K_g, P, Q, R, S,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    stride_gn, stride_gk, stride_gp, stride_gq,
    stride_sn, stride_sk, stride_sp, stride_sq,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wsplit, stride_wk, stride_wc, stride_wr, stride_ws, stride_bsplit,
    negative_slope,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, FEW_CHANNELS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, REGISTER_A: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """Tile (BLOCK_N output channels, BLOCK_K input channels) of one kernel position (r, s) (with
    FEW_CHANNELS: of one kernel row r, columns j = s * C_g + c) of one group: program_id(1) is
    group * taps + tap. The M = N*P*Q output pixels are split across program_id(2): each split
    writes its partial sums at grad_weight_ptr + split * stride_wsplit (an fp32 workspace that
    _sum_splits reduces in a fixed order; with one split, grad_weight itself). grad_bias is summed
    by the programs of tap 0 and column block 0."""
    if FEW_CHANNELS:
        s_taps = 1
        span = S * C_g
    else:
        s_taps = S
        span = C_g
    taps = R * s_taps
    group = (tl.program_id(1) // taps).to(tl.int64)
    tap = tl.program_id(1) % taps
    r = tap // s_taps
    s = tap % s_taps
    pid_n, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(K_g, BLOCK_N), tl.maximum(tl.cdiv(span, BLOCK_K), 1), GROUP)
    M = N * P * Q
    split = tl.program_id(2)
    blocks_per_split = tl.cdiv(tl.cdiv(M, BLOCK_M), tl.num_programs(2))
    m_start = split.to(tl.int64) * blocks_per_split * BLOCK_M
    m_end = tl.minimum(M, m_start + blocks_per_split * BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = offs_n < K_g
    k_ok = offs_k < span
    if FEW_CHANNELS:
        s_j = offs_k // C_g
        c_j = offs_k % C_g
    else:
        s_j = s
        c_j = offs_k
    col_w = s_j * dil_w - pad_w  # iw = q * sW + col_w
    x_cols = x_ptr + group * C_g * stride_xc + c_j.to(tl.int64) * stride_xc
    g_chan = (group * K_g + offs_n) * stride_gk
    s_chan = (group * K_g + offs_n) * stride_sk
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC_DTYPE)
    bias_acc = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    for mb in range(0, tl.cdiv(m_end - m_start, BLOCK_M)):
        offs_m = m_start + mb * BLOCK_M + tl.arange(0, BLOCK_M)
        q = offs_m % Q
        p = (offs_m // Q) % P
        n = offs_m // (P * Q)
        m_ok = offs_m < m_end
        # g is read transposed, (BLOCK_N, BLOCK_M), so the dot is g.T @ x with no shuffle.
        g_mask = n_ok[:, None] & m_ok[None, :]
        g_pix = n * stride_gn + p * stride_gp + q * stride_gq
        grad = tl.load(grad_out_ptr + g_chan[:, None] + g_pix[None, :], mask=g_mask, other=0.0).to(ACC_DTYPE)
        if ACTIVATION != 0:
            s_pix = n * stride_sn + p * stride_sp + q * stride_sq
            saved = tl.load(saved_ptr + s_chan[:, None] + s_pix[None, :], mask=g_mask, other=0)
            grad = _activation_grad(grad, saved.to(ACC_DTYPE), negative_slope, ACTIVATION)
        if HAS_BIAS:
            bias_acc += tl.sum(grad, axis=1)
        ih = p * stride_h - pad_h + r * dil_h
        row_ok = m_ok & (ih >= 0) & (ih < H)
        x_row = n * stride_xn + ih * stride_xh
        if FEW_CHANNELS:
            iw = (q.to(tl.int32) * stride_w)[:, None] + col_w[None, :]  # int32, as in the forward
            x_mask = row_ok[:, None] & (iw >= 0) & (iw < W) & k_ok[None, :]
            x_ptrs = x_cols[None, :] + x_row[:, None] + iw * stride_xw
        else:
            iw = q * stride_w + col_w
            x_mask = (row_ok & (iw >= 0) & (iw < W))[:, None] & k_ok[None, :]
            x_ptrs = x_cols[None, :] + (x_row + iw * stride_xw)[:, None]
        x = tl.load(x_ptrs, mask=x_mask, other=0.0)
        # REGISTER_A (TF32 on Hopper): g.T, contiguous along the output channels, fed to wgmma from
        # registers rather than copied into shared memory 4 bytes at a time (linear's _from_registers).
        acc = tl.dot(_from_registers(grad.to(x.dtype), REGISTER_A), x, acc, input_precision=INPUT_PRECISION)
    split_offset = split.to(tl.int64) * stride_wsplit
    offs_w = (((group * K_g + offs_n) * stride_wk)[:, None]
              + (c_j * stride_wc + r * stride_wr + s_j * stride_ws)[None, :])
    tl.store(grad_weight_ptr + split_offset + offs_w, acc.to(grad_weight_ptr.dtype.element_ty),
             mask=n_ok[:, None] & k_ok[None, :])
    if HAS_BIAS:
        if (tap == 0) & (pid_k == 0):
            tl.store(grad_bias_ptr + split.to(tl.int64) * stride_bsplit + group * K_g + offs_n,
                     bias_acc.to(grad_bias_ptr.dtype.element_ty), mask=n_ok)
