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
//   linear_grad_weight_accumulate  grad_weight += grad_out.T @ x, grad_bias += grad_out.sum(0)
// with g = grad_out * act'(saved) computed in the prologue of each tile load, never stored.
// Every output element is owned by one thread of one block (no atomics): results are
// deterministic, run to run.
//
// Every kernel is one 64 x 64 output tile per block of 256 threads, in two steps:
//   block_matmul   the tile's A @ B into a row-major tile of accumulators in shared memory, on
//                  tensor cores (mma.cuh: __half, __nv_bfloat16, and float when TF32 is allowed)
//                  or on the SIMT path (matmul_tile: float without TF32, double);
//   the epilogue   each thread takes 16 consecutive columns of one row of that tile, so bias,
//                  activation, saved values and outputs move 16 bytes at a time where the row is
//                  contiguous and 16-byte aligned (element by element otherwise).
// The operands are read through loaders (Dense, Grad), so strides (non-contiguous inputs, a bias
// of stride 0) and the activation-derivative prologue live in one place per kernel.
// All offsets are long long: any of these tensors may pass 2**31 elements.
//
// Entry points are templates over the element type (__half, __nv_bfloat16, float, double) and,
// for float, whether TF32 tensor cores may be used (torch.backends.cuda.matmul.allow_tf32, as the
// Triton backend's input_precision), instantiated through name expressions: "linear_fwd<float>",
// "linear_fwd<float, true>", ... (fastdl/backends/cupy/_runtime.py). The activation is a runtime
// argument, uniform over the grid, where Triton has a constexpr: 20 instantiations instead of one
// per (type, activation, bias) keep the first-use compile short, and every thread takes the same
// branch.

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include "elements.cuh"
#include "mma.cuh"
#include "philox.cuh"

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

// The block: a 64 x 64 output tile, 256 threads (tc::ROWS, tc::COLS, tc::BLOCK_THREADS: both paths
// share the grid of fastdl/backends/cupy/_runtime.py).
#define BLOCK_ROWS 64
#define BLOCK_COLS 64
#define THREADS 256
static_assert(BLOCK_ROWS == tc::ROWS && BLOCK_COLS == tc::COLS && THREADS == tc::BLOCK_THREADS, "one grid for both paths");
// Row-blocks per column sweep in the launch order (Triton's GROUP): operand tiles reused from L2.
#define GROUP 8
// The accumulator tile's row pitch in shared memory: 16-byte aligned rows for the epilogue.
#define STAGE_PITCH (BLOCK_COLS + 4)
// The epilogue: each thread owns EPILOGUE_COLS consecutive columns of one row.
#define EPILOGUE_COLS 16
#define EPILOGUE_THREADS_PER_ROW (BLOCK_COLS / EPILOGUE_COLS)
static_assert(BLOCK_ROWS * EPILOGUE_THREADS_PER_ROW == THREADS, "one run of EPILOGUE_COLS per thread");

// SIMT path: 16 x 16 threads with 4 x 4 outputs each, a reduction step of 16: a thread's rows
// are ty + 16 * i and its columns tx + 16 * j, so neighbouring threads read neighbouring
// shared-memory words (no bank conflicts).
#define SIMT_RED 16
#define THREADS_ROWS 16
#define THREADS_COLS 16
#define MICRO_ROWS (BLOCK_ROWS / THREADS_ROWS)
#define MICRO_COLS (BLOCK_COLS / THREADS_COLS)
// One word of padding per shared row (an odd pitch): stores that walk the reduction index
// fall in different banks.
#define SIMT_PITCH (BLOCK_ROWS + 1)
static_assert(BLOCK_ROWS * SIMT_RED == THREADS * 4, "each thread loads 4 elements of the A tile");
static_assert(BLOCK_COLS * SIMT_RED == THREADS * 4, "each thread loads 4 elements of the B tile");

