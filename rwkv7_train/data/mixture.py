"""The mixture schedule: which source each global training sample comes from, as a pure function of the seed and
the sample number.

Global samples are cut into blocks of M. Every block holds each source's share of M, rounded by the
largest-remainder rule on the normalised weights, so the proportions are exact block by block; within a block the
order is shuffled by a permutation derived from (seed, block). A source's samples are numbered in the order they
occur: source s's j-th sample reads that source's own j-th window (its RWKV-LM order), so each source is still
read as one pass with no window twice. Nothing is stored: resuming needs only the number of samples consumed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

_U64 = 2**64


def largest_remainder(weights: Sequence[float], total: int) -> list[int]:
    """Integer shares of `total` proportional to positive `weights` (Hamilton's method): every share gets the
    floor of its quota, the units left over go to the largest remainders, ties to the earlier source."""
    exact = [Fraction(w) for w in weights]  # exact arithmetic: no float rounding decides a share
    quotas = [w * total / sum(exact) for w in exact]
    shares = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - shares[i]), i))
    for i in by_remainder[:total - sum(shares)]:
        shares[i] += 1
    return shares


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on a uint64 array (wrapping arithmetic): a fixed, version-independent hash,
    unlike numpy's Generator streams, which a numpy upgrade may change -- and with them a resumed run's order."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class MixtureSchedule:
    """locate(g) -> (source, j): global sample g (0, 1, ...) is source's j-th sample (0, 1, ...)."""

    def __init__(self, weights: Sequence[float], seed: int, block: int):
        self.block = int(block)
        self.counts = largest_remainder(weights, self.block)  # samples of each source in every block
        self._seed_key = splitmix64(np.array([seed % _U64], dtype=np.uint64))
        self._sorted_labels = np.repeat(np.arange(len(self.counts)), self.counts)
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None

    def layout(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Block b's source of each position, and each position's rank among its source's samples in the block."""
        if self._cached is None or self._cached[0] != b:
            block_key = splitmix64(self._seed_key + np.uint64(b % _U64))
            keys = splitmix64(block_key + np.arange(self.block, dtype=np.uint64))
            labels = self._sorted_labels[np.argsort(keys, kind="stable")]
            rank = np.empty(self.block, dtype=np.int64)
            for s, n in enumerate(self.counts):
                rank[labels == s] = np.arange(n)
            self._cached = (b, labels, rank)
        return self._cached[1], self._cached[2]

    def locate(self, g: int) -> tuple[int, int]:
        b, pos = divmod(int(g), self.block)
        labels, rank = self.layout(b)
        s = int(labels[pos])
        return s, b * self.counts[s] + int(rank[pos])

    def samples_before(self, g: int) -> list[int]:
        """How many of the global samples 0 .. g-1 each source gave."""
        b, pos = divmod(int(g), self.block)
        labels, _ = self.layout(b)
        partial = np.bincount(labels[:pos], minlength=len(self.counts))
        return [b * n + int(k) for n, k in zip(self.counts, partial)]
