// Dropout, out = in * keep * scale, the mask drawn from Philox4x32-10 and never stored: the
// algorithm of kernels/triton/dropout.py with the same names (its docstring has the why). The
// backward is this kernel applied to grad_out with the forward's seed.
//
// The tensor is an (R, C) matrix of any strides (a flat dense tensor is (1, numel)). Element
// (r, c) takes word c % 4 of Philox at counter r * ceil(C / 4) + c // 4, under the key seed[0],
// seed[1] (philox.cuh): the same bits as tl.randint4x and the NumPy reference, so every backend
// drops the same elements for one seed.
//
// One thread per chunk of CHUNK consecutive elements of a row: 8 for 2-byte types (two Philox
// calls, one 16-byte load and store), 4 for float (one call, 16 bytes) and double (one call, two
// 16-byte accesses). Chunks start at multiples of CHUNK, so a chunk's counters are whole groups of
// four. packed (the launcher checks: unit column strides, every row start and the pointers 16-byte
// aligned) loads whole chunks as 16-byte vectors, the row's last partial chunk element-wise;
// otherwise every element is loaded alone through its strides. Grid: x over a row's chunks,
// y over rows (striding past CUDA's 65535 limit).
//
// The product is in Acc (float; double for double) with scale = 1/(1-p) rounded to Acc: torch's
// rule (a dropped NaN or inf gives NaN, a dropped -x gives -0.0).

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include "elements.cuh"
#include "philox.cuh"

// Threads per block: the launcher's DROPOUT_THREADS.
#define DROPOUT_THREADS 256
#define DROPOUT_PACK_BYTES 16

namespace dropout {

template <typename T> struct Chunk { static constexpr int size = sizeof(T) == 2 ? 8 : 4; };

template <typename T, int N>
struct alignas(DROPOUT_PACK_BYTES) Pack {
    T v[N];
};

// One 16-byte store: through __stwb on uint4 (one STG.E.128; NVVM split a plain store of the
// aggregate into element stores); the host emulation copies the pack.
template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
#ifdef __CUDACC__
    __stwb(reinterpret_cast<uint4*>(p), *reinterpret_cast<const uint4*>(&v));
#else
    *reinterpret_cast<Pack<T, N>*>(p) = v;
#endif
}

}  // namespace dropout

template <typename T>
__global__ void __launch_bounds__(DROPOUT_THREADS) dropout_apply(
    const T* __restrict__ in, T* __restrict__ out, const long long* __restrict__ seed,
    long long R, long long C, long long stride_ir, long long stride_ic, long long stride_or, long long stride_oc,
    int threshold, double scale, int packed)
{
    typedef typename Accumulator<T>::type Acc;
    constexpr int CHUNK = dropout::Chunk<T>::size;
    constexpr int PER_PACK = DROPOUT_PACK_BYTES / sizeof(T);
    const long long chunk = (long long)blockIdx.x * DROPOUT_THREADS + threadIdx.x;
    const long long first = chunk * CHUNK;
    if (first >= C) return;
    const DropoutKey key = load_dropout_key(seed);
    const Acc keep_scale = Acc(scale);
    const long long groups_per_row = (C + 3) / 4;
    const bool whole = packed && first + CHUNK <= C;
    for (long long r = blockIdx.y; r < R; r += gridDim.y) {
        unsigned words[CHUNK];
#pragma unroll
        for (int g = 0; g < CHUNK / 4; ++g) {
            const PhiloxWords pw = philox4x32_10((unsigned long long)(r * groups_per_row + first / 4 + g), key.k0, key.k1);
#pragma unroll
            for (int j = 0; j < 4; ++j) words[4 * g + j] = pw.w[j];
        }
        if (whole) {
            const T* src = in + r * stride_ir + first;
            T* dst = out + r * stride_or + first;
#pragma unroll
            for (int v = 0; v < CHUNK / PER_PACK; ++v) {
                dropout::Pack<T, PER_PACK> pack = reinterpret_cast<const dropout::Pack<T, PER_PACK>*>(src)[v];
#pragma unroll
                for (int j = 0; j < PER_PACK; ++j) {
                    const Acc factor = dropout_keep(words[v * PER_PACK + j], threshold) ? keep_scale : Acc(0);
                    pack.v[j] = from_acc<T>(to_acc(pack.v[j]) * factor);
                }
                dropout::store_pack(dst + v * PER_PACK, pack);
            }
        } else {
#pragma unroll
            for (int j = 0; j < CHUNK; ++j) {
                const long long c = first + j;
                if (c < C) {
                    const Acc factor = dropout_keep(words[j], threshold) ? keep_scale : Acc(0);
                    out[r * stride_or + c * stride_oc] = from_acc<T>(to_acc(in[r * stride_ir + c * stride_ic]) * factor);
                }
            }
        }
    }
}
