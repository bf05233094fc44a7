// 2-D convolution with a fused bias + activation: forward and backward CUDA kernels (CuPy RawModule).
//
// The semantics of kernels/triton/conv2d.py and fastdl/reference/conv2d.py: input (N, C, H, W),
// weight (K, C/G, R, S), groups G, stride (sh, sw), padding (top, left; bottom and right follow from
// P and Q), dilation (dh, dw), out (N, K, P, Q). Every kernel is an implicit GEMM on linear.cu's
// block (a 64 x 64 tile, 256 threads; compiled after it in one module: SOURCE_PRELUDES), per group:
//   conv2d_fwd         out[(n, p, q), k] = act(sum over (r, s, c) of window[(n, p, q), (r, s, c)]
//                      * w[k, (r, s, c)] + bias[k]); rows M = N*P*Q pixels, columns the group's
//                      K/G filters. The epilogue writes what backward reads (SAVE, as linear_fwd):
//                      a uint8 mask for relu / leaky_relu, the pre-activation for gelu / gelu_tanh
//                      / silu, nothing else (sigmoid / tanh differentiate through `out`).
//   conv2d_bwd_input   grad_input[(n, h, w), c] = sum over (r, s, k) of g[(n, p, q), k] * w[k, c, r, s]
//                      where h = p sh - top + r dh (w likewise): computed directly, no zero-inserted
//                      copy of grad_out. The rows are split by output phase (h mod sh, w mod sw,
//                      one grid row each): a phase's pixels are reached by the same kernel positions,
//                      so the positions that miss it are skipped whole, and no MMA multiplies the
//                      zeros a zero insertion would have made.
//   conv2d_bwd_weight  grad_weight[k, (r, s, c)] = sum over pixels (n, p, q) of g[(n, p, q), k]
//                      * window[(n, p, q), (r, s, c)], grad_bias[k] = sum of g[., k]. When the weight
//                      has too few tiles to fill the GPU, the pixels are split into `splits` ranges
//                      (grid rows), each writing a float32 (double) partial that conv2d_sum_splits
//                      adds in split order: deterministic, no atomics, rounded once.
// with g = grad_out * act'(saved) computed in the prologue of each tile load, never stored.
// One input channel per group (depthwise) runs the direct kernels of conv2d_depthwise.cuh instead
// (conv2d_dw_fwd, conv2d_dw_bwd_input, conv2d_dw_bwd_weight), with the same arguments.
//
// The reduction of the forward and of the input gradient runs over (r, s) and, within each kernel
// position, over channel blocks: nested loops (tc::matmul_segments), so channels_last (NHWC)
// input moves 16-byte chunks along C, and no reduction index is divided by the channel count. A
// group with few channels per position (the 3-channel stem: 3 of a 32-wide step) makes one flat
// reduction over (r, s, c) instead, so its steps are full. NCHW and any other strides go through
// the loaders' element() (the SIMT path always does: fp32 without TF32, fp64).
// The epilogue gives each thread 16 consecutive output channels of one pixel when the output's
// channels are contiguous (channels_last: 16-byte stores), else 16 channels of one pixel with the
// warp's lanes on consecutive pixels (NCHW: each store instruction is a contiguous run of pixels).
// All offsets are long long (a tensor may pass 2**31 elements).
//
// TF32 for float32 follows torch.backends.cudnn.allow_tf32 (the flag torch's convolutions obey),
// chosen by the launcher (fastdl/backends/cupy/conv2d.py) through the <float, true> instantiations.

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include "mma.cuh"

// ---------------------------------------------------------------------------------------------
// Index math.

// Pixel and reduction indices are below 2**31 in every launch (the launcher splits a batch whose
// pixels would pass that), so they are divided in 32 bits: a 64-bit division is a call to a long
// software routine on the GPU (and its ABI cost registers). Offsets stay 64-bit.
__device__ __forceinline__ long long div_(long long a, long long b) { return (long long)(unsigned(a) / unsigned(b)); }

// Triton's _grouped_tile (linear.cu's grouped_tile) in 32-bit arithmetic: GROUP row tiles per column sweep.
__device__ __forceinline__ void grouped_tile32(unsigned pid, unsigned num_rows, unsigned num_cols, long long& row,
                                               long long& col) {
    const unsigned width = GROUP * num_cols, group_id = pid / width, first_row = group_id * GROUP;
    const unsigned group_rows = min(num_rows - first_row, unsigned(GROUP));
    row = first_row + (pid % width) % group_rows;
    col = (pid % width) / group_rows;
}

// The geometry of one convolution, as the kernels' arguments give it.
struct Conv {
    long long H, W, P, Q;
    int R, S, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w;
};

// Pixel m of an (N, rows, cols) grid -> (n, i, j).
__device__ __forceinline__ void pixel(long long m, long long rows, long long cols, long long& n, long long& i,
                                      long long& j) {
    const long long t = div_(m, cols);
    j = m - t * cols;
    n = div_(t, rows);
    i = t - n * rows;
}

