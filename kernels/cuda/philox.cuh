#pragma once
// Philox4x32-10 (Salmon et al., SC'11), the counter-based generator of fastdl's dropout, written as
// Triton's tl.randint4x computes it: key (k0, k1), counter (c0, c1, c2, c3) = (low and high 32 bits
// of a 64-bit counter, 0, 0), ten rounds. The mulhilo products are plain 64-bit multiplies of
// 32-bit operands (one IMAD.WIDE.U32 each; the host emulation runs the same text).
// fastdl/reference/dropout.py holds the same scheme in NumPy; a test checks the three agree.

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u
// An element is kept when the top 24 bits of its word are >= ceil(p * 2**24) (the launcher's
// threshold): the float32 uniform (word >> 8) / 2**24 compared with p, in integers.
#define DROPOUT_UNIFORM_SHIFT 8

struct PhiloxWords {
    unsigned w[4];
};

__device__ __forceinline__ PhiloxWords philox4x32_10(unsigned long long counter, unsigned k0, unsigned k1) {
    unsigned c0 = unsigned(counter), c1 = unsigned(counter >> 32), c2 = 0u, c3 = 0u;
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        const unsigned long long p0 = (unsigned long long)PHILOX_M0 * c0;
        const unsigned long long p1 = (unsigned long long)PHILOX_M1 * c2;
        const unsigned n0 = unsigned(p1 >> 32) ^ c1 ^ k0;
        const unsigned n2 = unsigned(p0 >> 32) ^ c3 ^ k1;
        c1 = unsigned(p1);
        c3 = unsigned(p0);
        c0 = n0;
        c2 = n2;
        k0 += PHILOX_W0;
        k1 += PHILOX_W1;
    }
    return PhiloxWords{{c0, c1, c2, c3}};
}

// The dropout key: the two int64 words the op drew on the device (each below 2**31).
struct DropoutKey {
    unsigned k0, k1;
};

__device__ __forceinline__ DropoutKey load_dropout_key(const long long* seed) {
    return DropoutKey{unsigned(seed[0]), unsigned(seed[1])};
}

__device__ __forceinline__ bool dropout_keep(unsigned word, int threshold) {
    return int(word >> DROPOUT_UNIFORM_SHIFT) >= threshold;
}