// ---------------------------------------------------------------------------------------------
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
// Operand loaders (the interface of mma.cuh; the SIMT path calls element() only). An operand is
// (outer x reduction): A's rows or B's columns by the reduction index.

// Element (outer, red) at p[outer * stride_outer + red * stride_red].
template <typename T>
struct Dense {
    typedef typename Accumulator<T>::type Acc;
    static constexpr int CHUNK = 16 / sizeof(T);
    const T* p;
    long long stride_outer, stride_red;

    __device__ bool red_contiguous() const { return stride_red <= stride_outer; }
    __device__ bool vector() const {
        return red_contiguous() ? tc::aligned_rows<T>(p, stride_outer, stride_red) : tc::aligned_rows<T>(p, stride_red, stride_outer);
    }
    __device__ Acc element(long long outer, long long red) const { return to_acc(p[outer * stride_outer + red * stride_red]); }
    __device__ bool direct() const { return true; }
    __device__ const void* address(long long outer, long long red) const { return p + outer * stride_outer + red * stride_red; }
    __device__ void chunk(long long outer, long long red, float (&v)[CHUNK]) const {
        T e[CHUNK];
        tc::load_vector(p + outer * stride_outer + red * stride_red, e);
#pragma unroll
        for (int i = 0; i < CHUNK; ++i) v[i] = to_acc(e[i]);
    }
};

// g = grad_out * act'(saved) at (m, n), read as (outer, red) = (m, n), or (n, m) when Transposed.
template <typename T, bool Transposed>
struct Grad {
    typedef typename Accumulator<T>::type Acc;
    static constexpr int CHUNK = 16 / sizeof(T);
    const T* grad_out;
    const void* saved;
    long long stride_gm, stride_gn, stride_sm, stride_sn;
    Acc negative_slope;
    int activation;

    __device__ long long g_outer() const { return Transposed ? stride_gn : stride_gm; }
    __device__ long long g_red() const { return Transposed ? stride_gm : stride_gn; }
    __device__ long long s_outer() const { return Transposed ? stride_sn : stride_sm; }
    __device__ long long s_red() const { return Transposed ? stride_sm : stride_sn; }
    __device__ bool red_contiguous() const { return g_red() <= g_outer(); }
    __device__ bool vector() const {
        const bool red = red_contiguous();
        const long long g_along = red ? g_red() : g_outer(), g_across = red ? g_outer() : g_red();
        const long long s_along = red ? s_red() : s_outer(), s_across = red ? s_outer() : s_red();
        if (!tc::aligned_rows<T>(grad_out, g_across, g_along)) return false;
        switch (save_kind(activation)) {
            case SAVE_MASK:  // CHUNK bytes at a time
                return s_along == 1 && s_across % CHUNK == 0 && reinterpret_cast<unsigned long long>(saved) % CHUNK == 0;
            case SAVE_PREACT: return tc::aligned_rows<T>(saved, s_across, s_along);
            default: return activation == ACT_NONE || tc::aligned_rows<T>(saved, s_across, s_along);  // `out`
        }
    }
    __device__ Acc element(long long outer, long long red) const {
        const long long m = Transposed ? red : outer, n = Transposed ? outer : red;
        return load_grad<T>(grad_out, saved, m, n, stride_gm, stride_gn, stride_sm, stride_sn, negative_slope, activation);
    }
    // Without an activation g is grad_out as stored: its chunks may be copied as they are.
    __device__ bool direct() const { return activation == ACT_NONE; }
    __device__ const void* address(long long outer, long long red) const {
        const long long m = Transposed ? red : outer, n = Transposed ? outer : red;
        return grad_out + m * stride_gm + n * stride_gn;
    }
    __device__ void chunk(long long outer, long long red, float (&v)[CHUNK]) const {
        const long long m = Transposed ? red : outer, n = Transposed ? outer : red;
        T g[CHUNK];
        tc::load_vector(grad_out + m * stride_gm + n * stride_gn, g);
#pragma unroll
        for (int i = 0; i < CHUNK; ++i) v[i] = to_acc(g[i]);
        if (activation == ACT_NONE) return;
        const long long offset = m * stride_sm + n * stride_sn;
        Acc s[CHUNK];
        if (save_kind(activation) == SAVE_MASK) {
            unsigned char mask[CHUNK];
            tc::load_vector(static_cast<const unsigned char*>(saved) + offset, mask);
#pragma unroll
            for (int i = 0; i < CHUNK; ++i) s[i] = Acc(mask[i]);
        } else {
            T e[CHUNK];
            tc::load_vector(static_cast<const T*>(saved) + offset, e);
#pragma unroll
            for (int i = 0; i < CHUNK; ++i) s[i] = to_acc(e[i]);
        }
#pragma unroll
        for (int i = 0; i < CHUNK; ++i) v[i] = activation_grad(v[i], s[i], negative_slope, activation);
    }
};