__device__ __forceinline__ bool aligned16(const void* p) { return reinterpret_cast<unsigned long long>(p) % 16 == 0; }

// Every stride a whole number of 16-byte chunks of U.
template <typename U>
__device__ __forceinline__ bool chunked(long long a, long long b, long long c) {
    constexpr long long E = 16 / sizeof(U) > 0 ? 16 / sizeof(U) : 1;
    return a % E == 0 && b % E == 0 && c % E == 0;
}

// Reduction index j of a (tap, inner) reduction: the segment's tap when the reduction is nested
// (j < per_tap), or decoded from j when it is flat.
__device__ __forceinline__ void tap_inner(long long j, int tap0, long long per_tap, bool flat, int S, int& r, int& s,
                                          long long& inner) {
    int tap = tap0;
    inner = j;
    if (flat) {
        const long long t = div_(j, per_tap);
        tap = int(t);
        inner = j - t * per_tap;
    }
    r = tap / S;
    s = tap - r * S;
}

// ---------------------------------------------------------------------------------------------
// Operand loaders (mma.cuh's interface, plus segment() / segment_used() for matmul_segments; the
// SIMT path calls element() only, with a flat reduction).

// The input through the kernel window: element (pixel m = (n, p, q), j = (r, s, c)) is
// x[n, c, p sh - top + r dh, q sw - left + s dw], zero in the padding. PixelOuter: (outer, red) =
// (m, j), the forward's A; else (j, m) with m counted from m_begin, bwd_weight's B.
template <typename T, bool PixelOuter>
struct Window {
    typedef typename Accumulator<T>::type Acc;
    static constexpr int CHUNK = 16 / sizeof(T);
    const T* x;  // at the group's first channel
    long long xs_n, xs_c, xs_h, xs_w;
    Conv conv;
    long long Cg, m_begin;
    bool flat;
    int tap0;

    __device__ void segment(int s) { tap0 = s; }
    __device__ bool segment_used(int) const { return true; }
    __device__ bool red_contiguous() const { return PixelOuter == (xs_c == 1); }
    // 16-byte chunks along C: channels_last, whole chunks per kernel position, aligned pixels.
    __device__ bool vector() const {
        return xs_c == 1 && Cg % CHUNK == 0 && aligned16(x) && chunked<T>(xs_n, xs_h, xs_w);
    }
    // The offset of (m, j), or -1 in the padding.
    __device__ long long offset(long long m, long long j) const {
        long long n, p, q, c;
        int r, s;
        pixel(m, conv.P, conv.Q, n, p, q);
        tap_inner(j, tap0, Cg, flat, conv.S, r, s, c);
        const long long ih = p * conv.stride_h - conv.pad_top + r * conv.dil_h;
        const long long iw = q * conv.stride_w - conv.pad_left + s * conv.dil_w;
        if (ih < 0 || ih >= conv.H || iw < 0 || iw >= conv.W) return -1;
        return n * xs_n + c * xs_c + ih * xs_h + iw * xs_w;
    }
    __device__ Acc element(long long outer, long long red) const {
        const long long o = PixelOuter ? offset(outer, red) : offset(m_begin + red, outer);
        return o < 0 ? Acc(0) : to_acc(x[o]);
    }
    __device__ bool direct() const { return true; }
    __device__ const void* address(long long outer, long long red) const {  // a chunk lies in one pixel
        const long long o = PixelOuter ? offset(outer, red) : offset(m_begin + red, outer);
        return o < 0 ? nullptr : x + o;
    }
    __device__ void chunk(long long outer, long long red, float (&v)[CHUNK]) const {
        const long long o = PixelOuter ? offset(outer, red) : offset(m_begin + red, outer);
        T e[CHUNK];
        if (o < 0) {
#pragma unroll
            for (int i = 0; i < CHUNK; ++i) v[i] = 0.0f;
            return;
        }
        tc::load_vector(x + o, e);
#pragma unroll
        for (int i = 0; i < CHUNK; ++i) v[i] = to_acc(e[i]);
    }
};

// The filters: element (outer, j = (r, s, inner)) = w[.., .., r, s] with (outer, inner) = (k, c)
// for the forward's B, (c, k) for bwd_input's B.
template <typename T>
struct Filters {
    typedef typename Accumulator<T>::type Acc;
    static constexpr int CHUNK = 16 / sizeof(T);
    const T* w;  // at the group's first filter
    long long s_outer, s_inner, s_r, s_s;
    long long per_tap;  // inner indices per kernel position
    int S;
    bool flat;
    int tap0;

