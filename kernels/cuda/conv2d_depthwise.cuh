// conv2d.cu's direct depthwise kernels: one input channel per group (C/G == 1). #included at the
// end of conv2d.cu (fastdl.nvrtc inlines it there); uses what comes before it in the module:
// THREADS, save_kind / activation_fn / activation_grad (linear.cu), Accumulator / to_acc / from_acc
// (elements.cuh), tc::load_vector / store_run (mma.cuh), div_ and pixel (conv2d.cu).
#pragma once

// With one input channel per group the implicit GEMM of conv2d.cu has one useful column per group and a
// reduction of R*S: a 3x3 depthwise layer does 9 multiply-adds per output and is bound by memory,
// so these kernels read the operands directly, no tile and no tensor cores. Output channel k
// reads input channel k / Kg (Kg = K / G, the channel multiplier, usually 1).
//   conv2d_dw_fwd         out[n, k, p, q] = act(bias[k] + sum over (r, s) of
//                         x[n, k / Kg, p sh - top + r dh, q sw - left + s dw] * w[k, 0, r, s]);
//                         the epilogue (bias, activation, SAVE) is conv2d_fwd's.
//   conv2d_dw_bwd_input   grad_input[n, c, h, w] = sum over j < Kg and the (r, s) whose window
//                         reaches (h, w) of g[n, c Kg + j, p, q] * w[c Kg + j, 0, r, s]: a gather
//                         (each thread owns its input pixels: no atomics), act' in the g load.
//   conv2d_dw_bwd_weight  grad_weight[k, 0, r, s] = sum over pixels of g * x at that tap,
//                         grad_bias[k] = sum of g: per (channel, tap) reductions over N*P*Q,
//                         split over grid rows as conv2d_bwd_weight's (its float partials and
//                         conv2d_sum_splits), summed in a fixed order in the block.
// A block is DW_CHANNELS channels x DwTile<T>::PIXELS pixels; a thread owns VEC consecutive
// channels (16 bytes of T) of one pixel. Where the channels are contiguous (channels_last) the
// LANES threads of a pixel sit side by side, so a warp reads whole 16-byte chunks along C; else
// (NCHW) a warp's lanes are consecutive pixels, each access a contiguous run of the warp. The
// filters of the block's channels are staged in shared memory as [tap][channel] in the
// accumulator type, DW_TAP_CHUNK taps at a time (any R x S). Accumulation in float (double).
// The arguments are the GEMM kernels' (the launchers pick the kernel by C/G); weight's
// in-channel stride is unused.

#define DW_CHANNELS 32
#define DW_TAP_CHUNK 32
// The weight gradient sums DW_TAPS_PER_PASS taps per pass over the pixels (a 3x3 filter in one
// pass), reading g and x once per pass; DwWeightGrad splits a pass's taps between threads.
#define DW_TAPS_PER_PASS 9

template <bool B> struct DwFlag { static constexpr bool value = B; };

template <typename T>
struct DwTile {
    static constexpr int VEC = 16 / sizeof(T);            // channels per thread
    static constexpr int LANES = DW_CHANNELS / VEC;       // threads per pixel
    static constexpr int PIXELS = THREADS / LANES;        // pixels per block: 64, 32, 16
    static_assert(DW_CHANNELS % VEC == 0 && THREADS % LANES == 0 && PIXELS % 8 == 0, "block shape");
};

// This thread's pixel slot and channel lane in the block.
template <typename T>
__device__ __forceinline__ void dw_place(bool channels_contiguous, int& slot, int& lane) {
    typedef DwTile<T> D;
    if (channels_contiguous) {
        lane = threadIdx.x % D::LANES;
        slot = threadIdx.x / D::LANES;
    } else {
        slot = threadIdx.x % D::PIXELS;
        lane = threadIdx.x / D::PIXELS;
    }
}

__device__ __forceinline__ int dw_count(long long first, long long end, int vec) {
    return int(max(0LL, min((long long)vec, end - first)));
}

