"""kernels/cuda/*.cu run on the CPU: the cupy backend's launchers, with only the final launch swapped.

Each source's module (fastdl.nvrtc.module_source: preludes and .cuh headers included) is compiled
as host C++ against a small emulation of CUDA: blocks run in order, a block's threads are
std::threads meeting at a std::barrier for __syncthreads, __shared__ is static, and a warp's 32
threads exchange __shfl_xor_sync values through a slot each and a barrier of their own. The
tensor-core instructions (mma.cuh's ldmatrix and mma.sync, inline PTX on the GPU) have an
emulation branch there (FASTDL_HOST_EMULATION, defined here): warp-collective through the same
slots, each lane receiving the registers the PTX ISA's fragment layouts give it. Every template
instantiation the backend compiles (NAME_EXPRESSIONS) gets a C entry point, called through ctypes
with the launcher's own arguments on CPU tensors. A failed FASTDL_DEVICE_ASSERT is recorded and
raised as EmulatedDeviceAssert after the launch. Accesses to misaligned addresses (found by
-fsanitize=alignment) fail the launch too; a misaligned 16-byte pack load may instead crash the
test process (x86's aligned moves fault, as the GPU does) before it can be reported.

Index errors, bounds, strides, alignment paths, block and warp reductions, tile ownership, the
math and the launchers' arguments are all exercised; a missing __syncthreads shows under
ThreadSanitizer (not run here). cp.async copies (mma.cuh's pipeline) land when a wait_group covers
them, not before, so a read of a tile before its wait computes wrong numbers. Warp-level timing, independent thread scheduling inside a warp
and CUDA's math library are not. Each module is compiled once per test session.

    def test_x(emulated_backend):   # fastdl.backends.cupy, launching into the emulation
        emulated_backend.cross_entropy_fwd(...)
"""
from __future__ import annotations

import atexit
import ctypes
import functools
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdl import nvrtc
from fastdl.backends import cupy as cupy_backend
from fastdl.backends.cupy import _runtime as cupy_runtime

