// The tensor-core tile shared by kernels/cuda (linear.cu today, conv2d.cu next): one block of
// 256 threads computes a 64 x 64 float32 tile of A @ B with mma.sync, A (rows x reduction) and
// B (reduction x cols) read through operand loaders, so the caller's layout (strides, an implicit
// im2col, a prologue such as linear's activation gradient) lives in the caller.
//
//   tc::matmul<In, SumRows>(acc, smem, row0, col0, rows, cols, reduction, a, b, row_partial)
//                                      the main loop: acc += A B, this warp's share in fragments
//   tc::matmul_segments<In, SumRows>(..., segments, length, a, b, row_partial)
//                                      the same over a reduction of `segments` runs of `length`
//                                      (conv2d: kernel positions x channels), as nested loops
//   tc::row_sums<In>(...)              A's row sums (a bias gradient), deterministic
//   tc::stage(acc, staged, pitch)      fragments -> a row-major tile in shared memory, from which
//                                      the caller's epilogue reads runs of a row
//   tc::load_run / tc::store_run       an epilogue's global accesses, 16 bytes at a time where a
//                                      row is contiguous and 16-byte aligned (aligned_rows)
//
// For conv2d (implicit GEMM, kernels/cuda/conv2d.cu): A = the im2col view of the input (rows:
// (n, oh, ow), reduction: (kh, kw, c), c fastest), B = the filters; its loaders compute addresses
// (and zeros for padding) in element() / chunk(); the tile, the fragments and the epilogue
// staging are unchanged. matmul_segments walks (kh, kw) and the channel blocks as nested loops.
//
// In is the tensor-core input type: __half, __nv_bfloat16 (mma.m16n8k16, f32 accumulate) or
// tc::tf32 (float32 storage rounded with cvt.rna.tf32.f32, mma.m16n8k8). The fragment layouts
// are the PTX ISA's ("Matrix Fragments for mma.m16n8k16 with floating point type", "... for
// mma.m16n8k8", "ldmatrix"), written down once below, in the emulation branch; the device
// branch is the PTX itself. With FASTDL_HOST_EMULATION (tests/cuda_emulation.py) the two
// warp-collective instructions (ldmatrix and mma) are emulated lane by lane: each
// lane hands its registers to the warp, and gets back exactly the registers the hardware gives
// it, so a kernel that loads a fragment in the wrong layout computes wrong numbers on the CPU.
//
// Operand tiles move global -> shared in a 2-stage pipeline (matmul's comment): on sm_80 / sm_90,
// where both operands need no transform on load, their 16-byte chunks go by cp.async (LDGSTS), so
// step k + 1's copies are in flight during step k's mma; otherwise (a prologue such as act', an
// unaligned or strided operand) both go through registers into one stage, fetched before the mma.
// TF32 operands are rounded (cvt.rna) as fragments are read from shared memory, so raw float32
// copies and register-staged values give the same mma inputs.
//
// An operand loader (a struct; linear.cu's Dense and Grad are examples) provides:
//   bool red_contiguous() const     its elements are closest along the reduction index (else
//                                   along the outer one: A's row, B's column); picks the shared
//                                   layout, so 16-byte chunks are copied along that index
//   bool vector() const             whole chunks may be read with one 16-byte load (stride 1
//                                   along the chunk, 16-byte aligned rows)
//   void chunk(outer, red, float (&v)[CHUNK]) const   CHUNK consecutive elements along the
//                                   contiguous index starting at (outer, red); all in bounds,
//                                   called only when vector()
//   float element(outer, red) const one element, in bounds
//   bool direct() const             a chunk's elements are stored values, unchanged (no prologue):
//                                   the tile may copy them to shared memory with cp.async
//   const void* address(outer, red) const   the chunk's first element, or nullptr where the whole
//                                   chunk is zeros (padding); called only when vector() && direct(),
//                                   for chunks whose first element is in bounds
// The tile calls them only in bounds and fills zeros elsewhere, so partial tiles, any K and
// misaligned or non-contiguous operands are correct; only the copy width changes.
#pragma once

namespace tc {

// Tensor-core input types: the storage each is staged in, its rounding, and its MMA depth.
struct tf32 {};  // float32 storage, rounded to TF32 (round to nearest, ties away: cvt.rna)

template <typename In> struct Input;
template <> struct Input<__half> {
    typedef __half storage;
    static constexpr int MMA_K = 16;
    static __device__ __forceinline__ __half round(float v) { return __float2half_rn(v); }
    static __device__ __forceinline__ float widen(__half v) { return __half2float(v); }
};
template <> struct Input<__nv_bfloat16> {
    typedef __nv_bfloat16 storage;
    static constexpr int MMA_K = 16;
    static __device__ __forceinline__ __nv_bfloat16 round(float v) { return __float2bfloat16_rn(v); }
    static __device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
};
template <> struct Input<tf32> {
    typedef float storage;
    static constexpr int MMA_K = 8;
    static __device__ __forceinline__ float round(float v) {
#ifdef FASTDL_HOST_EMULATION
        unsigned u;
        memcpy(&u, &v, 4);
        if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;  // ties away from 0
        memcpy(&v, &u, 4);
        return v;
#else
        unsigned u;
        asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(u) : "f"(v));
        return __uint_as_float(u);
#endif
    }
    static __device__ __forceinline__ float widen(float v) { return v; }
};

