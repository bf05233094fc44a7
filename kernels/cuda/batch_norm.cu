// Batch normalization's four pieces (torch's SyncBatchNorm decomposition; their formulas are in
// fastdl/reference/batch_norm.py, the launchers in fastdl/backends/cupy/batch_norm.py): per-channel
// statistics, the normalize pass with the fused residual and activation, the backward's
// per-channel reduction and its element-wise pass.
// Compiled after linear.cu in one module (fastdl.backends.cupy.SOURCE_PRELUDES): its activations
// (activation_fn, activation_grad and the ACT_ codes) are the ones used here. The packs, the
// thread mapping and the reductions are in batch_norm.cuh.
//
// Tensors are (N, C, S) strided views, each with its own three strides. Every thread of a block
// keeps one set of channels for the whole launch and walks items, an item being one position along
// (n, s) for each of LANES lanes; the channels, the per-channel parameters and the reduction state
// stay in registers. Two mappings, picked per launch from x's strides (`channels`):
//
//   channels (stride_c == 1, NHWC)  a block takes a tile of tile_groups x LANES consecutive
//            channels and tile_groups threads per (n, s) row; the other BN_THREADS / tile_groups
//            threads take the next rows. A lane is a channel: a warp reads whole rows of channels.
//   rows     (stride_s == 1, NCHW)  a block takes one channel and all its threads walk its (n, s)
//            rows, LANES consecutive positions along s a thread (lanes are positions).
//
// LANES is 16 / sizeof(T) when the lanes divide the packed extent (C for channels, S for rows),
// else 1. A tensor whose lanes are contiguous and 16-byte aligned (its bit in `vec`, set by the
// launcher) moves them with one 16-byte access; any other strides are read element by element.
//
// Reductions (stats, backward_reduce) are split over gridDim.y when the channel tiles alone would
// leave the GPU idle: each split writes its partial (mean, M2) or (sum_dy, sum_dy_xmu) per channel
// and a second kernel combines the splits in index order. A thread's state is updated item by
// item (Welford: one division per item, shared by its lanes), merged with Chan's formula across
// the warp by shuffles, across the warps through shared memory in warp order, and across the
// splits in split order: the same bits on every run, no atomics. Never sum and sum of squares: the
// mean of 1e4 with a standard deviation of 1 comes out right in float32.
//
// Accumulation and the element math are in Acc (float; double for double); outputs are rounded
// once. All offsets are long long. Entry points are templates over the element type only; the
// weight / bias type (x's, or float for half inputs) is the runtime flag weight_float (they are
// read once per thread), which halves the instantiations.

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include "elements.cuh"

// Threads per block; the launcher's BN_THREADS.
#define BN_THREADS 256
#define BN_WARPS (BN_THREADS / 32)
// At least 2 blocks of 256 per SM: up to 128 registers a thread, room for 8 lanes of per-channel
// parameters and state without spills (a bound of 4, 64 registers, spilled them).
#define BN_MIN_BLOCKS 2
#define BN_PACK_BYTES 16
// The most channel groups a block of the channels mapping takes (a warp's width).
#define BN_MAX_GROUPS 32
// Bits of `vec`: the tensors moved 16 bytes (LANES elements) at a time.
#define BN_VEC_X 1
#define BN_VEC_RESIDUAL 2
#define BN_VEC_OUT 4
#define BN_VEC_MASK 8
#define BN_VEC_GRAD_OUT 16
#define BN_VEC_GRAD_INPUT 32
#define BN_VEC_GRAD_RESIDUAL 64

#include "batch_norm.cuh"

