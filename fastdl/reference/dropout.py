"""Dropout in float64 NumPy: the forward and backward given a mask, and the counter-based mask
every backend draws (Philox4x32-10, vectorized in uint64 arithmetic).

    out        = input * keep * scale            scale = 1 / (1 - p)
    grad_input = grad_out * keep * scale

The mask is a pure function of (key, p, element): an element (r, c) of a (rows, cols) view has the
Philox counter  q = r * ceil(cols / 4) + c // 4  (64-bit, split into the counter words
(low 32 bits, high 32 bits, 0, 0)) and takes word c % 4 of the four 32-bit words Philox returns
for q under the key (key[0], key[1]), so each Philox call serves four neighbouring elements. A
flat tensor is the view (1, numel): element i has counter i // 4, word i % 4. Rows are padded
to a multiple of 4 so that a row's groups of four never straddle two rows (linear's fused
epilogue draws its (M, N) output's mask this way; when N % 4 == 0 that is exactly the mask of
the flat output). The uniform of a word w is (w >> 8) / 2**24, a float32 in [0, 1) exactly, and
an element is kept when uniform >= p, computed as the integer compare (w >> 8) >= ceil(p * 2**24)
(`threshold`), so no backend depends on a float conversion.

Multiplying by `keep * scale` rather than selecting is torch's rule: a dropped NaN or inf gives
NaN, a dropped negative number gives -0.0.
"""
from __future__ import annotations

import math

import numpy as np

PHILOX_ROUNDS = 10
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57   # the round multipliers
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85   # the key schedule's increments (Weyl sequence)
WORDS = 4                                       # elements served by one Philox call
UNIFORM_BITS = 24
_LOW = np.uint64(0xFFFFFFFF)


def philox4x32(counter: tuple, key: tuple, rounds: int = PHILOX_ROUNDS) -> tuple[np.ndarray, ...]:
    """Philox4x32-`rounds` (Salmon et al., SC'11) of counter words (c0, c1, c2, c3) under the key
    (k0, k1): four uint32 arrays, broadcast over the inputs. Every word is held in uint64 so the
    32 x 32 -> 64-bit products are exact."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & _LOW for c in counter)
    k0, k1 = (np.uint64(int(k) & 0xFFFFFFFF) for k in key)
    m0, m1 = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1)
    shift = np.uint64(32)
    for _ in range(rounds):
        p0, p1 = m0 * c0, m1 * c2
        c0, c1, c2, c3 = (p1 >> shift) ^ c1 ^ k0, p1 & _LOW, (p0 >> shift) ^ c3 ^ k1, p0 & _LOW
        k0 = np.uint64((int(k0) + PHILOX_W0) & 0xFFFFFFFF)
        k1 = np.uint64((int(k1) + PHILOX_W1) & 0xFFFFFFFF)
    return tuple(w.astype(np.uint32) for w in (c0, c1, c2, c3))


def threshold(p: float) -> int:
    """The smallest 24-bit uniform numerator kept: ceil(p * 2**24) (p * 2**24 is exact in float64)."""
    return math.ceil(p * float(1 << UNIFORM_BITS))


def row_groups(cols: int) -> int:
    """Philox counters per row of a (rows, cols) view: ceil(cols / 4)."""
    return -(-cols // WORDS)


def random_words(key: tuple, rows: int, cols: int) -> np.ndarray:
    """The (rows, cols) uint32 word each element draws (see the module docstring)."""
    groups = row_groups(cols)
    q = (np.arange(rows, dtype=np.uint64)[:, None] * np.uint64(groups)
         + np.arange(groups, dtype=np.uint64)[None, :])                     # (rows, groups)
    words = philox4x32((q & _LOW, q >> np.uint64(32), 0, 0), key)
    return np.stack(words, axis=-1).reshape(rows, groups * WORDS)[:, :cols]


def keep_mask(key: tuple, p: float, rows: int, cols: int) -> np.ndarray:
    """(rows, cols) bool: which elements dropout keeps at drop probability 0 < p < 1."""
    return (random_words(key, rows, cols) >> np.uint32(32 - UNIFORM_BITS)) >= threshold(p)


def flat_keep_mask(key: tuple, p: float, shape) -> np.ndarray:
    """keep_mask of a tensor of `shape` in its memory order (the view (1, numel)), reshaped to it."""
    numel = math.prod(shape)
    return keep_mask(key, p, 1, numel).reshape(shape)


def forward(input, keep, p: float):
    """out = input * keep * 1/(1-p) in float64; returns (out, saved) with saved = {keep, scale}."""
    x = np.asarray(input, dtype=np.float64)
    scale = 1.0 / (1.0 - p)
    factor = np.where(np.asarray(keep, dtype=bool), scale, 0.0)
    return x * factor, {"factor": factor}


def backward(grad_out, saved):
    """grad_input = grad_out * keep * 1/(1-p): dropout is linear in its input."""
    return np.asarray(grad_out, dtype=np.float64) * saved["factor"]
