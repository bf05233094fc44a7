"""Dense layer with a fused activation: forward and backward Triton kernels.

Forward:  out = act(x @ w.T + b). The bias add and the activation are an epilogue on the fp32
(fp64 for fp64) accumulator, so the pre-activation never makes a round trip through memory.
What backward needs is written in the same epilogue (SAVE):
  - relu / leaky_relu: a uint8 mask, 1 byte per element instead of the 2-4 byte pre-activation;
  - gelu / gelu_tanh / silu: the pre-activation (their derivative needs it);
  - sigmoid / tanh / none: nothing; the derivative is a function of `out`, which autograd keeps.

Backward, with g = grad_out * act'(.) computed in the prologue of each operand load, never stored:
  grad_input  = g @ w          (_linear_bwd_input, tiles over (M, K), loop over N)
  grad_weight = g.T @ x        (_linear_bwd_weight, tiles over (N, K), loop over M)
  grad_bias   = g.sum(0)       (the k == 0 column of _linear_bwd_weight programs, loop over M)
and _linear_grad_weight_accumulate, grad_weight (+)= g.T @ x in place: linear_cross_entropy's
chunks add their rows' share into one grad_weight.
Every program owns its outputs (no atomics), so results are deterministic and autotuning is safe.

Pointer offsets are int64: any of these tensors may pass 2**31 elements.
"""
import triton
import triton.language as tl

from .matmul_tiles import TileLists, first_config_only, without  # noqa: F401  (first_config_only: conv2d's)
from .dropout import keep_factor, keep_words_rows

# ACTIVATION and SAVE take the codes of fastdl.backends.common (ACTIVATION_CODES, SAVE_KIND).


# --- autotune config lists -------------------------------------------------------------------------
#
# A tile is (outer0, outer1, reduction block, warps, stages): the output tile is outer0 x outer1,
# (BLOCK_M, BLOCK_N) in the forward, (BLOCK_M, BLOCK_K) in grad_input and (BLOCK_N, BLOCK_K) in
# grad_weight, and the loop steps over the reduction block (BLOCK_K, BLOCK_N, BLOCK_M).
#
# Each launch may pick only from the list of its kernel, precision and epilogue on its target
# (early_config_prune, matmul_tiles.py; the target is the launch's device, see target.py). Every tile fits the
# A100's 163 KB of shared memory per block (the H100's is 227 KB). On sm_90 no pickable config
# spills registers (`fastdl inspect --arch sm_90 --configs all`: 0 of 825 pairs); on the A100, where
# mma.sync keeps the operands in registers, 90 of those pairs spilled (8 B to 1.2 KB, mostly the
# backward kernels' 128-wide tiles with an activation), so its lists drop them (SM80_SPILLS below)
# and add clean tiles where too few were left (SM80_EXTRA). The numbers in the comments are spills
# per thread from those runs. The first tile of a list is its default: what runs under the
# interpreter (the whole list, whatever the target) and with FASTDL_AUTOTUNE=0 (the target's list).
HEAVY_EPILOGUES = (3, 4, 5, 6, 7)  # gelu, gelu_tanh, silu, sigmoid, tanh: transcendental math per element

KERNELS = {  # kernel name -> (its reduction block, the pointer whose dtype the dot's operands have)
    "linear_fwd": ("BLOCK_K", "x_ptr"),
    "linear_bwd_input": ("BLOCK_N", "w_ptr"),
    "linear_bwd_weight": ("BLOCK_M", "x_ptr"),
    "linear_grad_weight_accumulate": ("BLOCK_M", "x_ptr"),
}

