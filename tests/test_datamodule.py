"""RWKVDataModule on real binidx files: batches are the file's tokens at RWKV-LM's positions, ranks split the
windows, sources open as plain prefixes, lists and prepared directories (RWKV-LM's files as they are, and our
shards as RWKV-LM reads them), bad data fails with one clear line, and validation windows are fixed.

The helpers here (corpus writers, the recording LightningModule) are shared with test_mixture and test_packing."""

import math
import struct

import lightning as L
import numpy as np
import pytest
import torch

from rwkv7_train.data.batch import Batch
from rwkv7_train.data.binidx import BinidxWriter
from rwkv7_train.data.datamodule import RWKVDataModule
from rwkv7_train.data.manifest import Manifest, ShardInfo, shard_name, write_manifest
from rwkv7_train.errors import UserError

VOCAB = 1000
CTX = 16


def random_docs(n_docs, seed, vocab=VOCAB, lengths=(10, 80)):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, size=int(rng.integers(*lengths))) for _ in range(n_docs)]


def write_corpus(prefix, n_docs=80, vocab=VOCAB, seed=0, lengths=(10, 80)):
    with BinidxWriter(prefix, vocab_size=max(vocab, 65536)) as w:
        for doc in random_docs(n_docs, seed, vocab, lengths):
            w.add_document(doc)
    return str(prefix)


def write_source_dir(directory, shard_docs, vocab_size=VOCAB):
    """A prepared source as rwkv7-prep leaves it: shard-NNNNN.bin/.idx written by BinidxWriter + manifest.json."""
    shards, first = [], 0
    for i, docs in enumerate(shard_docs):
        prefix = directory / shard_name(i)
        with BinidxWriter(prefix, vocab_size=vocab_size) as w:
            for doc in docs:
                w.add_document(doc)
        shards.append(ShardInfo(prefix=shard_name(i), documents=w.n_documents, tokens=w.n_tokens,
                                first_document=first, sha256_bin=w.sha256["bin"], sha256_idx=w.sha256["idx"],
                                bytes_bin=w.bin_path.stat().st_size, bytes_idx=w.idx_path.stat().st_size))
        first += w.n_documents
    write_manifest(Manifest(source_dir=directory, name=directory.name, tokenizer="test-vocab", vocab_size=vocab_size,
                            documents=first, tokens=sum(s.tokens for s in shards), complete=True, shards=shards))
    return str(directory)


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "train")


def file_tokens(*prefixes):
    # Read straight from the .bin files, back to back, independently of the reader under test.
    return np.concatenate([np.fromfile(f"{p}.bin", dtype="<u2").astype(np.int64) for p in prefixes])


def make_dm(train_path=None, **kw):
    args = dict(train_path=train_path, ctx_len=CTX, micro_bsz=4, vocab_size=VOCAB, epoch_steps=3)
    args.update(kw)
    return RWKVDataModule(**args)


def rwkv_lm_magic_prime(n_tokens, ctx_len):
    """RWKV-LM's make_data.py choice: the largest prime p = 2 mod 3 at most n_tokens // ctx_len - 1."""
    p = n_tokens // ctx_len - 1
    while not (p % 3 == 2 and all(p % d for d in range(2, math.isqrt(p) + 1))):
        p -= 1
    return p


def rwkv_lm_start(p, ii, ctx_len):
    factor = int(p * ((math.sqrt(5) - 1) / 2))
    return ((factor * ii ** 3) % p) * ctx_len


def test_training_batches_are_the_file_tokens_at_rwkv_lm_positions(corpus):
    dm = make_dm(corpus)
    dm.setup("fit")
    tokens = file_tokens(corpus)
    assert dm.n_train_tokens == len(tokens)
    assert dm.magic_primes == [rwkv_lm_magic_prime(len(tokens), CTX)]
    batches = list(dm.train_dataloader())
    assert len(batches) == 3
    for b, batch in enumerate(batches):
        assert isinstance(batch, Batch) and batch.cu_seqlens is None
        assert batch.idx.dtype == batch.targets.dtype == batch.source.dtype == torch.long
        assert batch.idx.shape == batch.targets.shape == (4, CTX) and batch.source.tolist() == [0] * 4
        for row in range(4):
            s = rwkv_lm_start(dm.magic_primes[0], ii=1 + b * 4 + row, ctx_len=CTX)
            assert batch.idx[row].tolist() == tokens[s:s + CTX].tolist()
            assert batch.targets[row].tolist() == tokens[s + 1:s + CTX + 1].tolist()