// The block tile: 64 x 64 outputs, 256 threads = 8 warps as 2 (rows) x 4 (cols), each warp
// 32 x 16 = 2 x 2 mma tiles of 16 x 8. A reduction step moves one 16-byte chunk per thread and
// operand: 32 (16-bit) or 16 (TF32) reduction indices per step. STAGES steps' tiles are in shared
// memory at once (the pipeline): 20 KB in all.
constexpr int ROWS = 64, COLS = 64, BLOCK_THREADS = 256;
constexpr int WARP_ROWS = 32, WARP_COLS = 16, WARPS_PER_ROW = COLS / WARP_COLS;
constexpr int MI = WARP_ROWS / 16, NI = WARP_COLS / 8;

template <typename In> struct Tile {
    typedef typename Input<In>::storage S;
    static constexpr int CHUNK = 16 / sizeof(S);          // elements per 16-byte copy
    static constexpr int RED = BLOCK_THREADS * CHUNK / ROWS;     // reduction indices per step
    // Shared layouts, one 16-byte chunk of padding per row: a warp's ldmatrix rows (or TF32's
    // 32-bit fragment loads) fall in distinct banks in both.
    static constexpr int RED_PITCH = RED + CHUNK;          // [outer][red]: 80 bytes
    static constexpr int OUTER_PITCH = ROWS + 8;           // [red][outer]: 144 / 288 bytes
    static constexpr int OPERAND_ELEMS = ROWS * RED_PITCH > RED * OUTER_PITCH ? ROWS * RED_PITCH : RED * OUTER_PITCH;
    static constexpr int STAGES = 2;
    static constexpr int SHARED_BYTES = 2 * STAGES * OPERAND_ELEMS * int(sizeof(S));  // A's stages, then B's
    static_assert(ROWS == COLS, "one chunk mapping serves both operands");
    static_assert(RED % Input<In>::MMA_K == 0, "whole mma steps per reduction step");
};

// Register fragments of one mma: A (16 x MMA_K), B (MMA_K x 8), C/D (16 x 8, f32).
struct FragA { unsigned r[4]; };
struct FragB { unsigned r[2]; };
struct FragC { float r[4]; };

__device__ __forceinline__ int lane_id() { return threadIdx.x % 32; }

#ifdef FASTDL_HOST_EMULATION
// ---- The PTX ISA's fragment layouts, as the emulation applies them ------------------------------
// groupID = lane >> 2, threadID_in_group = lane % 4.

template <typename In> constexpr bool is_bf16 = false;
template <> constexpr bool is_bf16<__nv_bfloat16> = true;

__device__ __forceinline__ float bits_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
__device__ __forceinline__ float b16_float(unsigned short h, bool bf16) {
    return bf16 ? __bfloat162float(__nv_bfloat16{h}) : __half2float(__half{h});
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8j..8j+7 give the addresses of the
// eight 16-byte rows of matrix j; every lane receives matrix j in register j: without .trans,
// row lane/4, elements 2 (lane % 4) and + 1 (low half first); with .trans, the same positions
// of the transposed matrix (elements lane/4 of rows 2 (lane % 4) and + 1).
template <bool Trans>
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* row) {
    const void* rows[32];
    emulated_warp_gather(row, rows);
    const int lane = lane_id();
    for (int j = 0; j < 4; ++j) {
        const unsigned short* m[8];
        for (int i = 0; i < 8; ++i) m[i] = static_cast<const unsigned short*>(rows[8 * j + i]);
        unsigned lo, hi;
        if (!Trans) {
            lo = m[lane / 4][2 * (lane % 4)];
            hi = m[lane / 4][2 * (lane % 4) + 1];
        } else {
            lo = m[2 * (lane % 4)][lane / 4];
            hi = m[2 * (lane % 4) + 1][lane / 4];
        }
        r[j] = lo | (hi << 16);
    }
}