    __device__ void segment(int s) { tap0 = s; }
    __device__ bool red_contiguous() const { return s_inner == 1 || (s_outer != 1 && s_inner <= s_outer); }
    __device__ bool vector() const {
        if (!aligned16(w)) return false;
        return red_contiguous() ? s_inner == 1 && per_tap % CHUNK == 0 && chunked<T>(s_outer, s_r, s_s)
                                : s_outer == 1 && chunked<T>(s_inner, s_r, s_s);
    }
    __device__ long long offset(long long outer, long long j) const {
        long long inner;
        int r, s;
        tap_inner(j, tap0, per_tap, flat, S, r, s, inner);
        return outer * s_outer + inner * s_inner + r * s_r + s * s_s;
    }
    __device__ Acc element(long long outer, long long red) const { return to_acc(w[offset(outer, red)]); }
    __device__ bool direct() const { return true; }
    __device__ const void* address(long long outer, long long red) const { return w + offset(outer, red); }
    __device__ void chunk(long long outer, long long red, float (&v)[CHUNK]) const {
        T e[CHUNK];
        tc::load_vector(w + offset(outer, red), e);
#pragma unroll
        for (int i = 0; i < CHUNK; ++i) v[i] = to_acc(e[i]);
    }
};

// g = grad_out * act'(saved) at offsets of grad_out and of saved (the mask, the pre-activation, or
// `out` for sigmoid / tanh), CHUNK elements along k at a time where both are contiguous there.
template <typename T>
struct GradValues {
    typedef typename Accumulator<T>::type Acc;
    static constexpr int CHUNK = 16 / sizeof(T);
    const T* grad_out;  // at the group's first channel, as saved
    const void* saved;
    long long gs_n, gs_k, gs_p, gs_q, ss_n, ss_k, ss_p, ss_q;
    Acc negative_slope;
    int activation;

    __device__ Acc at(long long n, long long k, long long p, long long q) const {
        const Acc grad = to_acc(grad_out[n * gs_n + k * gs_k + p * gs_p + q * gs_q]);
        if (activation == ACT_NONE) return grad;
        const long long o = n * ss_n + k * ss_k + p * ss_p + q * ss_q;
        const Acc s = save_kind(activation) == SAVE_MASK ? Acc(static_cast<const unsigned char*>(saved)[o])
                                                         : to_acc(static_cast<const T*>(saved)[o]);
        return activation_grad(grad, s, negative_slope, activation);
    }
    // 16-byte chunks along k: grad_out and saved channels_last-like and aligned.
    __device__ bool k_vector(long long per_tap_or_k) const {
        if (gs_k != 1 || per_tap_or_k % CHUNK != 0 || !aligned16(grad_out) || !chunked<T>(gs_n, gs_p, gs_q))
            return false;
        switch (save_kind(activation)) {
            case SAVE_MASK:  // CHUNK bytes at a time
                return ss_k == 1 && reinterpret_cast<unsigned long long>(saved) % CHUNK == 0 && ss_n % CHUNK == 0
                    && ss_p % CHUNK == 0 && ss_q % CHUNK == 0;
            case SAVE_PREACT: return ss_k == 1 && aligned16(saved) && chunked<T>(ss_n, ss_p, ss_q);
            default: return activation == ACT_NONE || (ss_k == 1 && aligned16(saved) && chunked<T>(ss_n, ss_p, ss_q));
        }
    }
    // Without an activation g is grad_out as stored: its chunks may be copied as they are.
    __device__ bool direct() const { return activation == ACT_NONE; }
    __device__ const void* address_at(long long n, long long k, long long p, long long q) const {
        return grad_out + n * gs_n + k + p * gs_p + q * gs_q;
    }
    __device__ void chunk_at(long long n, long long k, long long p, long long q, float (&v)[CHUNK]) const {
        T g[CHUNK];
        tc::load_vector(grad_out + n * gs_n + k + p * gs_p + q * gs_q, g);
#pragma unroll
        for (int i = 0; i < CHUNK; ++i) v[i] = to_acc(g[i]);
        if (activation == ACT_NONE) return;
        const long long o = n * ss_n + k + p * ss_p + q * ss_q;
        Acc s[CHUNK];
        if (save_kind(activation) == SAVE_MASK) {
            unsigned char mask[CHUNK];
            tc::load_vector(static_cast<const unsigned char*>(saved) + o, mask);
#pragma unroll
            for (int i = 0; i < CHUNK; ++i) s[i] = Acc(mask[i]);
        } else {
            T e[CHUNK];
            tc::load_vector(static_cast<const T*>(saved) + o, e);
#pragma unroll
            for (int i = 0; i < CHUNK; ++i) s[i] = to_acc(e[i]);
        }
#pragma unroll
        for (int i = 0; i < CHUNK; ++i) v[i] = float(activation_grad(Acc(v[i]), s[i], negative_slope, activation));
    }
};

// bwd_weight's A: (outer, red) = (k, pixel m from m_begin): grad_out.T.
template <typename T>
struct GradByFilter {
    typedef typename Accumulator<T>::type Acc;
    static constexpr int CHUNK = 16 / sizeof(T);
    GradValues<T> g;
    long long P, Q, Kg, m_begin;