namespace bn {

// ---------------------------------------------------------------------------------------------
// Bodies, per LANES (the entry points pick LANES or 1).

template <int LANES, typename T>
__device__ __forceinline__ void stats(
    const T* __restrict__ x, void* __restrict__ partial, void* __restrict__ mean_out, void* __restrict__ var_out,
    long long N, long long C, long long S, long long sxn, long long sxc, long long sxs, long long chunk,
    int channels, int tile_groups, int vec, long long* sh_n, typename Accumulator<T>::type* sh_mean,
    typename Accumulator<T>::type* sh_m2)
{
    typedef typename Accumulator<T>::type Acc;
    const Slot sl = slot<LANES>(channels, C, S, tile_groups);
    const long long inner = channels ? sxc : sxs;
    long long n = 0;
    Acc mean[LANES], m2[LANES];
#pragma unroll
    for (int j = 0; j < LANES; ++j) { mean[j] = Acc(0); m2[j] = Acc(0); }
    walk(sl, N * S / sl.s_lanes, chunk, [&](long long in, long long s) {
        Acc v[LANES];
        load<LANES>(x + in * sxn + sl.c * sxc + s * sxs, inner, vec & BN_VEC_X, v);
        ++n;
        const Acc inv = Acc(1) / Acc(n);
#pragma unroll
        for (int j = 0; j < LANES; ++j) {
            const Acc delta = v[j] - mean[j];
            mean[j] += delta * inv;
            m2[j] += delta * (v[j] - mean[j]);
        }
    });
    block_welford<LANES>(sl.groups, n, mean, m2, sh_n, sh_mean, sh_m2);
    if (int(threadIdx.x) >= sl.groups || !sl.active) return;
    Acc* mean_p = static_cast<Acc*>(mean_out);
    Acc* var_p = static_cast<Acc*>(var_out);
    if (!channels && LANES > 1) {  // the lanes are positions of one channel: one total
        long long n_all = 0;
        Acc m_all[1] = {Acc(0)}, q_all[1] = {Acc(0)};
#pragma unroll
        for (int j = 0; j < LANES; ++j) {
            const Acc m_j[1] = {mean[j]}, q_j[1] = {m2[j]};
            chan(n_all, m_all, q_all, n, m_j, q_j);
        }
        n = n_all;
        mean[0] = m_all[0];
        m2[0] = q_all[0];
    }
    const int outputs = channels ? LANES : 1;
#pragma unroll
    for (int j = 0; j < LANES; ++j) {
        if (j >= outputs) break;
        if (gridDim.y == 1) {
            mean_p[sl.c + j] = mean[j];
            var_p[sl.c + j] = n > 0 ? m2[j] / Acc(n) : Acc(0);
        } else {
            Acc* out = static_cast<Acc*>(partial);
            out[(long long)blockIdx.y * C + sl.c + j] = mean[j];
            out[((long long)gridDim.y + blockIdx.y) * C + sl.c + j] = m2[j];
        }
    }
}

// pre = (x - mean) * invstd * weight + bias (+ residual) for each lane of an item.
template <int LANES, typename T, typename Acc>
__device__ __forceinline__ void pre_activation(
    const T* __restrict__ x, const T* __restrict__ residual, long long in, long long c, long long s,
    long long sxn, long long sxc, long long sxs, long long srn, long long src, long long srs, int channels, int vec,
    const Acc (&mean)[LANES], const Acc (&scale)[LANES], const Acc (&shift)[LANES], Acc (&xmu)[LANES],
    Acc (&pre)[LANES])
{
    Acc v[LANES];
    load<LANES>(x + in * sxn + c * sxc + s * sxs, channels ? sxc : sxs, vec & BN_VEC_X, v);
#pragma unroll
    for (int j = 0; j < LANES; ++j) {
        xmu[j] = v[j] - mean[j];
        pre[j] = xmu[j] * scale[j] + shift[j];
    }
    if (residual != nullptr) {
        Acc r[LANES];
        load<LANES>(residual + in * srn + c * src + s * srs, channels ? src : srs, vec & BN_VEC_RESIDUAL, r);
#pragma unroll
        for (int j = 0; j < LANES; ++j) pre[j] += r[j];
    }
}

// The lanes' per-channel (mean, invstd * weight, bias): lane j's channel is c + j in the channels
// mapping, c in the rows one.
template <int LANES, typename T>
__device__ __forceinline__ void channel_params(
    const Slot& sl, const void* mean, const void* invstd, const void* weight, const void* bias, int weight_float,
    typename Accumulator<T>::type (&m)[LANES], typename Accumulator<T>::type (&inv)[LANES],
    typename Accumulator<T>::type (&scale)[LANES], typename Accumulator<T>::type (&shift)[LANES])
{
    typedef typename Accumulator<T>::type Acc;
    if (!sl.active) return;
#pragma unroll
    for (int j = 0; j < LANES; ++j) {
        const long long c = sl.c + (sl.c_lanes > 1 ? j : 0);
        m[j] = acc_param<Acc>(mean, c, Acc(0));
        inv[j] = acc_param<Acc>(invstd, c, Acc(1));
        scale[j] = inv[j] * param<T>(weight, c, weight_float, Acc(1));
        shift[j] = param<T>(bias, c, weight_float, Acc(0));
    }
}

template <int LANES, typename T>
__device__ __forceinline__ void elemt(
    const T* __restrict__ x, const void* __restrict__ mean, const void* __restrict__ invstd,
    const void* __restrict__ weight, const void* __restrict__ bias, const T* __restrict__ residual,
    T* __restrict__ out, unsigned char* __restrict__ mask, long long N, long long C, long long S,
    long long sxn, long long sxc, long long sxs, long long srn, long long src, long long srs,
    long long son, long long soc, long long sos, long long smn, long long smc, long long sms,
    long long chunk, double negative_slope, int activation, int channels, int tile_groups, int vec, int weight_float)
{
    typedef typename Accumulator<T>::type Acc;
    const Slot sl = slot<LANES>(channels, C, S, tile_groups);
    Acc m[LANES], inv[LANES], scale[LANES], shift[LANES];
    channel_params<LANES, T>(sl, mean, invstd, weight, bias, weight_float, m, inv, scale, shift);
    const Acc slope = Acc(negative_slope);
    walk(sl, N * S / sl.s_lanes, chunk, [&](long long in, long long s) {
        Acc xmu[LANES], pre[LANES], y[LANES];
        pre_activation<LANES>(x, residual, in, sl.c, s, sxn, sxc, sxs, srn, src, srs, channels, vec, m, scale, shift,
                              xmu, pre);
#pragma unroll
        for (int j = 0; j < LANES; ++j) y[j] = activation_fn(pre[j], slope, activation);
        store<LANES>(out + in * son + sl.c * soc + s * sos, channels ? soc : sos, vec & BN_VEC_OUT, y);
        if (mask != nullptr)
            store_mask<LANES>(mask + in * smn + sl.c * smc + s * sms, channels ? smc : sms, vec & BN_VEC_MASK, pre);
    });
}

// dy = grad_out * act'(pre) for an item's lanes, and x - mean where `need_x`. act' from the mask
// when there is one (relu / leaky_relu: the residual is not read), else from pre recomputed.
template <int LANES, typename T, typename Acc>
__device__ __forceinline__ void grad_through_activation(
    const T* __restrict__ grad_out, const T* __restrict__ x, const T* __restrict__ residual,
    const unsigned char* __restrict__ mask, long long in, long long c, long long s,
    long long sgn, long long sgc, long long sgs, long long sxn, long long sxc, long long sxs,
    long long srn, long long src, long long srs, long long smn, long long smc, long long sms,
    int channels, int vec, int activation, Acc slope, bool need_x,
    const Acc (&mean)[LANES], const Acc (&scale)[LANES], const Acc (&shift)[LANES], Acc (&dy)[LANES], Acc (&xmu)[LANES])
{
    load<LANES>(grad_out + in * sgn + c * sgc + s * sgs, channels ? sgc : sgs, vec & BN_VEC_GRAD_OUT, dy);
    const bool recompute = activation != ACT_NONE && mask == nullptr;
    if (recompute) {
        Acc pre[LANES];
        pre_activation<LANES>(x, residual, in, c, s, sxn, sxc, sxs, srn, src, srs, channels, vec, mean, scale, shift,
                              xmu, pre);
#pragma unroll
        for (int j = 0; j < LANES; ++j) {
            Acc saved;  // what activation_grad reads: the 0/1 mask, pre, or the output
            if (activation == ACT_RELU || activation == ACT_LEAKY_RELU)
                saved = pre[j] > Acc(0) ? Acc(1) : Acc(0);
            else if (activation == ACT_SIGMOID || activation == ACT_TANH)
                saved = activation_fn(pre[j], slope, activation);
            else
                saved = pre[j];
            dy[j] = activation_grad(dy[j], saved, slope, activation);
        }
        return;
    }
    if (activation != ACT_NONE) {
        Acc saved[LANES];
        load_mask<LANES>(mask + in * smn + c * smc + s * sms, channels ? smc : sms, vec & BN_VEC_MASK, saved);
#pragma unroll
        for (int j = 0; j < LANES; ++j) dy[j] = activation_grad(dy[j], saved[j], slope, activation);
    }
    if (need_x) {
        Acc v[LANES];
        load<LANES>(x + in * sxn + c * sxc + s * sxs, channels ? sxc : sxs, vec & BN_VEC_X, v);
#pragma unroll
        for (int j = 0; j < LANES; ++j) xmu[j] = v[j] - mean[j];
    }
}

template <int LANES, typename T>
__device__ __forceinline__ void backward_reduce(
    const T* __restrict__ grad_out, const T* __restrict__ x, const void* __restrict__ mean,
    const void* __restrict__ invstd, const void* __restrict__ weight, const void* __restrict__ bias,
    const T* __restrict__ residual, const unsigned char* __restrict__ mask, void* __restrict__ partial,
    void* __restrict__ sum_dy_out, void* __restrict__ sum_dy_xmu_out, long long N, long long C, long long S,
    long long sgn, long long sgc, long long sgs, long long sxn, long long sxc, long long sxs,
    long long srn, long long src, long long srs, long long smn, long long smc, long long sms,
    long long chunk, double negative_slope, int activation, int channels, int tile_groups, int vec, int weight_float,
    typename Accumulator<T>::type* sh_a, typename Accumulator<T>::type* sh_b)
{
    typedef typename Accumulator<T>::type Acc;
    const Slot sl = slot<LANES>(channels, C, S, tile_groups);
    Acc m[LANES], inv[LANES], scale[LANES], shift[LANES];
    channel_params<LANES, T>(sl, mean, invstd, weight, bias, weight_float, m, inv, scale, shift);
    const Acc slope = Acc(negative_slope);
    Acc sum_dy[LANES], sum_dy_xmu[LANES];
#pragma unroll
    for (int j = 0; j < LANES; ++j) { sum_dy[j] = Acc(0); sum_dy_xmu[j] = Acc(0); }
    walk(sl, N * S / sl.s_lanes, chunk, [&](long long in, long long s) {
        Acc dy[LANES], xmu[LANES];
        grad_through_activation<LANES>(grad_out, x, residual, mask, in, sl.c, s, sgn, sgc, sgs, sxn, sxc, sxs,
                                       srn, src, srs, smn, smc, sms, channels, vec, activation, slope, true,
                                       m, scale, shift, dy, xmu);
#pragma unroll
        for (int j = 0; j < LANES; ++j) {
            sum_dy[j] += dy[j];
            sum_dy_xmu[j] += dy[j] * xmu[j];
        }
    });
    block_sums<LANES>(sl.groups, sum_dy, sum_dy_xmu, sh_a, sh_b);
    if (int(threadIdx.x) >= sl.groups || !sl.active) return;
    if (!channels && LANES > 1) {  // the lanes are positions of one channel, summed in order
#pragma unroll
        for (int j = 1; j < LANES; ++j) { sum_dy[0] += sum_dy[j]; sum_dy_xmu[0] += sum_dy_xmu[j]; }
    }
    const int outputs = channels ? LANES : 1;
#pragma unroll
    for (int j = 0; j < LANES; ++j) {
        if (j >= outputs) break;
        if (gridDim.y == 1) {
            static_cast<Acc*>(sum_dy_out)[sl.c + j] = sum_dy[j];
            static_cast<Acc*>(sum_dy_xmu_out)[sl.c + j] = sum_dy_xmu[j];
        } else {
            Acc* out = static_cast<Acc*>(partial);
            out[(long long)blockIdx.y * C + sl.c + j] = sum_dy[j];
            out[((long long)gridDim.y + blockIdx.y) * C + sl.c + j] = sum_dy_xmu[j];
        }
    }
}

template <int LANES, typename T>
__device__ __forceinline__ void backward_elemt(
    const T* __restrict__ grad_out, const T* __restrict__ x, const void* __restrict__ mean,
    const void* __restrict__ invstd, const void* __restrict__ weight, const void* __restrict__ bias,
    const T* __restrict__ residual, const unsigned char* __restrict__ mask, const void* __restrict__ mean_dy,
    const void* __restrict__ mean_dy_xmu, T* __restrict__ grad_input, T* __restrict__ grad_residual,
    long long N, long long C, long long S,
    long long sgn, long long sgc, long long sgs, long long sxn, long long sxc, long long sxs,
    long long srn, long long src, long long srs, long long smn, long long smc, long long sms,
    long long sdn, long long sdc, long long sds, long long sqn, long long sqc, long long sqs,
    long long chunk, double negative_slope, int activation, int channels, int tile_groups, int vec, int weight_float)
{
    typedef typename Accumulator<T>::type Acc;
    const Slot sl = slot<LANES>(channels, C, S, tile_groups);
    Acc m[LANES], inv[LANES], scale[LANES], shift[LANES], mdy[LANES], k[LANES];
    channel_params<LANES, T>(sl, mean, invstd, weight, bias, weight_float, m, inv, scale, shift);
    const bool training = mean_dy != nullptr;
    if (sl.active) {
#pragma unroll
        for (int j = 0; j < LANES; ++j) {
            const long long c = sl.c + (sl.c_lanes > 1 ? j : 0);
            mdy[j] = training ? static_cast<const Acc*>(mean_dy)[c] : Acc(0);
            k[j] = training ? inv[j] * inv[j] * static_cast<const Acc*>(mean_dy_xmu)[c] : Acc(0);
        }
    }
    const Acc slope = Acc(negative_slope);
    const bool need_x = grad_input != nullptr && training;
    walk(sl, N * S / sl.s_lanes, chunk, [&](long long in, long long s) {
        Acc dy[LANES], xmu[LANES];
        grad_through_activation<LANES>(grad_out, x, residual, mask, in, sl.c, s, sgn, sgc, sgs, sxn, sxc, sxs,
                                       srn, src, srs, smn, smc, sms, channels, vec, activation, slope, need_x,
                                       m, scale, shift, dy, xmu);
        if (grad_residual != nullptr)
            store<LANES>(grad_residual + in * sqn + sl.c * sqc + s * sqs, channels ? sqc : sqs,
                         vec & BN_VEC_GRAD_RESIDUAL, dy);
        if (grad_input != nullptr) {
            Acc g[LANES];
#pragma unroll
            for (int j = 0; j < LANES; ++j)
                g[j] = (training ? dy[j] - mdy[j] - xmu[j] * k[j] : dy[j]) * scale[j];
            store<LANES>(grad_input + in * sdn + sl.c * sdc + s * sds, channels ? sdc : sds, vec & BN_VEC_GRAD_INPUT,
                         g);
        }
    });
}

}  // namespace bn