// ---------------------------------------------------------------------------------------------
// The SIMT tile (float without TF32, double).

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

// acc[i][j] += sum over r < reduction of a(row0 + ty + 16 i, r) * b(col0 + tx + 16 j, r), with
// zeros outside (rows, cols, reduction): the loaders are called in bounds only. When the
// reduction index is an operand's contiguous one (red_contiguous), consecutive threads load
// along it: reads are coalesced for row-major and column-major operands alike.
// row_sum (bwd_weight's bias): when sum_rows, the thread adds every A element of its rows.
// tiles: 2 * SIMT_RED * SIMT_PITCH elements of shared memory.
template <typename Acc, typename OpA, typename OpB>
__device__ __forceinline__ void matmul_tile(
    Acc (&acc)[MICRO_ROWS][MICRO_COLS], Acc (&row_sum)[MICRO_ROWS], bool sum_rows, Acc* tiles,
    long long row0, long long col0, long long rows, long long cols, long long reduction,
    const OpA& a, const OpB& b)
{
    Acc* a_tile = tiles;                           // [SIMT_RED][SIMT_PITCH]
    Acc* b_tile = tiles + SIMT_RED * SIMT_PITCH;   // [SIMT_RED][SIMT_PITCH]
    const bool a_red_fast = a.red_contiguous(), b_red_fast = b.red_contiguous();
    const int tid = threadIdx.x;
    const int tx = tid % THREADS_COLS;
    const int ty = tid / THREADS_COLS;
    for (long long red0 = 0; red0 < reduction; red0 += SIMT_RED) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            int idx = tid + e * THREADS;
            int i = a_red_fast ? idx / SIMT_RED : idx % BLOCK_ROWS;
            int r = a_red_fast ? idx % SIMT_RED : idx / BLOCK_ROWS;
            long long row = row0 + i, red = red0 + r;
            a_tile[r * SIMT_PITCH + i] = (row < rows && red < reduction) ? a.element(row, red) : Acc(0);
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            int idx = tid + e * THREADS;
            int j = b_red_fast ? idx / SIMT_RED : idx % BLOCK_COLS;
            int r = b_red_fast ? idx % SIMT_RED : idx / BLOCK_COLS;
            long long col = col0 + j, red = red0 + r;
            b_tile[r * SIMT_PITCH + j] = (red < reduction && col < cols) ? b.element(col, red) : Acc(0);
        }
        __syncthreads();  // the tiles are complete before anyone reads them
        // Unrolled by 4: fully unrolled, ptxas hoists the shared loads of the whole step into
        // registers (166 a thread for linear_fwd<float>); by 8, linear_grad_weight_accumulate<float>
        // spilled 16 B at MIN_BLOCKS' 128 (sm_90); by 4 it takes 79. Register counts only: the
        // speed is not measured.
