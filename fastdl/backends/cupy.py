"""CuPy launchers for kernels/cuda/*.cu: allocate outputs with torch, launch, return torch tensors.

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

from fastdl.backends.common import ACC_DTYPE as _ACC_DTYPE
from fastdl.backends.common import ACTIVATION_CODES, cross_entropy_outputs, linear_backward_saved, linear_outputs


# The element type each kernel template is instantiated for.
CUDA_TYPES = {torch.float16: "__half", torch.bfloat16: "__nv_bfloat16", torch.float32: "float",
              torch.float64: "double"}
LINEAR_KERNELS = ("linear_fwd", "linear_bwd_input", "linear_bwd_weight")
CROSS_ENTROPY_KERNELS = ("cross_entropy_fwd", "scale_rows", "linear_grad_weight_accumulate")
# Per source stem: the template instantiations compiled (also by fastdl.nvrtc, in CPU CI).
NAME_EXPRESSIONS = {
    stem: tuple(f"{kernel}<{ctype}>" for kernel in kernels for ctype in CUDA_TYPES.values())
    for stem, kernels in (("linear", LINEAR_KERNELS), ("cross_entropy", CROSS_ENTROPY_KERNELS))
}
# Per source stem: the sources compiled before it in the same module (cross_entropy.cu uses
# linear.cu's element types and tiled matmul).
SOURCE_PRELUDES = {"cross_entropy": ("linear",)}
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


def _ptr(t: torch.Tensor | None) -> np.uint64:
    return np.uint64(t.data_ptr() if t is not None else 0)


def _i64(*values) -> list[np.int64]:
    return [np.int64(v) for v in values]


def _launch(name: str, like: torch.Tensor, num_blocks: int | tuple[int, ...], args: tuple,
            stem: str = "linear", threads: int = THREADS) -> None:
    """name<like's type> from kernels/cuda/<stem>.cu on like's device and torch's current stream."""
    cupy = _cupy()
    device = like.device
    index = device.index if device.index is not None else torch.cuda.current_device()
    fn = _function(stem, index, f"{name}<{CUDA_TYPES[like.dtype]}>")
    grid = num_blocks if isinstance(num_blocks, tuple) else (num_blocks,)
    with cupy.cuda.Device(index):
        stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream)
        with stream:
            fn(grid, (threads,), args)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def linear_fwd(input, weight, bias, activation, negative_slope):
    """input (M, K), weight (N, K), bias (N,) or None -> out (M, N), saved (M, N) or empty."""
    M, K = input.shape
    N = weight.shape[0]
    code, out, saved, writes_saved = linear_outputs(input, weight, activation)
    if M == 0 or N == 0:
        return out, saved
    s_strides = saved.stride() if writes_saved else (0, 0)
    _launch("linear_fwd", input, _cdiv(M, BLOCK_ROWS) * _cdiv(N, BLOCK_COLS), (
        _ptr(input), _ptr(weight), _ptr(bias), _ptr(out), _ptr(saved if writes_saved else None),
        *_i64(M, N, K,
              input.stride(0), input.stride(1), weight.stride(0), weight.stride(1),
              bias.stride(0) if bias is not None else 0,
              out.stride(0), out.stride(1), s_strides[0], s_strides[1]),
        np.float64(negative_slope), np.int32(bias is not None), np.int32(code),
    ))
    return out, saved


def linear_bwd(grad_out, input, weight, bias, saved, out, activation, negative_slope,
               needs_input_grad, needs_weight_grad, needs_bias_grad):
    """Gradients of linear_fwd; `saved` is linear_fwd's second output (or `out` for sigmoid/tanh)."""
    M, K = input.shape
    N = weight.shape[0]
    code = ACTIVATION_CODES[activation]
    s = linear_backward_saved(code, saved, out)  # None: not read without an activation
    s_strides = s.stride() if s is not None else (0, 0)
    grad_input = grad_weight = grad_bias = None
    if needs_input_grad:
        grad_input = torch.empty((M, K), device=input.device, dtype=input.dtype)
        if M > 0 and K > 0:
            if N == 0:
                grad_input.zero_()
            else:
                _launch("linear_bwd_input", input, _cdiv(M, BLOCK_ROWS) * _cdiv(K, BLOCK_COLS), (
                    _ptr(grad_out), _ptr(s), _ptr(weight), _ptr(grad_input),
                    *_i64(M, N, K,
                          grad_out.stride(0), grad_out.stride(1), s_strides[0], s_strides[1],
                          weight.stride(0), weight.stride(1), grad_input.stride(0), grad_input.stride(1)),
                    np.float64(negative_slope), np.int32(code),
                ))
    if needs_weight_grad or needs_bias_grad:
        if needs_weight_grad:
            grad_weight = torch.empty((N, K), device=input.device, dtype=weight.dtype)
        if needs_bias_grad:
            grad_bias = torch.empty((N,), device=input.device, dtype=weight.dtype)
        if M == 0:
            for grad in (grad_weight, grad_bias):
                if grad is not None:
                    grad.zero_()
        elif N > 0:
            # Bias only: run with K = 0, so only the k-tile-0 blocks run and grad_weight is never
            # written. At least one k-tile either way, so the bias column runs even when K == 0.
            k_run = K if needs_weight_grad else 0
            w_strides = grad_weight.stride() if grad_weight is not None else (0, 0)
            _launch("linear_bwd_weight", input, _cdiv(N, BLOCK_ROWS) * max(1, _cdiv(k_run, BLOCK_COLS)), (
                _ptr(grad_out), _ptr(s), _ptr(input), _ptr(grad_weight), _ptr(grad_bias),
                *_i64(M, N, k_run,
                      grad_out.stride(0), grad_out.stride(1), s_strides[0], s_strides[1],
                      input.stride(0), input.stride(1), w_strides[0], w_strides[1]),
                np.float64(negative_slope), np.int32(needs_bias_grad), np.int32(code),
            ))
    return grad_input, grad_weight, grad_bias


