"""What the CuPy launchers share (kernels/cuda/*.cu): compiling, pointers, and launching on torch's stream.

The launchers (linear.py, cross_entropy.py) allocate outputs with torch, launch, return torch tensors.

Tensors cross over as raw device pointers (tensor.data_ptr(), offset included) with their
strides, so nothing is copied, any layout works, and bfloat16 needs no CuPy dtype. Kernels run
on torch's current stream and device, so they order with the torch work around them exactly
like a torch op would. Each source is compiled once per device, on first use, by NVRTC through
cupy.RawModule; `cupy` is imported only then, so this module imports on machines without it.
CuPy compiles with -ftz=true (float32 denormals flush to zero), which torch's kernels do not.
Inputs were validated upstream (fastdl.functional).
"""
from __future__ import annotations

import threading

import numpy as np
import torch


# The template arguments of each kernel per precision: the element type, and for "tf32" (float32
# inputs on TF32 tensor cores, linear.cu's matmuls when torch.backends.cuda.matmul.allow_tf32)
# float with the TF32 flag set. fastdl.inspection reads the precision of a CUDA row from here.
TF32 = "tf32"
CUDA_TYPES = {torch.float16: "__half", torch.bfloat16: "__nv_bfloat16", torch.float32: "float",
              torch.float64: "double", TF32: "float, true"}
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LINEAR_KERNELS = ("linear_fwd", "linear_bwd_input", "linear_bwd_weight", "linear_grad_weight_accumulate")
CROSS_ENTROPY_KERNELS = ("cross_entropy_fwd", "scale_rows")
MAX_POOL2D_KERNELS = ("max_pool2d_fwd", "max_pool2d_bwd")
CONV2D_KERNELS = ("conv2d_fwd", "conv2d_bwd_input", "conv2d_bwd_weight")
# conv2d's direct depthwise kernels (one input channel per group): float accumulation, no TF32.
CONV2D_DW_KERNELS = ("conv2d_dw_fwd", "conv2d_dw_bwd_input", "conv2d_dw_bwd_weight")
# Per source stem: the template instantiations compiled (also by fastdl.nvrtc, in CPU CI).
NAME_EXPRESSIONS = {
    stem: tuple(f"{kernel}<{CUDA_TYPES[precision]}>" for kernel in kernels for precision in precisions)
    for stem, kernels, precisions in (("linear", LINEAR_KERNELS, (*DTYPES, TF32)),
                                      ("cross_entropy", CROSS_ENTROPY_KERNELS, DTYPES),
                                      ("max_pool2d", MAX_POOL2D_KERNELS, DTYPES))
}
# conv2d's matmuls in every precision; its split-reduction sum (float partials) per dtype only.
NAME_EXPRESSIONS["conv2d"] = (tuple(f"{kernel}<{CUDA_TYPES[precision]}>" for kernel in CONV2D_KERNELS
                                    for precision in (*DTYPES, TF32))
                              + tuple(f"conv2d_sum_splits<{CUDA_TYPES[dtype]}>" for dtype in DTYPES)
                              + tuple(f"{kernel}<{CUDA_TYPES[dtype]}>" for kernel in CONV2D_DW_KERNELS
                                      for dtype in DTYPES))
# batch_norm's four kernels per dtype; its split combines per accumulator type (float, double).
BATCH_NORM_KERNELS = ("batch_norm_stats", "batch_norm_elemt", "batch_norm_backward_reduce", "batch_norm_backward_elemt")
BATCH_NORM_COMBINES = ("batch_norm_stats_combine", "batch_norm_backward_reduce_combine")
NAME_EXPRESSIONS["batch_norm"] = (tuple(f"{kernel}<{CUDA_TYPES[dtype]}>" for kernel in BATCH_NORM_KERNELS
                                        for dtype in DTYPES)
                                  + tuple(f"{kernel}<{CUDA_TYPES[dtype]}>" for kernel in BATCH_NORM_COMBINES
                                          for dtype in (torch.float32, torch.float64)))