#pragma unroll 4
        for (int r = 0; r < SIMT_RED; ++r) {
            Acc av[MICRO_ROWS], bv[MICRO_COLS];
#pragma unroll
            for (int i = 0; i < MICRO_ROWS; ++i) av[i] = a_tile[r * SIMT_PITCH + ty + i * THREADS_ROWS];
#pragma unroll
            for (int j = 0; j < MICRO_COLS; ++j) bv[j] = b_tile[r * SIMT_PITCH + tx + j * THREADS_COLS];
            if (sum_rows) {
#pragma unroll
                for (int i = 0; i < MICRO_ROWS; ++i) row_sum[i] += av[i];
            }
#pragma unroll
            for (int i = 0; i < MICRO_ROWS; ++i)
#pragma unroll
                for (int j = 0; j < MICRO_COLS; ++j) acc[i][j] += av[i] * bv[j];
        }
        __syncthreads();  // everyone is done reading before the next tiles overwrite them
    }
}

// ---------------------------------------------------------------------------------------------
// One block's matmul, on the path of its element type.

// The tensor-core input type of (T, TF32), or void for the SIMT path.
template <typename T, bool TF32> struct TensorCoreInput { typedef void type; static constexpr bool used = false; };
template <bool TF32> struct TensorCoreInput<__half, TF32> { typedef __half type; static constexpr bool used = true; };
template <bool TF32> struct TensorCoreInput<__nv_bfloat16, TF32> {
    typedef __nv_bfloat16 type;
    static constexpr bool used = true;
};
template <> struct TensorCoreInput<float, true> { typedef tc::tf32 type; static constexpr bool used = true; };

// Registers per thread: at most 128 (two blocks per SM) everywhere but double's SIMT path: its
// epilogue holds a run of 16 doubles through the activation, and at 128 linear_fwd<double> spilled
// (48 B with the old epilogue, 32 B with this one, sm_90); with one block per SM it takes ~206.
template <typename T> struct MinBlocks { static constexpr int value = 2; };
template <> struct MinBlocks<double> { static constexpr int value = 1; };

__host__ __device__ constexpr int max_bytes(int a, int b) { return a > b ? a : b; }

template <typename T, bool TF32, bool TC = TensorCoreInput<T, TF32>::used> struct Workspace;
template <typename T, bool TF32> struct Workspace<T, TF32, true> {
    static constexpr int BYTES = max_bytes(tc::Tile<typename TensorCoreInput<T, TF32>::type>::SHARED_BYTES,
                                           BLOCK_ROWS * STAGE_PITCH * int(sizeof(float)));
};
template <typename T, bool TF32> struct Workspace<T, TF32, false> {
    typedef typename Accumulator<T>::type Acc;
    static constexpr int BYTES = max_bytes(2 * SIMT_RED * SIMT_PITCH * int(sizeof(Acc)),
                                           BLOCK_ROWS * STAGE_PITCH * int(sizeof(Acc)));
};

