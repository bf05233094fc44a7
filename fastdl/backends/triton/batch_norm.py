"""Triton launchers for batch normalization (kernels/triton/batch_norm.py): torch's SyncBatchNorm
decomposition, the contract every backend implements (fastdl/ops/batch_norm.py and
fastdl/functional/sync_batch_norm.py are the callers; they validated the arguments and allocated
the outputs). Tensors named *3 are (N, C, S) strided views; acc is float32 (float64 for float64).

  batch_norm_stats(x3) -> (mean, biased var)                                           acc (C,)
  batch_norm_elemt(x3, mean, invstd, weight, bias, residual3, activation, negative_slope, out3, mask3)
  batch_norm_backward_reduce(grad_out3, x3, mean, invstd, weight, bias, residual3, mask3, activation,
                             negative_slope, dy3=None) -> (sum_dy, sum_dy_xmu)         acc (C,)
      (dy3: an extension only this backend has, declared by its `writes_dy` attribute)
  batch_norm_backward_elemt(grad_out3, x3, mean, invstd, weight, bias, residual3, mask3, activation,
                            negative_slope, mean_dy, mean_dy_xmu, grad_input3, grad_residual3)

The layout (kernels/triton/batch_norm.py) follows x3: channels tiles when its channels are
contiguous (channels_last, and (N, C) input), rows of positions otherwise. Nothing here writes a
tensor it was not handed as an output; the stats and reduce launchers allocate their results and
their split partials (scratch).
"""
from __future__ import annotations

import torch
import triton

from fastdl.backends.common import ACC_DTYPE as TORCH_ACC_DTYPE
from fastdl.backends.common import ACTIVATION_CODES
from fastdl.backends.triton._launch import ACC_DTYPE, interpreter_bf16, wrap_triton
from fastdl.kernels.triton import batch_norm as _bn

INT32_MAX = 2**31 - 1
# The SM count the split is chosen for where the tensor is not on a GPU (the interpreter, and
# fastdl inspect's capture): an H100's, so the CPU runs the GPU's partial boundaries.
DEFAULT_SMS = 132


def activation_code(activation) -> int:
    """The kernels' ACTIVATION code of `activation` ("none" or None: 0)."""
    return 0 if activation in (None, "none") else ACTIVATION_CODES[activation]


def channels_tile(x3: torch.Tensor) -> bool:
    """Tile channels (the channels_last path) when x3's channels are contiguous and there is more
    than one of them."""
    return x3.shape[1] > 1 and x3.stride(1) == 1