// mma.sync.aligned.m16n8k{16,8}.row.col.f32.{f16,bf16,tf32}.f32: D = A B + C, every lane's
// registers gathered into the full matrices by the documented layouts, each lane's D computed
// at its own C positions (products exact in float, summed in float in k order).
template <typename In>
__device__ __forceinline__ void mma(FragC& d, const FragA& a, const FragB& b) {
    FragA as[32];
    FragB bs[32];
    FragC cs[32];
    emulated_warp_gather(a, as);
    emulated_warp_gather(b, bs);
    emulated_warp_gather(d, cs);
    constexpr int K = Input<In>::MMA_K;
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, t = l % 4;
        if constexpr (K == 16) {  // m16n8k16 .f16/.bf16: a_i pairs; row g (+8 for a1, a3), col 2t (+8 for a2, a3)
            const bool bf16 = is_bf16<In>;
            for (int i = 0; i < 8; ++i) {
                const unsigned reg = as[l].r[i / 2];
                const unsigned short h = (unsigned short)(i % 2 ? reg >> 16 : reg & 0xffff);
                const int row = g + ((i / 2) % 2) * 8, col = 2 * t + (i % 2) + (i / 4) * 8;
                A[row][col] = b16_float(h, bf16);
            }
            for (int i = 0; i < 4; ++i) {  // b_i: row 2t + (i % 2) (+8 for b2, b3), col g
                const unsigned reg = bs[l].r[i / 2];
                const unsigned short h = (unsigned short)(i % 2 ? reg >> 16 : reg & 0xffff);
                B[2 * t + (i % 2) + (i / 2) * 8][g] = b16_float(h, bf16);
            }
        } else {  // m16n8k8 .tf32: a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4); b0 (t, g), b1 (t+4, g)
            // The mma reads the 19 TF32 bits of each register (the low 13 are not used).
            for (int i = 0; i < 4; ++i) A[g + (i % 2) * 8][t + (i / 2) * 4] = bits_float(as[l].r[i] & 0xffffe000u);
            for (int i = 0; i < 2; ++i) B[t + i * 4][g] = bits_float(bs[l].r[i] & 0xffffe000u);
        }
    }
    const int lane = lane_id(), g = lane >> 2, t = lane % 4;
    for (int i = 0; i < 4; ++i) {  // c_i: row g (+8 for c2, c3), col 2t + (i % 2)
        const int row = g + (i / 2) * 8, col = 2 * t + (i % 2);
        float sum = cs[lane].r[i];
        for (int k = 0; k < K; ++k) sum += A[row][k] * B[k][col];
        d.r[i] = sum;
    }
}

// cp.async.cg.shared.global [dst], [src], 16, src_bytes / commit_group / wait_group N, as the PTX
// ISA defines them: a copy belongs to the group its thread commits next, and is complete only when
// a wait_group leaves its group behind; the emulation (tests/cuda_emulation.py) performs it then,
// so a read of the tile before the wait sees the old contents, as it may on the GPU.
__device__ __forceinline__ void copy_async_16(void* dst, const void* src, int src_bytes) {
    emulated_cp_async(dst, src, src_bytes);
}
__device__ __forceinline__ void copy_async_commit() { emulated_cp_async_commit(); }
template <int N> __device__ __forceinline__ void copy_async_wait() { emulated_cp_async_wait(N); }

#else
// ---- The device: inline PTX ----------------------------------------------------------------------

template <bool Trans>
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* row) {
    const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(row));
    if (Trans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
}

template <typename In> __device__ __forceinline__ void mma(FragC& d, const FragA& a, const FragB& b);
template <> __device__ __forceinline__ void mma<__half>(FragC& d, const FragA& a, const FragB& b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(d.r[0]), "+f"(d.r[1]), "+f"(d.r[2]), "+f"(d.r[3])
                 : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]));
}
template <> __device__ __forceinline__ void mma<__nv_bfloat16>(FragC& d, const FragA& a, const FragB& b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(d.r[0]), "+f"(d.r[1]), "+f"(d.r[2]), "+f"(d.r[3])
                 : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]));
}
template <> __device__ __forceinline__ void mma<tf32>(FragC& d, const FragA& a, const FragB& b) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(d.r[0]), "+f"(d.r[1]), "+f"(d.r[2]), "+f"(d.r[3])
                 : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]));
}

