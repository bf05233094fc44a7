"""Dropout: out = x * keep * scale, the mask drawn from a counter-based generator, never stored.

Dropout is memory-bound: read x, write out, and (in torch) a bool mask written forward and read
backward. Here the mask is a pure function of (seed, element), so the backward regenerates it
instead of reading it: the same kernel, applied to grad_out, is the backward.

The generator is Philox4x32-10 (tl.randint4x, 64-bit counters): one call gives four 32-bit words,
and serves four neighbouring elements of a row, so it costs ~10 rounds of two 32x32-bit multiplies
per four elements instead of per element (an element-wise call would make the kernel compute-bound
for 2-byte types on an H100). Element (r, c) of the (R, C) view has the counter
r * ceil(C / 4) + c // 4 and takes word c % 4; the key is the two int64 words at seed_ptr (each
under 2**31). It is kept when (word >> 8) >= threshold = ceil(p * 2**24): the float32 uniform
(word >> 8) / 2**24 compared with p, done in integers. fastdl/reference/dropout.py is the same
scheme in NumPy and kernels/cuda/dropout.cu in CUDA C: all three draw the same mask.

The multiply by keep * scale (not a select) is torch's rule: a dropped NaN or inf stays NaN, a
dropped negative value is -0.0. scale is 1/(1-p) in float64, rounded to the accumulator dtype.
"""
import triton
import triton.language as tl

WORDS = 4  # elements one Philox call serves
UNIFORM_SHIFT = 8  # the uniform's 24 bits are a word's top bits
NUM_WARPS = 4


def block_size(cols: int) -> int:
    """Elements per program along a row: 2048 (16 per thread with 4 warps: two 16-byte accesses of a
    2-byte type), fewer for short rows (linear's (M, N) gradients with a small N)."""
    return max(64, min(2048, triton.next_power_of_2(cols)))


@triton.jit
def keep_words(seed_ptr, row, first_group, groups_per_row, GROUPS: tl.constexpr):
    """The (GROUPS * 4,) Philox words of the row's elements from group first_group on: four words per
    counter, interleaved so element 4 * g + j gets word j of counter g."""
    key = tl.load(seed_ptr) | (tl.load(seed_ptr + 1) << 32)
    counter = row.to(tl.int64) * groups_per_row + first_group + tl.arange(0, GROUPS).to(tl.int64)
    w0, w1, w2, w3 = tl.randint4x(key, counter)
    return tl.join(tl.join(w0, w2), tl.join(w1, w3)).reshape(GROUPS * 4)


@triton.jit
def keep_words_rows(seed_ptr, rows, first_group, groups_per_row, GROUPS: tl.constexpr):
    """keep_words for a block of rows (int64 (BLOCK_M,)): (BLOCK_M, GROUPS * 4) words (linear's epilogue)."""
    key = tl.load(seed_ptr) | (tl.load(seed_ptr + 1) << 32)
    counter = rows[:, None] * groups_per_row + first_group + tl.arange(0, GROUPS).to(tl.int64)[None, :]
    w0, w1, w2, w3 = tl.randint4x(key, counter)
    return tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (rows.shape[0], GROUPS * 4))


@triton.jit
def keep_factor(words, threshold, scale, ACC_DTYPE: tl.constexpr):
    """scale where the element is kept, 0 where dropped (uniform < p), in the accumulator dtype."""
    kept = (words >> 8).to(tl.int32) >= threshold
    # tl.full, not .to: the interpreter hands a float argument over as a Python float, which a cast
    # would round to float32 first.
    return tl.where(kept, tl.full((), scale, ACC_DTYPE), 0.0)


@triton.jit(do_not_specialize=["threshold"])
def _dropout(
    in_ptr, out_ptr, seed_ptr,  # in/out (R, C), seed (2,) int64
    R, C,
    stride_ir, stride_ic, stride_or, stride_oc,
    threshold, scale: tl.float64,
    ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    """out = in * keep * scale over one BLOCK of one row (the grid is R * cdiv(C, BLOCK) programs).
    Forward: in = x; backward: in = grad_out, out = grad_input, the same seed."""
    pid = tl.program_id(0).to(tl.int64)
    blocks_per_row = tl.cdiv(C, BLOCK)
    row = pid // blocks_per_row
    first = (pid % blocks_per_row) * BLOCK
    cols = first + tl.arange(0, BLOCK).to(tl.int64)
    mask = cols < C
    x = tl.load(in_ptr + row * stride_ir + cols * stride_ic, mask=mask, other=0.0, eviction_policy="evict_first")
    words = keep_words(seed_ptr, row, first // 4, tl.cdiv(C, 4), BLOCK // 4)
    y = x.to(ACC_DTYPE) * keep_factor(words, threshold, scale, ACC_DTYPE)
    tl.store(out_ptr + row * stride_or + cols * stride_oc, y.to(out_ptr.dtype.element_ty), mask=mask)
