// Dense layer with a fused activation: forward and backward CUDA kernels (CuPy RawModule).
//
// The same algorithm as kernels/triton/linear.py, with the same names:
//   linear_fwd         out = act(x @ w.T + bias); the bias add and the activation are an epilogue
//                      on the float (double for double) accumulator. What backward needs is
//                      written in that epilogue (SAVE): a uint8 mask for relu / leaky_relu, the
//                      pre-activation for gelu / gelu_tanh / silu, nothing for sigmoid / tanh /
//                      none (their derivative is a function of `out`, which autograd keeps).
//   linear_bwd_input   grad_input  = g @ w        tiles over (M, K), loop over N
//   linear_bwd_weight  grad_weight = g.T @ x      tiles over (N, K), loop over M
//                      grad_bias   = g.sum(0)     summed by the blocks of the first k-tile column
// with g = grad_out * act'(saved) computed in the prologue of each tile load, never stored.
// Every output element is owned by one thread of one block (no atomics): results are
// deterministic, run to run.
//
// One tiled matmul (matmul_tile) serves all three: a 64 x 64 output tile per block of 256
// threads, each thread holding a 4 x 4 register micro-tile, the reduction walked 16 at a time
// through shared memory. The operands are read through loaders (lambdas), so strides
// (non-contiguous inputs, a bias of stride 0) and the activation-derivative prologue live in one
// place per kernel; tiles are staged in the accumulator type, so the prologue runs once per
// loaded element, not once per use.
// All offsets are long long: any of these tensors may pass 2**31 elements.
//
// Entry points are templates over the element type (__half, __nv_bfloat16, float, double),
// instantiated through name expressions: "linear_fwd<float>", ... (fastdl/backends/cupy.py).
// The activation is a runtime argument, uniform over the grid, where Triton has a constexpr: 12
// instantiations instead of one per (type, activation, bias) keep the first-use compile short,
// and every thread takes the same branch.

#include <cuda_fp16.h>
#include <cuda_bf16.h>

// Activation codes: identical to ACTIVATION_CODES in fastdl/backends/common.py.
#define ACT_NONE 0
#define ACT_RELU 1
#define ACT_LEAKY_RELU 2
#define ACT_GELU 3
#define ACT_GELU_TANH 4
#define ACT_SILU 5
#define ACT_SIGMOID 6
#define ACT_TANH 7
// What the forward saves for backward: identical to SAVE_KIND in fastdl/backends/common.py.
#define SAVE_NONE 0
#define SAVE_MASK 1
#define SAVE_PREACT 2

// 64 x 64 tiles, 16 x 16 threads with 4 x 4 outputs each, a reduction step of 16: a thread's
// rows are ty + 16 * i and its columns tx + 16 * j, so neighbouring threads read neighbouring
// shared-memory words (no bank conflicts) and store neighbouring output columns.
#define BLOCK_ROWS 64
#define BLOCK_COLS 64
#define BLOCK_RED 16
#define THREADS_ROWS 16
#define THREADS_COLS 16
#define THREADS (THREADS_ROWS * THREADS_COLS)
#define MICRO_ROWS (BLOCK_ROWS / THREADS_ROWS)
#define MICRO_COLS (BLOCK_COLS / THREADS_COLS)
// One word of padding per shared row (an odd pitch): stores that walk the reduction index
// fall in different banks.
#define TILE_PAD 1
// Two blocks per SM at least: caps registers at 128 a thread (no spills for float accumulators).
#define MIN_BLOCKS 2
// Row-blocks per column sweep in the launch order (Triton's GROUP): operand tiles reused from L2.
#define GROUP 8

static_assert(BLOCK_ROWS * BLOCK_RED == THREADS * 4, "each thread loads 4 elements of the A tile");
static_assert(BLOCK_COLS * BLOCK_RED == THREADS * 4, "each thread loads 4 elements of the B tile");

// ---------------------------------------------------------------------------------------------
// Element types and their accumulators.

template <typename T> struct Accumulator { typedef float type; };
template <> struct Accumulator<double> { typedef double type; };

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename T> __device__ __forceinline__ T from_acc(typename Accumulator<T>::type v);
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }

// Math at the accumulator's precision (no silent promotion of float to double or back).
__device__ __forceinline__ float erf_(float z) { return erff(z); }
__device__ __forceinline__ double erf_(double z) { return erf(z); }
__device__ __forceinline__ float exp_(float z) { return expf(z); }
__device__ __forceinline__ double exp_(double z) { return exp(z); }
__device__ __forceinline__ float tanh_(float z) { return tanhf(z); }
__device__ __forceinline__ double tanh_(double z) { return tanh(z); }

