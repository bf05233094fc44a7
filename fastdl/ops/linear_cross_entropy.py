"""torch.ops.fastdl.linear_cross_entropy_<backend>: cross_entropy(linear(...)) in row chunks, with autograd.

linear_cross_entropy(input (N, H), weight (V, H), bias, target, ...) walks the rows in chunks:
logits chunk = input chunk @ weight.T + bias (the dense kernel), then the fused loss+gradient
kernel writes the gradient over that chunk's logits (a buffer this op allocated and nobody else
sees), then grad_input rows and grad_weight / grad_bias accumulate from it, so the extra memory
is one (chunk, V) buffer plus grad_weight's float32 accumulator. For "mean"/"sum" that all
happens in the forward and backward writes grad_output * each gradient to a new tensor (the saved
ones stay intact: a second backward works); for "none" each row's grad_output must scale its
gradient before it reaches grad_weight, so the forward computes only the loss and the backward
redoes the chunks with that per-row scale.

grad_weight and grad_bias accumulate across chunks in float32 (float64 for float64) and are
rounded to the weight's dtype once: rounding the running sum once per chunk made the error grow
with the number of chunks (256 chunks: 2.2e-3 relative in fp16, 1.8e-2 in bf16, about 8x torch's
unfused error). For "mean"/"sum" the float32 sums are what the forward saves, and the backward's
scaling by grad_output writes them, rounded, into the new gradient (one rounding, no second
(V, H) buffer). Memory: V * H * 4 bytes (2 GiB at V = 128256, H = 4096) held from forward to
backward, and grad_input (N * H) saved beside the gradient the backward returns; the in-place
scaling this replaced returned the saved buffers themselves. An in-place, memory-saving opt-in
is not built.

Double backward (create_graph=True): the backward recomputes
cross_entropy(linear(input, weight, bias), target) with torch's ops and differentiates that with
a graph (_define.recompute_grads). That is why input, weight, bias and target are saved for every
reduction: they are the op's inputs, so saving them keeps them alive until backward and copies
nothing.
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdl import backends
from fastdl.ops._define import (create_graph, define, fake_dense_grads, or_empty, recompute_grads,
                                register_autograd)
from fastdl.ops.cross_entropy import acc_dtype, reduce_rows, reduction_scale, scale_rows_op

# linear_cross_entropy's chunk: the bytes of one chunk of logits (its gradient overwrites it).
# 256 MiB keeps the extra memory near 5% of the unfused path's at N=8192, V=128256 in bf16
# while each chunk's matmuls (>= 1024 x V x H there) still fill the GPU.
CHUNK_BYTES = 256 * 2**20
# Forces a chunk size (rows); tests use it to run several chunks on small shapes.
CHUNK_ROWS_ENV = "FASTDL_LINEAR_CE_CHUNK_ROWS"
# The row tile the chunk's matmuls are counted in (their autotuned BLOCK_M is 64, 128 or 256).
MATMUL_TILE_ROWS = 128
# Per-SM limits torch's device properties do not give: resident blocks (32 on sm_80 / sm_90 /
# sm_100, 16 on sm_86 / sm_87, 24 on sm_89; 16 assumed elsewhere), the shared memory the CUDA
# runtime reserves per resident block (1 KB since sm_80), and the unit registers are allocated in
# per warp (256). fastdl.inspection.sass.occupancy uses the same numbers for sm_80 / sm_90
# (tests/test_linear_cross_entropy.py checks the two agree).
MAX_BLOCKS_PER_SM = {(8, 0): 32, (8, 6): 16, (8, 7): 16, (8, 9): 24, (9, 0): 32, (10, 0): 32}
RESERVED_SHARED_PER_BLOCK = 1024
REGISTER_UNIT = 256


def resident_blocks(registers: int, shared: int, warps: int, props) -> int:
    """Blocks of a kernel (registers per thread, shared memory bytes and warps per block) one SM
    holds at once on a device with torch.cuda.get_device_properties `props`."""
    per_warp = -(-max(registers, 1) * 32 // REGISTER_UNIT) * REGISTER_UNIT
    limits = (
        props.regs_per_multiprocessor // per_warp // warps,
        props.shared_memory_per_multiprocessor // (shared + RESERVED_SHARED_PER_BLOCK),
        props.max_threads_per_multi_processor // (32 * warps),
        MAX_BLOCKS_PER_SM.get((props.major, props.minor), 16),
    )
    return max(0, min(limits))


def rows_per_wave(launchers, dtype: torch.dtype, vocab: int, device: torch.device, label_smoothing: float,
                  compute_grad: bool, per_row_scale: bool) -> Optional[int]:
    """Rows of one wave of the cross-entropy kernel a chunk launches (one program or block per
    row): SMs x its resident blocks per SM, from the compiled kernel's registers and shared memory
    (the backend's cross_entropy_fwd_resources: Triton's compiled kernel, CUDA's function
    attributes). None off CUDA devices, or for a backend that cannot tell (chunks then keep the
    budget's size)."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _rows_per_wave(launchers.__name__, dtype, vocab, torch.device("cuda", index), label_smoothing > 0.0,
                          bool(compute_grad), bool(per_row_scale))


