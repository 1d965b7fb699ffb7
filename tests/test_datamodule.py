"""RWKVDataModule on real binidx files: batches are the file's tokens at RWKV-LM's positions, ranks split the
windows, bad data fails with one clear line, validation windows are fixed, and a resumed run continues exactly."""

import math

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from rwkv7_train.data.binidx import BinidxWriter
from rwkv7_train.data.datamodule import RWKVDataModule
from rwkv7_train.errors import UserError

VOCAB = 1000
CTX = 16


def write_corpus(prefix, n_docs=80, vocab=VOCAB, seed=0):
    rng = np.random.default_rng(seed)
    with BinidxWriter(prefix, vocab_size=max(vocab, 65536)) as w:
        for _ in range(n_docs):
            w.add_document(rng.integers(1, vocab, size=int(rng.integers(10, 80))))
    return prefix


@pytest.fixture
def corpus(tmp_path):
    return str(write_corpus(tmp_path / "train"))


def file_tokens(prefix):
    # Read straight from the .bin, independently of the reader under test.
    return np.fromfile(f"{prefix}.bin", dtype="<u2").astype(np.int64)


def make_dm(train_path, **kw):
    args = dict(train_path=train_path, val_path=None, ctx_len=CTX, micro_bsz=4, vocab_size=VOCAB, epoch_steps=3)
    args.update(kw)
    return RWKVDataModule(**args)


def rwkv_lm_start(p, ii, ctx_len):
    factor = int(p * ((math.sqrt(5) - 1) / 2))
    return ((factor * ii ** 3) % p) * ctx_len


def test_training_batches_are_the_file_tokens_at_rwkv_lm_positions(corpus):
    dm = make_dm(corpus)
    dm.setup("fit")
    tokens = file_tokens(corpus)
    assert dm.n_train_tokens == len(tokens)
    batches = list(dm.train_dataloader())
    assert len(batches) == 3
    for b, (idx, targets) in enumerate(batches):
        assert idx.dtype == targets.dtype == torch.long and idx.shape == targets.shape == (4, CTX)
        for row in range(4):
            s = rwkv_lm_start(dm.magic_prime, ii=1 + b * 4 + row, ctx_len=CTX)
            assert idx[row].tolist() == tokens[s:s + CTX].tolist()
            assert targets[row].tolist() == tokens[s + 1:s + CTX + 1].tolist()
    assert isinstance(batches[0], tuple)


def test_two_ranks_read_disjoint_windows_that_together_are_the_single_rank_stream(corpus):
    dm = make_dm(corpus, epoch_steps=4)
    per_rank = 4 * 4
    assert 2 * per_rank <= dm.train_dataset().p  # no wrap-around within the epoch
    rank0 = {dm.train_dataset(0, 2).start_of(k) for k in range(per_rank)}
    rank1 = {dm.train_dataset(1, 2).start_of(k) for k in range(per_rank)}
    assert len(rank0) == len(rank1) == per_rank and rank0.isdisjoint(rank1)
    single = {dm.train_dataset(0, 1).start_of(k) for k in range(2 * per_rank)}
    assert rank0 | rank1 == single


def test_token_beyond_the_model_vocab_names_file_offset_and_fix(tmp_path):
    prefix = tmp_path / "bad"
    with BinidxWriter(prefix) as w:
        w.add_document(np.array([5, 6, 7, 4321] + [8] * 200))
    dm = make_dm(str(prefix), val_path=str(prefix))
    dm.setup("fit")
    with pytest.raises(UserError) as e:
        next(iter(dm.val_dataloader()))
    msg = str(e.value)
    assert "\n" not in msg and f"{prefix}.bin" in msg and "4321" in msg and "offset 3" in msg
    assert "vocab_size" in msg


def test_validation_uses_the_first_non_overlapping_windows(corpus, tmp_path):
    tokens = file_tokens(corpus)
    dm = make_dm(corpus, val_path=corpus, val_windows=6)
    dm.setup("fit")
    idx = torch.cat([b[0] for b in dm.val_dataloader()])
    targets = torch.cat([b[1] for b in dm.val_dataloader()])
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
    assert sum(b[0].shape[0] for b in dm.val_dataloader()) == 3


def test_no_val_path_means_no_validation_batches(corpus):
    dm = make_dm(corpus)
    dm.setup("fit")
    assert len(dm.val_dataloader()) == 0


def test_missing_train_files_say_how_to_fix(tmp_path):
    dm = make_dm(str(tmp_path / "nope"))
    with pytest.raises(UserError) as e:
        dm.setup("fit")
    prefix = tmp_path / "nope"
    assert str(e.value) == f"data file not found: {prefix}.bin/.idx — run rwkv7-prep or set data.train_path=..."


def test_corpus_too_small_for_ctx_len_is_a_user_error(tmp_path):
    prefix = write_corpus(tmp_path / "tiny", n_docs=2)
    with pytest.raises(UserError, match="ctx_len 4096"):
        make_dm(str(prefix), ctx_len=4096).setup("fit")


class RecordBatches(L.LightningModule):
    """A harness, not a model: records the training batches it is given."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch[0].clone())
        return self.w * 0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(dm, steps, tmp_path, ckpt_path=None, callbacks=()):
    trainer = L.Trainer(max_steps=steps, max_epochs=-1, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=list(callbacks), default_root_dir=tmp_path)
    module = RecordBatches()
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return torch.cat(module.seen)


@pytest.mark.filterwarnings("ignore")
def test_resume_mid_epoch_continues_the_exact_sample_stream(corpus, tmp_path):
    # epoch_steps=3, checkpoint after step 4: the resume starts inside the second mini-epoch.
    ckpt_dir = tmp_path / "ckpt"
    full = fit(make_dm(corpus), 8, tmp_path,
               callbacks=[ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=4, save_top_k=-1)])
    ckpt = sorted(ckpt_dir.glob("*step=4*"))[0]
    assert torch.load(ckpt, weights_only=False)["RWKVDataModule"]["samples_consumed"] == 4 * 4
    resumed = fit(make_dm(corpus), 8, tmp_path, ckpt_path=ckpt)
    assert resumed.shape == (4 * 4, CTX)
    assert torch.equal(resumed, full[4 * 4:])
