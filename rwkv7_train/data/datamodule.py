"""Lightning batches from binidx files: magic-prime training windows, fixed validation windows, exact resume.

A training batch is a tuple (idx, targets) of LongTensors [micro_bsz, ctx_len], targets = idx shifted by one token.
Which window a rank reads is a pure function of (its sample count, rank, world_size) -- see sampler.py -- so
resuming only needs the number of samples consumed, which the DataModule keeps in its state_dict.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from rwkv7_train.data.binidx import BinidxReader, bin_path, idx_path
from rwkv7_train.data.sampler import magic_prime, n_windows, sample_number, window_start
from rwkv7_train.errors import UserError


def read_window(reader: BinidxReader, start: int, ctx_len: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens start .. start+ctx_len as (x, y) with y = x shifted by one; UserError on ids outside the vocab."""
    w = np.asarray(reader.tokens[start:start + ctx_len + 1], dtype=np.int64)
    if w.size != ctx_len + 1:
        raise UserError(f"{reader.bin_path}: window at token {start} runs past the end ({reader.n_tokens} tokens); "
                        "the file changed since it was opened, re-open it")
    bad = np.flatnonzero((w >= vocab_size) | (w < 0))
    if bad.size:
        off = int(bad[0])
        raise UserError(
            f"{reader.bin_path}: token id {int(w[off])} at token offset {start + off} is outside the model's vocab "
            f"0..{vocab_size - 1}; the data was tokenized for another vocabulary: set model.vocab_size to match it "
            "or re-run rwkv7-prep with the model's tokenizer"
        )
    t = torch.from_numpy(w)
    return t[:-1], t[1:]