// Runs of N elements of U at p along a dimension of stride 1 (starting at multiples of N) may move
// N * sizeof(U) bytes at once: p so aligned and every other stride a multiple of N.
template <typename U, int N>
__device__ __forceinline__ bool dw_vector(const void* p, long long along, long long a, long long b, long long c) {
    return along == 1 && reinterpret_cast<unsigned long long>(p) % (N * sizeof(U)) == 0 && a % N == 0
        && b % N == 0 && c % N == 0;
}

// N bytes of a mask at once (N = 16 / sizeof(T): 8, 4 or 2), unpacked by shifts (a byte array
// copied whole would live in local memory).
template <int N>
__device__ __forceinline__ void dw_load_bytes(const unsigned char* p, unsigned char (&v)[N]) {
    static_assert(N == 8 || N == 4 || N == 2, "a mask run of 8, 4 or 2 bytes");
    unsigned words[2];
    if constexpr (N == 8) {
        const uint2 bits = *reinterpret_cast<const uint2*>(p);
        words[0] = bits.x;
        words[1] = bits.y;
    } else if constexpr (N == 4) {
        words[0] = *reinterpret_cast<const unsigned*>(p);
    } else {
        words[0] = *reinterpret_cast<const unsigned short*>(p);
    }
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = (unsigned char)(words[i / 4] >> (8 * (i % 4)));
}

template <int N>
__device__ __forceinline__ void dw_store_bytes(unsigned char* p, const unsigned char (&v)[N]) {
    static_assert(N == 8 || N == 4 || N == 2, "a mask run of 8, 4 or 2 bytes");
    unsigned words[2] = {0u, 0u};
#pragma unroll
    for (int i = 0; i < N; ++i) words[i / 4] |= unsigned(v[i]) << (8 * (i % 4));
    if constexpr (N == 8) {
        *reinterpret_cast<uint2*>(p) = uint2{words[0], words[1]};
    } else if constexpr (N == 4) {
        *reinterpret_cast<unsigned*>(p) = words[0];
    } else {
        *reinterpret_cast<unsigned short*>(p) = (unsigned short)words[0];
    }
}

// VEC elements of T at p (stride `stride`) into the accumulator type, zeros past `count`; one
// 16-byte load when `vector` and the run is whole.
template <typename T, int VEC>
__device__ __forceinline__ void dw_load(const T* p, long long stride, int count, bool vector,
                                        typename Accumulator<T>::type (&v)[VEC]) {
    typedef typename Accumulator<T>::type Acc;
    if (vector && count == VEC) {
        T e[VEC];
        tc::load_vector(p, e);
#pragma unroll
        for (int i = 0; i < VEC; ++i) v[i] = to_acc(e[i]);
    } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) v[i] = i < count ? to_acc(p[i * stride]) : Acc(0);
    }
}

// The input under VEC output channels k.. at (n, h, w): channels k / Kg ..; a 16-byte load when
// Kg == 1 and `vector`.
template <typename T, int VEC>
__device__ __forceinline__ void dw_load_input(const T* x, long long offset, long long xs_c, long long k, long long Kg,
                                              int count, bool vector, typename Accumulator<T>::type (&v)[VEC]) {
    typedef typename Accumulator<T>::type Acc;
    if (Kg == 1) {
        dw_load<T, VEC>(x + offset + k * xs_c, xs_c, count, vector, v);
    } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) v[i] = i < count ? to_acc(x[offset + div_(k + i, Kg) * xs_c]) : Acc(0);
    }
}

// g = grad_out * act'(saved) for VEC output channels k, k + step, .. at (n, p, q); `vector`: one
// 16-byte load of grad_out (and of saved, or VEC mask bytes) when step is 1 and the run is whole.
template <typename T>
struct DwGrad {
    typedef typename Accumulator<T>::type Acc;
    static constexpr int VEC = DwTile<T>::VEC;
    const T* grad_out;
    const void* saved;
    long long gs_n, gs_k, gs_p, gs_q, ss_n, ss_k, ss_p, ss_q;
    Acc negative_slope;
    int activation;

