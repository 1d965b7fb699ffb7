"""RWKV-LM's "magic prime" sampling: a pseudo-random pass over a token file with no shuffle state.

The file is cut into windows of ctx_len tokens; window k starts at token k * ctx_len. Pick p, the largest prime
with p = 2 (mod 3) and p <= n_windows = n_tokens // ctx_len - 1 (as RWKV-LM's make_data.py), and require
0.9 < p / n_windows <= 1 (RWKV-LM's dataset asserts the same bound against n_tokens // ctx_len).
Sample number ii (ii = 1, 2, ...) reads ctx_len + 1 tokens from

    start(ii) = ((floor(p * (sqrt(5) - 1) / 2) * ii**3) mod p) * ctx_len

Because p = 2 (mod 3), cubing is a bijection mod p, and the golden-ratio factor is nonzero mod p, so any p
consecutive values of ii visit every window 0..p-1 exactly once, in an order no one has to store.

RWKV-LM (RWKV-v7/train_temp/src/dataset.py) numbers samples per rank as

    ii = 1 + epoch * samples_per_epoch + idx * world_size + rank

with idx this rank's position in the mini-epoch (0 .. epoch_steps * micro_bsz - 1) and samples_per_epoch =
epoch_steps * micro_bsz * world_size (it insists on 40320). Counting a rank's samples k = epoch * (epoch_steps *
micro_bsz) + idx across mini-epochs, that is ii = 1 + k * world_size + rank: global_sample gives ii - 1. RWKV-LM
computes the factor in float64 as int(p * ((sqrt(5) - 1) / 2)) and ii**3 in Python integers; golden_factor and
window_start do the same, so a run with the same file, ctx_len, micro-batch and world size sees RWKV-LM's samples
in RWKV-LM's order.
"""

from __future__ import annotations

import math

from rwkv7_train.errors import UserError

# Evaluated exactly as RWKV-LM writes it: the float rounding of p * GOLDEN must match to reproduce its order.
GOLDEN = (math.sqrt(5) - 1) / 2

# Deterministic Miller-Rabin: these bases decide primality exactly for every n < 3.3e24.
_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    for q in _MR_BASES:
        if n % q == 0:
            return n == q
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def n_windows(n_tokens: int, ctx_len: int) -> int:
    """Window slots for the magic prime: n_tokens // ctx_len - 1, so the last window's ctx_len + 1 tokens fit."""
    return n_tokens // ctx_len - 1


def magic_prime(n_windows: int) -> int:
    """Largest prime p with p % 3 == 2 and p <= n_windows; UserError unless 0.9 < p / n_windows <= 1."""
    n = int(n_windows)
    if n < 2:
        raise UserError(f"{n} windows is too few for magic-prime sampling (need at least 2); "
                        "use more data or a smaller ctx_len")
    p = n - (n - 2) % 3  # largest value <= n that is 2 mod 3
    while 10 * p > 9 * n:  # integer form of p / n > 0.9
        if is_prime(p):
            return p
        p -= 3
    raise UserError(f"no magic prime for {n} windows: need a prime p = 2 (mod 3) with 0.9*{n} < p <= {n}; "
                    "use more data or a different ctx_len")


def golden_factor(p: int) -> int:
    """floor(p * (sqrt(5) - 1) / 2), computed in float64 exactly as RWKV-LM does."""
    return int(p * GOLDEN)


def global_sample(k: int, rank: int, world_size: int) -> int:
    """The 0-based number over all ranks of `rank`'s k-th sample (k counted across mini-epochs): RWKV-LM's ii - 1."""
    return k * world_size + rank


def window_start(ii: int, p: int, ctx_len: int) -> int:
    """First token of sample ii: ((golden_factor(p) * ii**3) mod p) * ctx_len, in exact integers."""
    # pow(ii, 3, p) equals ii**3 mod p exactly; it just avoids building the huge cube.
    return (golden_factor(p) * pow(ii, 3, p)) % p * ctx_len
