// Softmax cross-entropy: loss and gradient from one block per row, in two sweeps of the row.
//
// The same algorithm as kernels/triton/cross_entropy.py, with the same names; its docstring has
// the math. Every loss is sum_c T_c (lse - x_c) for a target distribution T, with gradient
// softmax(x) * B - T, B = sum_c T_c:
//
//   sweep 1  each thread keeps an online (m, s): a running max of its columns and the sum of
//            exp(x - m), rescaled when m grows, so exp never overflows (logits of magnitude 1e4
//            are fine); then the block combines the pairs, warps by shuffles, then the warps'
//            results through shared memory: s = s_a exp(m_a - m) + s_b exp(m_b - m), shifting by
//            0 where m is -inf, so -inf entries give exp(-inf) = 0, never nan.
//            Probability targets also sum B here.
//   sweep 2  with m and s final: grad = (exp(x - m) / s * B - T) * scale, written once; and the
//            row sums the loss needs relative to m, sum_c T_c (x_c - m).
//
// Contiguous rows are read 16 bytes per thread per load (8 half / bfloat16, 4 float, 2 double)
// from their first 16-byte boundary on, and the gradient written the same way when its row is
// on the same boundary (always, for a contiguous or in-place gradient of contiguous logits); any
// other layout goes one element at a time. Consecutive threads take consecutive columns (or
// packs) either way, so loads are coalesced.
//
// Bad targets: a class index outside [0, C) that is not ignore_index fails a device-side assert
// (FASTDL_DEVICE_ASSERT, CUDA's assert unless predefined); the read of x_t is clamped to column 0,
// so a bad index never reads out of bounds even where asserts are compiled out.
// All offsets are long long: rows * C may pass 2**31 (8192 x 262144 already does).
//
// Also here: scale_rows (the backward, out of place). linear_cross_entropy's in-place
// grad_weight += g.T @ x is linear_grad_weight_accumulate in linear.cu.
//
// Compiled after linear.cu, in one module (fastdl.backends.cupy.SOURCE_PRELUDES): it uses that
// file's element types (Accumulator, to_acc, from_acc, exp_).
//
// Entry points are templates over the element type (__half, __nv_bfloat16, float, double),
// instantiated through name expressions: "cross_entropy_fwd<float>", ... The target kind, class
// weights, smoothing and whether to write the gradient are runtime arguments, uniform over the
// grid, where Triton has constexprs: one instantiation per type instead of one per combination
// (16) keeps the first-use compile short, and every thread of a block takes the same branch.

#include <cuda_fp16.h>
#include <cuda_bf16.h>

#ifndef FASTDL_DEVICE_ASSERT
#define FASTDL_DEVICE_ASSERT(condition, message) assert((condition) && message)
#endif

// Threads per block of the row kernels: a multiple of the warp, at most CE_MAX_THREADS (one
// shared slot per warp; at most 1024, so the warps' results fit one warp). The launcher picks a
// power of two from 32 to 512 by C (about 16 columns a thread): a block of 512 reads a
// 32000-column bf16 row in 8 loads of 16 bytes a thread.
#define CE_MAX_THREADS 512
#define WARP_SIZE 32
#define FULL_MASK 0xffffffffu
// Loads of this many bytes per thread on the contiguous path.
#define PACK_BYTES 16

// ---------------------------------------------------------------------------------------------
// Helpers (the element types and exp_ come from linear.cu).

__device__ __forceinline__ float log_(float z) { return logf(z); }
__device__ __forceinline__ double log_(double z) { return log(z); }

template <typename Acc> __device__ __forceinline__ Acc neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return __int_as_float(0xff800000); }
template <> __device__ __forceinline__ double neg_inf<double>() {
    return __longlong_as_double(0xfff0000000000000ULL);
}

template <typename T>
struct alignas(PACK_BYTES) Pack {
    static constexpr int size = PACK_BYTES / sizeof(T);
    T v[size];
};