// ---------------------------------------------------------------------------------------------
// Entry points. Arguments: pointers, sizes, strides (in elements: n, c, s per tensor), the chunk
// (items per block row), then flags. mean / invstd / sums / partials are Acc (float, double for
// double), (C,) contiguous; partial is (2, gridDim.y, C). Grid: x over channel tiles (channels)
// or channels (rows), y over chunks. packed: LANES = 16 / sizeof(T) lanes an item, else 1.

// mean, biased var of x over (n, s); with gridDim.y > 1 each block row writes its split's
// (mean, M2) to partial instead, for batch_norm_stats_combine.
template <typename T>
__global__ void __launch_bounds__(BN_THREADS, BN_MIN_BLOCKS) batch_norm_stats(
    const T* __restrict__ x, void* __restrict__ partial, void* __restrict__ mean, void* __restrict__ var,
    long long N, long long C, long long S, long long sxn, long long sxc, long long sxs,
    long long chunk, int channels, int packed, int tile_groups, int vec)
{
    typedef typename Accumulator<T>::type Acc;
    constexpr int LANES = bn::Packed<T>::lanes;
    __shared__ long long sh_n[BN_THREADS];
    __shared__ Acc sh_mean[BN_THREADS * LANES];
    __shared__ Acc sh_m2[BN_THREADS * LANES];
    if (packed)
        bn::stats<LANES>(x, partial, mean, var, N, C, S, sxn, sxc, sxs, chunk, channels, tile_groups, vec,
                         sh_n, sh_mean, sh_m2);
    else
        bn::stats<1>(x, partial, mean, var, N, C, S, sxn, sxc, sxs, chunk, channels, tile_groups, vec,
                     sh_n, sh_mean, sh_m2);
}