    __device__ bool vector() const {
        if (!dw_vector<T, VEC>(grad_out, gs_k, gs_n, gs_p, gs_q)) return false;
        switch (save_kind(activation)) {
            case SAVE_MASK: return dw_vector<unsigned char, VEC>(saved, ss_k, ss_n, ss_p, ss_q);
            case SAVE_PREACT: return dw_vector<T, VEC>(saved, ss_k, ss_n, ss_p, ss_q);
            default: return activation == ACT_NONE || dw_vector<T, VEC>(saved, ss_k, ss_n, ss_p, ss_q);
        }
    }
    __device__ void load(long long n, long long k, long long step, long long p, long long q, int count, bool vec,
                         Acc (&g)[VEC]) const {
        const bool whole = vec && step == 1;
        dw_load<T, VEC>(grad_out + n * gs_n + k * gs_k + p * gs_p + q * gs_q, step * gs_k, count, whole, g);
        if (activation == ACT_NONE) return;
        const long long o = n * ss_n + k * ss_k + p * ss_p + q * ss_q;
        Acc s[VEC];
        if (save_kind(activation) == SAVE_MASK) {
            const unsigned char* mask = static_cast<const unsigned char*>(saved) + o;
            unsigned char m[VEC];
            if (whole && count == VEC) {
                dw_load_bytes(mask, m);
            } else {
#pragma unroll
                for (int i = 0; i < VEC; ++i) m[i] = i < count ? mask[i * step * ss_k] : 0;
            }
#pragma unroll
            for (int i = 0; i < VEC; ++i) s[i] = Acc(m[i]);
        } else {
            dw_load<T, VEC>(static_cast<const T*>(saved) + o, step * ss_k, count, whole, s);
        }
#pragma unroll
        for (int i = 0; i < VEC; ++i) g[i] = activation_grad(g[i], s[i], negative_slope, activation);
    }
};

// The filters of the block's channels for taps [tap0, tap0 + DW_TAP_CHUNK) as [tap][channel] in
// shared memory, zeros past the taps and channels: channel i of the block is filter
// first + i * step (the forward: the block's output channels; bwd_input: the j-th filter of each
// input channel). Every thread calls it; the filters are ready when it returns.
template <typename T>
__device__ __forceinline__ void dw_stage_filters(typename Accumulator<T>::type* filters, const T* w, long long ws_k,
                                                 long long ws_r, long long ws_s, long long first, long long step,
                                                 int channels, int tap0, int taps, int S) {
    typedef typename Accumulator<T>::type Acc;
    __syncthreads();  // the previous chunk's filters are no longer read
    for (int i = threadIdx.x; i < DW_TAP_CHUNK * DW_CHANNELS; i += THREADS) {
        const int channel = i / DW_TAP_CHUNK, t = i - channel * DW_TAP_CHUNK;  // taps fastest: w's order
        Acc v = Acc(0);
        if (channel < channels && tap0 + t < taps) {
            const int r = (tap0 + t) / S, s = tap0 + t - r * S;
            v = to_acc(w[(first + channel * step) * ws_k + r * ws_r + s * ws_s]);
        }
        filters[t * DW_CHANNELS + channel] = v;
    }
    __syncthreads();
}

// Shared memory of the forward and the input gradient: the staged filters.
template <typename T>
struct DwFilterSmem {
    static constexpr int BYTES = DW_TAP_CHUNK * DW_CHANNELS * int(sizeof(typename Accumulator<T>::type));
};