// staged (a BLOCK_ROWS x STAGE_PITCH shared tile) = A[row0:, :] @ B[:, col0:] for the block's
// 64 x 64 tile, zeros outside (rows, cols); with SumRows and sum_rows (uniform over the block),
// row_sum[i] = the sum of A's row row0 + i. Every thread calls it; staged and row_sum are ready
// for every thread when it returns.
template <typename T, bool TF32, bool SumRows, typename OpA, typename OpB>
__device__ __forceinline__ void block_matmul(
    typename Accumulator<T>::type*& staged, typename Accumulator<T>::type*& row_sum, bool sum_rows,
    long long row0, long long col0, long long rows, long long cols, long long reduction, const OpA& a, const OpB& b)
{
    typedef typename Accumulator<T>::type Acc;
    // One buffer: the operand tiles during the loop, then the accumulator tile.
    __shared__ uint4 workspace[Workspace<T, TF32>::BYTES / 16];
    __shared__ Acc sums[BLOCK_ROWS];
    staged = reinterpret_cast<Acc*>(workspace);
    row_sum = sums;
    if constexpr (TensorCoreInput<T, TF32>::used) {
        typedef typename TensorCoreInput<T, TF32>::type In;
        tc::FragC acc[tc::MI][tc::NI] = {};
        float row_partial[tc::Tile<In>::CHUNK] = {};
        tc::matmul<In, SumRows>(acc, workspace, row0, col0, rows, cols, reduction, a, b, row_partial);
        if (SumRows && sum_rows)
            tc::row_sums<In>(row_partial, a.red_contiguous(), reinterpret_cast<float*>(workspace), sums);
        tc::stage(acc, staged, STAGE_PITCH);
    } else {
        const int tx = threadIdx.x % THREADS_COLS, ty = threadIdx.x / THREADS_COLS;
        const bool owner = SumRows && sum_rows && tx == 0;
        Acc acc[MICRO_ROWS][MICRO_COLS] = {};
        Acc acc_rows[MICRO_ROWS] = {};
        matmul_tile<Acc>(acc, acc_rows, owner, staged, row0, col0, rows, cols, reduction, a, b);
#pragma unroll
        for (int i = 0; i < MICRO_ROWS; ++i) {
#pragma unroll
            for (int j = 0; j < MICRO_COLS; ++j)
                staged[(ty + i * THREADS_ROWS) * STAGE_PITCH + tx + j * THREADS_COLS] = acc[i][j];
            if (owner) sums[ty + i * THREADS_ROWS] = acc_rows[i];
        }
    }
    __syncthreads();  // the tile is staged
}

// This thread's run in the epilogue: row `row` of the tile, columns [col, col + EPILOGUE_COLS),
// its accumulators in v.
template <typename Acc>
__device__ __forceinline__ void epilogue_run(const Acc* staged, int& row, int& col, Acc (&v)[EPILOGUE_COLS]) {
    row = threadIdx.x / EPILOGUE_THREADS_PER_ROW;
    col = (threadIdx.x % EPILOGUE_THREADS_PER_ROW) * EPILOGUE_COLS;
    tc::load_vector(staged + row * STAGE_PITCH + col, v);
}

__device__ __forceinline__ long long cdiv(long long a, long long b) { return (a + b - 1) / b; }

__device__ __forceinline__ int run_length(long long start, long long end) {
    return int(max(0LL, min((long long)EPILOGUE_COLS, end - start)));
}

// ---------------------------------------------------------------------------------------------
// Entry points. Arguments: pointers, sizes, strides (in elements), then scalars and flags.