# (regs / spill: sm_90 unless named; "spills" is any local memory per thread.)
_16 = ((64, 64, 32, 4, 3), (128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
       (256, 128, 64, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 64, 4, 4))
_TF32 = ((64, 64, 32, 4, 3), (128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4),
         (64, 64, 64, 4, 3), (128, 128, 64, 8, 2), (64, 64, 32, 8, 3))
# fp64 (DMMA): 64x64 tiles with 4 warps spill without bias (8-16 B) and with gelu_tanh (432 B).
_FP64 = ((64, 64, 32, 8, 3), (32, 64, 32, 4, 3), (32, 32, 32, 4, 3), (128, 64, 16, 8, 3), (64, 128, 16, 8, 3))
# The fp64 GELU derivative (erf and exp in double) needs reduction blocks of 16: 64x64x32 spills 2 KB.
_FP64_HEAVY_BWD = ((32, 32, 16, 4, 3), (32, 32, 16, 8, 3), (64, 32, 16, 8, 3), (32, 64, 16, 8, 3))

# The forward's lists; KERNEL_LISTS below holds the backward kernels'.
CONFIG_LISTS = {
    # 128x256x64 spills 24 B with relu (its uint8 mask store); 256x128x64 (236 regs) is clean.
    "fp16/bf16": without(_16, (128, 256, 64, 8, 3)),
    # gelu / silu in the epilogue of a 128-element-per-thread accumulator: 128x256 and 256x128 spill
    # up to 700 B, also with BLOCK_K=32; 128x128x64 (150 regs) is the biggest clean tile.
    "fp16/bf16 heavy": without(_16, (128, 256, 64, 8, 3), (256, 128, 64, 8, 3)),
    # TF32's 128x256x32 / 256x128x32 spill 48-700 B (and 64-wide K at 3 stages would not fit 163 KB).
    "tf32": _TF32,
    "tf32 heavy": _TF32,
    # FFMA: 128x64 / 64x128 with 4 warps spill 16 B, 64x64x64 spills 32 B without bias.
    "fp32": ((64, 64, 32, 4, 3), (128, 128, 32, 8, 3), (64, 64, 32, 8, 3), (64, 64, 16, 4, 3)),
    "fp64": _FP64,
    "fp64 heavy": _FP64[:3] + ((64, 32, 32, 4, 3),),
}
_BWD_WEIGHT = {
    # 256x128x64 spills 112 B (leaky_relu): g is read transposed, (BLOCK_N, BLOCK_M).
    "fp16/bf16": without(_16, (256, 128, 64, 8, 3)),
    # 128x128x64 spills 8 B (fp16 gelu), 128x256x64 184 B, 64x64x64 16 B.
    "fp16/bf16 heavy": ((64, 64, 32, 4, 3), (128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4),
                        (64, 64, 32, 8, 3), (128, 256, 32, 8, 3)),
    # With g.T fed to wgmma from registers (REGISTER_A, sm_90): 128x256x32 spills 32 B (leaky_relu),
    # 128x128x64 24 B (gelu).
    "tf32": _TF32,
    "tf32 heavy": without(_TF32, (128, 128, 64, 8, 2)),
    "fp32": ((64, 64, 32, 4, 3), (64, 128, 32, 4, 4), (64, 64, 64, 4, 4), (128, 128, 32, 8, 3), (64, 64, 32, 8, 3)),
    "fp64": _FP64,
    "fp64 heavy": without(_FP64_HEAVY_BWD, (64, 32, 16, 8, 3)),  # 56 B with gelu
}
KERNEL_LISTS = {
    **{("linear_bwd_input", name): tiles for name, tiles in {
        # 64x64x32 with 4 warps spills 8 B on sm_80 (fp16, bf16); 256x128x64 spills 32-280 B.
        "fp16/bf16": ((64, 64, 64, 4, 4), (128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
                      (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 8, 3)),
        "fp16/bf16 heavy": ((64, 64, 64, 4, 4), (128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (128, 256, 32, 8, 3),
                            (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 8, 3)),
        # 256x128x32 spills 16 B on sm_80 in the transposed TF32 product (152 B with relu).
        "tf32": _TF32 + ((128, 256, 32, 8, 3),),
        "tf32 heavy": without(_TF32, (128, 128, 64, 8, 2)) + ((128, 256, 32, 8, 3),),  # 128x128x64: 8 B
        # FFMA with the activation's prologue: every other tile spills 8-24 B with some activation.
        "fp32": ((128, 128, 32, 8, 3),),
        "fp64": _FP64,
        "fp64 heavy": _FP64_HEAVY_BWD,
    }.items()},
    **{("linear_bwd_weight", name): tiles for name, tiles in _BWD_WEIGHT.items()},
    # No activation, but its g tile is read from grad_out directly: 128x256 spills 304-432 B.
    **{("linear_grad_weight_accumulate", name): without(tiles, (128, 256, 64, 8, 3), (128, 256, 32, 8, 3))
       for name, tiles in _BWD_WEIGHT.items()},
}

# On the A100 (and every compute capability 8.x GPU: mma.sync holds its operand fragments in
# registers, where sm_90's wgmma reads them from shared memory) some tiles that are clean on sm_90
# spill. A launch there (target.py) picks from its list less SM80_SPILLS, plus SM80_EXTRA where
# too little would be left. From `fastdl inspect --arch sm_80 --configs all` over every variant of
# each list (bytes per thread, worst variant); the extras compiled clean in every variant of their
# list on sm_80.
SM80_SPILLS = {
    ("linear_fwd", "fp16/bf16"): {(256, 128, 64, 8, 3): 24},
    ("linear_fwd", "fp16/bf16 heavy"): {(64, 64, 32, 4, 3): 8},
    ("linear_fwd", "fp32"): {(64, 64, 32, 8, 3): 8},
    ("linear_bwd_input", "fp16/bf16"): {(128, 64, 32, 4, 4): 8, (128, 128, 64, 8, 3): 16, (128, 256, 64, 8, 3): 168},
    ("linear_bwd_input", "fp16/bf16 heavy"): {(64, 64, 64, 4, 4): 16, (128, 128, 64, 8, 3): 1192,
                                              (128, 256, 32, 8, 3): 48},
    ("linear_bwd_input", "tf32"): {(64, 64, 32, 4, 3): 8, (64, 64, 64, 4, 3): 16, (128, 128, 64, 8, 2): 120,
                                   (128, 256, 32, 8, 3): 48},
    ("linear_bwd_input", "tf32 heavy"): {(64, 128, 32, 4, 4): 8, (128, 64, 32, 4, 4): 24, (128, 256, 32, 8, 3): 240},
    ("linear_bwd_input", "fp32"): {(128, 128, 32, 8, 3): 64},
    ("linear_bwd_input", "fp64"): {(64, 64, 32, 8, 3): 8, (64, 128, 16, 8, 3): 8},
    ("linear_bwd_input", "fp64 heavy"): {(32, 32, 16, 8, 3): 8},
    ("linear_bwd_weight", "fp16/bf16"): {(128, 128, 64, 8, 3): 80, (128, 256, 64, 8, 3): 376},
    ("linear_bwd_weight", "fp16/bf16 heavy"): {(64, 64, 32, 4, 3): 8, (64, 64, 32, 8, 3): 16, (64, 128, 32, 4, 4): 96,
                                               (128, 64, 32, 4, 4): 592, (128, 128, 32, 8, 3): 120,
                                               (128, 256, 32, 8, 3): 432},
    ("linear_bwd_weight", "tf32"): {(128, 128, 64, 8, 2): 32},
    ("linear_bwd_weight", "tf32 heavy"): {(64, 64, 64, 4, 3): 80, (64, 128, 32, 4, 4): 48, (128, 64, 32, 4, 4): 256,
                                          (128, 128, 32, 8, 3): 56},
    ("linear_bwd_weight", "fp32"): {(64, 64, 32, 8, 3): 8, (64, 64, 64, 4, 4): 384},
    ("linear_bwd_weight", "fp64 heavy"): {(32, 32, 16, 8, 3): 16},
}
SM80_EXTRA = {
    # FFMA with an activation's prologue: every tile of 128x128x32 or with 4 warps at 64x64x32
    # spilled with some activation; these four are clean with all eight.
    ("linear_bwd_input", "fp32"): ((128, 128, 16, 8, 3), (64, 128, 32, 8, 3), (64, 64, 32, 8, 3),
                                   (64, 64, 16, 4, 3)),
    # The GELU/SiLU/sigmoid/tanh derivative on a (BLOCK_N, BLOCK_M) tile of g: nothing of the list
    # is left; a 16-deep reduction keeps the 128x128 tile clean.
    ("linear_bwd_weight", "fp16/bf16 heavy"): ((64, 32, 32, 4, 3), (128, 128, 16, 8, 3)),
}


# Dropout in the forward's epilogue (Philox words for the whole tile, interleaved in registers) costs
# registers: these tiles spilled with it (fastdl inspect --configs all over the "dropout" cases,
# bytes per thread, worst variant), so a DROPOUT launch picks from its list without them.
DROPOUT_SPILLS = {
    ("linear_fwd", "fp16/bf16"): {(256, 128, 64, 8, 3): 408},
    ("linear_fwd", "fp32"): {(128, 128, 32, 8, 3): 24},
    ("linear_fwd", "tf32 heavy"): {(128, 64, 32, 4, 4): 64},
}
SM80_DROPOUT_SPILLS = {  # besides SM80_SPILLS, on sm_80
    ("linear_fwd", "tf32"): {(64, 128, 32, 4, 4): 8},
    ("linear_fwd", "tf32 heavy"): {(128, 128, 64, 8, 2): 8},
}
DROPOUT_SUFFIX = " dropout"


def _config_list_name(kernel: str, named_args: dict, kwargs: dict) -> str:
    itemsize = named_args[KERNELS[kernel][1]].dtype.itemsize
    heavy = kwargs.get("ACTIVATION", 0) in HEAVY_EPILOGUES
    if itemsize == 8:
        return "fp64" + (" heavy" if heavy else "")
    if itemsize == 2:
        precision = "fp16/bf16"
    elif kwargs.get("INPUT_PRECISION", "ieee") == "ieee":
        return "fp32"  # FFMA: no tensor cores; the same small tiles for every epilogue
    else:
        precision = "tf32"
    return precision + (" heavy" if heavy else "")


TILES = TileLists(KERNELS, CONFIG_LISTS, KERNEL_LISTS, _config_list_name, SM80_SPILLS, SM80_EXTRA,
                  variants={DROPOUT_SUFFIX: ("DROPOUT", DROPOUT_SPILLS, SM80_DROPOUT_SPILLS)})
# The names tests, the inspection and the launchers use.
config_list_name, config_tiles, tile_of = TILES.list_name, TILES.config_tiles, TILES.tile_of
list_configs, matmul_configs, _autotune = TILES.list_configs, TILES.all_configs, TILES.autotune
@triton.jit
def _tanh(z):
    # tanh through exp of a non-positive argument: no overflow, and it runs under the interpreter.
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -t, t)


@triton.jit
def _activation(z, negative_slope, ACTIVATION: tl.constexpr):
    y = z
    if ACTIVATION == 1:
        y = tl.where(z < 0, 0.0, z)  # NaN stays NaN, as torch.relu
    elif ACTIVATION == 2:
        y = tl.where(z > 0, z, z * negative_slope)
    elif ACTIVATION == 3:
        y = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACTIVATION == 4:
        y = 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    elif ACTIVATION == 5:
        y = z * tl.sigmoid(z)
    elif ACTIVATION == 6:
        y = tl.sigmoid(z)
    elif ACTIVATION == 7:
        y = _tanh(z)
    return y


@triton.jit
def _activation_grad(grad, saved, negative_slope, ACTIVATION: tl.constexpr):
    """grad * act'(.); `saved` is the mask (relu, leaky), pre-activation (gelu*, silu) or output."""
    g = grad
    if ACTIVATION == 1:
        g = tl.where(saved != 0, grad, 0.0)
    elif ACTIVATION == 2:
        g = tl.where(saved != 0, grad, grad * negative_slope)
    elif ACTIVATION == 3:
        cdf = 0.5 * (1.0 + tl.erf(saved * 0.7071067811865476))
        pdf = tl.exp(-0.5 * saved * saved) * 0.3989422804014327
        g = grad * (cdf + saved * pdf)
    elif ACTIVATION == 4:
        t = _tanh(0.7978845608028654 * (saved + 0.044715 * saved * saved * saved))
        d_inner = 0.7978845608028654 * (1.0 + 0.134145 * saved * saved)
        g = grad * (0.5 * (1.0 + t) + 0.5 * saved * (1.0 - t * t) * d_inner)
    elif ACTIVATION == 5:
        s = tl.sigmoid(saved)
        g = grad * (s * (1.0 + saved * (1.0 - s)))
    elif ACTIVATION == 6:
        g = grad * saved * (1.0 - saved)
    elif ACTIVATION == 7:
        g = grad * (1.0 - saved * saved)
    return g


@triton.jit
def _from_registers(a, REGISTER_A: tl.constexpr):
    """A dot's A operand, fed to Hopper's wgmma from registers where REGISTER_A.

    wgmma reads a 32-bit (TF32) operand from shared memory only K-major; g.T in the weight gradients
    is contiguous along the output dimension, so Triton 3.9 would copy it into shared memory
    transposed, 4 bytes per cp.async. From registers any layout will do and the loads stay 16 bytes
    wide. "+ 0.0" (not folded away: it turns -0.0 into +0.0, which no sum can tell apart) is what
    makes Triton feed the operand from registers. The launchers set REGISTER_A for TF32 products
    whose B operand is K-major (see k_major in fastdl/backends/triton/linear.py); elsewhere (sm_80's
    mma.sync, 2-byte operands) the operand is taken as it is: on sm_80 the extra registers spill.
    """
    if REGISTER_A:
        return a + 0.0
    return a


@triton.jit
def _grouped_tile(pid, num_rows, num_cols, GROUP: tl.constexpr):
    # Walk GROUP row-blocks per column sweep so operand tiles are reused from L2.
    width = GROUP * num_cols
    group_id = pid // width
    first_row = group_id * GROUP
    group_rows = tl.minimum(num_rows - first_row, GROUP)
    row = first_row + (pid % width) % group_rows
    col = (pid % width) // group_rows
    return row, col


@_autotune("linear_fwd", key=["M", "N", "K", "ACTIVATION", "HAS_BIAS", "INPUT_PRECISION", "DROPOUT"])
@triton.jit(do_not_specialize=["dropout_threshold"])
def _linear_fwd(
    x_ptr, w_ptr, bias_ptr, out_ptr, saved_ptr,  # x (M, K), w (N, K), bias (N,), out/saved (M, N)
    seed_ptr,  # (2,) int64 dropout key (read only with DROPOUT)
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_bias,
    stride_om, stride_on, stride_sm, stride_sn,
    negative_slope, dropout_threshold, dropout_scale: tl.float64,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, SAVE: tl.constexpr, DROPOUT: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0.0)
        w = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n * stride_bias, mask=offs_n < N, other=0.0)
        acc += bias.to(ACC_DTYPE)[None, :]
    out = _activation(acc, negative_slope, ACTIVATION)
    if DROPOUT:
        # Dropout after the activation, the mask a pure function of (seed, m, n): element (m, n) is
        # element n of row m of the (M, N) view in kernels/triton/dropout.py (rows padded to groups
        # of four), so it is the mask dropout draws for the contiguous output when N % 4 == 0, and
        # linear's backward regenerates it there (fastdl.backends.triton.dropout_rows).
        words = keep_words_rows(seed_ptr, offs_m, pid_n.to(tl.int64) * (BLOCK_N // 4), tl.cdiv(N, 4), BLOCK_N // 4)
        out = out * keep_factor(words, dropout_threshold, dropout_scale, ACC_DTYPE)
    tile_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             out.to(out_ptr.dtype.element_ty), mask=tile_mask)
    if SAVE == 1:
        tl.store(saved_ptr + offs_m[:, None] * stride_sm + offs_n[None, :] * stride_sn,
                 (acc > 0).to(tl.uint8), mask=tile_mask)
    elif SAVE == 2:
        tl.store(saved_ptr + offs_m[:, None] * stride_sm + offs_n[None, :] * stride_sn,
                 acc.to(saved_ptr.dtype.element_ty), mask=tile_mask)


@_autotune("linear_bwd_input", key=["M", "N", "K", "ACTIVATION", "INPUT_PRECISION"])
@triton.jit
def _linear_bwd_input(
    grad_out_ptr, saved_ptr, w_ptr, grad_input_ptr,  # grad_out/saved (M, N), w (N, K), grad_input (M, K)
    M, N, K,
    stride_gm, stride_gn, stride_sm, stride_sn, stride_wn, stride_wk, stride_im, stride_ik,
    negative_slope,
    ACTIVATION: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    pid_m, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    g_ptrs = grad_out_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn
    s_ptrs = saved_ptr + offs_m[:, None] * stride_sm + offs_n[None, :] * stride_sn
    # TF32 without an activation computes the transposed product, grad_input.T = w.T @ g.T. Hopper's
    # wgmma reads 32-bit operands from shared memory only K-major (contiguous along the reduction),
    # and w is reduced over N but contiguous along K: as the B operand of g @ w, Triton copied it
    # into shared memory transposed, 4 bytes per cp.async. As the A operand of w.T @ g.T it is read
    # from registers, where any layout will do, so it is copied 16 bytes at a time; g.T is K-major
    # as B. (With an activation g is computed in registers and would have to be stored as B, which
    # keeps each wgmma from overlapping the next step: those variants keep the plain product.)
    TRANSPOSED: tl.constexpr = INPUT_PRECISION == "tf32" and ACTIVATION == 0
    if TRANSPOSED:
        w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn  # w.T: (BLOCK_K, BLOCK_N)
        acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=ACC_DTYPE)
    else:
        w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC_DTYPE)
    for n in range(0, tl.cdiv(N, BLOCK_N)):
        n_left = N - n * BLOCK_N
        g_mask = (offs_m[:, None] < M) & (offs_n[None, :] < n_left)
        grad = tl.load(g_ptrs, mask=g_mask, other=0.0)
        if ACTIVATION != 0:
            saved = tl.load(s_ptrs, mask=g_mask, other=0)
            grad = _activation_grad(grad.to(ACC_DTYPE), saved.to(ACC_DTYPE), negative_slope, ACTIVATION)
        if TRANSPOSED:
            w_t = tl.load(w_ptrs, mask=(offs_k[:, None] < K) & (offs_n[None, :] < n_left), other=0.0)
            # "+ 0.0" (not folded: it turns -0.0 into +0.0, which no sum can tell) is what makes
            # Triton 3.9 feed w.T to wgmma from registers; without it w.T is copied 4 bytes at a time.
            acc = tl.dot(w_t + 0.0, tl.trans(grad.to(w_t.dtype)), acc, input_precision=INPUT_PRECISION)
        else:
            w = tl.load(w_ptrs, mask=(offs_n[:, None] < n_left) & (offs_k[None, :] < K), other=0.0)
            acc = tl.dot(grad.to(w.dtype), w, acc, input_precision=INPUT_PRECISION)
        g_ptrs += BLOCK_N * stride_gn
        s_ptrs += BLOCK_N * stride_sn
        w_ptrs += BLOCK_N * stride_wn
    if TRANSPOSED:
        tl.store(grad_input_ptr + offs_k[:, None] * stride_ik + offs_m[None, :] * stride_im,
                 acc.to(grad_input_ptr.dtype.element_ty),
                 mask=(offs_k[:, None] < K) & (offs_m[None, :] < M))
    else:
        tl.store(grad_input_ptr + offs_m[:, None] * stride_im + offs_k[None, :] * stride_ik,
                 acc.to(grad_input_ptr.dtype.element_ty),
                 mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


@_autotune("linear_bwd_weight", key=["M", "N", "K", "ACTIVATION", "HAS_BIAS", "INPUT_PRECISION", "REGISTER_A"])
@triton.jit
def _linear_bwd_weight(
    grad_out_ptr, saved_ptr, x_ptr, grad_weight_ptr, grad_bias_ptr,  # grad_out/saved (M, N), x (M, K)
    M, N, K,
    stride_gm, stride_gn, stride_sm, stride_sn, stride_xm, stride_xk,
    stride_wsplit, stride_wn, stride_wk, stride_bsplit,
    negative_slope,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, REGISTER_A: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """grad_weight (and grad_bias) over the rows of split program_id(1).

    With few (N, K) tiles and many rows, one program per tile would leave most SMs idle, so the
    rows are split across program_id(1): each split writes its partial sums at
    grad_weight_ptr + split * stride_wsplit (an fp32 workspace, reduced by _sum_splits), and with
    a single split the pointers are grad_weight and grad_bias themselves.
    """
    # K == 0 still runs one k-column: it owns grad_bias.
    pid_n, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.maximum(tl.cdiv(K, BLOCK_K), 1), GROUP)
    split = tl.program_id(1)
    blocks_per_split = tl.cdiv(tl.cdiv(M, BLOCK_M), tl.num_programs(1))
    m_start = split * blocks_per_split * BLOCK_M
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    offs_m = m_start + tl.arange(0, BLOCK_M).to(tl.int64)
    # g is read transposed, (BLOCK_N, BLOCK_M), so the dot is g.T @ x with no shuffle.
    g_ptrs = grad_out_ptr + offs_n[:, None] * stride_gn + offs_m[None, :] * stride_gm
    s_ptrs = saved_ptr + offs_n[:, None] * stride_sn + offs_m[None, :] * stride_sm
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC_DTYPE)
    bias_acc = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    m_end = tl.minimum(M - m_start, blocks_per_split * BLOCK_M)
    for m in range(0, tl.cdiv(m_end, BLOCK_M)):
        m_left = m_end - m * BLOCK_M
        g_mask = (offs_n[:, None] < N) & (offs_m[None, :] - m_start < m_left)
        grad = tl.load(g_ptrs, mask=g_mask, other=0.0).to(ACC_DTYPE)
        if ACTIVATION != 0:
            saved = tl.load(s_ptrs, mask=g_mask, other=0)
            grad = _activation_grad(grad, saved.to(ACC_DTYPE), negative_slope, ACTIVATION)
        if HAS_BIAS:
            bias_acc += tl.sum(grad, axis=1)
        x = tl.load(x_ptrs, mask=(offs_m[:, None] - m_start < m_left) & (offs_k[None, :] < K), other=0.0)
        acc = tl.dot(_from_registers(grad.to(x.dtype), REGISTER_A), x, acc, input_precision=INPUT_PRECISION)
        g_ptrs += BLOCK_M * stride_gm
        s_ptrs += BLOCK_M * stride_sm
        x_ptrs += BLOCK_M * stride_xm
    split_offset = split.to(tl.int64)
    tl.store(grad_weight_ptr + split_offset * stride_wsplit + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
             acc.to(grad_weight_ptr.dtype.element_ty),
             mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))
    if HAS_BIAS:
        if pid_k == 0:
            tl.store(grad_bias_ptr + split_offset * stride_bsplit + offs_n,
                     bias_acc.to(grad_bias_ptr.dtype.element_ty), mask=offs_n < N)