// 16 bytes global -> shared, bypassing L1 (.cg), the first src_bytes from src and zeros after
// (src_bytes 0: nothing is read, the chunk is zeros). sm_80 and later, as mma.sync above.
__device__ __forceinline__ void copy_async_16(void* dst, const void* src, int src_bytes) {
    const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(address), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void copy_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
#endif

// ---- Global memory: 16 bytes an access where a run of elements is contiguous and aligned ------

// Rows of (p, stride_row, stride_col) start 16-byte aligned and run contiguously: a run of
// elements along a row starting at a multiple of 16 / sizeof(U) columns may move 16 bytes at a time.
template <typename U>
__device__ __forceinline__ bool aligned_rows(const void* p, long long stride_row, long long stride_col) {
    return stride_col == 1 && (stride_row * (long long)sizeof(U)) % 16 == 0
        && reinterpret_cast<unsigned long long>(p) % 16 == 0;
}

// N elements from p (16-byte aligned, N * sizeof(U) a multiple of 8), in 16-byte loads.
template <typename U, int N>
__device__ __forceinline__ void load_vector(const U* p, U (&v)[N]) {
    constexpr int BYTES = N * int(sizeof(U));
    if constexpr (BYTES % 16 == 0) {
#pragma unroll
        for (int q = 0; q < BYTES / 16; ++q) {
            const uint4 bits = reinterpret_cast<const uint4*>(p)[q];
            memcpy(reinterpret_cast<char*>(v) + 16 * q, &bits, 16);
        }
    } else {
        static_assert(BYTES == 8 || BYTES == 4, "a uint8 mask chunk of 8 or 4 bytes");
        if constexpr (BYTES == 8) {
            const uint2 bits = *reinterpret_cast<const uint2*>(p);
            memcpy(v, &bits, 8);
        } else {
            const unsigned bits = *reinterpret_cast<const unsigned*>(p);
            memcpy(v, &bits, 4);
        }
    }
}

template <typename U, int N>
__device__ __forceinline__ void store_vector(U* p, const U (&v)[N]) {
    static_assert(N * sizeof(U) % 16 == 0, "whole 16-byte stores");
#pragma unroll
    for (int q = 0; q < int(N * sizeof(U)) / 16; ++q) {
        uint4 bits;
        memcpy(&bits, reinterpret_cast<const char*>(v) + 16 * q, 16);
        reinterpret_cast<uint4*>(p)[q] = bits;
    }
}

// The first `count` elements of a run of N at p (stride `stride`); vector: the run is whole,
// starts at a multiple of 16 bytes from a row's start, and aligned_rows held. An epilogue's
// stores go through store_run: 16-byte stores where the output row allows.
template <typename U, int N>
__device__ __forceinline__ void load_run(const U* p, long long stride, U (&v)[N], int count, bool vector) {
    if (vector && count == N) {
        load_vector(p, v);
    } else {
#pragma unroll
        for (int e = 0; e < N; ++e)
            if (e < count) v[e] = p[e * stride];
    }
}

template <typename U, int N>
__device__ __forceinline__ void store_run(U* p, long long stride, const U (&v)[N], int count, bool vector) {
    if (vector && count == N) {
        store_vector(p, v);
    } else {
#pragma unroll
        for (int e = 0; e < N; ++e)
            if (e < count) p[e * stride] = v[e];
    }
}

// ---- Global -> registers -> shared: one 16-byte chunk per thread and operand per step ----------

// Where this thread's chunk of an operand lies in the (outer x red) step tile.
template <typename In>
__device__ __forceinline__ void chunk_position(bool red_contiguous, int& outer, int& red) {
    typedef Tile<In> T;
    const int tid = threadIdx.x;
    if (red_contiguous) {
        outer = tid / (T::RED / T::CHUNK);
        red = (tid % (T::RED / T::CHUNK)) * T::CHUNK;
    } else {
        red = tid / (ROWS / T::CHUNK);
        outer = (tid % (ROWS / T::CHUNK)) * T::CHUNK;
    }
}

// This thread's chunk at (outer0 + outer, red0 + red), zeros out of bounds, as float; row sums
// (SumRows) add each value to the partial of its outer index.
template <typename In, bool SumRows, typename Op>
__device__ __forceinline__ void fetch(const Op& op, bool red_contiguous, bool vector, long long outer0, long long red0,
                                      long long outers, long long reduction, float (&v)[Tile<In>::CHUNK],
                                      float (&row_partial)[Tile<In>::CHUNK]) {
    constexpr int CHUNK = Tile<In>::CHUNK;
    int o, r;
    chunk_position<In>(red_contiguous, o, r);
    const long long outer = outer0 + o, red = red0 + r;
    const bool whole = red_contiguous ? (outer < outers && red + CHUNK <= reduction)
                                      : (red < reduction && outer + CHUNK <= outers);
    if (vector && whole) {
        op.chunk(outer, red, v);
    } else {
#pragma unroll
        for (int e = 0; e < CHUNK; ++e) {
            const long long oe = red_contiguous ? outer : outer + e, re = red_contiguous ? red + e : red;
            v[e] = (oe < outers && re < reduction) ? float(op.element(oe, re)) : 0.0f;
        }
    }
    if (SumRows) {
#pragma unroll
        for (int e = 0; e < CHUNK; ++e) row_partial[red_contiguous ? 0 : e] += v[e];
    }
}

template <typename In>
__device__ __forceinline__ void store_chunk(typename Input<In>::storage* tile, bool red_contiguous,
                                            const float (&v)[Tile<In>::CHUNK]) {
    typedef Tile<In> T;
    int o, r;
    chunk_position<In>(red_contiguous, o, r);
    typename Input<In>::storage packed[T::CHUNK];
#pragma unroll
    for (int e = 0; e < T::CHUNK; ++e) packed[e] = Input<In>::round(v[e]);
    uint4 bits;
    memcpy(&bits, packed, 16);
    *reinterpret_cast<uint4*>(tile + (red_contiguous ? o * T::RED_PITCH + r : r * T::OUTER_PITCH + o)) = bits;
}

// This thread's chunk at (outer0 + outer, red0 + red) by cp.async into the step tile: the elements in
// bounds (a prefix of the chunk: it runs along the contiguous index) and zeros after them; the
// loader's address() is nullptr where the chunk is padding (zeros). The copy lands at a wait.
template <typename In, typename Op>
__device__ __forceinline__ void copy_chunk(const Op& op, typename Input<In>::storage* tile, bool red_contiguous,
                                           long long outer0, long long red0, long long outers, long long reduction) {
    typedef Tile<In> T;
    int o, r;
    chunk_position<In>(red_contiguous, o, r);
    const long long outer = outer0 + o, red = red0 + r;
    const long long in_bounds = red_contiguous ? (outer < outers ? reduction - red : 0)
                                               : (red < reduction ? outers - outer : 0);
    const int count = int(min((long long)T::CHUNK, max(0LL, in_bounds)));
    const void* source = count > 0 ? op.address(outer, red) : nullptr;
    copy_async_16(tile + (red_contiguous ? o * T::RED_PITCH + r : r * T::OUTER_PITCH + o), source,
                  source ? count * int(sizeof(typename Input<In>::storage)) : 0);
}

// SumRows for a chunk that came by cp.async: its values, from the tile (this thread's own copy,
// complete after the wait), added to row_partial as fetch() adds a register chunk's.
template <typename In>
__device__ __forceinline__ void sum_chunk(const typename Input<In>::storage* tile, bool red_contiguous,
                                          float (&row_partial)[Tile<In>::CHUNK]) {
    typedef Tile<In> T;
    int o, r;
    chunk_position<In>(red_contiguous, o, r);
    const typename Input<In>::storage* chunk = tile + (red_contiguous ? o * T::RED_PITCH + r : r * T::OUTER_PITCH + o);
#pragma unroll
    for (int e = 0; e < T::CHUNK; ++e) row_partial[red_contiguous ? 0 : e] += Input<In>::widen(chunk[e]);
}

// One operand's side of the pipeline: its loader, its shared layout, how its chunks travel (Async:
// cp.async; else registers, `next` holding the chunk between the load and the store). The path is a
// template argument, chosen once per matmul call (copied()).
template <typename In, typename Op, bool Async>
struct Operand {
    typedef typename Input<In>::storage S;
    static constexpr bool async = Async;
    const Op& op;
    S* tiles;  // STAGES step tiles of OPERAND_ELEMS
    long long outer0, outers;
    bool red_contiguous, vector;

    __device__ __forceinline__ Operand(const Op& op_, S* tiles_, long long outer0_, long long outers_)
        : op(op_), tiles(tiles_), outer0(outer0_), outers(outers_), red_contiguous(op_.red_contiguous()),
          vector(Async || op_.vector()) {}
    __device__ __forceinline__ S* tile(int stage) const { return tiles + stage * Tile<In>::OPERAND_ELEMS; }
    // Start the loads of the step at red0 into `stage`: copies in flight, or values into `next`.
    template <bool SumRows>
    __device__ __forceinline__ void load(int stage, long long red0, long long reduction, float (&next)[Tile<In>::CHUNK],
                                         float (&row_partial)[Tile<In>::CHUNK]) const {
        if constexpr (Async) copy_chunk<In>(op, tile(stage), red_contiguous, outer0, red0, outers, reduction);
        else fetch<In, SumRows>(op, red_contiguous, vector, outer0, red0, outers, reduction, next, row_partial);
    }
    // The register path's store of that step (after the copies' wait, or after an mma: see pipeline_step).
    __device__ __forceinline__ void store(int stage, const float (&next)[Tile<In>::CHUNK]) const {
        if constexpr (!Async) store_chunk<In>(tile(stage), red_contiguous, next);
    }
};


// ---- Shared -> fragments ---------------------------------------------------------------------------

// A float32 operand element as the TF32 mma reads it: rounded to nearest (ties away) here, since
// cp.async stages the raw float32 bits (rounding a value the register path already rounded
// changes nothing).
__device__ __forceinline__ unsigned tf32_bits(const float* p) {
    const float v = Input<tf32>::round(*p);
    unsigned u;
    memcpy(&u, &v, 4);
    return u;
}

// A's fragment for rows [row, row + 16) and reduction [k, k + MMA_K) of the step tile.
template <typename In>
__device__ __forceinline__ void load_a(FragA& a, const typename Input<In>::storage* tile, bool red_contiguous,
                                       int row, int k) {
    typedef Tile<In> T;
    const int lane = lane_id();
    if constexpr (Input<In>::MMA_K == 16) {
        // Matrices 0..3 = (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15):
        // a0..a3 of m16n8k16. Lane l gives row l % 8 of matrix l / 8.
        const int j = lane / 8, i = lane % 8;
        const int r = row + (j % 2) * 8, c = k + (j / 2) * 8;  // the matrix's first row and column
        if (red_contiguous) ldmatrix_x4<false>(a.r, tile + (r + i) * T::RED_PITCH + c);
        else ldmatrix_x4<true>(a.r, tile + (c + i) * T::OUTER_PITCH + r);
    } else {
        // TF32: a0 (g, t), a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4), one 32-bit load each
        // (ldmatrix's .trans moves 16-bit elements).
        const int g = lane >> 2, t = lane % 4;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int r = row + g + (q % 2) * 8, c = k + t + (q / 2) * 4;
            a.r[q] = tf32_bits(tile + (red_contiguous ? r * T::RED_PITCH + c : c * T::OUTER_PITCH + r));
        }
    }
}