// One 16-byte store of a pack at p (16-byte aligned). A plain `*(Pack<T>*)p = v` was split by
// NVVM into element stores in scale_rows (STG.E.U16 x 8 for half); CUDA's __stwb on uint4 is one
// st.global.v4 (STG.E.128) with the default write-back policy. The host emulation
// (tests/cuda_emulation.py, no __CUDACC__) copies the pack.
template <typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T>& v) {
#ifdef __CUDACC__
    uint4 bits;
    memcpy(&bits, &v, sizeof(bits));
    __stwb(reinterpret_cast<uint4*>(p), bits);
#else
    *reinterpret_cast<Pack<T>*>(p) = v;
#endif
}

// f(col, x_col) for every column of a row, each column by one of `threads` threads (this is
// `thread`); with STORE, f's result is written to g[col] in T. Columns [head, body_end) go a pack
// at a time: x contiguous from its first 16-byte boundary, and g (when storing) contiguous and
// on the same boundary. Columns before and after go one at a time.
template <bool STORE, typename T, typename F>
__device__ __forceinline__ void sweep_row(const T* x, long long stride_xc, T* g, long long stride_gc, long long C,
                                          long long thread, long long threads, F f)
{
    typedef Pack<T> P;
    const unsigned long long x_addr = reinterpret_cast<unsigned long long>(x);
    const bool packed = stride_xc == 1 && x_addr % sizeof(T) == 0 &&
        (!STORE || (stride_gc == 1 && (reinterpret_cast<unsigned long long>(g) - x_addr) % PACK_BYTES == 0));
    long long head = C, body_end = C;
    if (packed) {
        head = min(C, (long long)((PACK_BYTES - x_addr % PACK_BYTES) % PACK_BYTES / sizeof(T)));
        body_end = head + (C - head) / P::size * P::size;
    }
    for (long long col = thread; col < head; col += threads) {
        auto r = f(col, to_acc(x[col * stride_xc]));
        if (STORE) g[col * stride_gc] = from_acc<T>(r);
    }
    for (long long col = head + thread * P::size; col < body_end; col += threads * P::size) {
        const P in = *reinterpret_cast<const P*>(x + col);
        P out;
#pragma unroll
        for (int j = 0; j < P::size; ++j) {
            auto r = f(col + j, to_acc(in.v[j]));
            if (STORE) out.v[j] = from_acc<T>(r);
        }
        if (STORE) store_pack(g + col, out);
    }
    for (long long col = body_end + thread; col < C; col += threads) {
        auto r = f(col, to_acc(x[col * stride_xc]));
        if (STORE) g[col * stride_gc] = from_acc<T>(r);
    }
}

// One more column into a thread's online (m, s). One exp per column: the smaller of x and m is
// shifted by the larger. `x - x` is 0, or nan for x = +inf, as Triton's exp(x - m) gives there.
template <typename Acc>
__device__ __forceinline__ void online_update(Acc& m, Acc& s, Acc x) {
    if (x > m) {
        s = s * exp_(m - x) + (Acc(1) + (x - x));
        m = x;
    } else if (x != neg_inf<Acc>()) {  // a -inf column adds 0 (and m - m would be nan for m = -inf)
        s += exp_(x - m);
    }
}

// (m, s) += (m_o, s_o), in the larger max: the other sum rescaled by exp(lo - hi), or adding 0
// when the smaller max is -inf (no columns, or all -inf; then -inf - -inf would be nan). One exp
// per combine, not one per side (the larger side's is exp(0) = 1): two cost
// cross_entropy_fwd<double> 24 bytes of spills on sm_90 (the five unrolled shuffle steps held
// both exps' polynomial constants at once). A +inf max keeps the nan its sum already holds.
template <typename Acc>
__device__ __forceinline__ void combine(Acc& m, Acc& s, Acc m_o, Acc s_o) {
    const bool other_larger = m_o > m;
    const Acc hi = other_larger ? m_o : m, lo = other_larger ? m : m_o;
    const Acc s_hi = other_larger ? s_o : s, s_lo = other_larger ? s : s_o;
    s = s_hi + (lo == neg_inf<Acc>() ? Acc(0) : s_lo * exp_(lo - hi));
    m = hi;
}

