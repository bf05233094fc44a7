// 2-D max pooling, forward and backward: the algorithm of kernels/triton/max_pool2d.py, with the
// same names (its docstring has the why: bytes, the 1-byte saved tap, the gather backward).
//
// One thread per (pixel, lane group): a pixel is an output pixel (n, p, q) in the forward, an
// input pixel (n, h, w) in the backward; a lane group is LANES consecutive channels.
//
//   packed  channels_last with 16-byte runs: every tensor's channel stride is 1, C and every
//           pixel stride are multiples of LANES = 16 / sizeof(T) (8 half / bfloat16, 4 float,
//           2 double) and the pointers are aligned (the launcher checks). Each tap is one 16-byte
//           load of LANES channels, the output one 16-byte store, the saved taps one LANES-byte
//           store. Consecutive threads take consecutive channel groups of a pixel, then the next
//           pixel: a warp reads whole 128-byte lines of NHWC rows.
//   else    one channel a thread (LANES = 1), any strides. Threads are ordered channels fastest
//           when the output's channels are contiguous (channels_last, e.g. C = 3), else q fastest
//           (NCHW: a warp writes consecutive output columns).
//
// Forward, torch's rule per window (fastdl/reference/max_pool2d.py): over the in-bounds taps in
// row-major order, take a tap when it is the first, greater than the running maximum, or NaN;
// ties keep the first maximum, the last NaN is reported, an all -inf window reports its first
// in-bounds tap. Taps in the padding are skipped, never loaded. The stored value is the chosen
// element itself. saved: nothing (save 0), the tap r * KW + s as uint8 (save 1), or torch's
// int64 flat index h * W + w (save 2).
//
// Backward, a gather: input element (h, w) visits the windows that could have chosen it,
// p = (h + pad_h - r * dil_h) / stride_h where that divides exactly and 0 <= p < P (likewise q),
// and adds grad_out where the window's saved tap (or flat index) is this element. No atomics; the
// order is fixed (deterministic); sums in Acc (float, double for double), rounded once.
//
// All offsets are long long; coordinates within an image are 32-bit. Entry points are templates over the element type (__half,
// __nv_bfloat16, float, double), instantiated through name expressions ("max_pool2d_fwd<float>");
// the layout and what is saved are runtime arguments, uniform over the grid.

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include "elements.cuh"

// Threads per block; the launcher's POOL_THREADS.
#define POOL_THREADS 256
// At least 4 blocks per SM: at most 64 registers a thread. Without a minimum, ptxas chased full
// occupancy (32 registers at 2048 threads per SM) and spilled the per-item coordinates when a
// kernel needed a few more: max_pool2d_bwd<double> took 32 registers and 24 B of stack on sm_90
// (16 B on sm_80), and small source changes tipped other instantiations over the same cliff. With
// the bound every instantiation takes 40-52 registers and no stack (4-6 blocks of 256 per SM,
// plenty for 16-byte loads in flight). A minimum of 6 (40 registers) spills half and bfloat16.
#define POOL_MIN_BLOCKS 4
#define PACK_BYTES 16
#define SAVE_NONE 0
#define SAVE_POS 1
#define SAVE_INDEX 2

namespace pool {

template <typename Acc> __device__ __forceinline__ Acc neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return __int_as_float(0xff800000); }
template <> __device__ __forceinline__ double neg_inf<double>() { return __longlong_as_double(0xfff0000000000000ULL); }

template <typename T, int LANES>
struct alignas(sizeof(T) * LANES) Lanes {
    T v[LANES];
};

template <typename T> struct Packed { static constexpr int lanes = PACK_BYTES / sizeof(T); };

// LANES consecutive elements at p (aligned to their whole size when LANES > 1): one load.
template <int LANES, typename T>
__device__ __forceinline__ Lanes<T, LANES> load_lanes(const T* p, long long stride) {
    Lanes<T, LANES> out;
    if (LANES > 1) {
        out = *reinterpret_cast<const Lanes<T, LANES>*>(p);
    } else {
        out.v[0] = p[0];
    }
    (void)stride;
    return out;
}