// B's fragments for columns [col, col + 16) (two n8 tiles) and reduction [k, k + MMA_K).
template <typename In>
__device__ __forceinline__ void load_b(FragB (&b)[NI], const typename Input<In>::storage* tile, bool red_contiguous,
                                       int col, int k) {
    typedef Tile<In> T;
    static_assert(NI == 2, "one ldmatrix.x4 holds two n8 tiles");
    const int lane = lane_id();
    if constexpr (Input<In>::MMA_K == 16) {
        // Matrices 0..3 = (cols 0-7, k 0-7), (cols 0-7, k 8-15), (cols 8-15, k 0-7), (cols 8-15, k 8-15):
        // b0, b1 of the first n8 tile, then of the second.
        const int j = lane / 8, i = lane % 8;
        const int n = col + (j / 2) * 8, c = k + (j % 2) * 8;
        unsigned r[4];
        if (red_contiguous) ldmatrix_x4<false>(r, tile + (n + i) * T::RED_PITCH + c);
        else ldmatrix_x4<true>(r, tile + (c + i) * T::OUTER_PITCH + n);
        b[0].r[0] = r[0]; b[0].r[1] = r[1]; b[1].r[0] = r[2]; b[1].r[1] = r[3];
    } else {
        // TF32: b0 (k = t, n = g), b1 (k = t + 4, n = g).
        const int g = lane >> 2, t = lane % 4;
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
            for (int q = 0; q < 2; ++q) {
                const int n = col + ni * 8 + g, c = k + t + q * 4;
                b[ni].r[q] = tf32_bits(tile + (red_contiguous ? n * T::RED_PITCH + c : c * T::OUTER_PITCH + n));
            }
    }
}