// x, w (K, 1, R, S), bias (K,) or null, out (N, K, P, Q), saved like out: uint8 mask, T
// pre-activation or null (conv2d_fwd's arguments). Grid: (pixel tiles, channel tiles).
template <typename T>
__global__ void __launch_bounds__(THREADS) conv2d_dw_fwd(
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
    typedef DwTile<T> D;
    constexpr int VEC = D::VEC;
    __shared__ uint4 smem[DwFilterSmem<T>::BYTES / 16];
    Acc* filters = reinterpret_cast<Acc*>(smem);
    int slot, lane;
    dw_place<T>(os_k == 1, slot, lane);
    const long long Kg = div_(K, groups), M = N * P * Q;
    const long long m = (long long)blockIdx.x * D::PIXELS + slot, k0 = (long long)blockIdx.y * DW_CHANNELS;
    const long long k = k0 + lane * VEC;
    const int count = m < M ? dw_count(k, K, VEC) : 0;
    long long n, p, q;
    pixel(count ? m : 0, P, Q, n, p, q);
    const bool x_vector = Kg == 1 && dw_vector<T, VEC>(x, xs_c, xs_n, xs_h, xs_w);
    const int taps = int(R * S);
    Acc z[VEC] = {};
    for (int tap0 = 0; tap0 < taps; tap0 += DW_TAP_CHUNK) {
        dw_stage_filters(filters, w, ws_k, ws_r, ws_s, k0, 1, int(min(K - k0, (long long)DW_CHANNELS)), tap0, taps,
                         int(S));
        if (count == 0) continue;
        int r = tap0 / int(S), s = tap0 - r * int(S);
        for (int t = 0; t < min(DW_TAP_CHUNK, taps - tap0); ++t) {
            const long long ih = p * stride_h - pad_top + r * dil_h, iw = q * stride_w - pad_left + s * dil_w;
            if (ih >= 0 && ih < H && iw >= 0 && iw < W) {
                Acc v[VEC];
                dw_load_input<T, VEC>(x, n * xs_n + ih * xs_h + iw * xs_w, xs_c, k, Kg, count, x_vector, v);
                const Acc* f = filters + t * DW_CHANNELS + lane * VEC;
#pragma unroll
                for (int i = 0; i < VEC; ++i) z[i] += v[i] * f[i];
            }
            if (++s == int(S)) {
                s = 0;
                ++r;
            }
        }
    }
    if (count == 0) return;

    if (has_bias) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) z[i] += i < count ? to_acc(bias[(k + i) * stride_bias]) : Acc(0);
    }
    const int save = save_kind(activation);
    if (save == SAVE_MASK) {
        unsigned char mask[VEC];
#pragma unroll
        for (int i = 0; i < VEC; ++i) mask[i] = z[i] > Acc(0);
        unsigned char* dst = static_cast<unsigned char*>(saved) + n * ss_n + k * ss_k + p * ss_p + q * ss_q;
        if (count == VEC && dw_vector<unsigned char, VEC>(saved, ss_k, ss_n, ss_p, ss_q)) {
            dw_store_bytes(dst, mask);
        } else {
#pragma unroll
            for (int i = 0; i < VEC; ++i)
                if (i < count) dst[i * ss_k] = mask[i];
        }
    } else if (save == SAVE_PREACT) {
        T pre[VEC];
#pragma unroll
        for (int i = 0; i < VEC; ++i) pre[i] = from_acc<T>(z[i]);
        tc::store_run(static_cast<T*>(saved) + n * ss_n + k * ss_k + p * ss_p + q * ss_q, ss_k, pre, count,
                      dw_vector<T, VEC>(saved, ss_k, ss_n, ss_p, ss_q));
    }
    const Acc slope = Acc(negative_slope);
    T o[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) o[i] = from_acc<T>(activation_fn(z[i], slope, activation));
    tc::store_run(out + n * os_n + k * os_k + p * os_p + q * os_q, os_k, o, count,
                  dw_vector<T, VEC>(out, os_k, os_n, os_p, os_q));
}