// ---------------------------------------------------------------------------------------------
// Activations, as torch computes them.

__device__ __forceinline__ int save_kind(int activation) {
    switch (activation) {
        case ACT_RELU: case ACT_LEAKY_RELU: return SAVE_MASK;
        case ACT_GELU: case ACT_GELU_TANH: case ACT_SILU: return SAVE_PREACT;
        default: return SAVE_NONE;
    }
}

template <typename Acc>
__device__ __forceinline__ Acc sigmoid_(Acc z) {
    // exp(-z) overflows to inf for very negative z, and 1 / inf is the right 0.
    return Acc(1) / (Acc(1) + exp_(-z));
}

template <typename Acc>
__device__ __forceinline__ Acc activation_fn(Acc z, Acc negative_slope, int activation) {
    switch (activation) {
        case ACT_RELU: return (z > Acc(0) || z != z) ? z : Acc(0);  // NaN passes, as in torch
        case ACT_LEAKY_RELU: return z > Acc(0) ? z : z * negative_slope;
        case ACT_GELU: return Acc(0.5) * z * (Acc(1) + erf_(z * Acc(0.7071067811865476)));
        case ACT_GELU_TANH:
            return Acc(0.5) * z * (Acc(1) + tanh_(Acc(0.7978845608028654) * (z + Acc(0.044715) * z * z * z)));
        case ACT_SILU: return z * sigmoid_(z);
        case ACT_SIGMOID: return sigmoid_(z);
        case ACT_TANH: return tanh_(z);
        default: return z;
    }
}

// grad * act'(.); `saved` is the mask (relu, leaky_relu), the pre-activation (gelu, gelu_tanh,
// silu) or the output (sigmoid, tanh).
template <typename Acc>
__device__ __forceinline__ Acc activation_grad(Acc grad, Acc saved, Acc negative_slope, int activation) {
    switch (activation) {
        case ACT_RELU: return saved != Acc(0) ? grad : Acc(0);
        case ACT_LEAKY_RELU: return saved != Acc(0) ? grad : grad * negative_slope;
        case ACT_GELU: {
            Acc cdf = Acc(0.5) * (Acc(1) + erf_(saved * Acc(0.7071067811865476)));
            Acc pdf = exp_(Acc(-0.5) * saved * saved) * Acc(0.3989422804014327);
            return grad * (cdf + saved * pdf);
        }
        case ACT_GELU_TANH: {
            Acc t = tanh_(Acc(0.7978845608028654) * (saved + Acc(0.044715) * saved * saved * saved));
            Acc d_inner = Acc(0.7978845608028654) * (Acc(1) + Acc(0.134145) * saved * saved);
            return grad * (Acc(0.5) * (Acc(1) + t) + Acc(0.5) * saved * (Acc(1) - t * t) * d_inner);
        }
        case ACT_SILU: {
            Acc s = sigmoid_(saved);
            return grad * (s * (Acc(1) + saved * (Acc(1) - s)));
        }
        case ACT_SIGMOID: return grad * saved * (Acc(1) - saved);
        case ACT_TANH: return grad * (Acc(1) - saved * saved);
        default: return grad;
    }
}

// g = grad_out * act'(saved) at (m, n): the backward prologue, applied as a tile is loaded.
template <typename T>
__device__ __forceinline__ typename Accumulator<T>::type load_grad(
    const T* __restrict__ grad_out, const void* __restrict__ saved, long long m, long long n,
    long long stride_gm, long long stride_gn, long long stride_sm, long long stride_sn,
    typename Accumulator<T>::type negative_slope, int activation)
{
    typedef typename Accumulator<T>::type Acc;
    Acc grad = to_acc(grad_out[m * stride_gm + n * stride_gn]);
    if (activation == ACT_NONE) return grad;
    long long offset = m * stride_sm + n * stride_sn;
    Acc s = save_kind(activation) == SAVE_MASK
        ? Acc(static_cast<const unsigned char*>(saved)[offset])
        : to_acc(static_cast<const T*>(saved)[offset]);
    return activation_grad(grad, s, negative_slope, activation);
}

// ---------------------------------------------------------------------------------------------
// The shared tiled matmul.

// Triton's _grouped_tile: walk GROUP row-blocks per column sweep.
__device__ __forceinline__ void grouped_tile(long long pid, long long num_rows, long long num_cols,
                                             long long& row, long long& col) {
    long long width = GROUP * num_cols;
    long long group_id = pid / width;
    long long first_row = group_id * GROUP;
    long long group_rows = min(num_rows - first_row, (long long)GROUP);
    row = first_row + (pid % width) % group_rows;
    col = (pid % width) / group_rows;
}