// ---- The main loop ---------------------------------------------------------------------------------

// One reduction step's mma run over the staged tiles: acc += A[:, step] @ B[step, :], this warp's
// 32 x 16 share, MMA_K reduction indices an mma.
template <typename In>
__device__ __forceinline__ void mma_step(FragC (&acc)[MI][NI], const typename Input<In>::storage* a_tile,
                                         const typename Input<In>::storage* b_tile, bool a_red, bool b_red) {
    const int warp = threadIdx.x / 32;
    const int warp_row = (warp / WARPS_PER_ROW) * WARP_ROWS, warp_col = (warp % WARPS_PER_ROW) * WARP_COLS;
#pragma unroll
    for (int k = 0; k < Tile<In>::RED; k += Input<In>::MMA_K) {
        FragA fa[MI];
        FragB fb[NI];
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) load_a<In>(fa[mi], a_tile, a_red, warp_row + mi * 16, k);
        load_b<In>(fb, b_tile, b_red, warp_col, k);
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
            for (int ni = 0; ni < NI; ++ni) mma<In>(acc[mi][ni], fa[mi], fb[ni]);
    }
}


// The pipeline, one reduction step: step `stage`'s tiles were loaded one step earlier; start the
// next step's loads into the other stage (when `more`), wait for this step's copies, then the mma.
// A register-path chunk of the next step is stored after the mma (its load overlaps the mma too).
// Barriers: the first makes this step's tiles (copies and stores) visible to the block; the second
// keeps the next step's loads from overwriting a stage another warp's mma is still reading.
// Where a path copies, every thread commits one group a step (empty or not), so wait_group 1
// means "all but the next step's copies have landed".
template <typename In, bool SumRows, typename TA, typename TB>
__device__ __forceinline__ void pipeline_step(FragC (&acc)[MI][NI], const TA& a, const TB& b,
                                              int stage, bool more, long long next_red0, long long reduction,
                                              float (&row_partial)[Tile<In>::CHUNK]) {
    float unused[Tile<In>::CHUNK], a_next[Tile<In>::CHUNK], b_next[Tile<In>::CHUNK];
    if (more) {
        a.template load<SumRows>(stage ^ 1, next_red0, reduction, a_next, row_partial);
        b.template load<false>(stage ^ 1, next_red0, reduction, b_next, unused);
    }
    if constexpr (TA::async || TB::async) {
        copy_async_commit();
        copy_async_wait<1>();  // this step's copies
    }
    if constexpr (SumRows && TA::async) sum_chunk<In>(a.tile(stage), a.red_contiguous, row_partial);
    __syncthreads();  // the step's tiles are complete
    mma_step<In>(acc, a.tile(stage), b.tile(stage), a.red_contiguous, b.red_contiguous);
    if (more) {
        a.store(stage ^ 1, a_next);
        b.store(stage ^ 1, b_next);
    }
    __syncthreads();  // everyone has read the tiles before the next step's loads overwrite them
}

// The first step's loads into stage 0 (the register path stored at once: nothing to overlap yet).
template <typename In, bool SumRows, typename TA, typename TB>
__device__ __forceinline__ void pipeline_start(const TA& a, const TB& b, long long reduction,
                                               float (&row_partial)[Tile<In>::CHUNK]) {
    float unused[Tile<In>::CHUNK];
    float a_next[Tile<In>::CHUNK], b_next[Tile<In>::CHUNK];
    a.template load<SumRows>(0, 0, reduction, a_next, row_partial);
    b.template load<false>(0, 0, reduction, b_next, unused);
    a.store(0, a_next);
    b.store(0, b_next);
    if constexpr (TA::async || TB::async) copy_async_commit();
}

// Whether a call's operands go by cp.async: both, where both loaders allow it (vector() and
// direct()); else both through registers in one stage, as before the pipeline.
// The choice is made once per call and each path is its own loop (Operand's Async): one loop that
// tested it per step held both paths' state at once, and fp16 / bf16 conv2d spilled at its
// 128-register cap (a third path, A through registers and B copied, spilled there too).
template <typename OpA, typename OpB>
__device__ __forceinline__ bool copied(const OpA& a, const OpB& b) {
    return a.vector() && a.direct() && b.vector() && b.direct();
}