# Autotuning trial runs would each add into grad_weight; restore_value resets it between trials.
@_autotune("linear_grad_weight_accumulate", key=["M", "N", "K", "HAS_BIAS", "INPUT_PRECISION", "REGISTER_A"],
           restore_value=["grad_weight_ptr", "grad_bias_ptr"])
@triton.jit
def _linear_grad_weight_accumulate(
    grad_out_ptr, x_ptr, grad_weight_ptr, grad_bias_ptr,  # grad_out (M, N), x (M, K), grad_weight (N, K)
    M, N, K,
    stride_gm, stride_gn, stride_xm, stride_xk, stride_wn, stride_wk,
    HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    REGISTER_A: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """grad_weight += grad_out.T @ x and grad_bias += grad_out.sum(0), in place (ACCUMULATE=False: =
    instead of +=, so the first chunk neither reads the accumulator nor needs it zero-filled).

    linear_cross_entropy's chunks each add their rows' share into one grad_weight; a kernel that
    returned a fresh (N, K) partial per chunk (as linear's backward does) would cost a second
    vocabulary-sized buffer, more than the chunk of logits the chunking saves. The tile sum is
    fp32 (fp64 for fp64); it meets the accumulator once per chunk.
    """
    pid_n, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.maximum(tl.cdiv(K, BLOCK_K), 1), GROUP)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M).to(tl.int64)
    g_ptrs = grad_out_ptr + offs_n[:, None] * stride_gn + offs_m[None, :] * stride_gm
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC_DTYPE)
    bias_acc = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    for m in range(0, tl.cdiv(M, BLOCK_M)):
        m_left = M - m * BLOCK_M
        grad = tl.load(g_ptrs, mask=(offs_n[:, None] < N) & (offs_m[None, :] < m_left), other=0.0)
        if HAS_BIAS:
            bias_acc += tl.sum(grad.to(ACC_DTYPE), axis=1)
        x = tl.load(x_ptrs, mask=(offs_m[:, None] < m_left) & (offs_k[None, :] < K), other=0.0)
        acc = tl.dot(_from_registers(grad.to(x.dtype), REGISTER_A), x, acc, input_precision=INPUT_PRECISION)
        g_ptrs += BLOCK_M * stride_gm
        x_ptrs += BLOCK_M * stride_xm
    w_ptrs = grad_weight_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
    w_mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    if ACCUMULATE:
        acc += tl.load(w_ptrs, mask=w_mask, other=0.0).to(ACC_DTYPE)
    tl.store(w_ptrs, acc.to(grad_weight_ptr.dtype.element_ty), mask=w_mask)
    if HAS_BIAS:
        if pid_k == 0:
            bias_ptrs = grad_bias_ptr + offs_n
            if ACCUMULATE:
                bias_acc += tl.load(bias_ptrs, mask=offs_n < N, other=0.0).to(ACC_DTYPE)
            tl.store(bias_ptrs, bias_acc.to(grad_bias_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _sum_splits(
    partial_ptr, out_ptr,  # partial (SPLITS, numel) fp32, contiguous; out (numel,) contiguous
    numel, SPLITS: tl.constexpr, BLOCK: tl.constexpr,
):
    """out = partial.sum(0), in a fixed order (deterministic), cast to out's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.load(partial_ptr + offs, mask=mask, other=0.0)
    for split in range(1, SPLITS):
        acc += tl.load(partial_ptr + split * numel + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
