"""torch's CPU generator (MT19937) for many seeds at once, in int64 tensor arithmetic on any device.

`uniform_float64(seeds, count)[i]` is, bit for bit, what

    torch.rand(count, dtype=torch.float64, generator=torch.Generator().manual_seed(seeds[i]))

gives on the CPU. Keyed dequantization noise is defined by those per-key CPU generators; this lets
a GPU draw it for a whole batch of keys in a few thousand kernel launches instead of a Python loop
over keys, with the same numbers (tests/pipeline/model/test_mersenne.py compares them).

The generator (ATen's mt19937 and CPUGeneratorImpl): manual_seed(s) fills the 624-word state from
the low 32 bits of s (Matsumoto & Nishimura 1998, init_genrand); each 32-bit draw tempers the next
state word, twisting the state every 624 draws (the first draw twists first); a float64 draw takes
two 32-bit draws hi, lo and returns (((hi << 32) | lo) mod 2**53) * 2**-53.

References:
    Matsumoto & Nishimura 1998, "Mersenne Twister: a 623-dimensionally equidistributed uniform
    pseudo-random number generator", ACM TOMACS 8(1).
"""

from __future__ import annotations

import torch
from torch import Tensor

N, M = 624, 397
MATRIX_A, UPPER, LOWER, WORD = 0x9908B0DF, 0x80000000, 0x7FFFFFFF, 0xFFFFFFFF


def seed_states(seeds: Tensor) -> Tensor:
    """int64 seeds [B] -> MT19937 states [B, 624] (each word in int64, below 2**32)."""
    state = torch.empty(len(seeds), N, dtype=torch.int64, device=seeds.device)
    state[:, 0] = seeds & WORD
    for j in range(1, N):
        previous = state[:, j - 1]
        # 1812433253 < 2**31 and previous < 2**32: the product fits in int64 before the mask.
        state[:, j] = (1812433253 * (previous ^ (previous >> 30)) + j) & WORD
    return state


def _twist(upper_from: Tensor, lower_from: Tensor) -> Tensor:
    mixed = (upper_from & UPPER) | (lower_from & LOWER)
    return (mixed >> 1) ^ ((lower_from & 1) * MATRIX_A)


def next_state(state: Tensor) -> Tensor:
    """One twist of every state [B, 624], as ATen's mt19937::next_state, in 4 vector blocks:
    word i takes word i + 397 (mod 624), which for i >= 227 is already the new one."""
    new = torch.empty_like(state)
    k = N - M  # 227
    new[:, :k] = state[:, M:] ^ _twist(state[:, :k], state[:, 1 : k + 1])
    new[:, k : 2 * k] = new[:, :k] ^ _twist(state[:, k : 2 * k], state[:, k + 1 : 2 * k + 1])
    new[:, 2 * k : N - 1] = new[:, k : N - 1 - k] ^ _twist(
        state[:, 2 * k : N - 1], state[:, 2 * k + 1 :]
    )
    new[:, N - 1] = new[:, M - 1] ^ _twist(state[:, N - 1], new[:, 0])
    return new


def _temper(y: Tensor) -> Tensor:
    y = y ^ (y >> 11)
    y = y ^ ((y << 7) & 0x9D2C5680)
    y = y ^ ((y << 15) & 0xEFC60000)
    return y ^ (y >> 18)


def uniform_float64(seeds: Tensor, count: int) -> Tensor:
    """[B, count] float64 in [0, 1) on the seeds' device: per seed, the CPU generator's
    torch.rand(count, dtype=torch.float64) after manual_seed(seed) (see the module docstring)."""
    state, words, drawn = seed_states(seeds), [], 0
    while drawn < 2 * count:
        state = next_state(state)
        words.append(_temper(state))
        drawn += N
    draws = torch.cat(words, dim=1)[:, : 2 * count]  # (B, 2 * count) 32-bit draws
    high, low = draws[:, 0::2], draws[:, 1::2]
    bits = ((high & ((1 << 21) - 1)) << 32) | low  # the low 53 bits of (high << 32) | low
    return bits.to(torch.float64) * 2.0**-53  # exact: bits < 2**53
