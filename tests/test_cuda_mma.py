"""kernels/cuda/mma.cuh's emulated tensor-core instructions against the PTX ISA's own figures.

The host emulation (tests/cuda_emulation.py) replaces mma.sync and ldmatrix, inline PTX on the
GPU, by warp-collective C++. If it gave a lane other registers than the hardware does, every
emulated kernel test would check kernels against the wrong instruction. So one warp runs each
instruction here on registers filled by the fragment layouts as the PTX ISA states them (written
out again below, independently of mma.cuh), and the result is read back by the same figures:
  mma.m16n8k16 (.f16, .bf16): a_i (i = 0..7): row g + 8 ((i // 2) % 2), col 2t + i % 2 + 8 (i // 4)
                              b_i (i = 0..3): row 2t + i % 2 + 8 (i // 2), col g
  mma.m16n8k8 (.tf32):        a_i (i = 0..3): row g + 8 (i % 2), col t + 4 (i // 2)
                              b_i (i = 0..1): row t + 4 i, col g
  C / D (both):               c_i (i = 0..3): row g + 8 (i // 2), col 2t + i % 2
  ldmatrix .x4:               lanes 8j..8j+7 address the rows of matrix j, which lands in
                              register j: lane l gets row l // 4, elements 2 (l % 4) and + 1
                              (.trans: elements l // 4 of rows 2 (l % 4) and + 1)
with g = lane // 4 and t = lane % 4.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import cuda_emulation
from fastdl import nvrtc

PROBES = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include "mma.cuh"

// One warp: lane l's A, B and C registers from a[l], b[l], c[l]; D back to d[l].
template <typename In>
__global__ void mma_probe(const unsigned* a, const unsigned* b, const float* c, float* d) {
    const int lane = threadIdx.x;
    tc::FragA fa;
    tc::FragB fb;
    tc::FragC fc;
    for (int i = 0; i < 4; ++i) fa.r[i] = a[lane * 4 + i];
    for (int i = 0; i < 2; ++i) fb.r[i] = b[lane * 2 + i];
    for (int i = 0; i < 4; ++i) fc.r[i] = c[lane * 4 + i];
    tc::mma<In>(fc, fa, fb);
    for (int i = 0; i < 4; ++i) d[lane * 4 + i] = fc.r[i];
}

// One warp: lane l gives the address of row rows[l] of `matrix` (8 16-bit elements a row);
// its four registers back to out[l].
template <int Trans>
__global__ void ldmatrix_probe(const unsigned short* matrix, const long long* rows, unsigned* out) {
    const int lane = threadIdx.x;
    unsigned r[4];
    tc::ldmatrix_x4<Trans != 0>(r, matrix + rows[lane] * 8);
    for (int j = 0; j < 4; ++j) out[lane * 4 + j] = r[j];
}

// One warp: y = x rounded to TF32 as the tile stages float32 operands.
template <int Unused>
__global__ void round_probe(const float* x, float* y) { y[threadIdx.x] = tc::Input<tc::tf32>::round(x[threadIdx.x]); }
"""
EXPRESSIONS = ("mma_probe<__half>", "mma_probe<__nv_bfloat16>", "mma_probe<tc::tf32>",
               "ldmatrix_probe<0>", "ldmatrix_probe<1>", "round_probe<0>")


@pytest.fixture(scope="module")
def probes():
    source = nvrtc._join([("probes.cu", PROBES)])
    functions = cuda_emulation.host_library("mma_probes", source, EXPRESSIONS)
    if isinstance(functions, str):
        pytest.skip(functions)
    return functions


def _run(probes, expression, *arrays):
    fn, _ = probes[expression]
    assert fn(1, 1, 32, *[a.ctypes.data for a in arrays]) == 0