# dropout's one kernel (forward and backward alike) per dtype.
NAME_EXPRESSIONS["dropout"] = tuple(f"dropout_apply<{CUDA_TYPES[dtype]}>" for dtype in DTYPES)
# Per source stem: the sources compiled before it in the same module (cross_entropy.cu uses
# linear.cu's element types; conv2d.cu its block matmul, loaders' element types and epilogue;
# batch_norm.cu its activations).
SOURCE_PRELUDES = {"cross_entropy": ("linear",), "conv2d": ("linear",), "batch_norm": ("linear",)}
# The kernels' fixed geometry: 64 x 64 output tiles, 256 threads per block.
BLOCK_ROWS = BLOCK_COLS = 64
THREADS = 256

_INSTALL_HINT = ("fastdl's cupy backend needs CuPy: pip install fastdl[cuda12] (CUDA 12) "
                 "or pip install fastdl[cuda13] (CUDA 13)")

_lock = threading.Lock()
_functions: dict[tuple[str, int, str], object] = {}  # (stem, device index, name expression)
_modules: dict[tuple[str, int], object] = {}


def _cupy():
    try:
        import cupy
    except ImportError as exc:
        raise RuntimeError(_INSTALL_HINT) from exc
    return cupy


def _compile_options(cupy) -> tuple[str, ...]:
    from fastdl import nvrtc

    try:
        version = tuple(int(v) for v in cupy.cuda.nvrtc.getVersion())
    except Exception:  # noqa: BLE001 - without a version any header directory is a guess
        version = None
    # CuPy finds the CUDA headers itself in most setups; this adds the best match we know of for
    # CuPy's NVRTC (the nvidia-cuda-runtime wheel, CUDA_PATH, /usr/local/cuda), for cuda_bf16.h,
    # and only one of the same CUDA major: headers of another major could break a working setup.
    return tuple(nvrtc.OPTIONS) + nvrtc.header_options(version, same_major_only=True)


def _function(stem: str, device_index: int, expression: str):
    key = (stem, device_index, expression)
    fn = _functions.get(key)
    if fn is not None:
        return fn
    cupy = _cupy()
    from fastdl import nvrtc

    with _lock:
        module = _modules.get((stem, device_index))
        with cupy.cuda.Device(device_index):
            if module is None:
                module = cupy.RawModule(code=nvrtc.module_source(stem), options=_compile_options(cupy),
                                        name_expressions=NAME_EXPRESSIONS[stem])
                _modules[(stem, device_index)] = module
            fn = module.get_function(expression)  # compiles for this device's arch on first use
        _functions[key] = fn
    return fn


def ptr(t: torch.Tensor | None) -> np.uint64:
    return np.uint64(t.data_ptr() if t is not None else 0)


def i64(*values) -> list[np.int64]:
    return [np.int64(v) for v in values]


def tf32(dtype: torch.dtype) -> bool:
    """Whether float32 matmuls may round their inputs to TF32: torch's own switch, as the Triton
    backend's input_precision (fastdl/backends/triton/_launch.py), so fastdl matches F.linear."""
    return dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32


def launch(name: str, like: torch.Tensor, num_blocks: int | tuple[int, ...], args: tuple,
            stem: str = "linear", threads: int = THREADS, precision=None) -> None:
    """name<like's type> from kernels/cuda/<stem>.cu on like's device and torch's current stream;
    precision (a key of CUDA_TYPES, e.g. TF32) picks another instantiation than like's dtype."""
    cupy = _cupy()
    device = like.device
    index = device.index if device.index is not None else torch.cuda.current_device()
    fn = _function(stem, index, f"{name}<{CUDA_TYPES[precision or like.dtype]}>")
    grid = num_blocks if isinstance(num_blocks, tuple) else (num_blocks,)
    with cupy.cuda.Device(index):
        stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream)
        with stream:
            fn(grid, (threads,), args)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