// grad_out / saved (N, K, P, Q), w (K, 1, R, S), grad_input (N, C, H, W) (conv2d_bwd_input's
// arguments). Grid: (input pixel tiles, input channel tiles).
template <typename T>
__global__ void __launch_bounds__(THREADS) conv2d_dw_bwd_input(
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
    typedef DwTile<T> D;
    constexpr int VEC = D::VEC;
    __shared__ uint4 smem[DwFilterSmem<T>::BYTES / 16];
    Acc* filters = reinterpret_cast<Acc*>(smem);
    int slot, lane;
    dw_place<T>(is_c == 1, slot, lane);
    const long long Kg = div_(K, groups), M = N * H * W;
    const long long m = (long long)blockIdx.x * D::PIXELS + slot, c0 = (long long)blockIdx.y * DW_CHANNELS;
    const long long c = c0 + lane * VEC;
    const int count = m < M ? dw_count(c, C, VEC) : 0;
    long long n, h, iw;
    pixel(count ? m : 0, H, W, n, h, iw);
    const DwGrad<T> g{grad_out, saved, gs_n, gs_k, gs_p, gs_q, ss_n, ss_k, ss_p, ss_q, Acc(negative_slope), activation};
    const int taps = int(R * S);
    const int sh = int(stride_h), sw = int(stride_w);
    Acc v[VEC] = {};
    // The gather, with the 16-byte g loads decided at compile time: one loop body holding both the
    // vector and the element loads spilled in fp16 / bf16 (NVRTC 13, sm_80 and sm_90).
    auto gather = [&](auto vector) {
        for (long long j = 0; j < Kg; ++j) {
            for (int tap0 = 0; tap0 < taps; tap0 += DW_TAP_CHUNK) {
                dw_stage_filters(filters, w, ws_k, ws_r, ws_s, c0 * Kg + j, Kg,
                                 int(min(C - c0, (long long)DW_CHANNELS)), tap0, taps, int(S));
                if (count == 0) continue;
                int r = tap0 / int(S), s = tap0 - r * int(S);
                for (int t = 0; t < min(DW_TAP_CHUNK, taps - tap0); ++t) {
                    // The output pixel whose window met (h, iw) at tap (r, s), if any: a = p sh, b = q sw.
                    const int a = int(h) + int(pad_top) - r * int(dil_h), b = int(iw) + int(pad_left) - s * int(dil_w);
                    if (a >= 0 && b >= 0) {
                        const int p = unsigned(a) / unsigned(sh), q = unsigned(b) / unsigned(sw);
                        if (p * sh == a && q * sw == b && p < P && q < Q) {
                            Acc gv[VEC];
                            g.load(n, c * Kg + j, Kg, p, q, count, decltype(vector)::value, gv);
                            const Acc* f = filters + t * DW_CHANNELS + lane * VEC;
#pragma unroll
                            for (int i = 0; i < VEC; ++i) v[i] += gv[i] * f[i];
                        }
                    }
                    if (++s == int(S)) {
                        s = 0;
                        ++r;
                    }
                }
            }
        }
    };
    if (Kg == 1 && g.vector()) gather(DwFlag<true>{});
    else gather(DwFlag<false>{});
    if (count == 0) return;
    T o[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) o[i] = from_acc<T>(v[i]);
    tc::store_run(grad_input + n * is_n + c * is_c + h * is_h + iw * is_w, is_c, o, count,
                  dw_vector<T, VEC>(grad_input, is_c, is_n, is_h, is_w));
}

// The weight gradient's threads in GROUPS groups of SLOTS pixel slots: group j sums taps
// [j TAPS, (j + 1) TAPS) of each pass, a thread TAPS x VEC sums in registers. 2-byte types split a
// pass in two: 9 taps x 8 channels (72 floats) took ~156 registers, one 256-thread block per SM;
// 5 x 8 fit two. Both groups load a pixel's g (the second load hits L1); x's taps are split, so
// each pass still reads g and x once from memory.
template <typename T>
struct DwWeightGrad {
    static constexpr int GROUPS = sizeof(T) == 2 ? 2 : 1;
    static constexpr int TAPS = (DW_TAPS_PER_PASS + GROUPS - 1) / GROUPS;  // a thread's taps per pass
    static constexpr int SLOTS = DwTile<T>::PIXELS / GROUPS;               // pixels a block steps
    static_assert(DwTile<T>::PIXELS % GROUPS == 0 && (THREADS / DW_CHANNELS) % GROUPS == 0, "groups");
};