    __device__ bool red_contiguous() const { return g.gs_k != 1; }
    __device__ bool vector() const { return !red_contiguous() && g.k_vector(Kg); }
    __device__ Acc element(long long outer, long long red) const {
        long long n, p, q;
        pixel(m_begin + red, P, Q, n, p, q);
        return g.at(n, outer, p, q);
    }
    __device__ bool direct() const { return g.direct(); }
    __device__ const void* address(long long outer, long long red) const {
        long long n, p, q;
        pixel(m_begin + red, P, Q, n, p, q);
        return g.address_at(n, outer, p, q);
    }
    __device__ void chunk(long long outer, long long red, float (&v)[CHUNK]) const {
        long long n, p, q;
        pixel(m_begin + red, P, Q, n, p, q);
        g.chunk_at(n, outer, p, q, v);
    }
};

// bwd_input's A: (outer, red) = (pixel (n, i, j) of the block's phase, (r, s, k)): the gradient of
// the output that input pixel (h, w) = (ph + i sh, pw + j sw) met at kernel position (r, s), zero
// where none did (p = (h + top - r dh) / sh not whole or outside [0, P)).
template <typename T>
struct GradWindow {
    typedef typename Accumulator<T>::type Acc;
    static constexpr int CHUNK = 16 / sizeof(T);
    GradValues<T> g;
    Conv conv;
    long long Kg, phase_h, phase_w, rows, cols;  // the phase's pixel grid: rows x cols per image
    bool flat;
    int tap0;

    __device__ void segment(int s) { tap0 = s; }
    // Whether kernel position `tap` reaches this phase (the same for all its pixels).
    __device__ bool segment_used(int tap) const {
        if (flat) return true;
        const int r = tap / conv.S, s = tap - r * conv.S;
        // (phase + pad - r dil) mod stride, shifted to a non-negative value first (32-bit).
        const int a = int(phase_h) + conv.pad_top - r * conv.dil_h, b = int(phase_w) + conv.pad_left - s * conv.dil_w;
        const int sh = conv.stride_h, sw = conv.stride_w;
        return (a + sh * (1 + max(0, -a) / sh)) % sh == 0 && (b + sw * (1 + max(0, -b) / sw)) % sw == 0;
    }
    __device__ bool red_contiguous() const { return g.gs_k == 1; }
    __device__ bool vector() const { return g.k_vector(Kg); }
    // The output pixel (n, p, q) of (outer, j) and the filter k, or false where none.
    __device__ bool source(long long outer, long long j, long long& n, long long& k, long long& p, long long& q) const {
        long long i, jj;
        int r, s;
        pixel(outer, rows, cols, n, i, jj);
        tap_inner(j, tap0, Kg, flat, conv.S, r, s, k);
        const long long a = phase_h + i * conv.stride_h + conv.pad_top - (long long)r * conv.dil_h;
        const long long b = phase_w + jj * conv.stride_w + conv.pad_left - (long long)s * conv.dil_w;
        if (a < 0 || b < 0) return false;
        p = div_(a, conv.stride_h);
        q = div_(b, conv.stride_w);
        return p * conv.stride_h == a && q * conv.stride_w == b && p < conv.P && q < conv.Q;
    }
    __device__ Acc element(long long outer, long long red) const {
        long long n, k, p, q;
        return source(outer, red, n, k, p, q) ? g.at(n, k, p, q) : Acc(0);
    }
    __device__ bool direct() const { return g.direct(); }
    __device__ const void* address(long long outer, long long red) const {
        long long n, k, p, q;
        return source(outer, red, n, k, p, q) ? g.address_at(n, k, p, q) : nullptr;
    }
    __device__ void chunk(long long outer, long long red, float (&v)[CHUNK]) const {
        long long n, k, p, q;
        if (source(outer, red, n, k, p, q)) {
            g.chunk_at(n, k, p, q, v);
        } else {
#pragma unroll
            for (int i = 0; i < CHUNK; ++i) v[i] = 0.0f;
        }
    }
};

// ---------------------------------------------------------------------------------------------
// One block's matmul over a (kernel position, channel) reduction.

