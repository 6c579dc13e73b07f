"""SplitMix64 as a counter-based generator: uniform float64 for many seeds at once, any device.

`uniform_float64(seeds, count)[i, j]` is the (j + 1)-th output of SplitMix64 seeded with
seeds[i], its top 53 bits scaled to [0, 1):

    z = seed + (j + 1) * 0x9E3779B97F4A7C15                (mod 2**64; the Weyl sequence)
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9               (mod 2**64)
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB               (mod 2**64)
    z = z ^ (z >> 31)
    u = (z >> 11) * 2**-53                                 (exact: z >> 11 < 2**53)

Each output is a function of (seed, j) alone, so a value does not depend on which other seeds
share the batch, in which order, or on what device it is computed: there is no state to carry.
The integer steps are exact and int -> float64 of a number below 2**53 is exact, so the CPU and
a GPU give the same bits.

One definition in torch int64 arithmetic (`uniform_float64`) runs on any device: multiplication
wraps modulo 2**64, and a logical right shift is the arithmetic one with the sign-filled top bits
masked off. On the CPU `uniform_float64_numpy` computes the same numbers in numpy uint64 (logical
shifts, no masks: the faster of the two there), in cache-sized blocks, on one thread (the work is
bound by writing the float64 result). tests/pipeline/model/test_noise.py checks the two agree bit
for bit and against the definition above.

References:
    Steele, Lea & Flood 2014, "Fast splittable pseudorandom number generators", OOPSLA
    (SplitMix; the Weyl increment 0x9E3779B97F4A7C15 is 2**64 / golden ratio).
    Vigna, splitmix64.c (https://prng.di.unimi.it/splitmix64.c): the output function above, with
    the multipliers of Stafford's "Mix13" variant of the MurmurHash3 finalizer.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

GAMMA, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
SHIFTS = (30, 27, 31)
BLOCK = 1 << 15  # values per block on the CPU: 256 KiB of uint64 per array, inside L2


def _signed(constant: int) -> int:
    """A 64-bit constant as the int64 with the same bits (torch has no uint64 arithmetic)."""
    return constant - (1 << 64) if constant >= 1 << 63 else constant


def _logical_shift(z: Tensor, bits: int) -> Tensor:
    # int64 >> is arithmetic: mask off the copies of the sign bit.
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def uniform_float64(seeds: Tensor, count: int) -> Tensor:
    """int64 seeds [B] (the bits of 64-bit seeds) -> [B, count] float64 in [0, 1) on the seeds'
    device (see the module docstring)."""
    counters = torch.arange(1, count + 1, dtype=torch.int64, device=seeds.device) * _signed(GAMMA)
    z = seeds[:, None] + counters[None, :]  # (B, count), wrapping
    z = (z ^ _logical_shift(z, SHIFTS[0])) * _signed(MIX1)
    z = (z ^ _logical_shift(z, SHIFTS[1])) * _signed(MIX2)
    z = z ^ _logical_shift(z, SHIFTS[2])
    return _logical_shift(z, 11).to(torch.float64) * 2.0**-53


def uniform_float64_numpy(seeds: np.ndarray, count: int) -> np.ndarray:
    """uint64 seeds [B] -> [B, count] float64, the numbers of `uniform_float64`, on the CPU.

    Rows go through in blocks of about BLOCK values with every step in place, so the
    intermediates stay in cache and only the float64 result is written to memory."""
    seeds = np.asarray(seeds, dtype=np.uint64)
    out = np.empty((len(seeds), count), dtype=np.float64)
    counters = np.arange(1, count + 1, dtype=np.uint64) * np.uint64(GAMMA)  # wraps silently
    rows = max(1, BLOCK // max(count, 1))
    z = np.empty((min(rows, len(seeds)), count), dtype=np.uint64)
    shifted = np.empty_like(z)
    for start in range(0, len(seeds), rows):
        block, tmp = z[: len(seeds) - start], shifted[: len(seeds) - start]  # the last is short
        np.add(seeds[start : start + rows, None], counters, out=block)
        for bits, multiplier in zip(SHIFTS[:2], (MIX1, MIX2), strict=True):
            np.right_shift(block, np.uint64(bits), out=tmp)
            block ^= tmp
            block *= np.uint64(multiplier)
        np.right_shift(block, np.uint64(SHIFTS[2]), out=tmp)
        block ^= tmp
        block >>= np.uint64(11)
        np.multiply(block, 2.0**-53, out=out[start : start + rows], casting="unsafe")
    return out