// The block's sums of every thread's v (VEC channels at its lane, over its pixel slot), per group of
// SLOTS = PIXELS / GROUPS consecutive slots and channel, in a fixed order: thread i < GROUPS x
// DW_CHANNELS returns group i / DW_CHANNELS's sum of channel i % DW_CHANNELS. reduced holds PIXELS x
// DW_CHANNELS, parts 2 x 8 x DW_CHANNELS accumulators (two buffers: consecutive calls need only two
// barriers each).
template <typename T, int GROUPS>
__device__ __forceinline__ typename Accumulator<T>::type dw_block_sum(
    const typename Accumulator<T>::type (&v)[DwTile<T>::VEC], int slot, int lane,
    typename Accumulator<T>::type* reduced, typename Accumulator<T>::type* parts, int buffer) {
    typedef typename Accumulator<T>::type Acc;
    typedef DwTile<T> D;
    constexpr int PARTS = THREADS / DW_CHANNELS;  // 8
    constexpr int GROUP_PARTS = PARTS / GROUPS, SLOTS = D::PIXELS / GROUPS;
#pragma unroll
    for (int i = 0; i < D::VEC; ++i) reduced[slot * DW_CHANNELS + lane * D::VEC + i] = v[i];
    __syncthreads();
    const int channel = threadIdx.x % DW_CHANNELS, part = threadIdx.x / DW_CHANNELS;
    const int first = (part / GROUP_PARTS) * SLOTS;
    Acc sum = Acc(0);
    for (int s = part % GROUP_PARTS; s < SLOTS; s += GROUP_PARTS) sum += reduced[(first + s) * DW_CHANNELS + channel];
    parts[(buffer * PARTS + part) * DW_CHANNELS + channel] = sum;
    __syncthreads();
    sum = Acc(0);
    if (threadIdx.x < GROUPS * DW_CHANNELS) {
        for (int i = 0; i < GROUP_PARTS; ++i) sum += parts[(buffer * PARTS + part * GROUP_PARTS + i) * DW_CHANNELS + channel];
    }
    return sum;
}

template <typename T>
struct DwReduceSmem {
    typedef typename Accumulator<T>::type Acc;
    static constexpr int REDUCED = DwTile<T>::PIXELS * DW_CHANNELS;
    static constexpr int BYTES = (REDUCED + 2 * (THREADS / DW_CHANNELS) * DW_CHANNELS) * int(sizeof(Acc));
};