// staged = A[row0:, :] @ B[:, col0:] over `taps` x `per_tap` reduction indices: nested on the
// tensor cores (or one flat run when per_tap would leave over 1/8 of each step's indices empty),
// flat on the SIMT path. Every thread calls it; staged is ready when it returns.
template <typename T, bool TF32, typename OpA, typename OpB>
__device__ __forceinline__ void conv_matmul(typename Accumulator<T>::type*& staged, long long row0, long long col0,
                                            long long rows, long long cols, int taps, long long per_tap, bool flat,
                                            OpA a, OpB b)
{
    typedef typename Accumulator<T>::type Acc;
    if constexpr (TensorCoreInput<T, TF32>::used) {
        typedef typename TensorCoreInput<T, TF32>::type In;
        __shared__ uint4 workspace[Workspace<T, TF32>::BYTES / 16];
        staged = reinterpret_cast<Acc*>(workspace);
        tc::FragC acc[tc::MI][tc::NI] = {};
        float row_partial[tc::Tile<In>::CHUNK] = {};
        tc::matmul_segments<In, false>(acc, workspace, row0, col0, rows, cols, flat ? 1 : taps,
                                       flat ? taps * per_tap : per_tap, a, b, row_partial);
        tc::stage(acc, staged, STAGE_PITCH);
        __syncthreads();  // the tile is staged
    } else {
        Acc* unused;
        block_matmul<T, TF32, false>(staged, unused, false, row0, col0, rows, cols, taps * per_tap, a, b);
    }
}

// Whether the nested reduction would waste over 1/8 of its steps on padding: then it runs flat.
template <typename T, bool TF32>
__device__ __forceinline__ bool flat_reduction(long long per_tap) {
    if constexpr (TensorCoreInput<T, TF32>::used) {
        constexpr long long RED = tc::Tile<typename TensorCoreInput<T, TF32>::type>::RED;
        return cdiv(per_tap, RED) * RED * 8 > per_tap * 9;
    } else {
        return true;
    }
}

// The epilogue's run: 16 consecutive columns of one tile row. Channel-contiguous outputs: the four
// threads of a row side by side (16-byte stores along the channels); otherwise a warp's lanes on
// 32 consecutive rows (pixels), so each element store is one contiguous run of the warp.
template <typename Acc>
__device__ __forceinline__ void conv_epilogue_run(const Acc* staged, bool channels_contiguous, int& row, int& col,
                                                  Acc (&v)[EPILOGUE_COLS]) {
    if (channels_contiguous) {
        row = threadIdx.x / EPILOGUE_THREADS_PER_ROW;
        col = (threadIdx.x % EPILOGUE_THREADS_PER_ROW) * EPILOGUE_COLS;
    } else {
        row = threadIdx.x % BLOCK_ROWS;
        col = (threadIdx.x / BLOCK_ROWS) * EPILOGUE_COLS;
    }
    tc::load_vector(staged + row * STAGE_PITCH + col, v);
}

// Rows of U at p, every stride a whole number of 16-byte chunks: a run of 16 elements along a
// dimension of stride 1, starting at a multiple of 16, moves 16 bytes at a time.
template <typename U>
__device__ __forceinline__ bool runs16(const void* p, long long along, long long a, long long b, long long c) {
    return along == 1 && aligned16(p) && chunked<U>(a, b, c);
}

__device__ __forceinline__ const void* shift_saved(const void* saved, long long elements, int activation, int size) {
    const long long bytes = elements * (save_kind(activation) == SAVE_MASK ? 1 : size);
    return static_cast<const char*>(saved) + bytes;
}

// Registers: two blocks per SM (128 registers a thread) for fp16 / bf16's forward and input
// gradient. One block per SM where 128 spilled (NVRTC 13, local memory per thread): float's
// forward and input gradient (TF32 forward 8 B on sm_80, SIMT input gradient 32 B on sm_80 and
// 48 B on sm_90: the window's index math next to the tile), double (as linear.cu), and every
// weight gradient, which holds both loaders' index state, the activation-derivative prologue and
// the bias row sums at once (96 B in fp16 on sm_90 at 128).
template <typename T> struct ConvMinBlocks { static constexpr int value = MinBlocks<T>::value; };
template <> struct ConvMinBlocks<float> { static constexpr int value = 1; };
template <typename T> struct WeightGradMinBlocks { static constexpr int value = 1; };

// ---------------------------------------------------------------------------------------------
// Entry points. Arguments: pointers, sizes, strides (in elements), then scalars and flags.
// Geometry: input (N, C, H, W), weight (K, C/G, R, S), out (N, K, P, Q), G groups, stride
// (stride_h, stride_w), padding top and left, dilation (dil_h, dil_w).