PRELUDE = r"""
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
struct dim3 { unsigned x = 1, y = 1, z = 1; };
inline dim3 blockDim, gridDim;
inline thread_local dim3 threadIdx, blockIdx;
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline void __syncthreads() { block_barrier->arrive_and_wait(); }
#define FASTDL_HOST_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
using std::min; using std::max;
// Every lane of a warp calls it (the kernels only shuffle with the full mask): each writes its
// value, the warp meets, each reads its partner's, the warp meets again before slots are reused.
template <typename V> V __shfl_xor_sync(unsigned, V value, int lane_mask) {
    static V slots[1024];
    const unsigned t = threadIdx.x;
    std::barrier<>& warp = *warp_barriers[t / 32];
    slots[t] = value;
    warp.arrive_and_wait();
    V other = slots[(t & ~31u) | ((t & 31u) ^ unsigned(lane_mask))];
    warp.arrive_and_wait();
    return other;
}
// Every lane of a warp calls it: all[l] is lane l's value, in every lane (mma.cuh's ldmatrix and
// mma gather their operands' registers this way, then give each lane what the hardware would).
template <typename V> void emulated_warp_gather(const V& value, V (&all)[32]) {
    static V slots[1024];
    const unsigned t = threadIdx.x;
    std::barrier<>& warp = *warp_barriers[t / 32];
    slots[t] = value;
    warp.arrive_and_wait();
    for (unsigned l = 0; l < 32; ++l) all[l] = slots[(t & ~31u) | l];
    warp.arrive_and_wait();
}
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
inline float __int_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline double __longlong_as_double(unsigned long long i) { double d; std::memcpy(&d, &i, 8); return d; }
struct __half { uint16_t bits; };
struct __nv_bfloat16 { uint16_t bits; };
inline float __half2float(__half h) { _Float16 f; std::memcpy(&f, &h.bits, 2); return (float)f; }
inline __half __float2half_rn(float v) {
    _Float16 f = (_Float16)v; __half h; std::memcpy(&h.bits, &f, 2); return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
    uint32_t u = (uint32_t)b.bits << 16; float f; std::memcpy(&f, &u, 4); return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
    uint32_t u; std::memcpy(&u, &v, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40)};
    return {uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
// A failed device assert: counted and its message kept; the launch finishes (the read after an
// assert is clamped in the kernels), then Python raises.
inline std::atomic<int> assert_failures{0};
inline const char* assert_message = "";
#define FASTDL_DEVICE_ASSERT(condition, message) \
    ((condition) ? (void)0 : (void)(assert_message = message, assert_failures++))
extern "C" const char* emulated_assert_message() { return assert_message; }
// The build has -fsanitize=alignment: every typed access to a misaligned address calls this (on a
// GPU such an access, e.g. a 16-byte pack load off a 16-byte boundary, faults).
inline std::atomic<int> misaligned_accesses{0};
extern "C" void __ubsan_handle_type_mismatch_v1(void*, void*) { misaligned_accesses++; }
extern "C" int emulated_misaligned_accesses() { return misaligned_accesses.exchange(0); }
// cp.async.cg.shared.global [dst], [src], 16, src_bytes; commit_group; wait_group N (mma.cuh), as
// the PTX ISA defines them: a thread's copies join the group it commits next; wait_group N returns
// once at most the N most recent of its committed groups are pending. Each copy is performed when
// its group completes (the deferred copy a GPU may make: a read of the tile before the wait that
// covers it sees the old contents here too). 16 bytes: src_bytes from src, then zeros.
struct EmulatedCopy { void* dst; const void* src; int bytes; };
inline thread_local std::vector<EmulatedCopy> copies_uncommitted;
inline thread_local std::vector<std::vector<EmulatedCopy>> copy_groups;  // committed, oldest first
inline void emulated_cp_async(void* dst, const void* src, int src_bytes) {
    if (reinterpret_cast<uintptr_t>(dst) % 16 || (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % 16)
        || src_bytes < 0 || src_bytes > 16)
        misaligned_accesses++;
    copies_uncommitted.push_back({dst, src, src_bytes});
}
inline void emulated_cp_async_commit() {
    copy_groups.push_back(std::move(copies_uncommitted));
    copies_uncommitted.clear();
}
inline void emulated_cp_async_wait(int pending) {
    while (int(copy_groups.size()) > pending) {
        for (const EmulatedCopy& c : copy_groups.front()) {
            unsigned char bytes[16] = {};
            if (c.bytes > 0) std::memcpy(bytes, c.src, size_t(c.bytes));
            std::memcpy(c.dst, bytes, 16);
        }
        copy_groups.erase(copy_groups.begin());
    }
}
// At a block's exit no copy may be outstanding (it would land in the next block's shared memory
// here, and on a GPU it is a copy no wait covered): a failed assert.
inline void emulated_cp_async_exit() {
    bool outstanding = !copies_uncommitted.empty();
    for (const auto& group : copy_groups) outstanding |= !group.empty();
    if (outstanding) {
        assert_message = "cp.async copies outstanding at a block's exit (a missing cp.async.wait_group)";
        assert_failures++;
    }
    copies_uncommitted.clear();
    copy_groups.clear();
}
// The block's threads walk the grid's blocks in order (x fastest); the barrier after each block
// keeps one block's use of the __shared__ (here: static) arrays from overlapping the next one's.
template <typename... P, typename... A>
int emulate(long long grid_x, long long grid_y, int threads, void (*kernel)(P...), A... args) {
    assert_failures = 0;
    std::barrier<> barrier(threads);
    block_barrier = &barrier;
    warp_barriers.clear();
    for (int w = 0; w < threads / 32; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
    blockDim = dim3{unsigned(threads), 1, 1};
    gridDim = dim3{unsigned(grid_x), unsigned(grid_y), 1};
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t)
        pool.emplace_back([&, t] {
            threadIdx.x = unsigned(t);
            for (long long by = 0; by < grid_y; ++by)
                for (long long bx = 0; bx < grid_x; ++bx) {
                    blockIdx.x = unsigned(bx);
                    blockIdx.y = unsigned(by);
                    kernel(args...);
                    emulated_cp_async_exit();
                    barrier.arrive_and_wait();
                }
        });
    for (auto& thread : pool) thread.join();
    return assert_failures;
}
"""

# (kernel, precision) of every emulated launch, in order: which instantiation a launcher picked.
launches: list[tuple] = []


class EmulatedDeviceAssert(AssertionError):
    """A FASTDL_DEVICE_ASSERT failed during an emulated launch (on a GPU: a device-side assert)."""


def _ctype(param: str):
    if "*" in param:
        return ctypes.c_void_p
    return {"long long": ctypes.c_longlong, "double": ctypes.c_double, "int": ctypes.c_int}[
        param.rsplit(" ", 1)[0]]


_folder: Path | None = None


def _build_folder() -> Path:
    global _folder
    if _folder is None:
        _folder = Path(tempfile.mkdtemp(prefix="fastdl_emulated_cuda_"))
        atexit.register(shutil.rmtree, _folder, True)
    return _folder