// x (M, K), w (N, K), bias (N,) or null, out (M, N), saved (M, N): uint8 mask, T pre-activation
// or null, per save_kind(activation).
template <typename T, bool TF32 = false>
__global__ void __launch_bounds__(THREADS, MinBlocks<T>::value) linear_fwd(
    const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
    T* __restrict__ out, void* __restrict__ saved,
    long long M, long long N, long long K,
    long long stride_xm, long long stride_xk, long long stride_wn, long long stride_wk,
    long long stride_bias, long long stride_om, long long stride_on,
    long long stride_sm, long long stride_sn,
    double negative_slope, int has_bias, int activation,
    const long long* __restrict__ dropout_seed, int dropout_threshold, double dropout_scale)
{
    typedef typename Accumulator<T>::type Acc;
    long long pid_m, pid_n;
    grouped_tile(blockIdx.x, cdiv(M, BLOCK_ROWS), cdiv(N, BLOCK_COLS), pid_m, pid_n);
    const long long m0 = pid_m * BLOCK_ROWS, n0 = pid_n * BLOCK_COLS;
    Acc *staged, *unused;
    block_matmul<T, TF32, false>(staged, unused, false, m0, n0, M, N, K,
                                 Dense<T>{x, stride_xm, stride_xk}, Dense<T>{w, stride_wn, stride_wk});

    int row, col;
    Acc z[EPILOGUE_COLS];
    epilogue_run(staged, row, col, z);
    const long long m = m0 + row, n = n0 + col;
    const int count = run_length(n, N);
    if (m >= M || count == 0) return;
    if (has_bias) {
        T b[EPILOGUE_COLS];
        tc::load_run(bias + n * stride_bias, stride_bias, b, count, tc::aligned_rows<T>(bias, 0, stride_bias));
#pragma unroll
        for (int e = 0; e < EPILOGUE_COLS; ++e) z[e] += e < count ? to_acc(b[e]) : Acc(0);
    }
    const Acc slope = Acc(negative_slope);
    const int save = save_kind(activation);
    if (save == SAVE_MASK) {
        unsigned char mask[EPILOGUE_COLS];
#pragma unroll
        for (int e = 0; e < EPILOGUE_COLS; ++e) mask[e] = z[e] > Acc(0);
        unsigned char* s = static_cast<unsigned char*>(saved);
        tc::store_run(s + m * stride_sm + n * stride_sn, stride_sn, mask, count,
                  tc::aligned_rows<unsigned char>(saved, stride_sm, stride_sn));
    } else if (save == SAVE_PREACT) {
        T pre[EPILOGUE_COLS];
#pragma unroll
        for (int e = 0; e < EPILOGUE_COLS; ++e) pre[e] = from_acc<T>(z[e]);
        tc::store_run(static_cast<T*>(saved) + m * stride_sm + n * stride_sn, stride_sn, pre, count,
                  tc::aligned_rows<T>(saved, stride_sm, stride_sn));
    }
    Acc y[EPILOGUE_COLS];
#pragma unroll
    for (int e = 0; e < EPILOGUE_COLS; ++e) y[e] = activation_fn(z[e], slope, activation);
    if (dropout_seed != nullptr) {
        // Dropout after the activation (kernels/triton/linear.py's DROPOUT): element (m, n) takes
        // word n % 4 of Philox at counter m * ceil(N / 4) + n / 4, as dropout.cu's row m does. A run
        // starts at a multiple of 16 columns: EPILOGUE_COLS / 4 whole counters.
        const DropoutKey key = load_dropout_key(dropout_seed);
        const Acc scale = Acc(dropout_scale);
        const unsigned long long counter = (unsigned long long)(m * ((N + 3) / 4) + n / 4);
#pragma unroll
        for (int g = 0; g < EPILOGUE_COLS / 4; ++g) {
            const PhiloxWords pw = philox4x32_10(counter + g, key.k0, key.k1);
#pragma unroll
            for (int j = 0; j < 4; ++j) y[4 * g + j] *= dropout_keep(pw.w[j], dropout_threshold) ? scale : Acc(0);
        }
    }
    T o[EPILOGUE_COLS];
#pragma unroll
    for (int e = 0; e < EPILOGUE_COLS; ++e) o[e] = from_acc<T>(y[e]);
    tc::store_run(out + m * stride_om + n * stride_on, stride_on, o, count, tc::aligned_rows<T>(out, stride_om, stride_on));
}

// grad_out / saved (M, N), w (N, K), grad_input (M, K). saved: the forward's mask or
// pre-activation, `out` for sigmoid / tanh, unread (may be null) without an activation.
template <typename T, bool TF32 = false>
__global__ void __launch_bounds__(THREADS, MinBlocks<T>::value) linear_bwd_input(
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
    Acc *staged, *unused;
    block_matmul<T, TF32, false>(
        staged, unused, false, m0, k0, M, K, N,
        Grad<T, false>{grad_out, saved, stride_gm, stride_gn, stride_sm, stride_sn, Acc(negative_slope), activation},
        Dense<T>{w, stride_wk, stride_wn});

    int row, col;
    Acc v[EPILOGUE_COLS];
    epilogue_run(staged, row, col, v);
    const long long m = m0 + row, k = k0 + col;
    const int count = run_length(k, K);
    if (m >= M || count == 0) return;
    T o[EPILOGUE_COLS];
#pragma unroll
    for (int e = 0; e < EPILOGUE_COLS; ++e) o[e] = from_acc<T>(v[e]);
    tc::store_run(grad_input + m * stride_im + k * stride_ik, stride_ik, o, count,
              tc::aligned_rows<T>(grad_input, stride_im, stride_ik));
}