def block_positions(S: int, tile: int) -> int:
    """Columns of a rows-layout tile: the widest power of two (MIN_BLOCK_S .. tile) whose blocks
    cover S with at most 1/8 masked (S = 3136: 256, 6% masked; 784: 64; 49: 64, unavoidably 23%),
    else the one masking the least."""
    top = min(triton.next_power_of_2(S), tile)
    candidates = []
    block = top
    while block >= min(_bn.MIN_BLOCK_S, top):
        candidates.append(block)
        block //= 2
    padded = {b: -(-S // b) * b for b in candidates}
    for b in candidates:
        if padded[b] * 8 <= S * 9:
            return b
    return min(candidates, key=lambda b: (padded[b], -b))


def _align(x3: torch.Tensor, tensors) -> int:
    """Rows layout: the largest power of two, up to 16 bytes of x's elements, that divides S and the
    (n, c) strides of every tensor the kernel touches (the kernels' ALIGN)."""
    S = x3.shape[2]
    align = 16 // x3.element_size()
    values = [S] + [v for t in tensors if t is not None for v in t.stride()[:2]]
    while align > 1 and any(v % align for v in values):
        align //= 2
    return align


def _tiles(dtype: torch.dtype) -> tuple[int, int]:
    """(elementwise tile, reduction tile) in elements for x's dtype."""
    if dtype == torch.float64:
        return _bn.ELEMENTWISE_TILE_FP64, _bn.REDUCE_TILE_FP64
    return _bn.ELEMENTWISE_TILE, _bn.REDUCE_TILE


def _elementwise_launch(x3: torch.Tensor, tile_channels: bool) -> tuple[tuple[int], int, int, bool]:
    """(grid, BLOCK_ROWS, BLOCK_COLS, ROW64) of an elementwise kernel over x3."""
    N, C, S = x3.shape
    tile = _tiles(x3.dtype)[0]
    if tile_channels:
        block_cols = min(triton.next_power_of_2(C), _bn.MAX_BLOCK_C)
        num_rows, col_extent = N * S, C
    else:
        block_cols = block_positions(S, tile)
        num_rows, col_extent = N * C, S
    block_rows = min(tile // block_cols, triton.next_power_of_2(num_rows))
    grid = (-(-num_rows // block_rows) * -(-col_extent // block_cols),)
    return grid, block_rows, block_cols, num_rows + block_rows > INT32_MAX


def _sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SMS


def reduction_plan(x3: torch.Tensor, tile_channels: bool) -> dict:
    """How a reduction over x3 is split (kernels/triton/batch_norm.py's module docstring):
    block sizes, the rows a program reduces (PER, a multiple of BLOCK_ROWS), the grid and the
    number of partials per channel P.

    The split count G: the programs of an unsplit reduction (channel blocks, or channels x position
    blocks) times G should reach PROGRAMS_PER_SM programs per SM, each program reducing at least
    MIN_BLOCKS_PER_SPLIT tiles, with at most MAX_SPLITS partials per channel. ResNet-50 stage 1 at
    batch 256 on an H100 (C = 64, 256 x 56 x 56): channels_last, 64 x 64 tiles, G = 528 programs of
    24 tiles each; NCHW, 256-position blocks (13 per channel) over 16 images, 832 programs, G = 1."""
    N, C, S = x3.shape
    tile = _tiles(x3.dtype)[1]
    if tile_channels:
        block_cols = min(triton.next_power_of_2(C), _bn.MAX_BLOCK_C)
        num_rows = N * S
        col_blocks = -(-C // block_cols)
        base, per_split = col_blocks, 1
    else:
        block_cols = block_positions(S, tile)
        num_rows = N
        col_blocks = -(-S // block_cols)
        base, per_split = C * col_blocks, col_blocks
    block_rows = min(tile // block_cols, triton.next_power_of_2(num_rows))
    row_blocks = -(-num_rows // block_rows)
    target = _sms(x3.device) * _bn.PROGRAMS_PER_SM
    splits = min(max(1, -(-target // base)), max(1, row_blocks // _bn.MIN_BLOCKS_PER_SPLIT),
                 max(1, _bn.MAX_SPLITS // per_split))
    per = -(-row_blocks // splits) * block_rows
    splits = -(-num_rows // per)
    return dict(num_rows=num_rows, per=per, grid=(base * splits,), partials=splits * per_split,
                BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, ROW64=num_rows + block_rows > INT32_MAX)


def _combine_blocks(C: int, P: int) -> tuple[tuple[int], int, int]:
    block_c = min(_bn.COMBINE_BLOCK_C, triton.next_power_of_2(C))
    return (-(-C // block_c),), min(_bn.COMBINE_BLOCK_P, triton.next_power_of_2(P)), block_c


def _strides(t: torch.Tensor | None, default: torch.Tensor) -> tuple[int, int, int]:
    return tuple((t if t is not None else default).stride())


@interpreter_bf16(results=("acc", "acc"))
def batch_norm_stats(x3):
    """Per-channel mean and biased variance of x3 (N, C, S) over N and S, acc dtype (C,);
    deterministic (fixed-order combine of the split partials). N * S >= 1."""
    N, C, S = x3.shape
    acc = TORCH_ACC_DTYPE[x3.dtype]
    mean = torch.empty(C, device=x3.device, dtype=acc)
    var = torch.empty(C, device=x3.device, dtype=acc)
    tile_channels = channels_tile(x3)
    plan = reduction_plan(x3, tile_channels)
    P = plan["partials"]
    align = 1 if tile_channels else _align(x3, [x3])
    common = dict(ACC_DTYPE=ACC_DTYPE[x3.dtype], CHANNELS_TILE=tile_channels, FINAL=P == 1, ROW64=plan["ROW64"],
                  ALIGN=align, BLOCK_ROWS=plan["BLOCK_ROWS"], BLOCK_COLS=plan["BLOCK_COLS"],
                  num_warps=_bn.REDUCE_WARPS)
    if P == 1:
        wrap_triton(_bn._batch_norm_stats)[plan["grid"]](
            x3, mean, mean, var, plan["num_rows"], C, S, plan["per"], *x3.stride(), **common)
        return mean, var
    partials = torch.empty((3, P, C), device=x3.device, dtype=acc)
    wrap_triton(_bn._batch_norm_stats)[plan["grid"]](
        x3, partials[0], partials[1], partials[2], plan["num_rows"], C, S, plan["per"], *x3.stride(), **common)
    grid, block_p, block_c = _combine_blocks(C, P)
    wrap_triton(_bn._batch_norm_stats_combine)[grid](
        x3, partials[0], partials[1], partials[2], mean, var, C, P, x3.stride(1),
        ACC_DTYPE=ACC_DTYPE[x3.dtype], BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4)
    return mean, var


@interpreter_bf16(results=(), mutates=("out3",))
def batch_norm_elemt(x3, mean, invstd, weight, bias, residual3, activation, negative_slope, out3, mask3):
    """out3 = act((x3 - mean) * invstd * weight + bias (+ residual3)) in x's dtype; mask3 (uint8),
    when given, = pre > 0. Training and eval alike (the op passes batch or running statistics)."""
    N, C, S = x3.shape
    if x3.numel() == 0:
        return None
    tile_channels = channels_tile(x3)
    grid, block_rows, block_cols, row64 = _elementwise_launch(x3, tile_channels)
    align = 1 if tile_channels else _align(x3, [x3, residual3, out3, mask3])
    wrap_triton(_bn._batch_norm_elemt)[grid](
        x3, mean, invstd, weight if weight is not None else mean, bias if bias is not None else mean,
        residual3 if residual3 is not None else x3, out3, mask3 if mask3 is not None else out3,
        N, C, S, float(negative_slope),
        *x3.stride(), *_strides(residual3, x3), *out3.stride(), *_strides(mask3, out3),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual3 is not None,
        HAS_MASK=mask3 is not None, ACTIVATION=activation_code(activation), ACC_DTYPE=ACC_DTYPE[x3.dtype],
        CHANNELS_TILE=tile_channels, ROW64=row64, ALIGN=align, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols,
        num_warps=_bn.ELEMENTWISE_WARPS,
    )
    return None


def _grad_flags(residual3, mask3, activation):
    """(ACTIVATION code, USE_MASK, whether the residual is read): a saved mask replaces the
    recomputed pre-activation (relu, leaky_relu), and then the residual is not read."""
    code = activation_code(activation)
    use_mask = code != 0 and mask3 is not None
    return code, use_mask, residual3 is not None and code != 0 and not use_mask


def _writes_dy(launcher):
    """Marks a reduce launcher that takes dy3=: fastdl/ops/batch_norm.py passes it only to one with
    this attribute (a backend without it keeps the contract's form, backward_elemt reading grad_out
    and the mask or residual again). Set before @interpreter_bf16 wraps it, so the wrapper and the
    launcher itself (fastdl.inspection.traffic calls __wrapped__) both carry it."""
    launcher.writes_dy = True
    return launcher


@interpreter_bf16(results=("acc", "acc"), mutates=("dy3",))
@_writes_dy
def batch_norm_backward_reduce(grad_out3, x3, mean, invstd, weight, bias, residual3, mask3, activation,
                               negative_slope, dy3=None):
    """(sum_dy, sum_dy_xmu), acc dtype (C,): the sums over N and S of dy = grad_out * act'(pre) and
    of dy * (x - mean); deterministic (fixed-order combine of the split partials).

    dy3 (this backend's extension of the contract, declared by the launcher's `writes_dy`
    attribute): an (N, C, S) output in x's dtype that receives dy, rounded to its dtype, which is
    then what the sums add. The op passes the residual's gradient there, and backward_elemt then
    reads dy (with activation "none") instead of grad_out and the mask or residual."""
    N, C, S = x3.shape
    acc = TORCH_ACC_DTYPE[x3.dtype]
    sum_dy = torch.empty(C, device=x3.device, dtype=acc)
    sum_dy_xmu = torch.empty(C, device=x3.device, dtype=acc)
    if x3.numel() == 0:
        return sum_dy.zero_(), sum_dy_xmu.zero_()
    code, use_mask, read_residual = _grad_flags(residual3, mask3, activation)
    residual3 = residual3 if read_residual else None
    mask3 = mask3 if use_mask else None
    tile_channels = channels_tile(x3)
    plan = reduction_plan(x3, tile_channels)
    P = plan["partials"]
    align = 1 if tile_channels else _align(x3, [grad_out3, x3, residual3, mask3, dy3])
    if P == 1:
        targets = (sum_dy, sum_dy_xmu)
    else:
        partials = torch.empty((2, P, C), device=x3.device, dtype=acc)
        targets = (partials[0], partials[1])
    wrap_triton(_bn._batch_norm_backward_reduce)[plan["grid"]](
        grad_out3, x3, mean, invstd, weight if weight is not None else mean, bias if bias is not None else mean,
        residual3 if residual3 is not None else x3, mask3 if mask3 is not None else x3,
        dy3 if dy3 is not None else grad_out3, *targets,
        plan["num_rows"], C, S, plan["per"], float(negative_slope),
        *grad_out3.stride(), *x3.stride(), *_strides(residual3, x3), *_strides(mask3, x3), *_strides(dy3, grad_out3),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual3 is not None,
        USE_MASK=use_mask, WRITE_DY=dy3 is not None, ACTIVATION=code, ACC_DTYPE=ACC_DTYPE[x3.dtype], CHANNELS_TILE=tile_channels,
        FINAL=P == 1, ROW64=plan["ROW64"], ALIGN=align, BLOCK_ROWS=plan["BLOCK_ROWS"],
        BLOCK_COLS=plan["BLOCK_COLS"], num_warps=_bn.REDUCE_WARPS,
    )
    if P > 1:
        grid, block_p, block_c = _combine_blocks(C, P)
        wrap_triton(_bn._batch_norm_sum_partials)[grid](
            partials[0], partials[1], sum_dy, sum_dy_xmu, C, P,
            ACC_DTYPE=ACC_DTYPE[x3.dtype], BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4)
    return sum_dy, sum_dy_xmu


@interpreter_bf16(results=(), mutates=("grad_input3", "grad_residual3"))
def batch_norm_backward_elemt(grad_out3, x3, mean, invstd, weight, bias, residual3, mask3, activation,
                              negative_slope, mean_dy, mean_dy_xmu, grad_input3, grad_residual3):
    """grad_input3 (if given) = (dy - mean_dy - (x - mean) * invstd^2 * mean_dy_xmu) * invstd * weight,
    or dy * invstd * weight when mean_dy is None (eval); grad_residual3 (if given) = dy."""
    N, C, S = x3.shape
    if x3.numel() == 0 or (grad_input3 is None and grad_residual3 is None):
        return None
    code, use_mask, read_residual = _grad_flags(residual3, mask3, activation)
    residual3 = residual3 if read_residual else None
    mask3 = mask3 if use_mask else None
    tile_channels = channels_tile(x3)
    grid, block_rows, block_cols, row64 = _elementwise_launch(x3, tile_channels)
    align = 1 if tile_channels else _align(x3, [grad_out3, x3, residual3, mask3, grad_input3, grad_residual3])
    training = mean_dy is not None
    any_out = grad_input3 if grad_input3 is not None else grad_residual3
    wrap_triton(_bn._batch_norm_backward_elemt)[grid](
        grad_out3, x3, mean, invstd, weight if weight is not None else mean, bias if bias is not None else mean,
        residual3 if residual3 is not None else x3, mask3 if mask3 is not None else x3,
        mean_dy if training else mean, mean_dy_xmu if training else mean,
        any_out if grad_input3 is None else grad_input3, any_out if grad_residual3 is None else grad_residual3,
        N, C, S, float(negative_slope),
        *grad_out3.stride(), *x3.stride(), *_strides(residual3, x3), *_strides(mask3, x3),
        *_strides(grad_input3, any_out), *_strides(grad_residual3, any_out),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual3 is not None,
        USE_MASK=use_mask, TRAINING=training, WRITE_GRAD_INPUT=grad_input3 is not None,
        WRITE_GRAD_RESIDUAL=grad_residual3 is not None, ACTIVATION=code, ACC_DTYPE=ACC_DTYPE[x3.dtype],
        CHANNELS_TILE=tile_channels, ROW64=row64, ALIGN=align, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols,
        num_warps=_bn.ELEMENTWISE_WARPS,
    )
    return None