# --- cross_entropy ---
# The launcher interface of fastdl/backends/triton.py's cross_entropy section, on
# kernels/cuda/cross_entropy.cu: the same arguments, the same results (see the docstrings there).

# The most threads a block of cross_entropy_fwd may have: identical to the source's #define.
CE_MAX_THREADS = 512
# scale_rows: threads per block, 16-byte packs a thread takes per row, and the most rows in a grid
# (CUDA's limit on gridDim.y; each block then walks several rows).
SCALE_ROWS_THREADS = 256
SCALE_ROWS_PACKS = 4
MAX_GRID_Y = 65535


def row_threads(C: int) -> int:
    """cross_entropy_fwd's block: about 16 columns a thread, from one warp to CE_MAX_THREADS."""
    return min(CE_MAX_THREADS, max(32, 1 << (_cdiv(C, 16) - 1).bit_length()))


def _as_acc(t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    return t if t.dtype == acc else t.to(acc)


def cross_entropy_fwd(logits, target, weight, grad_scale, ignore_index, label_smoothing, compute_grad,
                      inplace=False):
    """Per-row softmax cross-entropy and its gradient, one block per row (kernels/cuda/cross_entropy.cu).

    The interface and results of fastdl.backends.triton.cross_entropy_fwd: (loss_rows (R,) in
    float32 / float64 for float64, grad_logits (R, C) or (0, 0)); a bad class index fails a
    device-side assert.
    """
    R, C = logits.shape
    acc = _ACC_DTYPE[logits.dtype]
    loss_rows, grad = cross_entropy_outputs(logits, compute_grad, inplace)
    if R == 0:
        return loss_rows, grad
    if C == 0:  # every index target was ignored (validated); probabilities sum over nothing
        loss_rows.zero_()
        return loss_rows, grad
    prob = target.dim() == 2
    smoothing = label_smoothing > 0.0
    weight_sum = weight.sum(dtype=acc) if weight is not None and smoothing and not prob else None
    scale = _as_acc(grad_scale, acc)
    g = grad if compute_grad else None
    _launch("cross_entropy_fwd", logits, R, (
        _ptr(logits), _ptr(target), _ptr(weight), _ptr(weight_sum), _ptr(scale), _ptr(loss_rows), _ptr(g),
        *_i64(C,
              logits.stride(0), logits.stride(1), target.stride(0), target.stride(1) if prob else 0,
              weight.stride(0) if weight is not None else 0, scale.stride(0) if scale.dim() else 0,
              g.stride(0) if g is not None else 0, g.stride(1) if g is not None else 0,
              ignore_index),
        np.float64(label_smoothing), np.int32(prob), np.int32(weight is not None), np.int32(smoothing),
        np.int32(bool(compute_grad)),
    ), stem="cross_entropy", threads=row_threads(C))
    return loss_rows, grad


def cross_entropy_bwd(grad_logits, scale):
    """In place: grad_logits[r, :] *= scale (shape ()) or scale[r] (shape (R,)); a 1-D grad_logits is one row."""
    x = grad_logits if grad_logits.dim() == 2 else grad_logits.view(1, -1)
    R, C = x.shape
    if R == 0 or C == 0:
        return
    s = _as_acc(scale, _ACC_DTYPE[x.dtype])
    columns_per_block = SCALE_ROWS_THREADS * SCALE_ROWS_PACKS * (16 // x.element_size())
    _launch("scale_rows", x, (_cdiv(C, columns_per_block), min(R, MAX_GRID_Y)), (
        _ptr(x), _ptr(s), *_i64(R, C, x.stride(0), x.stride(1), s.stride(0) if s.dim() else 0),
    ), stem="cross_entropy", threads=SCALE_ROWS_THREADS)


def linear_grad_weight_accumulate(grad_out, input, grad_weight, grad_bias):
    """In place: grad_weight += grad_out.T @ input; grad_bias += grad_out.sum(0) (grad_bias may be None).

    grad_out (M, N), input (M, K) in the same dtype; grad_weight (N, K) in any float dtype;
    grad_bias (N,) or None. The kernel adds into a grad_weight of input's dtype and a grad_bias
    of its accumulator's (what linear_cross_entropy passes); other dtypes go through a temporary.
    """
    M, K = input.shape
    N = grad_weight.shape[0]
    if M == 0 or N == 0:
        return
    acc = _ACC_DTYPE[input.dtype]
    w = grad_weight if grad_weight.dtype == input.dtype else torch.zeros((N, K), device=input.device,
                                                                          dtype=input.dtype)
    b = grad_bias if grad_bias is None or (grad_bias.dtype == acc and grad_bias.stride(0) == 1) else torch.zeros(
        (N,), device=input.device, dtype=acc)
    _launch("linear_grad_weight_accumulate", input, _cdiv(N, BLOCK_ROWS) * max(1, _cdiv(K, BLOCK_COLS)), (
        _ptr(grad_out), _ptr(input), _ptr(w), _ptr(b),
        *_i64(M, N, K, grad_out.stride(0), grad_out.stride(1), input.stride(0), input.stride(1),
              w.stride(0), w.stride(1)),
        np.int32(b is not None),
    ), stem="cross_entropy")
    if w is not grad_weight:
        grad_weight.add_(w)
    if b is not grad_bias:
        grad_bias.add_(b)