// The splits' (mean, M2) combined in split order, one thread a channel: split k covered
// min(k_count, count - k * split_count) of the count elements of each channel.
template <typename T>
__global__ void __launch_bounds__(BN_THREADS) batch_norm_stats_combine(
    const void* __restrict__ partial, void* __restrict__ mean, void* __restrict__ var,
    long long C, long long splits, long long count, long long split_count)
{
    typedef typename Accumulator<T>::type Acc;
    const long long c = (long long)blockIdx.x * BN_THREADS + threadIdx.x;
    if (c >= C) return;
    const Acc* p = static_cast<const Acc*>(partial);
    long long n = 0;
    Acc m[1] = {Acc(0)}, q[1] = {Acc(0)};
    for (long long k = 0; k < splits; ++k) {
        const long long left = count - k * split_count;
        const Acc m_k[1] = {p[k * C + c]}, q_k[1] = {p[(splits + k) * C + c]};
        bn::chan(n, m, q, left < split_count ? left : split_count, m_k, q_k);
    }
    static_cast<Acc*>(mean)[c] = m[0];
    static_cast<Acc*>(var)[c] = q[0] / Acc(n);
}

// out = act((x - mean) * invstd * weight + bias (+ residual)); mask (if given) = pre > 0.
template <typename T>
__global__ void __launch_bounds__(BN_THREADS, BN_MIN_BLOCKS) batch_norm_elemt(
    const T* __restrict__ x, const void* __restrict__ mean, const void* __restrict__ invstd,
    const void* __restrict__ weight, const void* __restrict__ bias, const T* __restrict__ residual,
    T* __restrict__ out, unsigned char* __restrict__ mask, long long N, long long C, long long S,
    long long sxn, long long sxc, long long sxs, long long srn, long long src, long long srs,
    long long son, long long soc, long long sos, long long smn, long long smc, long long sms,
    long long chunk, double negative_slope, int activation, int channels, int packed, int tile_groups, int vec,
    int weight_float)
{
    if (packed)
        bn::elemt<bn::Packed<T>::lanes>(x, mean, invstd, weight, bias, residual, out, mask, N, C, S, sxn, sxc, sxs,
                                        srn, src, srs, son, soc, sos, smn, smc, sms, chunk, negative_slope,
                                        activation, channels, tile_groups, vec, weight_float);
    else
        bn::elemt<1>(x, mean, invstd, weight, bias, residual, out, mask, N, C, S, sxn, sxc, sxs, srn, src, srs,
                     son, soc, sos, smn, smc, sms, chunk, negative_slope, activation, channels, tile_groups, vec,
                     weight_float);
}