// acc[i][j] += sum over r < reduction of load_a(row0 + ty + 16 i, r) * load_b(r, col0 + tx + 16 j),
// with zeros outside (rows, cols, reduction): the loaders are called in bounds only.
// a_red_fast / b_red_fast: the reduction index has the operand's smaller stride, so consecutive
// threads load along it: reads are coalesced for row-major and column-major operands alike.
// row_sum (bwd_weight's bias): when sum_rows, the thread adds every A element of its rows.
template <typename Acc, typename LoadA, typename LoadB>
__device__ __forceinline__ void matmul_tile(
    Acc (&acc)[MICRO_ROWS][MICRO_COLS], Acc (&row_sum)[MICRO_ROWS], bool sum_rows,
    long long row0, long long col0, long long rows, long long cols, long long reduction,
    bool a_red_fast, bool b_red_fast, LoadA load_a, LoadB load_b)
{
    __shared__ Acc a_tile[BLOCK_RED][BLOCK_ROWS + TILE_PAD];
    __shared__ Acc b_tile[BLOCK_RED][BLOCK_COLS + TILE_PAD];
    const int tid = threadIdx.x;
    const int tx = tid % THREADS_COLS;
    const int ty = tid / THREADS_COLS;
    for (long long red0 = 0; red0 < reduction; red0 += BLOCK_RED) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            int idx = tid + e * THREADS;
            int i = a_red_fast ? idx / BLOCK_RED : idx % BLOCK_ROWS;
            int r = a_red_fast ? idx % BLOCK_RED : idx / BLOCK_ROWS;
            long long row = row0 + i, red = red0 + r;
            a_tile[r][i] = (row < rows && red < reduction) ? load_a(row, red) : Acc(0);
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            int idx = tid + e * THREADS;
            int j = b_red_fast ? idx / BLOCK_RED : idx % BLOCK_COLS;
            int r = b_red_fast ? idx % BLOCK_RED : idx / BLOCK_COLS;
            long long col = col0 + j, red = red0 + r;
            b_tile[r][j] = (red < reduction && col < cols) ? load_b(red, col) : Acc(0);
        }
        __syncthreads();  // the tiles are complete before anyone reads them
        // Unrolled by 8, not 16: fully unrolled, ptxas hoists the shared loads of the whole step
        // into registers (166 a thread for linear_fwd<float>); by 8 it fits MIN_BLOCKS' 128
        // without spills (ptxas -v, sm_90). Register counts only: the speed is not measured.
#pragma unroll 8
        for (int r = 0; r < BLOCK_RED; ++r) {
            Acc a[MICRO_ROWS], b[MICRO_COLS];
#pragma unroll
            for (int i = 0; i < MICRO_ROWS; ++i) a[i] = a_tile[r][ty + i * THREADS_ROWS];
#pragma unroll
            for (int j = 0; j < MICRO_COLS; ++j) b[j] = b_tile[r][tx + j * THREADS_COLS];
            if (sum_rows) {
#pragma unroll
                for (int i = 0; i < MICRO_ROWS; ++i) row_sum[i] += a[i];
            }
#pragma unroll
            for (int i = 0; i < MICRO_ROWS; ++i)
#pragma unroll
                for (int j = 0; j < MICRO_COLS; ++j) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();  // everyone is done reading before the next tiles overwrite them
    }
}