def test_two_ranks_read_disjoint_windows_that_together_are_the_single_rank_stream(corpus):
    dm = make_dm(corpus, epoch_steps=4)
    per_rank = 4 * 4
    assert 2 * per_rank <= dm.train_dataset().primes[0]  # no wrap-around within the epoch
    rank0 = {dm.train_dataset(0, 2).locate(k) for k in range(per_rank)}
    rank1 = {dm.train_dataset(1, 2).locate(k) for k in range(per_rank)}
    assert len(rank0) == len(rank1) == per_rank and rank0.isdisjoint(rank1)
    single = {dm.train_dataset(0, 1).locate(k) for k in range(2 * per_rank)}
    assert rank0 | rank1 == single


def write_official_pair(prefix, docs):
    """.bin/.idx as RWKV-LM's binidx writer lays them out, from struct and numpy only (no project code)."""
    sizes = np.array([len(d) + 1 for d in docs], dtype="<i4")
    pointers = np.concatenate([[0], np.cumsum(sizes[:-1].astype(np.int64) * 2)]).astype("<i8")
    doc_idx = np.arange(len(docs) + 1, dtype="<i8")
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8))
        f.write(struct.pack("<Q", len(sizes)) + struct.pack("<Q", len(doc_idx)))
        f.write(sizes.tobytes() + pointers.tobytes() + doc_idx.tobytes())
    tokens = np.concatenate([np.append(d, 0) for d in docs]).astype("<u2")
    tokens.tofile(f"{prefix}.bin")
    return tokens.astype(np.int64)


def test_an_official_bin_idx_pair_written_independently_loads_as_a_source(tmp_path):
    prefix = str(tmp_path / "official")
    tokens = write_official_pair(prefix, random_docs(60, seed=5))
    dm = make_dm(sources=[{"name": "rwkv_lm", "path": prefix, "weight": 1.0}])
    dm.setup("fit")
    p = rwkv_lm_magic_prime(len(tokens), CTX)
    assert dm.magic_primes == [p]
    batch = next(iter(dm.train_dataloader()))
    for row in range(4):
        s = rwkv_lm_start(p, ii=1 + row, ctx_len=CTX)
        assert batch.idx[row].tolist() == tokens[s:s + CTX].tolist()


class RwkvLmIndexedDataset:
    """MMapIndexedDataset's reads (RWKV-LM, RWKV-v7/train_temp/src/binidx.py), written out here: the index header
    field by field, then sizes / pointers / doc_idx as np.frombuffer views; the .bin as one uint8 memmap."""

    dtypes = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: float, 7: np.double, 8: np.uint16}

    def __init__(self, prefix):
        with open(prefix + ".idx", "rb") as stream:
            assert stream.read(9) == b"MMIDIDX\x00\x00"
            assert struct.unpack("<Q", stream.read(8)) == (1,)
            (code,) = struct.unpack("<B", stream.read(1))
            self.dtype = self.dtypes[code]
            self.length = struct.unpack("<Q", stream.read(8))[0]
            self.doc_count = struct.unpack("<Q", stream.read(8))[0]
            offset = stream.tell()
        buf = memoryview(np.memmap(prefix + ".idx", mode="r", order="C"))
        self.sizes = np.frombuffer(buf, dtype=np.int32, count=self.length, offset=offset)
        self.pointers = np.frombuffer(buf, dtype=np.int64, count=self.length, offset=offset + self.sizes.nbytes)
        self.doc_idx = np.frombuffer(buf, dtype=np.int64, count=self.doc_count,
                                     offset=offset + self.sizes.nbytes + self.pointers.nbytes)
        self.bin_buffer = memoryview(np.memmap(prefix + ".bin", mode="r", order="C"))
        self.data_size = len(self.bin_buffer) // self.dtype().itemsize  # RWKV-LM's MyDataset.data_size

    def get(self, idx, offset=0, length=None):
        ptr, size = self.pointers[idx], self.sizes[idx]
        length = size - offset if length is None else length
        ptr += offset * np.dtype(self.dtype).itemsize
        return np.frombuffer(self.bin_buffer, dtype=self.dtype, count=length, offset=ptr)