// sum_dy, sum_dy_xmu over (n, s) of dy = grad_out * act'(pre); with gridDim.y > 1 each block row
// writes its split's sums to partial instead, for batch_norm_backward_reduce_combine.
template <typename T>
__global__ void __launch_bounds__(BN_THREADS, BN_MIN_BLOCKS) batch_norm_backward_reduce(
    const T* __restrict__ grad_out, const T* __restrict__ x, const void* __restrict__ mean,
    const void* __restrict__ invstd, const void* __restrict__ weight, const void* __restrict__ bias,
    const T* __restrict__ residual, const unsigned char* __restrict__ mask, void* __restrict__ partial,
    void* __restrict__ sum_dy, void* __restrict__ sum_dy_xmu, long long N, long long C, long long S,
    long long sgn, long long sgc, long long sgs, long long sxn, long long sxc, long long sxs,
    long long srn, long long src, long long srs, long long smn, long long smc, long long sms,
    long long chunk, double negative_slope, int activation, int channels, int packed, int tile_groups, int vec,
    int weight_float)
{
    typedef typename Accumulator<T>::type Acc;
    constexpr int LANES = bn::Packed<T>::lanes;
    __shared__ Acc sh_a[BN_THREADS * LANES];
    __shared__ Acc sh_b[BN_THREADS * LANES];
    if (packed)
        bn::backward_reduce<LANES>(grad_out, x, mean, invstd, weight, bias, residual, mask, partial, sum_dy,
                                   sum_dy_xmu, N, C, S, sgn, sgc, sgs, sxn, sxc, sxs, srn, src, srs, smn, smc, sms,
                                   chunk, negative_slope, activation, channels, tile_groups, vec, weight_float,
                                   sh_a, sh_b);
    else
        bn::backward_reduce<1>(grad_out, x, mean, invstd, weight, bias, residual, mask, partial, sum_dy, sum_dy_xmu,
                               N, C, S, sgn, sgc, sgs, sxn, sxc, sxs, srn, src, srs, smn, smc, sms, chunk,
                               negative_slope, activation, channels, tile_groups, vec, weight_float, sh_a, sh_b);
}