__device__ __forceinline__ long long cdiv(long long a, long long b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// Entry points. Arguments: pointers, sizes, strides (in elements), then scalars and flags.

// x (M, K), w (N, K), bias (N,) or null, out (M, N), saved (M, N): uint8 mask, T pre-activation
// or null, per save_kind(activation).
template <typename T>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) linear_fwd(
    const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
    T* __restrict__ out, void* __restrict__ saved,
    long long M, long long N, long long K,
    long long stride_xm, long long stride_xk, long long stride_wn, long long stride_wk,
    long long stride_bias, long long stride_om, long long stride_on,
    long long stride_sm, long long stride_sn,
    double negative_slope, int has_bias, int activation)
{
    typedef typename Accumulator<T>::type Acc;
    long long pid_m, pid_n;
    grouped_tile(blockIdx.x, cdiv(M, BLOCK_ROWS), cdiv(N, BLOCK_COLS), pid_m, pid_n);
    const long long m0 = pid_m * BLOCK_ROWS, n0 = pid_n * BLOCK_COLS;
    Acc acc[MICRO_ROWS][MICRO_COLS] = {};
    Acc unused[MICRO_ROWS] = {};
    matmul_tile<Acc>(
        acc, unused, false, m0, n0, M, N, K, stride_xk <= stride_xm, stride_wk <= stride_wn,
        [&](long long m, long long k) { return to_acc(x[m * stride_xm + k * stride_xk]); },
        [&](long long k, long long n) { return to_acc(w[n * stride_wn + k * stride_wk]); });

    const Acc slope = Acc(negative_slope);
    const int save = save_kind(activation);
    const int tx = threadIdx.x % THREADS_COLS, ty = threadIdx.x / THREADS_COLS;
#pragma unroll
    for (int j = 0; j < MICRO_COLS; ++j) {
        const long long n = n0 + tx + j * THREADS_COLS;
        if (n >= N) continue;
        const Acc b = has_bias ? to_acc(bias[n * stride_bias]) : Acc(0);
#pragma unroll
        for (int i = 0; i < MICRO_ROWS; ++i) {
            const long long m = m0 + ty + i * THREADS_ROWS;
            if (m >= M) continue;
            const Acc z = acc[i][j] + b;
            out[m * stride_om + n * stride_on] = from_acc<T>(activation_fn(z, slope, activation));
            if (save == SAVE_MASK)
                static_cast<unsigned char*>(saved)[m * stride_sm + n * stride_sn] = z > Acc(0);
            else if (save == SAVE_PREACT)
                static_cast<T*>(saved)[m * stride_sm + n * stride_sn] = from_acc<T>(z);
        }
    }
}

// grad_out / saved (M, N), w (N, K), grad_input (M, K). saved: the forward's mask or
// pre-activation, `out` for sigmoid / tanh, unread (may be null) without an activation.
template <typename T>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) linear_bwd_input(
    const T* __restrict__ grad_out, const void* __restrict__ saved, const T* __restrict__ w,
    T* __restrict__ grad_input,
    long long M, long long N, long long K,
    long long stride_gm, long long stride_gn, long long stride_sm, long long stride_sn,
    long long stride_wn, long long stride_wk, long long stride_im, long long stride_ik,
    double negative_slope, int activation)
{
    typedef typename Accumulator<T>::type Acc;
    long long pid_m, pid_k;
    grouped_tile(blockIdx.x, cdiv(M, BLOCK_ROWS), cdiv(K, BLOCK_COLS), pid_m, pid_k);
    const long long m0 = pid_m * BLOCK_ROWS, k0 = pid_k * BLOCK_COLS;
    const Acc slope = Acc(negative_slope);
    Acc acc[MICRO_ROWS][MICRO_COLS] = {};
    Acc unused[MICRO_ROWS] = {};
    matmul_tile<Acc>(
        acc, unused, false, m0, k0, M, K, N, stride_gn <= stride_gm, stride_wn <= stride_wk,
        [&](long long m, long long n) {
            return load_grad<T>(grad_out, saved, m, n, stride_gm, stride_gn, stride_sm, stride_sn,
                                slope, activation);
        },
        [&](long long n, long long k) { return to_acc(w[n * stride_wn + k * stride_wk]); });

    const int tx = threadIdx.x % THREADS_COLS, ty = threadIdx.x / THREADS_COLS;
#pragma unroll
    for (int i = 0; i < MICRO_ROWS; ++i) {
        const long long m = m0 + ty + i * THREADS_ROWS;
#pragma unroll
        for (int j = 0; j < MICRO_COLS; ++j) {
            const long long k = k0 + tx + j * THREADS_COLS;
            if (m < M && k < K) grad_input[m * stride_im + k * stride_ik] = from_acc<T>(acc[i][j]);
        }
    }
}