@functools.cache
def _rows_per_wave(backend_module: str, dtype, vocab, device, smoothing, compute_grad, per_row_scale):
    try:  # the op's launcher module of a backend package (fastdl/backends/<name>/cross_entropy.py)
        module = importlib.import_module(f"{backend_module}.cross_entropy")
    except ImportError:
        return None
    resources = getattr(module, "cross_entropy_fwd_resources", None)
    if resources is None:
        return None
    # Stand-ins with the chunk's dtypes, row stride (vocab) and alignment: two rows are enough.
    acc = acc_dtype(dtype)
    logits = torch.empty((2, vocab), dtype=dtype, device=device)
    target = torch.zeros((2,), dtype=torch.int64, device=device)
    grad_scale = torch.ones((2,) if per_row_scale else (), dtype=acc, device=device)
    registers, shared, warps = resources(logits, target, grad_scale, 0.1 if smoothing else 0.0, compute_grad,
                                         inplace=True)
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count * resident_blocks(registers, shared, warps, props) or None


def _idle(rows: int, unit: int) -> float:
    """The fraction of slots left idle when `rows` run in whole units of `unit` rows."""
    return 1.0 - rows / (-(-rows // unit) * unit)


def chunk_rows(rows: int, vocab: int, itemsize: int, device: torch.device, wave_rows: Optional[int] = None) -> int:
    """Rows per linear_cross_entropy chunk: the logits of a chunk fit the budget, at least 1 row.

    With wave_rows (rows_per_wave: on a GPU) and at least one wave within the budget, the chunk
    is sized in waves of the cross-entropy kernel (one program per row): of the most whole waves
    that fit, those waves cut down to whole 128-row tiles, and the most whole tiles
    (chunk_candidates), the one whose worse kernel idles least (chunk_idle: the cross-entropy
    kernel's last wave, or the last row tile of the chunk's three matmuls, which take most of a
    chunk's time), the largest on a tie. H100, bf16, 8 blocks/SM (1056 rows a wave): V = 32000
    takes 3168 rows (3 waves; 4096 was 3.88), V = 50257 2112 (2 waves; 2560 was 2.42); at
    V = 128256 less than a wave fits the budget and 1024 rows fill 97% of one (with the kernel's
    earlier 6 blocks/SM they were 1.29 waves, the second 29% full). Whole waves alone could cost
    more than they save: 792 rows would be 6.2 row tiles, a 7th tile 19% used in every matmul.
    Without waves (and on CPU): whole 128-row tiles, as before."""
    forced = os.environ.get(CHUNK_ROWS_ENV)
    if forced:
        return max(1, int(forced))
    budget = CHUNK_BYTES
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(budget, free // 8)
    n = budget // max(1, vocab * itemsize)
    if wave_rows and n >= wave_rows:
        n = min(chunk_candidates(n, wave_rows), key=lambda c: (chunk_idle(c, wave_rows), -c))
    elif n >= 2 * MATMUL_TILE_ROWS:
        n -= n % MATMUL_TILE_ROWS  # whole row tiles for the matmuls
    return int(max(1, min(rows, n)))


def chunk_candidates(n: int, wave_rows: int) -> tuple[int, ...]:
    """Chunk sizes chunk_rows weighs when n rows fit the budget: the most whole waves, those cut
    down to whole matmul tiles, and the most whole tiles (the size before waves counted)."""
    waves = n - n % wave_rows
    return tuple(c for c in (waves, waves - waves % MATMUL_TILE_ROWS, n - n % MATMUL_TILE_ROWS) if c > 0)


def chunk_idle(rows: int, wave_rows: int) -> float:
    """The worse idle fraction of a chunk of `rows`: in the cross-entropy kernel's last wave, or in
    the last row tile of its matmuls."""
    return max(_idle(rows, wave_rows), _idle(rows, MATMUL_TILE_ROWS))


def _chunked(launchers, input, weight, bias, target, ignore_index, label_smoothing, grad_scale, per_row_scale,
             want_loss, needs_input, needs_weight, needs_bias, round_sums=True):
    """One walk over the row chunks: loss rows and/or the three gradients, grad_scale applied per row.

    grad_weight and grad_bias are float32 (float64) sums, rounded to the weight's dtype if round_sums."""
    R, H = input.shape
    V = weight.shape[0]
    acc = acc_dtype(input.dtype)
    device = input.device
    loss_rows = torch.empty((R,), device=device, dtype=acc) if want_loss else None
    grad_input = torch.empty((R, H), device=device, dtype=input.dtype) if needs_input else None
    accumulate = getattr(launchers, "linear_grad_weight_accumulate", None)
    # Accumulated in float32 (float64), rounded once below: see the module docstring. With an
    # accumulating kernel the first chunk stores its share (accumulate=False), so the sums need no
    # zero-fill (a V x H x 4-byte write) and that chunk reads no accumulator.
    sums = torch.empty if accumulate is not None and R > 0 else torch.zeros
    grad_weight = sums((V, H), device=device, dtype=acc) if needs_weight else None
    grad_bias = torch.zeros((V,), device=device, dtype=acc) if needs_bias else None
    compute_grad = needs_input or needs_weight or needs_bias
    no_saved = input.new_empty((0, 0))
    # The budget counts what a chunk really holds per logit: the logits' own bytes on the GPU
    # backends, the float64 temporaries on the reference backend (its LINEAR_CE_BYTES_PER_LOGIT).
    wave = None if os.environ.get(CHUNK_ROWS_ENV) else rows_per_wave(
        launchers, input.dtype, V, device, label_smoothing, compute_grad, per_row_scale)
    step = chunk_rows(R, V, getattr(launchers, "LINEAR_CE_BYTES_PER_LOGIT", input.element_size()), device, wave)
    for start in range(0, R, step):
        end = min(R, start + step)
        x = input[start:end]
        logits = launchers.linear_fwd(x, weight, bias, None, 0.0)[0]
        scale = grad_scale[start:end] if per_row_scale else grad_scale
        loss_chunk, grad = launchers.cross_entropy_fwd(logits, target[start:end], None, scale, ignore_index,
                                                       label_smoothing, compute_grad, inplace=True)
        if want_loss:
            loss_rows[start:end] = loss_chunk
        if needs_input:
            grad_input[start:end] = launchers.linear_bwd(grad, x, weight, None, no_saved, None, None, 0.0,
                                                         True, False, False)[0]
        if needs_weight and accumulate is not None:
            accumulate(grad, x, grad_weight, grad_bias, accumulate=start > 0)
        elif needs_weight or needs_bias:
            # A backend without an accumulating kernel: a fresh (V, H) partial per chunk.
            _, partial_weight, partial_bias = launchers.linear_bwd(grad, x, weight, None, no_saved, None, None, 0.0,
                                                                   False, needs_weight, needs_bias)
            if needs_weight:
                grad_weight += partial_weight
            if needs_bias:
                grad_bias += partial_bias
        del logits, grad
    if round_sums:
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(weight.dtype)
    return loss_rows, grad_input, grad_weight, grad_bias


def torch_loss(input: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, ignore_index: int,
               label_smoothing: float, reduction: str) -> Tensor:
    """cross_entropy(linear(input, weight, bias), target) in torch's differentiable ops."""
    return F.cross_entropy(F.linear(input, weight, bias), target, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)


def torch_composite(input: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, ignore_index: int,
                    label_smoothing: float, reduction: str, needs_input_grad: bool, needs_weight_grad: bool,
                    needs_bias_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The "torch" entry: the unfused composition with empty gradients (torch's autograd differentiates
    the loss), for torch.func transforms and forward AD."""
    empty = input.new_empty((0,))
    return torch_loss(input, weight, bias, target, ignore_index, label_smoothing, reduction), empty, empty, empty


def define_op(backend: str):
    def linear_cross_entropy(input: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                             ignore_index: int, label_smoothing: float, reduction: str, needs_input_grad: bool,
                             needs_weight_grad: bool, needs_bias_grad: bool
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        denominator, scale = reduction_scale(reduction, target, None, ignore_index, weight.shape[0],
                                             acc_dtype(input.dtype), input.device)
        # "none": gradients need the per-row grad_output, so the backward computes them.
        grads_now = reduction != "none"
        loss_rows, grad_input, grad_weight, grad_bias = _chunked(
            backends.get(backend), input, weight, bias, target, ignore_index, label_smoothing, scale, False,
            True, grads_now and needs_input_grad, grads_now and needs_weight_grad, grads_now and needs_bias_grad,
            round_sums=False)  # the backward's scaling rounds them
        loss = reduce_rows(loss_rows, reduction, denominator, input.dtype)
        sums_like = input.new_empty((0,), dtype=acc_dtype(input.dtype))
        return loss, *or_empty((grad_input,), input), *or_empty((grad_weight, grad_bias), sums_like)

    def linear_cross_entropy_fake(input, weight, bias, target, ignore_index, label_smoothing, reduction,
                                  needs_input_grad, needs_weight_grad, needs_bias_grad):
        loss = input.new_empty((input.shape[0],) if reduction == "none" else ())
        now = reduction != "none"
        grad_input, grad_weight, grad_bias = fake_dense_grads(input, weight, now and needs_input_grad,
                                                              now and needs_weight_grad, now and needs_bias_grad)
        acc = acc_dtype(input.dtype)  # the unrounded float32 (float64) sums
        return loss, grad_input, grad_weight.to(acc), grad_bias.to(acc)

    def linear_cross_entropy_backward(grad_loss: Tensor, input: Tensor, weight: Tensor, bias: Optional[Tensor],
                                      target: Tensor, ignore_index: int, label_smoothing: float,
                                      needs_input_grad: bool, needs_weight_grad: bool, needs_bias_grad: bool
                                      ) -> tuple[Tensor, Tensor, Tensor]:
        """reduction="none": the chunks again, each row's gradient scaled by its grad_output."""
        _, grad_input, grad_weight, grad_bias = _chunked(
            backends.get(backend), input, weight, bias, target, ignore_index, label_smoothing, grad_loss, True,
            False, needs_input_grad, needs_weight_grad, needs_bias_grad)
        return or_empty((grad_input, grad_weight, grad_bias), input)

    def linear_cross_entropy_backward_fake(grad_loss, input, weight, bias, target, ignore_index, label_smoothing,
                                           needs_input_grad, needs_weight_grad, needs_bias_grad):
        return fake_dense_grads(input, weight, needs_input_grad, needs_weight_grad, needs_bias_grad)

    fwd = define("linear_cross_entropy", backend, linear_cross_entropy, linear_cross_entropy_fake)
    bwd_none = define("linear_cross_entropy_backward", backend, linear_cross_entropy_backward,
                      linear_cross_entropy_backward_fake)
    scale_op = scale_rows_op(backend)

    def setup_context(ctx, inputs, output):
        input, weight, bias, target, ignore_index, label_smoothing, reduction, *needs = inputs
        _, grad_input, grad_weight, grad_bias = output
        ctx.reduction, ctx.ignore_index, ctx.label_smoothing = reduction, ignore_index, label_smoothing
        ctx.needs = needs
        # The inputs for "none"'s backward and for a create_graph backward; the gradients the
        # forward computed for "mean"/"sum".
        ctx.save_for_backward(input, weight, bias, target,
                              *((None,) * 3 if reduction == "none" else (grad_input, grad_weight, grad_bias)))
        ctx.mark_non_differentiable(grad_input, grad_weight, grad_bias)

    def backward(ctx, grad_loss, *_):
        none = (None,) * 10
        if grad_loss is None:  # the gradients it returns are not differentiable
            return none
        input, weight, bias, target, *grads = ctx.saved_tensors
        needs = [a and b for a, b in zip(ctx.needs_input_grad[:3], ctx.needs)]
        if create_graph():
            grads = recompute_grads(
                lambda x, w, b: torch_loss(x, w, b, target, ctx.ignore_index, ctx.label_smoothing, ctx.reduction),
                (input, weight, bias), needs, (grad_loss,))
        elif ctx.reduction == "none":
            grads = bwd_none(grad_loss, input, weight, bias, target, ctx.ignore_index, ctx.label_smoothing,
                             *needs)
        else:
            dtypes = (input.dtype, weight.dtype, weight.dtype)
            grads = [scale_op(grad, grad_loss, dtype) if need else None
                     for grad, need, dtype in zip(grads, needs, dtypes)]
        return (*(g if need else None for g, need in zip(grads, needs)), *none[3:])

    register_autograd(fwd, backward, setup_context)
    return fwd
