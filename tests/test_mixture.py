"""The source mixture: exact per-block shares, a seed-determined order, each source read in its own RWKV-LM order,
ranks splitting the global stream, per-source validation, and an exact resume through a real Lightning Trainer."""

from collections import Counter
from fractions import Fraction

import pytest
import torch

from rwkv7_train.data.mixture import MixtureSchedule, largest_remainder
from test_datamodule import (CTX, file_tokens, fit, make_dm, random_docs, rwkv_lm_start, write_corpus,
                             write_source_dir)


def hamilton(weights, total):
    """Largest remainder, written plainly: floors of the exact quotas, then +1 down the list sorted by remainder."""
    quotas = [Fraction(w) / sum(map(Fraction, weights)) * total for w in weights]
    shares = [q.numerator // q.denominator for q in quotas]
    order = sorted(range(len(weights)), key=lambda i: quotas[i] - shares[i], reverse=True)
    for i in order[:total - sum(shares)]:
        shares[i] += 1
    return shares


@pytest.mark.parametrize("weights, total", [([5, 3, 2], 10), ([0.5, 0.3, 0.2], 1000), ([1, 1, 1], 100),
                                            ([0.4, 0.08, 0.04, 0.13, 0.2, 0.1, 0.05], 997), ([7.5, 1e-3], 64)])
def test_largest_remainder_shares(weights, total):
    shares = largest_remainder(weights, total)
    assert shares == hamilton(weights, total) and sum(shares) == total
    assert all(abs(s - Fraction(w) / sum(map(Fraction, weights)) * total) < 1 for s, w in zip(shares, weights))


def sources_of(schedule, n):
    return [schedule.locate(g)[0] for g in range(n)]


def test_every_block_holds_each_source_share_exactly():
    weights, block = [0.5, 0.3, 0.2], 50
    schedule = MixtureSchedule(weights, seed=1, block=block)
    assert schedule.counts == [25, 15, 10]
    labels = sources_of(schedule, 7 * block)
    for b in range(7):
        assert Counter(labels[b * block:(b + 1) * block]) == {0: 25, 1: 15, 2: 10}


def test_same_seed_gives_the_same_order_another_seed_another():
    weights = [3, 2, 1]
    a = sources_of(MixtureSchedule(weights, seed=7, block=60), 600)
    assert a == sources_of(MixtureSchedule(weights, seed=7, block=60), 600)
    assert a != sources_of(MixtureSchedule(weights, seed=8, block=60), 600)
    assert a[:60] != a[60:120]  # blocks are shuffled independently, not one order repeated


def test_each_source_numbers_its_samples_in_the_order_they_occur():
    schedule = MixtureSchedule([2, 5, 1], seed=3, block=16)
    per_source = {0: [], 1: [], 2: []}
    for g in range(16 * 9):
        s, j = schedule.locate(g)
        per_source[s].append(j)
    for js in per_source.values():
        assert js == list(range(len(js)))


def test_samples_before_counts_what_locate_assigns():
    schedule = MixtureSchedule([2, 5, 1], seed=4, block=16)
    assigned = [schedule.locate(g)[0] for g in range(16 * 5)]
    for g in (0, 1, 15, 16, 17, 40, 79, 80):
        assert schedule.samples_before(g) == [assigned[:g].count(s) for s in range(3)]


@pytest.fixture
def mixture(tmp_path):
    """Three sources: a plain binidx pair, a prepared directory of two shards, a list of two prefixes."""
    web = write_corpus(tmp_path / "web", n_docs=120, seed=1)
    code = write_source_dir(tmp_path / "code", [random_docs(50, seed=2), random_docs(40, seed=3)])
    books = [write_corpus(tmp_path / f"books{i}", n_docs=60, seed=4 + i) for i in range(2)]
    tokens = {"web": file_tokens(web), "code": file_tokens(f"{code}/shard-00000", f"{code}/shard-00001"),
              "books": file_tokens(*books)}
    sources = [{"name": "web", "path": web, "weight": 0.5}, {"name": "code", "path": code, "weight": 0.3},
               {"name": "books", "path": books, "weight": 0.2}]
    return sources, tokens


def test_each_source_is_read_in_its_own_rwkv_lm_order(mixture):
    sources, tokens = mixture
    dm = make_dm(sources=sources, mixture_block=10, epoch_steps=10)
    dm.setup("fit")
    assert dm.source_names == ["web", "code", "books"]
    batches = list(dm.train_dataloader())
    source = torch.cat([b.source for b in batches])
    idx = torch.cat([b.idx for b in batches])
    assert len(source) == 40
    for b in range(4):  # blocks of 10 samples: 5 web, 3 code, 2 books each
        assert Counter(source[b * 10:(b + 1) * 10].tolist()) == {0: 5, 1: 3, 2: 2}
    for s, name in enumerate(dm.source_names):
        rows = idx[source == s]
        for j, row in enumerate(rows):
            start = rwkv_lm_start(dm.magic_primes[s], j + 1, CTX)
            assert row.tolist() == tokens[name][start:start + CTX].tolist()


def test_two_ranks_split_a_pass_of_the_mixture_without_overlap(mixture):
    sources, _ = mixture
    dm = make_dm(sources=sources, mixture_block=10, epoch_steps=10)
    single = [dm.train_dataset(0, 1).locate(k) for k in range(80)]
    rank0 = [dm.train_dataset(0, 2).locate(k) for k in range(40)]
    rank1 = [dm.train_dataset(1, 2).locate(k) for k in range(40)]
    per_source = Counter(s for s, _ in single)
    assert all(per_source[s] <= dm.magic_primes[s] for s in per_source)  # within one pass of every source
    assert len(set(single)) == 80  # no window twice in the pass
    assert set(rank0).isdisjoint(rank1) and set(rank0) | set(rank1) == set(single)
    assert rank0 == single[0::2] and rank1 == single[1::2]


def test_worker_processes_give_the_same_batches(mixture):
    sources, _ = mixture
    inline = list(make_dm(sources=sources, num_workers=0).train_dataloader())
    workers = list(make_dm(sources=sources, num_workers=2).train_dataloader())
    assert len(inline) == len(workers) == 3
    for a, b in zip(inline, workers):
        assert torch.equal(a.idx, b.idx) and torch.equal(a.source, b.source)


def test_validation_has_one_loader_per_source_with_held_out_data(mixture, tmp_path):
    sources, _ = mixture
    held_out = {"web": write_corpus(tmp_path / "web_val", n_docs=5, seed=11),
                "books": write_source_dir(tmp_path / "books_val", [random_docs(6, seed=12)])}
    sources = [dict(s, val_path=held_out.get(s["name"])) for s in sources]
    dm = make_dm(sources=sources, val_windows=5)
    dm.setup("fit")
    assert dm.val_source_names == ["web", "books"]
    loaders = dm.val_dataloader()
    assert len(loaders) == 2
    expected = {"web": file_tokens(held_out["web"]), "books": file_tokens(f"{held_out['books']}/shard-00000")}
    for name, loader in zip(dm.val_source_names, loaders):
        batches = list(loader)
        idx = torch.cat([b.idx for b in batches])
        assert all(b.source.tolist() == [dm.source_names.index(name)] * len(b.source) for b in batches)
        assert idx.shape == (5, CTX)
        for i in range(5):
            assert idx[i].tolist() == expected[name][i * CTX:(i + 1) * CTX].tolist()


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("sampling", ["magic_prime", "packed"])
def test_resumed_run_trains_on_exactly_the_batches_of_an_uninterrupted_run(mixture, tmp_path, sampling):
    # epoch_steps=3, stop after step 4: the resume starts inside the second mini-epoch and the second block.
    sources, _ = mixture
    n = 4
    dm = lambda: make_dm(sources=sources, sampling=sampling, mixture_block=10, seed=5)  # noqa: E731
    full_dm, resumed_dm = dm(), dm()
    full, _ = fit(full_dm, 2 * n, tmp_path / "full")
    first, ckpt = fit(dm(), n, tmp_path / "first")
    assert torch.load(ckpt, weights_only=False)["RWKVDataModule"]["samples_consumed"] == n * 4
    resumed, _ = fit(resumed_dm, 2 * n, tmp_path / "resumed", ckpt_path=ckpt)
    assert len(full) == 2 * n and len(resumed) == n
    for a, b in zip(first + resumed, full):
        assert torch.equal(a.idx, b.idx) and torch.equal(a.targets, b.targets) and torch.equal(a.source, b.source)
        assert (a.cu_seqlens is None) == (b.cu_seqlens is None) == (sampling == "magic_prime")
        if sampling == "packed":
            assert torch.equal(a.cu_seqlens, b.cu_seqlens)
    assert len({tuple(b.source.tolist()) for b in full}) > 1  # the batches really mix sources
    trained = Counter(torch.cat([b.source for b in full]).tolist())
    expected = {name: trained[s] * CTX for s, name in enumerate(full_dm.source_names)}
    assert full_dm.tokens_per_source() == resumed_dm.tokens_per_source() == expected