// One store of a LANES-element group at p (aligned to its size when LANES > 1). 16-byte groups go
// through __stwb on uint4 (one STG.E.128: NVVM may split a plain aggregate store into element
// stores, as it did in cross_entropy.cu's scale_rows); the host emulation copies the group.
template <int LANES, typename T>
__device__ __forceinline__ void store_lanes(T* p, const Lanes<T, LANES>& v) {
#ifdef __CUDACC__
    if constexpr (sizeof(Lanes<T, LANES>) == 16) {
        __stwb(reinterpret_cast<uint4*>(p), *reinterpret_cast<const uint4*>(&v));  // Lanes is 16-byte aligned
        return;
    }
#endif
    *reinterpret_cast<Lanes<T, LANES>*>(p) = v;
}

// LANES taps (0..255) as bytes, one store of LANES bytes (8, 4, 2 or 1: aligned to that).
template <int LANES>
__device__ __forceinline__ void store_taps(unsigned char* p, const int (&tap)[LANES]) {
    Lanes<unsigned char, LANES> bytes;
#pragma unroll
    for (int j = 0; j < LANES; ++j) bytes.v[j] = (unsigned char)tap[j];
    *reinterpret_cast<Lanes<unsigned char, LANES>*>(p) = bytes;
}

template <int LANES>
__device__ __forceinline__ Lanes<unsigned char, LANES> load_taps(const unsigned char* p) {
    return *reinterpret_cast<const Lanes<unsigned char, LANES>*>(p);
}

// The channel and pixel of thread item i of one image (see the file comment for the orders).
// 32-bit: an image's items, its sizes and the pooling geometry fit (the launcher checks), and
// 64-bit division is a called subroutine (one per item and per tap cost spills); the offsets
// these make, times the strides, are 64-bit.
struct Item {
    int c, y, x;
};

__device__ __forceinline__ Item item(unsigned i, unsigned groups, int lanes, unsigned C, unsigned Y, unsigned X,
                                     int channels_inner) {
    Item it;
    if (channels_inner) {
        it.c = int(i % groups) * lanes;
        const unsigned pix = i / groups;
        it.x = int(pix % X);
        it.y = int(pix / X);
    } else {
        it.x = int(i % X);
        it.y = int(i / X % Y);
        it.c = int(i / X / Y);
    }
    return it;
}

template <int LANES, typename T>
__device__ __forceinline__ void pool_window(
    const T* __restrict__ input, T* __restrict__ out, void* __restrict__ saved, long long n, const Item& it,
    int H, int W,
    long long stride_xn, long long stride_xc, long long stride_xh, long long stride_xw,
    long long stride_on, long long stride_oc, long long stride_op, long long stride_oq,
    int KH, int KW, int stride_h, int stride_w, int pad_h, int pad_w, int dil_h, int dil_w, int save)
{
    typedef typename Accumulator<T>::type Acc;
    const int h0 = it.y * stride_h - pad_h, w0 = it.x * stride_w - pad_w;
    const T* x = input + n * stride_xn + it.c * stride_xc;
    Acc best[LANES];
    Lanes<T, LANES> result;  // the chosen elements themselves (their NaN payloads, their signs)
    int tap[LANES];
#pragma unroll
    for (int j = 0; j < LANES; ++j) { best[j] = neg_inf<Acc>(); result.v[j] = from_acc<T>(best[j]); tap[j] = -1; }
    for (int r = 0; r < KH; ++r) {
        const int h = h0 + r * dil_h;
        if (h < 0 || h >= H) continue;
        for (int s = 0; s < KW; ++s) {
            const int w = w0 + s * dil_w;
            if (w < 0 || w >= W) continue;
            const Lanes<T, LANES> v = load_lanes<LANES>(x + h * stride_xh + w * stride_xw, stride_xc);
#pragma unroll
            for (int j = 0; j < LANES; ++j) {
                const Acc a = to_acc(v.v[j]);
                // torch's rule: the first in-bounds tap, anything greater, any NaN (a != a).
                if (tap[j] < 0 || a > best[j] || a != a) {
                    best[j] = a;
                    result.v[j] = v.v[j];
                    tap[j] = r * KW + s;
                }
            }
        }
    }
    const long long o = n * stride_on + it.c * stride_oc + it.y * stride_op + it.x * stride_oq;
    store_lanes<LANES>(out + o, result);
    if (save == SAVE_POS) {
        store_taps<LANES>(static_cast<unsigned char*>(saved) + o, tap);
    } else if (save == SAVE_INDEX) {
        long long* index = static_cast<long long*>(saved) + o;
#pragma unroll
        for (int j = 0; j < LANES; ++j)
            index[j * stride_oc] = (long long)(h0 + tap[j] / KW * dil_h) * W + (w0 + tap[j] % KW * dil_w);
    }
}