def test_our_shards_parse_in_rwkv_lm_reader_and_give_its_samples(tmp_path):
    docs = random_docs(120, seed=9)
    source = write_source_dir(tmp_path / "src", [docs[:70], docs[70:]])
    one = write_source_dir(tmp_path / "one", [docs])
    for i, d in enumerate((docs[:70], docs[70:])):
        r = RwkvLmIndexedDataset(f"{source}/{shard_name(i)}")
        assert r.dtype == np.uint16 and r.length == len(d) and r.doc_idx.tolist() == list(range(len(d) + 1))
        for j, doc in enumerate(d):
            assert r.get(j).tolist() == doc.tolist() + [0]

    # RWKV-LM training from the one-shard source (MyDataset.__getitem__, world size 2) vs our rank-1 batches.
    r = RwkvLmIndexedDataset(f"{one}/{shard_name(0)}")
    p = rwkv_lm_magic_prime(r.data_size, CTX)
    assert 0.9 < p / (r.data_size // CTX) <= 1  # RWKV-LM's own assertion on the prime
    dm = make_dm(sources=[{"name": "one", "path": one, "weight": 1}], sampling="magic_prime")
    rank1 = dm.train_dataset(rank=1, world_size=2)
    assert dm.magic_primes == [p]
    for idx in range(len(rank1)):
        ii = 1 + idx * 2 + 1  # RWKV-LM's ii for rank 1 in epoch 0
        dix = r.get(idx=0, offset=rwkv_lm_start(p, ii, CTX), length=CTX + 1).astype(int)
        window, s = rank1[idx]
        assert s == 0 and window.tolist() == dix.tolist()


def test_a_source_of_several_shards_reads_them_back_to_back(tmp_path):
    prefixes = [write_corpus(tmp_path / f"part{i}", n_docs=30, seed=i) for i in range(3)]
    tokens = file_tokens(*prefixes)
    ends = np.cumsum([len(file_tokens(p)) for p in prefixes])[:-1]
    dm = make_dm(sources=[{"name": "parts", "path": prefixes, "weight": 1}])
    dataset = dm.train_dataset()
    p = dm.magic_primes[0]
    assert p == rwkv_lm_magic_prime(len(tokens), CTX)
    crossing = 0
    for k in range(p):  # one whole pass (items past the mini-epoch address later ones)
        start = rwkv_lm_start(p, k + 1, CTX)
        window, _ = dataset[k]
        assert window.tolist() == tokens[start:start + CTX + 1].tolist()
        crossing += any(start < e < start + CTX + 1 for e in ends)
    assert crossing > 0  # some windows span two files


def test_prepared_directory_and_its_shard_list_give_the_same_stream(tmp_path):
    docs = random_docs(90, seed=3)
    source = write_source_dir(tmp_path / "src", [docs[:40], docs[40:]])
    by_dir = make_dm(sources=[{"name": "a", "path": source, "weight": 1}]).train_dataset()
    listed = [f"{source}/{shard_name(i)}" for i in range(2)]
    by_list = make_dm(sources=[{"name": "a", "path": listed, "weight": 1}]).train_dataset()
    assert all(np.array_equal(by_dir[k][0], by_list[k][0]) for k in range(len(by_dir)))


def test_train_path_may_be_a_list_like_a_mixture_source(tmp_path):
    docs = random_docs(90, seed=3)
    source = write_source_dir(tmp_path / "src", [docs[:40], docs[40:]])
    listed = [f"{source}/{shard_name(i)}" for i in range(2)]
    by_sources = make_dm(sources=[{"name": "a", "path": listed, "weight": 1}]).train_dataset()
    dm = make_dm(train_path=listed)
    by_path = dm.train_dataset()
    assert dm.specs[0].name == shard_name(0)   # named after its first file
    assert all(np.array_equal(by_sources[k][0], by_path[k][0]) for k in range(len(by_sources)))


def test_truncated_shard_fails_at_open_naming_it(tmp_path):
    docs = random_docs(60, seed=1)
    source = write_source_dir(tmp_path / "src", [docs[:30], docs[30:]])
    shard = tmp_path / "src" / f"{shard_name(1)}.bin"
    shard.write_bytes(shard.read_bytes()[:-6])
    with pytest.raises(UserError) as e:
        make_dm(sources=[{"name": "a", "path": source, "weight": 1}]).setup("fit")
    assert "\n" not in str(e.value) and str(shard) in str(e.value) and "truncated" in str(e.value)

    # A plain pair has no manifest: its .bin is checked against its own .idx.
    prefix = write_corpus(tmp_path / "plain")
    with open(f"{prefix}.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(UserError, match=f"{prefix}.bin is 100 bytes .* truncated"):
        make_dm(prefix).setup("fit")


def test_checksum_failure_is_found_when_verify_checksums_is_on(tmp_path):
    source = write_source_dir(tmp_path / "src", [random_docs(60, seed=2)])
    shard = tmp_path / "src" / f"{shard_name(0)}.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 1  # same size, different content
    shard.write_bytes(bytes(data))
    sources = [{"name": "a", "path": source, "weight": 1}]
    make_dm(sources=sources).setup("fit")  # by default only sizes are checked
    with pytest.raises(UserError) as e:
        make_dm(sources=sources, verify_checksums=True).setup("fit")
    assert "\n" not in str(e.value) and str(shard) in str(e.value) and "sha256" in str(e.value)


def test_manifest_for_another_vocab_is_refused_naming_it(tmp_path):
    source = write_source_dir(tmp_path / "src", [random_docs(60, seed=2)], vocab_size=65536)
    with pytest.raises(UserError) as e:
        make_dm(sources=[{"name": "a", "path": source, "weight": 1}], vocab_size=VOCAB).setup("fit")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "src" / "manifest.json") in msg and "vocab_size 65536" in msg


def test_token_beyond_the_model_vocab_names_file_offset_and_fix(tmp_path):
    prefix = tmp_path / "bad"
    with BinidxWriter(prefix) as w:
        w.add_document(np.array([5, 6, 7, 4321] + [8] * 200))
    dm = make_dm(str(prefix), val_path=str(prefix))
    dm.setup("fit")
    with pytest.raises(UserError) as e:
        next(iter(dm.val_dataloader()[0]))
    msg = str(e.value)
    assert "\n" not in msg and f"{prefix}.bin" in msg and "4321" in msg and "offset 3" in msg
    assert "vocab_size" in msg


def test_validation_uses_the_first_non_overlapping_windows(corpus):
    tokens = file_tokens(corpus)
    dm = make_dm(corpus, val_path=corpus, val_windows=6)
    dm.setup("fit")
    (loader,) = dm.val_dataloader()
    idx = torch.cat([b.idx for b in loader])
    targets = torch.cat([b.targets for b in loader])
    assert idx.shape == (6, CTX)
    for i in range(6):
        assert idx[i].tolist() == tokens[i * CTX:(i + 1) * CTX].tolist()
        assert targets[i].tolist() == tokens[i * CTX + 1:(i + 1) * CTX + 1].tolist()


def test_short_validation_data_gives_fewer_windows(corpus, tmp_path):
    short = tmp_path / "short"
    with BinidxWriter(short) as w:
        w.add_document(np.arange(1, 3 * CTX + 5))  # 3*CTX + 5 tokens with the trailing 0: 3 full windows
    dm = make_dm(corpus, val_path=str(short), val_windows=64)
    dm.setup("fit")
    assert sum(b.idx.shape[0] for b in dm.val_dataloader()[0]) == 3


def test_no_val_path_means_no_validation_batches(corpus):
    dm = make_dm(corpus)
    dm.setup("fit")
    assert dm.val_dataloader() == [] and dm.val_source_names == []


def test_missing_train_files_say_how_to_fix(tmp_path):
    dm = make_dm(str(tmp_path / "nope"))
    with pytest.raises(UserError) as e:
        dm.setup("fit")
    prefix = tmp_path / "nope"
    assert str(e.value) == f"data file not found: {prefix}.bin/.idx — run rwkv7-prep or set data.train_path=..."


def test_directory_without_manifest_says_what_it_expects(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="manifest.json not found"):
        make_dm(sources=[{"name": "a", "path": str(tmp_path / "empty"), "weight": 1}]).setup("fit")


def test_corpus_too_small_for_ctx_len_is_a_user_error(tmp_path):
    prefix = write_corpus(tmp_path / "tiny", n_docs=2)
    with pytest.raises(UserError, match="ctx_len 4096"):
        make_dm(prefix, ctx_len=4096).setup("fit")


@pytest.mark.parametrize("kw, names", [
    (dict(train_path="x", sources=[{"name": "a", "path": "x", "weight": 1}]), "data.sources and data.train_path"),
    (dict(), "data.train_path"),
    (dict(sources=[]), "data.sources"),
    (dict(sources=[{"name": "a", "path": "x", "weight": 0}]), "data.sources.0.weight"),
    (dict(sources=[{"name": "a", "path": "x", "weight": "1"}]), "data.sources.0.weight"),
    (dict(sources=[{"name": "a", "path": "x", "weight": 1}, {"name": "a", "path": "y", "weight": 1}]),
     "data.sources.1.name"),
    (dict(sources=[{"name": "a", "path": "x", "weight": 1, "wieght": 2}]), "wieght"),
    (dict(sources=[{"name": "a", "weight": 1}]), "data.sources.0.path"),
    (dict(train_path="x", sampling="shuffle"), "data.sampling"),
    (dict(sources=[{"name": "a", "path": "x", "weight": 1}, {"name": "b", "path": "y", "weight": 1e-4}]),
     "data.mixture_block"),
])
def test_malformed_data_config_names_the_key(kw, names):
    with pytest.raises(UserError) as e:
        make_dm(**kw)
    assert names in str(e.value) and "\n" not in str(e.value)


class RecordBatches(L.LightningModule):
    """A harness, not a model: records the training batches it is given."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[Batch] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(Batch(*(None if t is None else t.clone() for t in batch)))
        return self.w * 0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(dm, steps, tmp_path, ckpt_path=None):
    """Train `steps` steps (in total, counting a resumed checkpoint's); the batches this run trained on, and the
    path of the checkpoint it saved at the end."""
    trainer = L.Trainer(max_steps=steps, max_epochs=-1, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path)
    module = RecordBatches()
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    saved = tmp_path / f"end-{steps}.ckpt"
    trainer.save_checkpoint(saved)
    return module.seen, saved


def test_resuming_on_another_number_of_ranks_repeats_and_skips_no_window(corpus):
    """2 ranks, then 1, then 2 again, each phase resumed from the last one's state_dict with the same global batch
    (4 windows a step): the windows read, counted step by step, are those of one uninterrupted rank."""
    from types import SimpleNamespace

    def read(world, steps, state):
        per_step = [[] for _ in range(steps)]
        for rank in range(world):
            dm = make_dm(corpus, micro_bsz=4 // world, epoch_steps=20)
            dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, training=True)
            if state:
                dm.load_state_dict(state)
            for step, batch in zip(range(steps), dm.train_dataloader()):
                dm.on_before_batch_transfer(batch, 0)
                per_step[step] += [tuple(row) for row in batch.idx.tolist()]
        return per_step, dm.state_dict()

    steps, state = [], None
    for world, n in ((2, 2), (1, 3), (2, 2)):
        got, state = read(world, n, state)
        steps += got
    assert state["samples_consumed"] == 7 * 4
    expected, _ = read(1, 7, None)
    assert [sorted(s) for s in steps] == [sorted(s) for s in expected]