// Block reductions: xor butterflies within each warp, the warps' results through shared memory,
// then every warp reduces those the same way, so every thread ends with the same bits (the
// combines are commutative) and no broadcast is needed. Called by every thread of the block.
template <typename Acc>
__device__ __forceinline__ void block_reduce_max_sum(Acc& m, Acc& s) {
    __shared__ Acc warp_m[CE_MAX_THREADS / WARP_SIZE], warp_s[CE_MAX_THREADS / WARP_SIZE];
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE, warps = blockDim.x / WARP_SIZE;
#pragma unroll
    for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2)
        combine(m, s, __shfl_xor_sync(FULL_MASK, m, offset), __shfl_xor_sync(FULL_MASK, s, offset));
    if (lane == 0) { warp_m[warp] = m; warp_s[warp] = s; }
    __syncthreads();  // every warp's result is in before anyone reads them
    m = lane < warps ? warp_m[lane] : neg_inf<Acc>();
    s = lane < warps ? warp_s[lane] : Acc(0);
    __syncthreads();  // read by everyone before a later reduction overwrites them
#pragma unroll
    for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2)
        combine(m, s, __shfl_xor_sync(FULL_MASK, m, offset), __shfl_xor_sync(FULL_MASK, s, offset));
}

template <typename Acc>
__device__ __forceinline__ Acc block_reduce_sum(Acc v) {
    __shared__ Acc warp_v[CE_MAX_THREADS / WARP_SIZE];
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE, warps = blockDim.x / WARP_SIZE;
#pragma unroll
    for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(FULL_MASK, v, offset);
    if (lane == 0) warp_v[warp] = v;
    __syncthreads();
    v = lane < warps ? warp_v[lane] : Acc(0);
    __syncthreads();
#pragma unroll
    for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(FULL_MASK, v, offset);
    return v;
}

// ---------------------------------------------------------------------------------------------
// Entry points. Arguments: pointers, sizes, strides (in elements), then scalars and flags.

