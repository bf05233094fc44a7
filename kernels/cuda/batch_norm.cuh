// batch_norm.cu's building blocks: 16-byte packs of lanes, the thread-to-(channel, item) mapping
// and its walk over items, Chan's combine and the block reductions in fixed order (the why of each
// is in batch_norm.cu's opening comment). Needs elements.cuh and, from the including file,
// BN_THREADS, BN_WARPS and BN_PACK_BYTES.
#pragma once

namespace bn {

template <typename T> struct Packed { static constexpr int lanes = BN_PACK_BYTES / sizeof(T); };

template <typename T, int LANES>
struct alignas(sizeof(T) * LANES) Pack {
    T v[LANES];
};

// LANES elements at p, `inner` apart: one aligned load when vec, else one load each.
template <int LANES, typename T, typename Acc>
__device__ __forceinline__ void load(const T* p, long long inner, bool vec, Acc (&v)[LANES]) {
    if (LANES > 1 && vec) {
        const Pack<T, LANES> pack = *reinterpret_cast<const Pack<T, LANES>*>(p);
#pragma unroll
        for (int j = 0; j < LANES; ++j) v[j] = to_acc(pack.v[j]);
    } else {
#pragma unroll
        for (int j = 0; j < LANES; ++j) v[j] = to_acc(p[j * inner]);
    }
}

// v rounded to T at p, `inner` apart. 16-byte packs go through __stwb on uint4 (one STG.E.128:
// NVVM may split an aggregate store into element stores); the host emulation copies the pack.
template <int LANES, typename T, typename Acc>
__device__ __forceinline__ void store(T* p, long long inner, bool vec, const Acc (&v)[LANES]) {
    if (LANES > 1 && vec) {
        Pack<T, LANES> pack;
#pragma unroll
        for (int j = 0; j < LANES; ++j) pack.v[j] = from_acc<T>(v[j]);
#ifdef __CUDACC__
        if constexpr (sizeof(Pack<T, LANES>) == 16) {
            __stwb(reinterpret_cast<uint4*>(p), *reinterpret_cast<const uint4*>(&pack));
            return;
        }
#endif
        *reinterpret_cast<Pack<T, LANES>*>(p) = pack;
    } else {
#pragma unroll
        for (int j = 0; j < LANES; ++j) p[j * inner] = from_acc<T>(v[j]);
    }
}

// The relu mask: (pre > 0) as 0 / 1 bytes, LANES of them (one LANES-byte store when vec).
template <int LANES, typename Acc>
__device__ __forceinline__ void store_mask(unsigned char* p, long long inner, bool vec, const Acc (&pre)[LANES]) {
    Pack<unsigned char, LANES> bytes;
#pragma unroll
    for (int j = 0; j < LANES; ++j) bytes.v[j] = pre[j] > Acc(0) ? 1 : 0;
    if (LANES > 1 && vec) {
        *reinterpret_cast<Pack<unsigned char, LANES>*>(p) = bytes;
    } else {
#pragma unroll
        for (int j = 0; j < LANES; ++j) p[j * inner] = bytes.v[j];
    }
}

template <int LANES, typename Acc>
__device__ __forceinline__ void load_mask(const unsigned char* p, long long inner, bool vec, Acc (&m)[LANES]) {
    if (LANES > 1 && vec) {
        const Pack<unsigned char, LANES> bytes = *reinterpret_cast<const Pack<unsigned char, LANES>*>(p);
#pragma unroll
        for (int j = 0; j < LANES; ++j) m[j] = Acc(bytes.v[j]);
    } else {
#pragma unroll
        for (int j = 0; j < LANES; ++j) m[j] = Acc(p[j * inner]);
    }
}

// A per-channel parameter in Acc: mean / invstd / sums are Acc; weight / bias are T or float
// (weight_float); absent (nullptr) reads as `absent`.
template <typename T>
__device__ __forceinline__ typename Accumulator<T>::type param(const void* p, long long c, int is_float,
                                                                typename Accumulator<T>::type absent) {
    typedef typename Accumulator<T>::type Acc;
    if (p == nullptr) return absent;
    return is_float ? Acc(static_cast<const float*>(p)[c]) : to_acc(static_cast<const T*>(p)[c]);
}

template <typename Acc>
__device__ __forceinline__ Acc acc_param(const void* p, long long c, Acc absent) {
    return p == nullptr ? absent : static_cast<const Acc*>(p)[c];
}

// What one thread covers: its first channel c (its lanes are c, c+1, ... in the channels mapping,
// c itself in the rows one), its first item in a chunk and its step between items, and how an item
// index i becomes (n, position along s): n = i / per_image, s = (i % per_image) * s_lanes.
struct Slot {
    long long c, first, step, per_image;
    int s_lanes;    // positions along s an item covers: LANES (rows), 1 (channels)
    int c_lanes;    // channels an item covers: LANES (channels), 1 (rows)
    bool active;    // its channels exist
    int group;      // its channel group within the block (the reductions' key); 0 in rows
    int groups;     // channel groups in the block: tile_groups (channels), 1 (rows)
};

template <int LANES>
__device__ __forceinline__ Slot slot(int channels, long long C, long long S, int tile_groups) {
    Slot sl;
    const int t = int(threadIdx.x);
    if (channels) {
        sl.group = t % tile_groups;
        sl.groups = tile_groups;
        sl.c = ((long long)blockIdx.x * tile_groups + sl.group) * LANES;
        sl.first = t / tile_groups;
        sl.step = BN_THREADS / tile_groups;
        sl.per_image = S;
        sl.s_lanes = 1;
        sl.c_lanes = LANES;
        sl.active = sl.c < C;
    } else {
        sl.group = 0;
        sl.groups = 1;
        sl.c = blockIdx.x;
        sl.first = t;
        sl.step = BN_THREADS;
        sl.per_image = S / LANES;
        sl.s_lanes = LANES;
        sl.c_lanes = 1;
        sl.active = true;
    }
    return sl;
}

// visit(n, s) for each of the thread's items in chunks blockIdx.y, blockIdx.y + gridDim.y, ... of
// `chunk` items out of `items`. (n, s) advances by the step without a division per item.
template <typename Visit>
__device__ __forceinline__ void walk(const Slot& sl, long long items, long long chunk, Visit&& visit) {
    if (!sl.active) return;
    const long long step_n = sl.step / sl.per_image, step_s = sl.step % sl.per_image;
    for (long long begin = (long long)blockIdx.y * chunk; begin < items; begin += (long long)gridDim.y * chunk) {
        const long long end = begin + chunk < items ? begin + chunk : items;
        long long i = begin + sl.first;
        if (i >= end) continue;
        long long n = i / sl.per_image, s = i % sl.per_image;
        for (; i < end; i += sl.step) {
            visit(n, s * sl.s_lanes);
            s += step_s;
            n += step_n;
            if (s >= sl.per_image) {
                s -= sl.per_image;
                ++n;
            }
        }
    }
}

// Chan's parallel combine of (count, mean, M2) per lane; the lanes share the count.
template <int LANES, typename Acc>
__device__ __forceinline__ void chan(long long& n, Acc (&mean)[LANES], Acc (&m2)[LANES], long long n_b,
                                     const Acc (&mean_b)[LANES], const Acc (&m2_b)[LANES]) {
    if (n_b == 0) return;
    if (n == 0) {
        n = n_b;
#pragma unroll
        for (int j = 0; j < LANES; ++j) { mean[j] = mean_b[j]; m2[j] = m2_b[j]; }
        return;
    }
    const long long total = n + n_b;
    const Acc w_b = Acc(n_b) / Acc(total);
    const Acc w_ab = Acc(n) * w_b;
#pragma unroll
    for (int j = 0; j < LANES; ++j) {
        const Acc delta = mean_b[j] - mean[j];
        mean[j] += delta * w_b;
        m2[j] += m2_b[j] + delta * delta * w_ab;
    }
    n = total;
}

// The block's per-group totals of (count, mean, M2): shuffles across the warp's rows of the same
// group, then the warps in order through shared memory. Every thread calls it; on return threads
// 0..groups-1 (warp 0) hold their group's total.
template <int LANES, typename Acc>
__device__ __forceinline__ void block_welford(int groups, long long& n, Acc (&mean)[LANES], Acc (&m2)[LANES],
                                              long long* sh_n, Acc* sh_mean, Acc* sh_m2) {
    for (int offset = groups; offset < 32; offset <<= 1) {
        Acc mean_b[LANES], m2_b[LANES];
        const long long n_b = __shfl_xor_sync(0xffffffffu, n, offset);
#pragma unroll
        for (int j = 0; j < LANES; ++j) {
            mean_b[j] = __shfl_xor_sync(0xffffffffu, mean[j], offset);
            m2_b[j] = __shfl_xor_sync(0xffffffffu, m2[j], offset);
        }
        chan(n, mean, m2, n_b, mean_b, m2_b);
    }
    const int lane = int(threadIdx.x) % 32, warp = int(threadIdx.x) / 32;
    if (lane < groups) {
        sh_n[warp * 32 + lane] = n;
#pragma unroll
        for (int j = 0; j < LANES; ++j) {
            sh_mean[(warp * 32 + lane) * LANES + j] = mean[j];
            sh_m2[(warp * 32 + lane) * LANES + j] = m2[j];
        }
    }
    __syncthreads();
    if (int(threadIdx.x) < groups) {
        n = 0;
        for (int w = 0; w < BN_WARPS; ++w) {
            Acc mean_b[LANES], m2_b[LANES];
            const int at = w * 32 + int(threadIdx.x);
#pragma unroll
            for (int j = 0; j < LANES; ++j) { mean_b[j] = sh_mean[at * LANES + j]; m2_b[j] = sh_m2[at * LANES + j]; }
            chan(n, mean, m2, sh_n[at], mean_b, m2_b);
        }
    }
}

// The block's per-group totals of two sums, in the order of block_welford.
template <int LANES, typename Acc>
__device__ __forceinline__ void block_sums(int groups, Acc (&a)[LANES], Acc (&b)[LANES], Acc* sh_a, Acc* sh_b) {
    for (int offset = groups; offset < 32; offset <<= 1) {
#pragma unroll
        for (int j = 0; j < LANES; ++j) {
            a[j] += __shfl_xor_sync(0xffffffffu, a[j], offset);
            b[j] += __shfl_xor_sync(0xffffffffu, b[j], offset);
        }
    }
    const int lane = int(threadIdx.x) % 32, warp = int(threadIdx.x) / 32;
    if (lane < groups) {
#pragma unroll
        for (int j = 0; j < LANES; ++j) {
            sh_a[(warp * 32 + lane) * LANES + j] = a[j];
            sh_b[(warp * 32 + lane) * LANES + j] = b[j];
        }
    }
    __syncthreads();
    if (int(threadIdx.x) < groups) {
#pragma unroll
        for (int j = 0; j < LANES; ++j) { a[j] = Acc(0); b[j] = Acc(0); }
        for (int w = 0; w < BN_WARPS; ++w) {
            const int at = w * 32 + int(threadIdx.x);
#pragma unroll
            for (int j = 0; j < LANES; ++j) { a[j] += sh_a[at * LANES + j]; b[j] += sh_b[at * LANES + j]; }
        }
    }
}

}  // namespace bn