// The splits' sums added in split order, one thread a channel.
template <typename T>
__global__ void __launch_bounds__(BN_THREADS) batch_norm_backward_reduce_combine(
    const void* __restrict__ partial, void* __restrict__ sum_dy, void* __restrict__ sum_dy_xmu,
    long long C, long long splits)
{
    typedef typename Accumulator<T>::type Acc;
    const long long c = (long long)blockIdx.x * BN_THREADS + threadIdx.x;
    if (c >= C) return;
    const Acc* p = static_cast<const Acc*>(partial);
    Acc a = Acc(0), b = Acc(0);
    for (long long k = 0; k < splits; ++k) {
        a += p[k * C + c];
        b += p[(splits + k) * C + c];
    }
    static_cast<Acc*>(sum_dy)[c] = a;
    static_cast<Acc*>(sum_dy_xmu)[c] = b;
}

// grad_input = (dy - mean_dy - (x - mean) * invstd^2 * mean_dy_xmu) * invstd * weight, or
// dy * invstd * weight without mean_dy (eval); grad_residual = dy. Either output may be absent.
template <typename T>
__global__ void __launch_bounds__(BN_THREADS, BN_MIN_BLOCKS) batch_norm_backward_elemt(
    const T* __restrict__ grad_out, const T* __restrict__ x, const void* __restrict__ mean,
    const void* __restrict__ invstd, const void* __restrict__ weight, const void* __restrict__ bias,
    const T* __restrict__ residual, const unsigned char* __restrict__ mask, const void* __restrict__ mean_dy,
    const void* __restrict__ mean_dy_xmu, T* __restrict__ grad_input, T* __restrict__ grad_residual,
    long long N, long long C, long long S,
    long long sgn, long long sgc, long long sgs, long long sxn, long long sxc, long long sxs,
    long long srn, long long src, long long srs, long long smn, long long smc, long long sms,
    long long sdn, long long sdc, long long sds, long long sqn, long long sqc, long long sqs,
    long long chunk, double negative_slope, int activation, int channels, int packed, int tile_groups, int vec,
    int weight_float)
{
    if (packed)
        bn::backward_elemt<bn::Packed<T>::lanes>(
            grad_out, x, mean, invstd, weight, bias, residual, mask, mean_dy, mean_dy_xmu, grad_input, grad_residual,
            N, C, S, sgn, sgc, sgs, sxn, sxc, sxs, srn, src, srs, smn, smc, sms, sdn, sdc, sds, sqn, sqc, sqs, chunk,
            negative_slope, activation, channels, tile_groups, vec, weight_float);
    else
        bn::backward_elemt<1>(
            grad_out, x, mean, invstd, weight, bias, residual, mask, mean_dy, mean_dy_xmu, grad_input, grad_residual,
            N, C, S, sgn, sgc, sgs, sxn, sxc, sxs, srn, src, srs, smn, smc, sms, sdn, sdc, sds, sqn, sqc, sqs, chunk,
            negative_slope, activation, channels, tile_groups, vec, weight_float);
}