def _bits16(values: np.ndarray, dtype) -> np.ndarray:
    return torch.from_numpy(values).to(dtype).view(torch.int16).numpy().view(np.uint16).astype(np.uint32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_mma_m16n8k16_fragments(probes, dtype):
    rng = np.random.default_rng(0)
    A = torch.from_numpy(rng.standard_normal((16, 16))).to(dtype).double().numpy()
    B = torch.from_numpy(rng.standard_normal((16, 8))).to(dtype).double().numpy()
    C = rng.standard_normal((16, 8)).astype(np.float32)
    a_bits, b_bits = _bits16(A, dtype), _bits16(B, dtype)
    a = np.zeros((32, 4), np.uint32)
    b = np.zeros((32, 2), np.uint32)
    c = np.zeros((32, 4), np.float32)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for i in range(8):  # two 16-bit elements a register, the lower index in the low half
            a[lane, i // 2] |= a_bits[g + 8 * ((i // 2) % 2), 2 * t + i % 2 + 8 * (i // 4)] << (16 * (i % 2))
        for i in range(4):
            b[lane, i // 2] |= b_bits[2 * t + i % 2 + 8 * (i // 2), g] << (16 * (i % 2))
        for i in range(4):
            c[lane, i] = C[g + 8 * (i // 2), 2 * t + i % 2]
    d = np.zeros((32, 4), np.float32)
    _run(probes, f"mma_probe<{'__half' if dtype == torch.float16 else '__nv_bfloat16'}>", a, b, c, d)
    D = np.zeros((16, 8))
    for lane in range(32):
        for i in range(4):
            D[lane // 4 + 8 * (i // 2), 2 * (lane % 4) + i % 2] = d[lane, i]
    np.testing.assert_allclose(D, A @ B + C, rtol=1e-5, atol=1e-5)


def test_mma_m16n8k8_tf32_fragments(probes):
    rng = np.random.default_rng(1)
    # Values with 10 explicit mantissa bits (TF32), so the product is the float64 one.
    A = np.round(rng.standard_normal((16, 8)) * 256) / 256
    B = np.round(rng.standard_normal((8, 8)) * 256) / 256
    C = rng.standard_normal((16, 8)).astype(np.float32)
    a_bits = A.astype(np.float32).view(np.uint32)
    b_bits = B.astype(np.float32).view(np.uint32)
    a = np.zeros((32, 4), np.uint32)
    b = np.zeros((32, 2), np.uint32)
    c = np.zeros((32, 4), np.float32)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for i in range(4):
            a[lane, i] = a_bits[g + 8 * (i % 2), t + 4 * (i // 2)]
            c[lane, i] = C[g + 8 * (i // 2), 2 * t + i % 2]
        for i in range(2):
            b[lane, i] = b_bits[t + 4 * i, g]
    d = np.zeros((32, 4), np.float32)
    _run(probes, "mma_probe<tc::tf32>", a, b, c, d)
    D = np.zeros((16, 8))
    for lane in range(32):
        for i in range(4):
            D[lane // 4 + 8 * (i // 2), 2 * (lane % 4) + i % 2] = d[lane, i]
    np.testing.assert_allclose(D, A @ B + C, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("trans", [0, 1])
def test_ldmatrix_x4(probes, trans):
    matrix = np.arange(40 * 8, dtype=np.uint16)  # element (row, col) holds 8 row + col: 40 rows of 8
    rows = np.random.default_rng(2).permutation(40)[:32].astype(np.int64)  # lane l addresses row rows[l]
    out = np.zeros((32, 4), np.uint32)
    _run(probes, f"ldmatrix_probe<{trans}>", matrix, rows, out)
    M = matrix.reshape(40, 8).astype(np.uint32)
    for lane in range(32):
        for j in range(4):  # matrix j: the rows addressed by lanes 8j..8j+7
            mat = M[rows[8 * j:8 * j + 8]]
            if trans:
                lo, hi = mat[2 * (lane % 4), lane // 4], mat[2 * (lane % 4) + 1, lane // 4]
            else:
                lo, hi = mat[lane // 4, 2 * (lane % 4)], mat[lane // 4, 2 * (lane % 4) + 1]
            assert out[lane, j] == lo | (hi << 16), (lane, j)


def test_tf32_rounding_is_to_nearest_ties_away(probes):
    # cvt.rna.tf32.f32: to the nearest of 10 mantissa bits, ties away from zero.
    ulp = 2.0 ** -10  # TF32's spacing in [1, 2)
    x = np.zeros(32, np.float32)
    cases = [(1 + ulp / 2, 1 + ulp), (-(1 + ulp / 2), -(1 + ulp)), (1 + ulp / 4, 1.0), (1 + 3 * ulp / 4, 1 + ulp),
             (1 + ulp + ulp / 2, 1 + 2 * ulp), (np.inf, np.inf), (3.0, 3.0)]
    x[:len(cases)] = [v for v, _ in cases]
    y = np.zeros(32, np.float32)
    _run(probes, "round_probe<0>", x, y)
    assert list(y[:len(cases)]) == [np.float32(want) for _, want in cases]