template <typename In, bool SumRows, bool AsyncA, bool AsyncB, typename OpA, typename OpB>
__device__ __forceinline__ void matmul_path(FragC (&acc)[MI][NI], void* smem, long long row0, long long col0,
                                            long long rows, long long cols, long long reduction,
                                            const OpA& a, const OpB& b, float (&row_partial)[Tile<In>::CHUNK]) {
    typedef Tile<In> T;
    typedef typename Input<In>::storage S;
    Operand<In, OpA, AsyncA> ta(a, static_cast<S*>(smem), row0, rows);
    Operand<In, OpB, AsyncB> tb(b, static_cast<S*>(smem) + T::STAGES * T::OPERAND_ELEMS, col0, cols);
    if constexpr (!AsyncA && !AsyncB) {
        // No copies: one stage through registers; each step's chunks are fetched before the
        // previous step's mma, so the global loads overlap the tensor cores.
        S* a_tile = ta.tile(0);
        S* b_tile = tb.tile(0);
        float a_next[T::CHUNK], b_next[T::CHUNK], unused[T::CHUNK];
        fetch<In, SumRows>(a, ta.red_contiguous, ta.vector, row0, 0, rows, reduction, a_next, row_partial);
        fetch<In, false>(b, tb.red_contiguous, tb.vector, col0, 0, cols, reduction, b_next, unused);
        for (long long red0 = 0; red0 < reduction; red0 += T::RED) {
            store_chunk<In>(a_tile, ta.red_contiguous, a_next);
            store_chunk<In>(b_tile, tb.red_contiguous, b_next);
            __syncthreads();  // the step's tiles are complete
            if (red0 + T::RED < reduction) {
                fetch<In, SumRows>(a, ta.red_contiguous, ta.vector, row0, red0 + T::RED, rows, reduction, a_next,
                                   row_partial);
                fetch<In, false>(b, tb.red_contiguous, tb.vector, col0, red0 + T::RED, cols, reduction, b_next, unused);
            }
            mma_step<In>(acc, a_tile, b_tile, ta.red_contiguous, tb.red_contiguous);
            __syncthreads();  // everyone has read the tiles before the next step overwrites them
        }
    } else {
        pipeline_start<In, SumRows>(ta, tb, reduction, row_partial);
        int stage = 0;
        for (long long red0 = 0; red0 < reduction; red0 += T::RED, stage ^= 1)
            pipeline_step<In, SumRows>(acc, ta, tb, stage, red0 + T::RED < reduction, red0 + T::RED, reduction,
                                       row_partial);
    }
}

// acc (zeroed by the caller) += A[row0:row0+64, :] @ B[:, col0:col0+64] over the whole reduction,
// this warp's 32 x 16 share in mma fragments. `smem`: Tile<In>::SHARED_BYTES, 16-byte aligned.
// SumRows: row_partial gathers A's values (as the loader returned them, before rounding to In)
// for row_sums(); a caller reduces them only where it needs them (sum_rows).
// Step k + 1's loads (cp.async into the second stage, or into registers) are issued before step
// k's mma, so the global loads overlap the tensor cores; two barriers a step.
template <typename In, bool SumRows, typename OpA, typename OpB>
__device__ __forceinline__ void matmul(FragC (&acc)[MI][NI], void* smem, long long row0, long long col0,
                                       long long rows, long long cols, long long reduction,
                                       const OpA& a, const OpB& b, float (&row_partial)[Tile<In>::CHUNK]) {
    if (reduction <= 0) return;
    if (copied(a, b)) matmul_path<In, SumRows, true, true>(acc, smem, row0, col0, rows, cols, reduction, a, b, row_partial);
    else matmul_path<In, SumRows, false, false>(acc, smem, row0, col0, rows, cols, reduction, a, b, row_partial);
}