// grad_out / saved (N, K, P, Q), x (N, C, H, W) -> grad_weight (K, 1, R, S) and grad_bias (K,), or
// float (double) partials (splits, K, R*S) in (r, s) order and (splits, K) for conv2d_sum_splits
// (conv2d_bwd_weight's arguments, columns = R*S or 0 for the bias only). Grid: (channel tiles, splits).
// Two blocks per SM (128 registers): without the bound ptxas picked 80 for float on sm_90 and spilled.
template <typename T>
__global__ void __launch_bounds__(THREADS, 2) conv2d_dw_bwd_weight(
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
    typedef DwTile<T> D;
    constexpr int VEC = D::VEC;
    __shared__ uint4 smem[DwReduceSmem<T>::BYTES / 16];
    Acc* reduced = reinterpret_cast<Acc*>(smem);
    Acc* parts = reduced + DwReduceSmem<T>::REDUCED;
    int slot, lane;
    dw_place<T>(gs_k == 1, slot, lane);
    const long long Kg = div_(K, groups), M = N * P * Q;
    const long long k0 = (long long)blockIdx.x * DW_CHANNELS, k = k0 + lane * VEC, split = blockIdx.y;
    const long long m_end = min(M, (split + 1) * split_len);
    const int count = dw_count(k, K, VEC);
    const DwGrad<T> g{grad_out, saved, gs_n, gs_k, gs_p, gs_q, ss_n, ss_k, ss_p, ss_q, Acc(negative_slope), activation};
    const bool g_vector = g.vector();
    const bool x_vector = Kg == 1 && dw_vector<T, VEC>(x, xs_c, xs_n, xs_h, xs_w);
    const bool partials = partial_weight != nullptr || partial_bias != nullptr;
    const long long out_k = k0 + threadIdx.x % DW_CHANNELS;  // the channel this thread writes (see below)
    const int taps = int(columns);
    typedef DwWeightGrad<T> WG;
    const int group = slot / WG::SLOTS, first_slot = slot - group * WG::SLOTS;
    int buffer = 0;
    // One pass over the split's pixels per GROUPS x TAPS taps; the first also sums the bias (in the
    // last group, which has the fewest taps).
    for (int tap0 = 0; tap0 == 0 || tap0 < taps; tap0 += WG::GROUPS * WG::TAPS) {
        const bool sums = has_bias && tap0 == 0;
        const bool bias_here = sums && group == WG::GROUPS - 1;
        const int first = tap0 + group * WG::TAPS;  // this thread's first tap
        Acc acc[WG::TAPS][VEC] = {};
        Acc bias_sum[VEC] = {};
        const int r0 = first / int(S), s0 = first - r0 * int(S);
        const bool busy = count > 0 && (first < taps || bias_here);
        for (long long m = split * split_len + first_slot; busy && m < m_end; m += WG::SLOTS) {
            long long n, p, q;
            pixel(m, P, Q, n, p, q);
            Acc gv[VEC];
            g.load(n, k, 1, p, q, count, g_vector, gv);
            if (bias_here) {
#pragma unroll
                for (int i = 0; i < VEC; ++i) bias_sum[i] += gv[i];
            }
            const long long x_n = n * xs_n;
            int r = r0, s = s0;
#pragma unroll
            for (int t = 0; t < WG::TAPS; ++t) {
                if (first + t < taps) {
                    const long long ih = p * stride_h - pad_top + r * dil_h, iw = q * stride_w - pad_left + s * dil_w;
                    if (ih >= 0 && ih < H && iw >= 0 && iw < W) {
                        Acc xv[VEC];
                        dw_load_input<T, VEC>(x, x_n + ih * xs_h + iw * xs_w, xs_c, k, Kg, count, x_vector, xv);
#pragma unroll
                        for (int i = 0; i < VEC; ++i) acc[t][i] += gv[i] * xv[i];
                    }
                    if (++s == int(S)) {
                        s = 0;
                        ++r;
                    }
                }
            }
        }
        if (sums) {  // one group sums: the other's slots hold zeros
            const Acc total = dw_block_sum<T, 1>(bias_sum, slot, lane, reduced, parts, buffer);
            buffer ^= 1;
            if (threadIdx.x < DW_CHANNELS && out_k < K) {
                if (partials) partial_bias[split * K + out_k] = total;
                else grad_bias[out_k] = from_acc<T>(total);
            }
        }
        // Thread i < GROUPS x DW_CHANNELS writes channel k0 + i % DW_CHANNELS of group i / DW_CHANNELS's taps.
        const int out_first = tap0 + int(threadIdx.x / DW_CHANNELS) * WG::TAPS;
#pragma unroll
        for (int t = 0; t < WG::TAPS; ++t) {
            if (tap0 + t < taps) {  // group 0's tap t exists (every call is made by the whole block)
                const Acc total = dw_block_sum<T, WG::GROUPS>(acc[t], slot, lane, reduced, parts, buffer);
                buffer ^= 1;
                const int tap = out_first + t;
                if (threadIdx.x < WG::GROUPS * DW_CHANNELS && out_k < K && tap < taps) {
                    const int r = tap / int(S), s = tap - r * int(S);
                    if (partials) partial_weight[(split * K + out_k) * columns + tap] = total;
                    else grad_weight[out_k * ws_k + r * ws_r + s * ws_s] = from_acc<T>(total);
                }
            }
        }
    }
}