// x, w, bias (K,) or null, out (N, K, P, Q), saved like out: uint8 mask, T pre-activation or null.
// Grid: (row tiles x column tiles of a group, G).
template <typename T, bool TF32 = false>
__global__ void __launch_bounds__(THREADS, ConvMinBlocks<T>::value) conv2d_fwd(
    const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
    T* __restrict__ out, void* __restrict__ saved,
    long long N, long long C, long long H, long long W, long long K, long long P, long long Q,
    long long R, long long S, long long groups,
    long long stride_h, long long stride_w, long long pad_top, long long pad_left, long long dil_h, long long dil_w,
    long long xs_n, long long xs_c, long long xs_h, long long xs_w,
    long long ws_k, long long ws_c, long long ws_r, long long ws_s, long long stride_bias,
    long long os_n, long long os_k, long long os_p, long long os_q,
    long long ss_n, long long ss_k, long long ss_p, long long ss_q,
    double negative_slope, int has_bias, int activation)
{
    typedef typename Accumulator<T>::type Acc;
    const long long Cg = div_(C, groups), Kg = div_(K, groups), M = N * P * Q, group = blockIdx.y;
    const Conv conv{H, W, P, Q, int(R), int(S), int(stride_h), int(stride_w), int(pad_top), int(pad_left),
                    int(dil_h), int(dil_w)};
    long long pid_m, pid_k;
    grouped_tile32(blockIdx.x, unsigned(cdiv(M, BLOCK_ROWS)), unsigned(cdiv(Kg, BLOCK_COLS)), pid_m, pid_k);
    const long long m0 = pid_m * BLOCK_ROWS, k0 = pid_k * BLOCK_COLS;
    const bool flat = flat_reduction<T, TF32>(Cg);
    Acc* staged;
    conv_matmul<T, TF32>(staged, m0, k0, M, Kg, int(R * S), Cg, flat,
                         Window<T, true>{x + group * Cg * xs_c, xs_n, xs_c, xs_h, xs_w, conv, Cg, 0, flat, 0},
                         Filters<T>{w + group * Kg * ws_k, ws_k, ws_c, ws_r, ws_s, Cg, int(S), flat, 0});

    const long long kfirst = group * Kg;  // the group's first output channel
    int row, col;
    Acc z[EPILOGUE_COLS];
    conv_epilogue_run(staged, os_k == 1, row, col, z);
    const long long m = m0 + row, k = k0 + col;
    const int count = run_length(k, Kg);
    if (m >= M || count == 0) return;
    long long n, p, q;
    pixel(m, P, Q, n, p, q);
    if (has_bias) {
        T b[EPILOGUE_COLS];
        tc::load_run(bias + (kfirst + k) * stride_bias, stride_bias, b, count,
                     stride_bias == 1 && aligned16(bias) && (kfirst + k) % (16 / sizeof(T)) == 0);
#pragma unroll
        for (int e = 0; e < EPILOGUE_COLS; ++e) z[e] += e < count ? to_acc(b[e]) : Acc(0);
    }
    const Acc slope = Acc(negative_slope);
    const int save = save_kind(activation);
    if (save != SAVE_NONE) {
        const long long s_off = n * ss_n + (kfirst + k) * ss_k + p * ss_p + q * ss_q;
        if (save == SAVE_MASK) {
            unsigned char mask[EPILOGUE_COLS];
#pragma unroll
            for (int e = 0; e < EPILOGUE_COLS; ++e) mask[e] = z[e] > Acc(0);
            unsigned char* s = static_cast<unsigned char*>(saved);
            tc::store_run(s + s_off, ss_k, mask, count,
                          runs16<unsigned char>(s + kfirst * ss_k, ss_k, ss_n, ss_p, ss_q));
        } else {
            T pre[EPILOGUE_COLS];
#pragma unroll
            for (int e = 0; e < EPILOGUE_COLS; ++e) pre[e] = from_acc<T>(z[e]);
            T* s = static_cast<T*>(saved);
            tc::store_run(s + s_off, ss_k, pre, count, runs16<T>(s + kfirst * ss_k, ss_k, ss_n, ss_p, ss_q));
        }
    }
    T o[EPILOGUE_COLS];
#pragma unroll
    for (int e = 0; e < EPILOGUE_COLS; ++e) o[e] = from_acc<T>(activation_fn(z[e], slope, activation));
    T* dst = out + kfirst * os_k;
    tc::store_run(dst + n * os_n + k * os_k + p * os_p + q * os_q, os_k, o, count,
                  runs16<T>(dst, os_k, os_n, os_p, os_q));
}