// acc += A @ B over a reduction made of `segments` runs of `length` indices each, walked as nested
// loops: segment by segment, RED indices a step, a step never straddling two segments. conv2d's
// implicit GEMM: one kernel position (r, s) per segment and a group's channels within it, so the
// loaders decode a reduction index with no division by the channel count, and the channel
// blocks of one position are contiguous runs (16-byte chunks along C in channels_last).
// The loaders are the caller's copies; each has `void segment(int)`, the segment of the loads
// that follow, and A has `bool segment_used(int) const`: false where the whole segment is zeros
// for this block (conv2d's input gradient at stride > 1 skips the kernel positions that do not
// reach the block's output phase). Otherwise as matmul, including SumRows and the pipeline.
template <typename In, bool SumRows, bool AsyncA, bool AsyncB, typename OpA, typename OpB>
__device__ __forceinline__ void matmul_segments_path(FragC (&acc)[MI][NI], void* smem, long long row0, long long col0,
                                                     long long rows, long long cols, int segments, long long length,
                                                     int segment, OpA& a, OpB& b, float (&row_partial)[Tile<In>::CHUNK]) {
    typedef Tile<In> T;
    typedef typename Input<In>::storage S;
    Operand<In, OpA, AsyncA> ta(a, static_cast<S*>(smem), row0, rows);
    Operand<In, OpB, AsyncB> tb(b, static_cast<S*>(smem) + T::STAGES * T::OPERAND_ELEMS, col0, cols);
    if constexpr (!AsyncA && !AsyncB) {  // as matmul_path's
        S* a_tile = ta.tile(0);
        S* b_tile = tb.tile(0);
        const bool a_red = ta.red_contiguous, b_red = tb.red_contiguous, a_vec = ta.vector, b_vec = tb.vector;
        float a_next[T::CHUNK], b_next[T::CHUNK], unused[T::CHUNK];
        fetch<In, SumRows>(a, a_red, a_vec, row0, 0, rows, length, a_next, row_partial);
        fetch<In, false>(b, b_red, b_vec, col0, 0, cols, length, b_next, unused);
        while (segment < segments) {
            int next = segment + 1;
            while (next < segments && !a.segment_used(next)) ++next;
            for (long long red0 = 0; red0 < length; red0 += T::RED) {
                store_chunk<In>(a_tile, a_red, a_next);
                store_chunk<In>(b_tile, b_red, b_next);
                __syncthreads();  // the step's tiles are complete
                // Fetch the next step: the next channel block, or the next segment's first.
                const bool same = red0 + T::RED < length;
                if (!same && next < segments) {
                    a.segment(next);
                    b.segment(next);
                }
                if (same || next < segments) {
                    const long long red = same ? red0 + T::RED : 0;
                    fetch<In, SumRows>(a, a_red, a_vec, row0, red, rows, length, a_next, row_partial);
                    fetch<In, false>(b, b_red, b_vec, col0, red, cols, length, b_next, unused);
                }
                mma_step<In>(acc, a_tile, b_tile, a_red, b_red);
                __syncthreads();  // everyone has read the tiles before the next step overwrites them
            }
            segment = next;
        }
    } else {
        pipeline_start<In, SumRows>(ta, tb, length, row_partial);
        int stage = 0;
        while (segment < segments) {
            int next = segment + 1;
            while (next < segments && !a.segment_used(next)) ++next;
            for (long long red0 = 0; red0 < length; red0 += T::RED, stage ^= 1) {
                // The next step: the next channel block, or the next segment's first.
                const bool same = red0 + T::RED < length;
                if (!same && next < segments) {
                    a.segment(next);
                    b.segment(next);
                }
                pipeline_step<In, SumRows>(acc, ta, tb, stage, same || next < segments, same ? red0 + T::RED : 0,
                                           length, row_partial);
            }
            segment = next;
        }
    }
}

template <typename In, bool SumRows, typename OpA, typename OpB>
__device__ __forceinline__ void matmul_segments(FragC (&acc)[MI][NI], void* smem, long long row0, long long col0,
                                                long long rows, long long cols, int segments, long long length,
                                                OpA a, OpB b, float (&row_partial)[Tile<In>::CHUNK]) {
    int segment = 0;
    while (segment < segments && !a.segment_used(segment)) ++segment;
    if (segment >= segments || length <= 0) return;
    a.segment(segment);
    b.segment(segment);
    if (copied(a, b))
        matmul_segments_path<In, SumRows, true, true>(acc, smem, row0, col0, rows, cols, segments, length, segment, a, b,
                                                      row_partial);
    else
        matmul_segments_path<In, SumRows, false, false>(acc, smem, row0, col0, rows, cols, segments, length, segment, a,
                                                        b, row_partial);
}

// The sums over the reduction of A's rows, from matmul's row_partial: row_sum[i] for the 64 rows,
// in a fixed order (deterministic). `scratch`: BLOCK_THREADS * CHUNK floats of shared memory (the
// operand tiles may be reused); call after matmul, by every thread.
template <typename In>
__device__ __forceinline__ void row_sums(const float (&row_partial)[Tile<In>::CHUNK], bool red_contiguous,
                                         float* scratch, float* row_sum) {
    typedef Tile<In> T;
    const int tid = threadIdx.x;
#pragma unroll
    for (int e = 0; e < T::CHUNK; ++e) scratch[tid * T::CHUNK + e] = row_partial[e];
    __syncthreads();
    if (tid < ROWS) {
        float sum = 0.0f;
        if (red_contiguous) {  // row i's chunks: threads i * (RED / CHUNK) + q, slot 0
            for (int q = 0; q < T::RED / T::CHUNK; ++q) sum += scratch[(tid * (T::RED / T::CHUNK) + q) * T::CHUNK];
        } else {  // row i: slot i % CHUNK of the threads whose chunk starts at i - i % CHUNK
            for (int r = 0; r < T::RED; ++r)
                sum += scratch[(r * (ROWS / T::CHUNK) + tid / T::CHUNK) * T::CHUNK + tid % T::CHUNK];
        }
        row_sum[tid] = sum;
    }
    __syncthreads();
}

// The accumulators into a row-major 64 x 64 shared tile of `pitch` (c_i of each mma: row
// g (+8 for c2, c3), column 2t + (i % 2)), for an epilogue that reads whole rows.
template <typename Acc>
__device__ __forceinline__ void stage(const FragC (&acc)[MI][NI], Acc* staged, int pitch) {
    const int warp = threadIdx.x / 32, lane = lane_id(), g = lane >> 2, t = lane % 4;
    const int warp_row = (warp / WARPS_PER_ROW) * WARP_ROWS, warp_col = (warp % WARPS_PER_ROW) * WARP_COLS;
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
            for (int i = 0; i < 4; ++i)
                staged[(warp_row + mi * 16 + g + (i / 2) * 8) * pitch + warp_col + ni * 8 + 2 * t + (i % 2)] =
                    Acc(acc[mi][ni].r[i]);
}

}  // namespace tc