// grad_out / saved (M, N), x (M, K), grad_weight (N, K), grad_bias (N,) or null.
// The grid has max(1, cdiv(K, 64)) k-tiles per n-tile, so the bias column runs even when K == 0;
// the blocks of k-tile 0 write grad_bias, each element by the one thread owning the start of its row.
template <typename T, bool TF32 = false>
__global__ void __launch_bounds__(THREADS, MinBlocks<T>::value) linear_bwd_weight(
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
    const bool sums = has_bias && pid_k == 0;
    Acc *staged, *row_sum;
    // g is read transposed, (n, m), so the matmul is g.T @ x with no shuffle.
    block_matmul<T, TF32, true>(
        staged, row_sum, sums, n0, k0, N, K, M,
        Grad<T, true>{grad_out, saved, stride_gm, stride_gn, stride_sm, stride_sn, Acc(negative_slope), activation},
        Dense<T>{x, stride_xk, stride_xm});

    int row, col;
    Acc v[EPILOGUE_COLS];
    epilogue_run(staged, row, col, v);
    const long long n = n0 + row, k = k0 + col;
    if (n >= N) return;
    if (sums && col == 0) grad_bias[n] = from_acc<T>(row_sum[row]);
    const int count = run_length(k, K);
    if (count == 0) return;
    T o[EPILOGUE_COLS];
#pragma unroll
    for (int e = 0; e < EPILOGUE_COLS; ++e) o[e] = from_acc<T>(v[e]);
    tc::store_run(grad_weight + n * stride_wn + k * stride_wk, stride_wk, o, count,
              tc::aligned_rows<T>(grad_weight, stride_wn, stride_wk));
}

// grad_weight (N, K) += grad_out.T @ x and grad_bias (N,) += grad_out.sum(0), in place;
// grad_out (M, N), x (M, K); grad_weight and grad_bias in Acc (float32, double for double): the
// sums across linear_cross_entropy's chunks are rounded to T once, by the caller, at the end.
// linear_bwd_weight's tiles (every output element owned by one thread: deterministic), with the
// old values added to the Acc tile sum in its epilogue.
template <typename T, bool TF32 = false>
__global__ void __launch_bounds__(THREADS, MinBlocks<T>::value) linear_grad_weight_accumulate(
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
    const bool sums = has_bias && pid_k == 0;
    Acc *staged, *row_sum;
    // grad_out is read transposed, (n, m), so the matmul is grad_out.T @ x with no shuffle.
    block_matmul<T, TF32, true>(staged, row_sum, sums, n0, k0, N, K, M,
                                Dense<T>{grad_out, stride_gn, stride_gm}, Dense<T>{x, stride_xk, stride_xm});

    int row, col;
    Acc v[EPILOGUE_COLS];
    epilogue_run(staged, row, col, v);
    const long long n = n0 + row, k = k0 + col;
    if (n >= N) return;
    if (sums && col == 0) grad_bias[n] += row_sum[row];
    const int count = run_length(k, K);
    if (count == 0) return;
    Acc* p = grad_weight + n * stride_wn + k * stride_wk;
    const bool vector = tc::aligned_rows<Acc>(grad_weight, stride_wn, stride_wk);
    Acc old[EPILOGUE_COLS] = {};
    tc::load_run(p, stride_wk, old, count, vector);
#pragma unroll
    for (int e = 0; e < EPILOGUE_COLS; ++e) old[e] += v[e];
    tc::store_run(p, stride_wk, old, count, vector);
}