def host_library(name: str, source: str, expressions) -> dict | str:
    """`source` (CUDA C, headers inlined) as a host library with one C entry point per template
    instantiation in `expressions` ("kernel<args>"): {expression: (function, library)}, or a
    string saying why it cannot be built here (no compiler, no C++20 or _Float16). Each entry
    point takes (grid_x, grid_y, threads, the kernel's own arguments)."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        return "no C++ compiler for the host emulation of the CUDA kernels"
    source = re.sub(r"#include <cuda_(fp16|bf16)\.h>", "", source)
    entries, wrappers = {}, []
    for index, expression in enumerate(expressions):
        kernel, args = re.fullmatch(r"(\w+)<(.+)>", expression).groups()
        ctype = args.split(",")[0].strip()
        match = re.search(r"__global__ void (?:__launch_bounds__\([^)]*\) )?" + kernel + r"\((.*?)\)\s*\{", source, re.S)
        params = [" ".join(p.split()) for p in match.group(1).split(",")]
        arg_names = [re.split(r"[\s*]+", p)[-1] for p in params]
        decl = ", ".join(re.sub(r"\bT\b", ctype, p) for p in params)
        symbol = f"{kernel}_{index}"
        wrappers.append(f'extern "C" int {symbol}(long long grid_x, long long grid_y, int threads, {decl}) '
                        f'{{ return emulate(grid_x, grid_y, threads, {kernel}<{args}>, {", ".join(arg_names)}); }}')
        entries[expression] = (symbol, [_ctype(p) for p in params])
    folder = _build_folder()
    (folder / f"{name}.cpp").write_text("\n".join([PRELUDE, source, *wrappers]))
    result = subprocess.run([compiler, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wno-unknown-pragmas",
                             "-fsanitize=alignment", "-fsanitize-recover=alignment",
                             str(folder / f"{name}.cpp"), "-o", str(folder / f"{name}.so")],
                            capture_output=True, text=True)
    if result.returncode != 0:
        return f"the host compiler cannot build the emulation (needs C++20 and _Float16):\n{result.stderr[-2000:]}"
    library = ctypes.CDLL(str(folder / f"{name}.so"))
    library.emulated_assert_message.restype = ctypes.c_char_p
    functions = {}
    for expression, (symbol, argtypes) in entries.items():
        fn = getattr(library, symbol)
        fn.argtypes = [ctypes.c_longlong, ctypes.c_longlong, ctypes.c_int] + argtypes
        fn.restype = ctypes.c_int
        functions[expression] = (fn, library)
    return functions


@functools.cache
def build(stem: str):
    """The module of kernels/cuda/<stem>.cu as a host library: {(kernel, precision): function},
    precision being a key of the backend's CUDA_TYPES (a dtype, or "tf32"), or a string saying
    why it cannot be built here."""
    functions = host_library(stem, nvrtc.module_source(stem), cupy_backend.NAME_EXPRESSIONS[stem])
    if isinstance(functions, str):
        return functions
    precision_of = {args: precision for precision, args in cupy_runtime.CUDA_TYPES.items()}
    return {(expression.split("<")[0], precision_of[expression.split("<", 1)[1][:-1]]): entry
            for expression, entry in functions.items()}


def launch(name, like, num_blocks, args, stem="linear", threads=cupy_backend.THREADS, precision=None):
    """cupy_runtime.launch's signature, run by the emulation on CPU tensors."""
    functions = build(stem)
    if isinstance(functions, str):
        pytest.skip(functions)
    fn, library = functions[(name, precision or like.dtype)]
    launches.append((name, precision or like.dtype))
    grid = tuple(num_blocks) if isinstance(num_blocks, tuple) else (num_blocks,)
    values = [int(a) if isinstance(a, np.uint64) else a.item() for a in args]
    failed_asserts = fn(grid[0], grid[1] if len(grid) > 1 else 1, threads, *values)
    misaligned = library.emulated_misaligned_accesses()
    if misaligned:
        raise AssertionError(f"{name}: {misaligned} misaligned accesses (a GPU faults on any)")
    if failed_asserts:
        raise EmulatedDeviceAssert(library.emulated_assert_message().decode())


@pytest.fixture
def emulated_backend(monkeypatch):
    """fastdl.backends.cupy with its launches run by the host emulation, on CPU tensors."""
    monkeypatch.setattr(cupy_runtime, "launch", launch)
    return cupy_backend


@pytest.fixture
def emulated_functional(emulated_backend, monkeypatch):
    """emulated_backend, and fastdl.use_backend("cupy") taking CPU tensors: whole fastdl.functional
    calls, autograd included, run through the emulated kernels."""
    from fastdl import backends

    resolve = backends.resolve
    monkeypatch.setattr(backends, "resolve",
                        lambda device: "cupy" if backends.selected_backend() == "cupy" else resolve(device))
    return emulated_backend