// grad_out / saved (N, K, P, Q) (saved: the forward's mask or pre-activation, `out` for sigmoid /
// tanh, unread without an activation), w, grad_input (N, C, H, W).
// Grid: (row tiles of phase (0, 0) x column tiles, G x stride_h x stride_w phases).
template <typename T, bool TF32 = false>
__global__ void __launch_bounds__(THREADS, ConvMinBlocks<T>::value) conv2d_bwd_input(
    const T* __restrict__ grad_out, const void* __restrict__ saved, const T* __restrict__ w,
    T* __restrict__ grad_input,
    long long N, long long C, long long H, long long W, long long K, long long P, long long Q,
    long long R, long long S, long long groups,
    long long stride_h, long long stride_w, long long pad_top, long long pad_left, long long dil_h, long long dil_w,
    long long gs_n, long long gs_k, long long gs_p, long long gs_q,
    long long ss_n, long long ss_k, long long ss_p, long long ss_q,
    long long ws_k, long long ws_c, long long ws_r, long long ws_s,
    long long is_n, long long is_c, long long is_h, long long is_w,
    double negative_slope, int activation)
{
    typedef typename Accumulator<T>::type Acc;
    const long long Cg = div_(C, groups), Kg = div_(K, groups);
    const unsigned phases = unsigned(stride_h * stride_w);
    const long long group = blockIdx.y / phases, phase = blockIdx.y - group * phases;
    const long long phase_h = unsigned(phase) / unsigned(stride_w), phase_w = phase - phase_h * stride_w;
    // This phase's input pixels: h = phase_h + i stride_h < H, w likewise.
    const long long rows = div_(H - phase_h + stride_h - 1, stride_h), cols = div_(W - phase_w + stride_w - 1, stride_w);
    const long long M = N * rows * cols;
    long long pid_m, pid_c;
    grouped_tile32(blockIdx.x, unsigned(cdiv(N * cdiv(H, stride_h) * cdiv(W, stride_w), BLOCK_ROWS)),
                   unsigned(cdiv(Cg, BLOCK_COLS)), pid_m, pid_c);
    const long long m0 = pid_m * BLOCK_ROWS, c0 = pid_c * BLOCK_COLS;
    if (m0 >= M) return;  // the grid is sized for phase (0, 0), the largest
    const Conv conv{H, W, P, Q, int(R), int(S), int(stride_h), int(stride_w), int(pad_top), int(pad_left),
                    int(dil_h), int(dil_w)};
    const long long kfirst = group * Kg;
    const bool flat = flat_reduction<T, TF32>(Kg);
    const GradValues<T> g{grad_out + kfirst * gs_k, shift_saved(saved, kfirst * ss_k, activation, sizeof(T)),
                          gs_n, gs_k, gs_p, gs_q, ss_n, ss_k, ss_p, ss_q, Acc(negative_slope), activation};
    Acc* staged;
    conv_matmul<T, TF32>(staged, m0, c0, M, Cg, int(R * S), Kg, flat,
                         GradWindow<T>{g, conv, Kg, phase_h, phase_w, rows, cols, flat, 0},
                         Filters<T>{w + kfirst * ws_k, ws_c, ws_k, ws_r, ws_s, Kg, int(S), flat, 0});

    int row, col;
    Acc v[EPILOGUE_COLS];
    conv_epilogue_run(staged, is_c == 1, row, col, v);
    const long long m = m0 + row, c = c0 + col;
    const int count = run_length(c, Cg);
    if (m >= M || count == 0) return;
    long long n, i, j;
    pixel(m, rows, cols, n, i, j);
    T o[EPILOGUE_COLS];
#pragma unroll
    for (int e = 0; e < EPILOGUE_COLS; ++e) o[e] = from_acc<T>(v[e]);
    T* dst = grad_input + group * Cg * is_c;
    tc::store_run(dst + n * is_n + c * is_c + (phase_h + i * stride_h) * is_h + (phase_w + j * stride_w) * is_w, is_c,
                  o, count, runs16<T>(dst, is_c, is_n, is_h, is_w));
}

