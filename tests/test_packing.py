"""Packed sampling: the same windows as magic-prime sampling, plus cu_seqlens marking where each document starts
in the flattened batch (a start after every token 0 and at every row start), for training and validation."""

import numpy as np
import pytest
import torch

from rwkv7_train.data.batch import document_starts
from test_datamodule import CTX, file_tokens, make_dm, rwkv_lm_start, write_corpus


def boundaries_from_tokens(rows):
    """Document starts of [B, T] token rows, position by position: row starts, and right after each 0."""
    B, T = len(rows), len(rows[0])
    starts = []
    for b, row in enumerate(rows):
        for t in range(T):
            if t == 0 or row[t - 1] == 0:
                starts.append(b * T + t)
    return starts + [B * T]


@pytest.fixture
def short_docs(tmp_path):
    # Documents of 1-12 tokens (+ the 0), so most 16-token windows hold several boundaries.
    return write_corpus(tmp_path / "short", n_docs=400, seed=21, lengths=(0, 12))


def test_cu_seqlens_are_the_document_starts_of_the_file_tokens(short_docs):
    tokens = file_tokens(short_docs)
    dm = make_dm(short_docs, sampling="packed")
    dm.setup("fit")
    p = dm.magic_primes[0]
    for b, batch in enumerate(dm.train_dataloader()):
        rows = []
        for row in range(4):
            s = rwkv_lm_start(p, 1 + b * 4 + row, CTX)
            rows.append(tokens[s:s + CTX].tolist())  # the window's inputs, read from the file
        assert batch.idx.tolist() == rows
        assert batch.cu_seqlens.dtype == torch.long and batch.cu_seqlens.dim() == 1
        assert batch.cu_seqlens.tolist() == boundaries_from_tokens(rows)
        assert len(batch.cu_seqlens) > 4 + 1  # more than the row starts: documents were found


def test_packed_batches_are_the_magic_prime_windows(short_docs):
    plain = list(make_dm(short_docs, sampling="magic_prime").train_dataloader())
    packed = list(make_dm(short_docs, sampling="packed").train_dataloader())
    for a, b in zip(plain, packed, strict=True):
        assert torch.equal(a.idx, b.idx) and torch.equal(a.targets, b.targets) and torch.equal(a.source, b.source)
        assert a.cu_seqlens is None


def test_every_packed_segment_is_one_document_cut_only_by_row_ends(short_docs):
    batch = next(iter(make_dm(short_docs, sampling="packed").train_dataloader()))
    flat, cu = batch.idx.reshape(-1), batch.cu_seqlens.tolist()
    assert cu[0] == 0 and cu[-1] == flat.numel() and all(a < b for a, b in zip(cu, cu[1:]))
    assert set(range(0, flat.numel() + 1, CTX)) <= set(cu)
    for start, end in zip(cu, cu[1:]):
        segment = flat[start:end].tolist()
        assert 0 not in segment[:-1]  # a 0 is only ever the last token of its segment
        assert segment[-1] == 0 or end % CTX == 0  # a segment ends its document or its row


@pytest.mark.parametrize("seed", range(5))
def test_document_starts_on_rows_with_zeros_anywhere(seed):
    rng = np.random.default_rng(seed)
    rows = rng.choice([0, 0, 5, 7, 9], size=(3, 11))  # zeros first and last in a row, runs of zeros
    rows[0, 0], rows[1, -1], rows[2, 3:6] = 0, 0, 0
    assert document_starts(torch.from_numpy(rows)).tolist() == boundaries_from_tokens(rows.tolist())
    assert document_starts(torch.ones(2, 5, dtype=torch.long)).tolist() == [0, 5, 10]


def test_packed_validation_batches_carry_cu_seqlens_too(short_docs, tmp_path):
    val = write_corpus(tmp_path / "val", n_docs=40, seed=8)
    dm = make_dm(short_docs, val_path=val, sampling="packed", val_windows=6)
    dm.setup("fit")
    (loader,) = dm.val_dataloader()
    for batch in loader:
        assert batch.cu_seqlens.tolist() == boundaries_from_tokens(batch.idx.tolist())