// logits (R, C); target (R,) int64 class indices or (R, C) probabilities in T; weight (C,) or
// unread; weight_sum () in Acc (read with weight, smoothing and index targets); grad_scale () or
// (R,) in Acc; loss (R,) in Acc; grad (R, C) in T (may be logits itself), unwritten without
// compute_grad. One block per row, blockDim.x a multiple of 32 up to CE_MAX_THREADS.
template <typename T>
__global__ void __launch_bounds__(CE_MAX_THREADS) cross_entropy_fwd(
    const T* logits, const void* __restrict__ target, const T* __restrict__ weight,
    const typename Accumulator<T>::type* __restrict__ weight_sum_ptr,
    const typename Accumulator<T>::type* __restrict__ grad_scale, typename Accumulator<T>::type* __restrict__ loss_rows,
    T* grad,
    long long C,
    long long stride_lr, long long stride_lc, long long stride_tr, long long stride_tc, long long stride_w,
    long long stride_scale, long long stride_gr, long long stride_gc,
    long long ignore_index, double label_smoothing,
    int prob_target, int has_weight, int smoothing, int compute_grad)
{
    typedef typename Accumulator<T>::type Acc;
    const long long row = blockIdx.x;
    const T* x_row = logits + row * stride_lr;
    const T* p_row = static_cast<const T*>(target) + row * stride_tr;  // probability targets only
    const long long tid = threadIdx.x, threads = blockDim.x;
    const Acc eps = smoothing ? Acc(label_smoothing) : Acc(0);
    const Acc eps_per_class = eps / Acc(C);
    // T_c of a probability target: (1 - eps) p_c + eps / C, times w_c.
    auto prob_dist = [&](long long col) {
        Acc q = to_acc(p_row[col * stride_tc]);
        if (smoothing) q = q * (Acc(1) - eps) + eps_per_class;
        if (has_weight) q *= to_acc(weight[col * stride_w]);
        return q;
    };

    Acc m = neg_inf<Acc>(), s = Acc(0);
    Acc b = Acc(0);  // B = sum_c T_c, summed in sweep 1 for probability targets
    sweep_row<false>(x_row, stride_lc, (T*)nullptr, 0, C, tid, threads, [&](long long col, Acc x) {
        online_update(m, s, x);
        if (prob_target) b += prob_dist(col);
        return Acc(0);
    });
    // The target's logit is read before the reduction's __syncthreads: with an in-place gradient,
    // sweep 2 of another thread may overwrite it as soon as every thread is past that barrier.
    Acc scale = grad_scale[row * stride_scale];
    bool ignored = false;
    long long target_col = 0;
    Acc w_target = Acc(1);
    Acc weight_sum = Acc(C);
    Acc x_target = Acc(0);
    if (!prob_target) {
        const long long t = static_cast<const long long*>(target)[row * stride_tr];
        ignored = t == ignore_index;
        const bool in_range = t >= 0 && t < C;
        if (tid == 0) FASTDL_DEVICE_ASSERT(in_range || ignored, "fastdl.cross_entropy: target out of bounds [0, C)");
        target_col = in_range && !ignored ? t : 0;
        x_target = to_acc(x_row[target_col * stride_lc]);
        if (has_weight) {
            w_target = to_acc(weight[target_col * stride_w]);
            if (smoothing) weight_sum = *weight_sum_ptr;
        }
        if (ignored) w_target = Acc(0);
        // torch's nll_loss multiplies an ignored row's gradient by 0 (nan stays nan).
        if (ignored) scale = Acc(0);
        b = w_target;
        if (smoothing) b = (Acc(1) - eps) * w_target + (ignored ? Acc(0) : eps_per_class * weight_sum);
    }

    block_reduce_max_sum(m, s);
    if (prob_target) b = block_reduce_sum(b);
    const Acc shift = m == neg_inf<Acc>() ? Acc(0) : m;
    const Acc log_s = log_(s);

    Acc row_sum = Acc(0);  // sum_c T_c (x_c - m), or sum_c w_c (x_c - m) for smoothing
    if (compute_grad || prob_target || smoothing) {
        T* g_row = compute_grad ? grad + row * stride_gr : nullptr;
        auto visit = [&](long long col, Acc x) {
            const Acc x_shifted = x - shift;
            Acc t_dist;
            if (prob_target) {
                t_dist = prob_dist(col);
                row_sum += t_dist * x_shifted;
            } else {
                t_dist = col == target_col ? (Acc(1) - eps) * w_target : Acc(0);
                if (smoothing) {
                    const Acc w = has_weight ? to_acc(weight[col * stride_w]) : Acc(1);
                    row_sum += w * x_shifted;
                    if (!ignored) t_dist += eps_per_class * w;
                }
            }
            return (exp_(x_shifted) / s * b - t_dist) * scale;
        };
        if (compute_grad) sweep_row<true>(x_row, stride_lc, g_row, stride_gc, C, tid, threads, visit);
        else sweep_row<false>(x_row, stride_lc, g_row, 0, C, tid, threads, visit);
        if (prob_target || smoothing) row_sum = block_reduce_sum(row_sum);
    }

    if (tid != 0) return;
    Acc loss;
    if (prob_target) {
        loss = b * log_s - row_sum;
    } else {
        // (m - x_t) first: both may be ~1e4, their difference is exact.
        loss = w_target * ((shift - x_target) + log_s);
        if (smoothing) loss = (Acc(1) - eps) * loss + eps_per_class * (weight_sum * log_s - row_sum);
        if (ignored) loss = Acc(0);
    }
    loss_rows[row] = loss;
}

// out[r, :] = x[r, :] * scale (shape ()) or scale[r] (shape (R,)), in Acc; x (R, C) is only read,
// out (R, C) any strides. Out of place, so the saved gradient survives for a second backward; the
// bytes moved are an in-place scaling's. Grid (column blocks, row blocks); each block walks rows
// blockIdx.y, + gridDim.y, ... (a grid's y is at most 65535) and its share of their columns, a pack
// at a time where x and out are contiguous and on the same 16-byte offset.
template <typename T>
__global__ void __launch_bounds__(CE_MAX_THREADS) scale_rows(
    const T* __restrict__ x, const typename Accumulator<T>::type* __restrict__ scale, T* __restrict__ out,
    long long R, long long C, long long stride_xr, long long stride_xc, long long stride_scale,
    long long stride_or, long long stride_oc)
{
    typedef typename Accumulator<T>::type Acc;
    const long long thread = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long threads = (long long)gridDim.x * blockDim.x;
    for (long long row = blockIdx.y; row < R; row += gridDim.y) {
        const Acc factor = scale[row * stride_scale];
        sweep_row<true>(x + row * stride_xr, stride_xc, out + row * stride_or, stride_oc, C, thread, threads,
                        [&](long long, Acc v) { return v * factor; });
    }
}