// grad_out / saved (M, N), x (M, K), grad_weight (N, K), grad_bias (N,) or null.
// The grid has max(1, cdiv(K, 64)) k-tiles per n-tile, so the bias column runs even when K == 0;
// the blocks of k-tile 0 write grad_bias, each element by the one thread (tx == 0) owning its row.
template <typename T>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) linear_bwd_weight(
    const T* __restrict__ grad_out, const void* __restrict__ saved, const T* __restrict__ x,
    T* __restrict__ grad_weight, T* __restrict__ grad_bias,
    long long M, long long N, long long K,
    long long stride_gm, long long stride_gn, long long stride_sm, long long stride_sn,
    long long stride_xm, long long stride_xk, long long stride_wn, long long stride_wk,
    double negative_slope, int has_bias, int activation)
{
    typedef typename Accumulator<T>::type Acc;
    long long pid_n, pid_k;
    grouped_tile(blockIdx.x, cdiv(N, BLOCK_ROWS), max(1LL, cdiv(K, BLOCK_COLS)), pid_n, pid_k);
    const long long n0 = pid_n * BLOCK_ROWS, k0 = pid_k * BLOCK_COLS;
    const Acc slope = Acc(negative_slope);
    const int tx = threadIdx.x % THREADS_COLS, ty = threadIdx.x / THREADS_COLS;
    const bool bias_owner = has_bias && pid_k == 0 && tx == 0;
    Acc acc[MICRO_ROWS][MICRO_COLS] = {};
    Acc bias_acc[MICRO_ROWS] = {};
    // g is read transposed, (n, m), so the matmul is g.T @ x with no shuffle.
    matmul_tile<Acc>(
        acc, bias_acc, bias_owner, n0, k0, N, K, M, stride_gm <= stride_gn, stride_xm <= stride_xk,
        [&](long long n, long long m) {
            return load_grad<T>(grad_out, saved, m, n, stride_gm, stride_gn, stride_sm, stride_sn,
                                slope, activation);
        },
        [&](long long m, long long k) { return to_acc(x[m * stride_xm + k * stride_xk]); });

#pragma unroll
    for (int i = 0; i < MICRO_ROWS; ++i) {
        const long long n = n0 + ty + i * THREADS_ROWS;
        if (n >= N) continue;
#pragma unroll
        for (int j = 0; j < MICRO_COLS; ++j) {
            const long long k = k0 + tx + j * THREADS_COLS;
            if (k < K) grad_weight[n * stride_wn + k * stride_wk] = from_acc<T>(acc[i][j]);
        }
        if (bias_owner) grad_bias[n] = from_acc<T>(bias_acc[i]);
    }
}

// grad_weight (N, K) += grad_out.T @ x and grad_bias (N,) += grad_out.sum(0), in place;
// grad_out (M, N), x (M, K); grad_weight and grad_bias in Acc (float32, double for double): the
// sums across linear_cross_entropy's chunks are rounded to T once, by the caller, at the end.
// linear_bwd_weight's tiles (64 x 64 per block of THREADS, every output element owned
// by one thread: deterministic), with the old values added to the Acc tile sum in its epilogue.
template <typename T>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) linear_grad_weight_accumulate(
    const T* __restrict__ grad_out, const T* __restrict__ x, typename Accumulator<T>::type* __restrict__ grad_weight,
    typename Accumulator<T>::type* __restrict__ grad_bias,
    long long M, long long N, long long K,
    long long stride_gm, long long stride_gn, long long stride_xm, long long stride_xk,
    long long stride_wn, long long stride_wk, int has_bias)
{
    typedef typename Accumulator<T>::type Acc;
    long long pid_n, pid_k;
    grouped_tile(blockIdx.x, cdiv(N, BLOCK_ROWS), max(1LL, cdiv(K, BLOCK_COLS)), pid_n, pid_k);
    const long long n0 = pid_n * BLOCK_ROWS, k0 = pid_k * BLOCK_COLS;
    const int tx = threadIdx.x % THREADS_COLS, ty = threadIdx.x / THREADS_COLS;
    const bool bias_owner = has_bias && pid_k == 0 && tx == 0;
    Acc acc[MICRO_ROWS][MICRO_COLS] = {};
    Acc bias_acc[MICRO_ROWS] = {};
    // grad_out is read transposed, (n, m), so the matmul is grad_out.T @ x with no shuffle.
    matmul_tile<Acc>(
        acc, bias_acc, bias_owner, n0, k0, N, K, M, stride_gm <= stride_gn, stride_xm <= stride_xk,
        [&](long long n, long long m) { return to_acc(grad_out[m * stride_gm + n * stride_gn]); },
        [&](long long m, long long k) { return to_acc(x[m * stride_xm + k * stride_xk]); });

#pragma unroll
    for (int i = 0; i < MICRO_ROWS; ++i) {
        const long long n = n0 + ty + i * THREADS_ROWS;
        if (n >= N) continue;
#pragma unroll
        for (int j = 0; j < MICRO_COLS; ++j) {
            const long long k = k0 + tx + j * THREADS_COLS;
            if (k < K) {
                grad_weight[n * stride_wn + k * stride_wk] += acc[i][j];
            }
        }
        if (bias_owner) grad_bias[n] += bias_acc[i];
    }
}