template <int LANES, typename T>
__device__ __forceinline__ void gather_windows(
    const T* __restrict__ grad_out, const void* __restrict__ saved, T* __restrict__ grad_input, long long n,
    const Item& it, int W, int P, int Q,
    long long stride_gn, long long stride_gc, long long stride_gp, long long stride_gq,
    long long stride_sn, long long stride_sc, long long stride_sp, long long stride_sq,
    long long stride_in, long long stride_ic, long long stride_ih, long long stride_iw,
    int KH, int KW, int stride_h, int stride_w, int pad_h, int pad_w, int dil_h, int dil_w, int save_index)
{
    typedef typename Accumulator<T>::type Acc;
    const long long here = (long long)it.y * W + it.x;  // this element's flat index, as torch's indices hold it
    const T* g = grad_out + n * stride_gn + it.c * stride_gc;
    const long long s_base = n * stride_sn + it.c * stride_sc;
    Acc acc[LANES];
#pragma unroll
    for (int j = 0; j < LANES; ++j) acc[j] = Acc(0);
    for (int r = 0; r < KH; ++r) {
        const int p_num = it.y + pad_h - r * dil_h;
        if (p_num < 0) continue;
        const int p = p_num / stride_h;
        if (p * stride_h != p_num || p >= P) continue;
        for (int s = 0; s < KW; ++s) {
            const int q_num = it.x + pad_w - s * dil_w;
            if (q_num < 0) continue;
            const int q = q_num / stride_w;
            if (q * stride_w != q_num || q >= Q) continue;
            const long long so = s_base + p * stride_sp + q * stride_sq;
            unsigned hits = 0;  // bit j: lane j's window chose this element
            if (save_index) {
                const long long* index = static_cast<const long long*>(saved) + so;
#pragma unroll
                for (int j = 0; j < LANES; ++j) hits |= unsigned(index[j * stride_sc] == here) << j;
            } else {
                const Lanes<unsigned char, LANES> taps = load_taps<LANES>(static_cast<const unsigned char*>(saved) + so);
                const int tap = r * KW + s;
#pragma unroll
                for (int j = 0; j < LANES; ++j) hits |= unsigned(taps.v[j] == tap) << j;
            }
            if (!hits) continue;  // grad_out is read only where it is added
            const Lanes<T, LANES> v = load_lanes<LANES>(g + p * stride_gp + q * stride_gq, stride_gc);
#pragma unroll
            for (int j = 0; j < LANES; ++j)
                if (hits >> j & 1u) acc[j] += to_acc(v.v[j]);
        }
    }
    Lanes<T, LANES> result;
#pragma unroll
    for (int j = 0; j < LANES; ++j) result.v[j] = from_acc<T>(acc[j]);
    store_lanes<LANES>(grad_input + n * stride_in + it.c * stride_ic + it.y * stride_ih + it.x * stride_iw, result);
}

}  // namespace pool

// ---------------------------------------------------------------------------------------------
// Entry points. Arguments: pointers, sizes, strides (in elements), then the pooling geometry and
// flags. Grid: x strides over an image's items, y over the images; any grid size is correct.