def collate_windows(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    # A tuple, where torch's default collate would give a list.
    xs, ys = zip(*samples)
    return torch.stack(xs), torch.stack(ys)


class TrainWindows(Dataset):
    """One rank's training samples. Item k is the rank's k-th sample since step 0: mini-epoch k // len(self),
    RWKV-LM's idx k % len(self). Indices past one mini-epoch are valid: they address later mini-epochs."""

    def __init__(self, reader: BinidxReader, ctx_len: int, vocab_size: int, magic_prime: int,
                 samples_per_epoch: int, rank: int, world_size: int):
        self.reader, self.ctx_len, self.vocab_size, self.p = reader, ctx_len, vocab_size, magic_prime
        self.samples_per_epoch = samples_per_epoch  # this rank's samples in one mini-epoch
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return self.samples_per_epoch

    def start_of(self, k: int) -> int:
        epoch, idx = divmod(k, self.samples_per_epoch)
        ii = sample_number(epoch, idx, self.rank, self.world_size, self.samples_per_epoch * self.world_size)
        return window_start(ii, self.p, self.ctx_len)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return read_window(self.reader, self.start_of(int(k)), self.ctx_len, self.vocab_size)


class ValWindows(Dataset):
    """The first n non-overlapping ctx_len windows of a file: the same tokens every evaluation."""

    def __init__(self, reader: BinidxReader, ctx_len: int, vocab_size: int, n: int):
        self.reader, self.ctx_len, self.vocab_size = reader, ctx_len, vocab_size
        self.n = min(n, (reader.n_tokens - 1) // ctx_len)  # each window reads ctx_len + 1 tokens

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return read_window(self.reader, i * self.ctx_len, self.ctx_len, self.vocab_size)


class RankSampler(DistributedSampler):
    """Yields one mini-epoch of this rank's sample numbers, starting after the samples it has already trained on.

    The position comes from `consumed()` (asked when each epoch's iteration starts), not from the epoch number:
    Lightning's epoch count after a resume does not always say how far into the data the run had got, the number of
    samples consumed does. Subclassing DistributedSampler tells Lightning the work is already split across ranks,
    so it does not wrap this sampler in another one.
    """

    def __init__(self, dataset: TrainWindows, consumed: Callable[[], int]):
        super().__init__(dataset, num_replicas=dataset.world_size, rank=dataset.rank, shuffle=False)
        self.consumed = consumed

    def __iter__(self):
        start = self.consumed()
        return iter(range(start, start + len(self.dataset)))

    def __len__(self) -> int:
        return len(self.dataset)


def _open(prefix: str, key: str) -> BinidxReader:
    prefix = os.fspath(prefix)
    if not (bin_path(prefix).is_file() and idx_path(prefix).is_file()):
        raise UserError(f"data file not found: {prefix}.bin/.idx — run rwkv7-prep or set {key}=...")
    return BinidxReader(prefix)


class RWKVDataModule(L.LightningDataModule):
    """Training and validation batches from binidx files (see the module docstring).

    train_path / val_path: binidx prefixes without .bin/.idx (val_path None: no validation loader);
    epoch_steps: optimizer steps per mini-epoch, so each rank reads epoch_steps * micro_bsz samples per mini-epoch
    (RWKV-LM's convention); val_windows: how many ctx_len windows from the start of the val file to evaluate;
    seed: seeds the DataLoader workers' RNGs only -- the magic-prime order has no randomness to seed.
    """

    def __init__(self, *, train_path: str, val_path: str | None = None, ctx_len: int, micro_bsz: int,
                 vocab_size: int, epoch_steps: int, val_windows: int = 64, num_workers: int = 0, seed: int = 0):
        super().__init__()
        for key, value, least in (("ctx_len", ctx_len, 1), ("micro_bsz", micro_bsz, 1), ("vocab_size", vocab_size, 1),
                                  ("epoch_steps", epoch_steps, 1), ("val_windows", val_windows, 0),
                                  ("num_workers", num_workers, 0)):
            if not isinstance(value, int) or value < least:
                raise UserError(f"data.{key}={value!r} must be an integer >= {least}; fix it in the data config")
        self.train_path, self.val_path = os.fspath(train_path), (None if val_path is None else os.fspath(val_path))
        self.ctx_len, self.micro_bsz, self.vocab_size = ctx_len, micro_bsz, vocab_size
        self.epoch_steps, self.val_windows = epoch_steps, val_windows
        self.num_workers, self.seed = num_workers, seed
        self.train_reader: BinidxReader | None = None
        self.val_reader: BinidxReader | None = None
        self.magic_prime: int | None = None
        self.samples_consumed = 0  # over all ranks; every rank consumes the same count in lockstep

    # ---- placement ---------------------------------------------------------------------------------------------
    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    # ---- Lightning hooks ---------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Open and validate the files (safe to call early, e.g. to read n_train_tokens before building a model)."""
        if self.train_reader is None and stage in (None, "fit"):
            self.train_reader = _open(self.train_path, "data.train_path")
            slots = n_windows(self.train_reader.n_tokens, self.ctx_len)
            try:
                self.magic_prime = magic_prime(slots)
            except UserError:
                raise UserError(
                    f"{self.train_path}.bin: {self.train_reader.n_tokens} tokens give {max(slots, 0)} windows of "
                    f"ctx_len {self.ctx_len}, too few for magic-prime sampling (it needs a prime p = 2 mod 3 with "
                    f"0.9 * windows < p <= windows); use a larger corpus or a different data.ctx_len"
                ) from None
        if self.val_reader is None and self.val_path is not None and stage in (None, "fit", "validate"):
            self.val_reader = _open(self.val_path, "data.val_path")
            if (self.val_reader.n_tokens - 1) // self.ctx_len < 1 and self.val_windows > 0:
                raise UserError(f"{self.val_path}.bin: {self.val_reader.n_tokens} tokens is less than one ctx_len "
                                f"{self.ctx_len} window; use more validation data or set data.val_path=null")

    @property
    def n_train_tokens(self) -> int:
        self.setup("fit")
        return self.train_reader.n_tokens

    def train_dataset(self, rank: int = 0, world_size: int = 1) -> TrainWindows:
        self.setup("fit")
        return TrainWindows(self.train_reader, self.ctx_len, self.vocab_size, self.magic_prime,
                            self.epoch_steps * self.micro_bsz, rank, world_size)

    def train_dataloader(self) -> DataLoader:
        rank, world_size = self._rank_and_world()
        dataset = self.train_dataset(rank, world_size)
        sampler = RankSampler(dataset, lambda: self._rank_position(world_size))
        return DataLoader(dataset, batch_size=self.micro_bsz, sampler=sampler, drop_last=True,
                          collate_fn=collate_windows, num_workers=self.num_workers,
                          pin_memory=torch.cuda.is_available(),
                          generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader | list:
        if self.val_path is None:
            return []  # Lightning then skips validation
        self.setup("validate")
        dataset = ValWindows(self.val_reader, self.ctx_len, self.vocab_size, self.val_windows)
        return DataLoader(dataset, batch_size=self.micro_bsz, shuffle=False, drop_last=False,
                          collate_fn=collate_windows, num_workers=self.num_workers)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # Called in the main process for the batch about to be trained on (not for prefetched ones), so the
        # count is exact when a checkpoint is written at the end of this step.
        trainer = self.trainer
        if trainer is not None and trainer.training:
            self.samples_consumed += int(batch[0].shape[0]) * trainer.world_size
        return batch

    # ---- exact resume ------------------------------------------------------------------------------------------
    def _rank_position(self, world_size: int) -> int:
        """Samples this rank has consumed; rounded up, so a change of world size never repeats a sample."""
        return -(-self.samples_consumed // world_size)

    def state_dict(self) -> dict:
        return {"samples_consumed": self.samples_consumed, "world_size": self._rank_and_world()[1],
                "ctx_len": self.ctx_len, "train_path": self.train_path}

    def load_state_dict(self, state_dict: dict) -> None:
        self.samples_consumed = int(state_dict["samples_consumed"])
        world_size = self._rank_and_world()[1]
        if state_dict.get("world_size", world_size) != world_size or state_dict.get("ctx_len") != self.ctx_len:
            rank_zero_warn(f"resuming with world_size {world_size} / ctx_len {self.ctx_len} instead of "
                           f"{state_dict.get('world_size')} / {state_dict.get('ctx_len')}: training continues after "
                           f"{self.samples_consumed} samples, but not in the order of an uninterrupted run")
