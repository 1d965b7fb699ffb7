"""The magic-prime sampler: the prime's properties, one pass visits every window once, RWKV-LM's arithmetic."""

import math

import pytest

from rwkv7_train.data.sampler import global_sample, golden_factor, is_prime, magic_prime, n_windows, window_start
from rwkv7_train.errors import UserError


def trial_division_prime(n):
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


def test_is_prime_agrees_with_trial_division():
    assert [n for n in range(5000) if is_prime(n)] == [n for n in range(5000) if trial_division_prime(n)]
    assert is_prime(2**61 - 1) and not is_prime((2**31 - 1) * (2**61 - 1))


@pytest.mark.parametrize("n", [2, 5, 12, 110, 1000, 9662, 123456, 2926222])
def test_magic_prime_is_the_largest_prime_2_mod_3_within_ten_percent(n):
    p = magic_prime(n)
    assert trial_division_prime(p) and p % 3 == 2
    assert 0.9 < p / n <= 1
    assert not any(trial_division_prime(q) and q % 3 == 2 for q in range(p + 1, n + 1))


def test_magic_prime_matches_the_values_rwkv_lm_documents_for_minipile():
    # RWKV-LM's demo scripts: minipile has 1498226207 tokens; ctx 512 -> 2926181, ctx 4096 -> 365759.
    assert magic_prime(n_windows(1498226207, 512)) == 2926181
    assert magic_prime(n_windows(1498226207, 4096)) == 365759


@pytest.mark.parametrize("n", [0, 1, 3, 13, 100])
def test_no_prime_within_ten_percent_is_a_user_error(n):
    with pytest.raises(UserError, match="ctx_len"):
        magic_prime(n)


def test_one_pass_of_p_samples_visits_every_window_exactly_once():
    ctx_len = 7
    p = magic_prime(500)
    starts = [window_start(ii, p, ctx_len) for ii in range(1, p + 1)]
    assert len(set(starts)) == p
    assert set(starts) == {k * ctx_len for k in range(p)}


@pytest.mark.parametrize("p", [11, 2926181, 365759, magic_prime(10**9)])
def test_window_start_equals_rwkv_lm_formula_in_python_ints(p):
    ctx_len = 4096
    factor = int(p * ((math.sqrt(5) - 1) / 2))  # RWKV-LM's float64 golden-ratio factor
    assert golden_factor(p) == factor
    assert factor == (math.isqrt(5 * p * p) - p) // 2  # = floor(p (sqrt5 - 1) / 2), exactly
    for ii in (1, 2, 40320, 5039 * 8 + 8, 123 * 40320 + 40319 + 1):
        assert window_start(ii, p, ctx_len) == ((factor * ii * ii * ii) % p) * ctx_len


@pytest.mark.parametrize("world_size, per_rank", [(1, 40320), (8, 5040), (4, 6)])
def test_global_sample_is_rwkv_lm_ii_minus_one_across_mini_epochs(world_size, per_rank):
    for rank in {0, world_size - 1}:
        for k in (0, 1, per_rank - 1, per_rank, 7 * per_rank + 5):
            epoch, idx = divmod(k, per_rank)
            ii = 1 + epoch * (per_rank * world_size) + idx * world_size + rank  # RWKV-LM's dataset.py
            assert global_sample(k, rank, world_size) == ii - 1


def test_sample_numbers_of_all_ranks_tile_the_epochs_without_gaps_or_repeats():
    world_size, per_rank = 4, 6
    numbers = [global_sample(k, rank, world_size) for k in range(3 * per_rank) for rank in range(world_size)]
    assert sorted(numbers) == list(range(3 * per_rank * world_size))