// input (N, C, H, W); out (N, C, P, Q); saved (N, C, P, Q) with out's strides: uint8 taps
// (save 1), int64 flat indices (save 2) or unwritten (save 0). packed: see the file comment.
template <typename T>
__global__ void __launch_bounds__(POOL_THREADS, POOL_MIN_BLOCKS) max_pool2d_fwd(
    const T* __restrict__ input, T* __restrict__ out, void* __restrict__ saved,
    long long N, long long C, long long H, long long W, long long P, long long Q,
    long long stride_xn, long long stride_xc, long long stride_xh, long long stride_xw,
    long long stride_on, long long stride_oc, long long stride_op, long long stride_oq,
    long long KH, long long KW, long long stride_h, long long stride_w, long long pad_h, long long pad_w,
    long long dil_h, long long dil_w, int save, int packed)
{
    constexpr int LANES = pool::Packed<T>::lanes;
    const int lanes = packed ? LANES : 1;
    const unsigned groups = unsigned(C) / unsigned(lanes);
    const int channels_inner = packed || stride_oc == 1;
    const unsigned items = unsigned(P * Q) * groups;  // per image
    for (long long n = blockIdx.y; n < N; n += gridDim.y) {
        for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < items; i += gridDim.x * blockDim.x) {
            const pool::Item it = pool::item(i, groups, lanes, unsigned(C), unsigned(P), unsigned(Q), channels_inner);
            if (packed)
                pool::pool_window<LANES>(input, out, saved, n, it, int(H), int(W), stride_xn, stride_xc, stride_xh,
                                         stride_xw, stride_on, stride_oc, stride_op, stride_oq, int(KH), int(KW),
                                         int(stride_h), int(stride_w), int(pad_h), int(pad_w), int(dil_h), int(dil_w),
                                         save);
            else
                pool::pool_window<1>(input, out, saved, n, it, int(H), int(W), stride_xn, stride_xc, stride_xh,
                                     stride_xw, stride_on, stride_oc, stride_op, stride_oq, int(KH), int(KW),
                                     int(stride_h), int(stride_w), int(pad_h), int(pad_w), int(dil_h), int(dil_w),
                                     save);
        }
    }
}

// grad_out (N, C, P, Q); saved (N, C, P, Q): uint8 taps or int64 flat indices (save_index);
// grad_input (N, C, H, W), every element written once.
template <typename T>
__global__ void __launch_bounds__(POOL_THREADS, POOL_MIN_BLOCKS) max_pool2d_bwd(
    const T* __restrict__ grad_out, const void* __restrict__ saved, T* __restrict__ grad_input,
    long long N, long long C, long long H, long long W, long long P, long long Q,
    long long stride_gn, long long stride_gc, long long stride_gp, long long stride_gq,
    long long stride_sn, long long stride_sc, long long stride_sp, long long stride_sq,
    long long stride_in, long long stride_ic, long long stride_ih, long long stride_iw,
    long long KH, long long KW, long long stride_h, long long stride_w, long long pad_h, long long pad_w,
    long long dil_h, long long dil_w, int save_index, int packed)
{
    constexpr int LANES = pool::Packed<T>::lanes;
    const int lanes = packed ? LANES : 1;
    const unsigned groups = unsigned(C) / unsigned(lanes);
    const int channels_inner = packed || stride_ic == 1;
    const unsigned items = unsigned(H * W) * groups;  // per image
    for (long long n = blockIdx.y; n < N; n += gridDim.y) {
        for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < items; i += gridDim.x * blockDim.x) {
            const pool::Item it = pool::item(i, groups, lanes, unsigned(C), unsigned(H), unsigned(W), channels_inner);
            if (packed)
                pool::gather_windows<LANES>(grad_out, saved, grad_input, n, it, int(W), int(P), int(Q),
                                            stride_gn, stride_gc, stride_gp, stride_gq, stride_sn, stride_sc,
                                            stride_sp, stride_sq, stride_in, stride_ic, stride_ih, stride_iw,
                                            int(KH), int(KW), int(stride_h), int(stride_w), int(pad_h), int(pad_w),
                                            int(dil_h), int(dil_w), save_index);
            else
                pool::gather_windows<1>(grad_out, saved, grad_input, n, it, int(W), int(P), int(Q),
                                        stride_gn, stride_gc, stride_gp, stride_gq, stride_sn, stride_sc,
                                        stride_sp, stride_sq, stride_in, stride_ic, stride_ih, stride_iw,
                                        int(KH), int(KW), int(stride_h), int(stride_w), int(pad_h), int(pad_w),
                                        int(dil_h), int(dil_w), save_index);
        }
    }
}