// grad_out / saved (N, K, P, Q), x (N, C, H, W) -> grad_weight (K, C/G, R, S) and grad_bias (K,),
// or, given partial buffers (either not null), float32 (double) partials: partial_weight (splits, K,
// R*S*C/G) in (r, s, c) order and partial_bias (splits, K), which conv2d_sum_splits adds. Split `split` covers pixels
// [split * split_len, min(M, (split + 1) * split_len)). grad_weight is computed as (k, (r, s, c))
// columns; columns = 0 computes only the bias (the blocks of column tile 0 write it).
// Grid: (row tiles x max(1, column tiles), G x splits).
template <typename T, bool TF32 = false>
__global__ void __launch_bounds__(THREADS, WeightGradMinBlocks<T>::value) conv2d_bwd_weight(
    const T* __restrict__ grad_out, const void* __restrict__ saved, const T* __restrict__ x,
    T* __restrict__ grad_weight, T* __restrict__ grad_bias,
    typename Accumulator<T>::type* __restrict__ partial_weight, typename Accumulator<T>::type* __restrict__ partial_bias,
    long long N, long long C, long long H, long long W, long long K, long long P, long long Q,
    long long R, long long S, long long groups,
    long long stride_h, long long stride_w, long long pad_top, long long pad_left, long long dil_h, long long dil_w,
    long long gs_n, long long gs_k, long long gs_p, long long gs_q,
    long long ss_n, long long ss_k, long long ss_p, long long ss_q,
    long long xs_n, long long xs_c, long long xs_h, long long xs_w,
    long long ws_k, long long ws_c, long long ws_r, long long ws_s,
    long long columns, long long splits, long long split_len,
    double negative_slope, int has_bias, int activation)
{
    typedef typename Accumulator<T>::type Acc;
    const long long Cg = div_(C, groups), Kg = div_(K, groups), M = N * P * Q;
    const long long group = blockIdx.y / unsigned(splits), split = blockIdx.y - group * splits;
    const long long m_begin = split * split_len, m_count = max(0LL, min(M, m_begin + split_len) - m_begin);
    const Conv conv{H, W, P, Q, int(R), int(S), int(stride_h), int(stride_w), int(pad_top), int(pad_left),
                    int(dil_h), int(dil_w)};
    long long pid_k, pid_j;
    grouped_tile32(blockIdx.x, unsigned(cdiv(Kg, BLOCK_ROWS)), unsigned(max(1LL, cdiv(columns, BLOCK_COLS))), pid_k,
                   pid_j);
    const long long k0 = pid_k * BLOCK_ROWS, j0 = pid_j * BLOCK_COLS;
    const bool sums = has_bias && pid_j == 0;
    const long long kfirst = group * Kg;
    const GradValues<T> g{grad_out + kfirst * gs_k, shift_saved(saved, kfirst * ss_k, activation, sizeof(T)),
                          gs_n, gs_k, gs_p, gs_q, ss_n, ss_k, ss_p, ss_q, Acc(negative_slope), activation};
    Acc *staged, *row_sum;
    block_matmul<T, TF32, true>(
        staged, row_sum, sums, k0, j0, Kg, columns, m_count,
        GradByFilter<T>{g, P, Q, Kg, m_begin},
        Window<T, false>{x + group * Cg * xs_c, xs_n, xs_c, xs_h, xs_w, conv, Cg, m_begin, true, 0});

    int row, col;
    Acc v[EPILOGUE_COLS];
    epilogue_run(staged, row, col, v);
    const long long k = k0 + row, j = j0 + col;
    if (k >= Kg) return;
    if (partial_weight != nullptr || partial_bias != nullptr) {
        if (sums && col == 0) partial_bias[split * K + kfirst + k] = row_sum[row];
        const int count = run_length(j, columns);
        if (count == 0) return;
        Acc* dst = partial_weight + (split * K + kfirst + k) * columns;
        tc::store_run(dst + j, 1, v, count, aligned16(partial_weight) && chunked<Acc>(columns, 0, 0));
        return;
    }
    if (sums && col == 0) grad_bias[kfirst + k] = from_acc<T>(row_sum[row]);
    const int count = run_length(j, columns);
    if (count == 0) return;
    T o[EPILOGUE_COLS];
#pragma unroll
    for (int e = 0; e < EPILOGUE_COLS; ++e) o[e] = from_acc<T>(v[e]);
    T* dst = grad_weight + (kfirst + k) * ws_k;
    if (Cg % EPILOGUE_COLS == 0) {  // the run lies in one kernel position: a run along c
        long long c;
        int r, s;
        tap_inner(j, 0, Cg, true, int(S), r, s, c);
        tc::store_run(dst + c * ws_c + r * ws_r + s * ws_s, ws_c, o, count,
                      runs16<T>(grad_weight, ws_c, ws_k, ws_r, ws_s));
    } else {
#pragma unroll
        for (int e = 0; e < EPILOGUE_COLS; ++e) {
            if (e < count) {
                long long c;
                int r, s;
                tap_inner(j + e, 0, Cg, true, int(S), r, s, c);
                dst[c * ws_c + r * ws_r + s * ws_s] = o[e];
            }
        }
    }
}

// grad_weight (K, C/G, R, S) = the sum over splits, in split order, of partial_weight (splits, K,
// columns) with columns = R*S*C/G in (r, s, c) order; grad_bias (K,) likewise from partial_bias.
// Either output may be null. One thread per output element.
template <typename T>
__global__ void __launch_bounds__(THREADS) conv2d_sum_splits(
    const typename Accumulator<T>::type* __restrict__ partial_weight,
    const typename Accumulator<T>::type* __restrict__ partial_bias,
    T* __restrict__ grad_weight, T* __restrict__ grad_bias,
    long long K, long long Cg, long long S, long long columns, long long splits,
    long long ws_k, long long ws_c, long long ws_r, long long ws_s)
{
    typedef typename Accumulator<T>::type Acc;
    const long long index = (long long)blockIdx.x * THREADS + threadIdx.x;
    const long long weights = grad_weight ? K * columns : 0;
    if (index < weights) {
        const long long k = div_(index, columns), j = index - k * columns;
        Acc sum = Acc(0);
        for (long long split = 0; split < splits; ++split) sum += partial_weight[(split * K + k) * columns + j];
        long long c;
        int r, s;
        tap_inner(j, 0, Cg, true, int(S), r, s, c);
        grad_weight[k * ws_k + c * ws_c + r * ws_r + s * ws_s] = from_acc<T>(sum);
    } else if (grad_bias && index < weights + K) {
        const long long k = index - weights;
        Acc sum = Acc(0);
        for (long long split = 0; split < splits; ++split) sum += partial_bias[split * K + k];
        grad_bias[k] = from_acc<T>(sum);
    }
}

// One input channel per group: the direct kernels (no tile, no tensor cores).
#include "conv2d_depthwise.cuh"
