"""Lightning batches from binidx sources: a weighted mixture of magic-prime passes, per-source validation windows,
exact resume.

Training sample g (0, 1, ... over all ranks; RWKV-LM's ii = g + 1) comes from the source that mixture.py's
schedule assigns it; being that source's j-th sample, it reads the source's magic-prime window for ii = j + 1
(sampler.py). With one source, j = g: RWKV-LM's sample order for the same file, ctx_len, micro-batch and world
size. Rank r trains on g = r, r + W, r + 2W, ..., so ranks read disjoint windows and only their own. Which window
a rank reads is a pure function of (its sample count, rank, world size, seed), so resuming only needs the number
of samples consumed, which the DataModule keeps in its state_dict. Batches are batch.Batch; with
sampling="packed" they also carry the document starts (cu_seqlens).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from rwkv7_train.data.batch import Batch, collate
from rwkv7_train.data.mixture import MixtureSchedule
from rwkv7_train.data.sampler import global_sample, magic_prime, n_windows, window_start
from rwkv7_train.data.sources import PathSpec, SourceSpec, TokenStream, open_source, parse_sources, single_source
from rwkv7_train.errors import UserError

SAMPLING_MODES = ("magic_prime", "packed")


def read_window(stream: TokenStream, start: int, ctx_len: int, vocab_size: int) -> np.ndarray:
    """Tokens start .. start+ctx_len (ctx_len + 1 of them) as int64; UserError on ids outside the vocab."""
    w = stream.read(start, ctx_len + 1)
    bad = np.flatnonzero((w >= vocab_size) | (w < 0))
    if bad.size:
        path, offset = stream.where(start + int(bad[0]))
        raise UserError(
            f"{path}: token id {int(w[bad[0]])} at token offset {offset} is outside the model's vocab "
            f"0..{vocab_size - 1}; the data was tokenized for another vocabulary: set model.vocab_size to match it "
            "or re-run rwkv7-prep with the model's tokenizer"
        )
    return w


class TrainWindows(Dataset):
    """One rank's training samples. Item k is the rank's k-th sample since step 0 (global sample k * W + rank);
    an item is (window of ctx_len + 1 tokens, source index). Indices past one mini-epoch are valid: they address
    later mini-epochs."""

    def __init__(self, streams: list[TokenStream], primes: list[int], schedule: MixtureSchedule, ctx_len: int,
                 vocab_size: int, samples_per_epoch: int, rank: int, world_size: int):
        self.streams, self.primes, self.schedule = streams, primes, schedule
        self.ctx_len, self.vocab_size = ctx_len, vocab_size
        self.samples_per_epoch = samples_per_epoch  # this rank's samples in one mini-epoch
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return self.samples_per_epoch

    def locate(self, k: int) -> tuple[int, int]:
        """(source index, first token) of this rank's k-th sample."""
        s, j = self.schedule.locate(global_sample(k, self.rank, self.world_size))
        return s, window_start(j + 1, self.primes[s], self.ctx_len)

    def __getitem__(self, k: int) -> tuple[np.ndarray, int]:
        s, start = self.locate(int(k))
        return read_window(self.streams[s], start, self.ctx_len, self.vocab_size), s


class ValWindows(Dataset):
    """The first n non-overlapping ctx_len windows of a source's held-out data: the same tokens every evaluation."""

    def __init__(self, stream: TokenStream, source: int, ctx_len: int, vocab_size: int, n: int):
        self.stream, self.source, self.ctx_len, self.vocab_size = stream, source, ctx_len, vocab_size
        self.n = min(n, (stream.n_tokens - 1) // ctx_len)  # each window reads ctx_len + 1 tokens

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return read_window(self.stream, i * self.ctx_len, self.ctx_len, self.vocab_size), self.source


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


class RWKVDataModule(L.LightningDataModule):
    """Training and validation batches (batch.Batch) from one binidx file or a weighted mixture of sources.

    train_path / val_path: one source, a prepared directory or binidx prefix (without .bin/.idx) or a list of
    them (val_path None: no validation);
    sources: instead, a mixture: a list of {name, path, weight, val_path (optional)}, path being a prepared
    directory, a binidx prefix or a list of them (see sources.py and configs/data/mixture.yaml);
    sampling: "magic_prime" (RWKV-LM's windows) or "packed" (the same windows, with cu_seqlens at document ends);
    epoch_steps: optimizer steps per mini-epoch, so each rank reads epoch_steps * micro_bsz samples per mini-epoch
    (RWKV-LM's convention); val_windows: how many ctx_len windows from the start of each source's validation data
    to evaluate; seed: seeds the mixture order and the DataLoader workers' RNGs; mixture_block: the mixture's
    weights hold exactly in every block of this many global samples; verify_checksums: hash every shard against its
    manifest at setup (off by default: sizes are always checked, hashing terabytes at every start is not).

    source_names: every source, in the order of Batch.source; val_source_names: the sources with validation data,
    in the order of val_dataloader()'s loaders (Lightning's dataloader_idx).
    """

    def __init__(self, *, train_path: PathSpec | None = None, val_path: PathSpec | None = None,
                 sources: Sequence[Mapping] | None = None, sampling: str = "magic_prime", ctx_len: int,
                 micro_bsz: int, vocab_size: int, epoch_steps: int, val_windows: int = 64, num_workers: int = 0,
                 seed: int = 0, mixture_block: int = 1000, verify_checksums: bool = False):
        super().__init__()
        for key, value, least in (("ctx_len", ctx_len, 1), ("micro_bsz", micro_bsz, 1), ("vocab_size", vocab_size, 1),
                                  ("epoch_steps", epoch_steps, 1), ("val_windows", val_windows, 0),
                                  ("num_workers", num_workers, 0), ("mixture_block", mixture_block, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise UserError(f"data.{key}={value!r} must be an integer >= {least}; fix it in the data config")
        if sampling not in SAMPLING_MODES:
            raise UserError(f"data.sampling={sampling!r} is not a sampling mode; "
                            f"use one of {', '.join(SAMPLING_MODES)}")
        if sources is not None and (train_path is not None or val_path is not None):
            raise UserError("data.sources and data.train_path/val_path both set; give a mixture in data.sources or "
                            "one file in data.train_path, not both")
        if sources is None and train_path is None:
            raise UserError("no training data: set data.train_path (a binidx prefix) or data.sources (a mixture)")
        self.specs: list[SourceSpec] = [single_source(train_path, val_path)] if sources is None \
            else parse_sources(sources)
        self.val_specs = [spec for spec in self.specs if spec.val_path is not None]
        self.source_names = [spec.name for spec in self.specs]
        self.val_source_names = [spec.name for spec in self.val_specs]
        self.sampling = sampling
        self.ctx_len, self.micro_bsz, self.vocab_size = ctx_len, micro_bsz, vocab_size
        self.epoch_steps, self.val_windows = epoch_steps, val_windows
        self.num_workers, self.seed, self.verify_checksums = num_workers, seed, verify_checksums
        self.schedule = MixtureSchedule([spec.weight for spec in self.specs], seed, mixture_block)
        for spec, count in zip(self.specs, self.schedule.counts):
            if count == 0:
                raise UserError(f"{spec.path_key.removesuffix('.path')}.weight={spec.weight} gets no sample in a "
                                f"mixture block of {mixture_block}; raise data.mixture_block or the weight")
        self.train_streams: list[TokenStream] | None = None
        self.magic_primes: list[int] | None = None
        self.val_streams: list[TokenStream] | None = None
        self.samples_consumed = 0  # over all ranks; every rank consumes the same count in lockstep

    # ---- placement ---------------------------------------------------------------------------------------------
    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    # ---- Lightning hooks ---------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Open and check the files (safe to call early, e.g. to read n_train_tokens before building a model)."""
        if self.train_streams is None and stage in (None, "fit"):
            streams = [open_source(spec.path, spec.path_key, self.vocab_size, self.verify_checksums)
                       for spec in self.specs]
            self.magic_primes = [self._magic_prime(stream) for stream in streams]
            self.train_streams = streams
        if self.val_streams is None and stage in (None, "fit", "validate"):
            streams = [open_source(spec.val_path, spec.val_key, self.vocab_size, self.verify_checksums)
                       for spec in self.val_specs]
            for stream, spec in zip(streams, self.val_specs):
                if (stream.n_tokens - 1) // self.ctx_len < 1 and self.val_windows > 0:
                    raise UserError(f"{stream.label}: {stream.n_tokens} tokens is less than one ctx_len "
                                    f"{self.ctx_len} window; use more validation data or set {spec.val_key}=null")
            self.val_streams = streams

    def _magic_prime(self, stream: TokenStream) -> int:
        slots = n_windows(stream.n_tokens, self.ctx_len)
        try:
            return magic_prime(slots)
        except UserError:
            raise UserError(
                f"{stream.label}: {stream.n_tokens} tokens give {max(slots, 0)} windows of ctx_len {self.ctx_len}, "
                "too few for magic-prime sampling (it needs a prime p = 2 mod 3 with 0.9 * windows < p <= windows); "
                "use a larger corpus or a different data.ctx_len"
            ) from None

    @property
    def n_train_tokens(self) -> int:
        self.setup("fit")
        return sum(stream.n_tokens for stream in self.train_streams)

    def train_dataset(self, rank: int = 0, world_size: int = 1) -> TrainWindows:
        self.setup("fit")
        return TrainWindows(self.train_streams, self.magic_primes, self.schedule, self.ctx_len, self.vocab_size,
                            self.epoch_steps * self.micro_bsz, rank, world_size)

    def _collate(self) -> Callable[[list], Batch]:
        return partial(collate, packed=self.sampling == "packed")

    def train_dataloader(self) -> DataLoader:
        rank, world_size = self._rank_and_world()
        dataset = self.train_dataset(rank, world_size)
        sampler = RankSampler(dataset, lambda: self._rank_position(world_size))
        return DataLoader(dataset, batch_size=self.micro_bsz, sampler=sampler, drop_last=True,
                          collate_fn=self._collate(), num_workers=self.num_workers,
                          pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per source with validation data, in val_source_names order ([]: Lightning skips validation)."""
        self.setup("validate")
        indices = [self.source_names.index(name) for name in self.val_source_names]
        return [DataLoader(ValWindows(stream, s, self.ctx_len, self.vocab_size, self.val_windows),
                           batch_size=self.micro_bsz, shuffle=False, drop_last=False, collate_fn=self._collate(),
                           num_workers=self.num_workers, pin_memory=torch.cuda.is_available())
                for stream, s in zip(self.val_streams, indices)]

    def on_before_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        # Called in the main process for the batch about to be trained on (not for prefetched ones), so the
        # count is exact when a checkpoint is written at the end of this step.
        trainer = self.trainer
        if trainer is not None and trainer.training:
            self.samples_consumed += int(batch.idx.shape[0]) * trainer.world_size
        return batch

    def tokens_per_source(self) -> dict[str, int]:
        """Training tokens (ctx_len a sample) each source has given so far, summed over all ranks. Computed from the
        sample count, so it needs no communication between ranks and is exact after a resume."""
        counts = self.schedule.samples_before(self.samples_consumed)
        return {name: n * self.ctx_len for name, n in zip(self.source_names, counts)}

    # ---- exact resume ------------------------------------------------------------------------------------------
    def _rank_position(self, world_size: int) -> int:
        """Samples this rank has consumed; rounded up, so a change of world size never repeats a sample."""
        return -(-self.samples_consumed // world_size)

    def _order(self) -> dict:
        """Everything besides samples_consumed that decides which windows come next. The world size is not in it:
        samples are numbered over all ranks, so the same global batch reads the same windows on any number."""
        return {"ctx_len": self.ctx_len, "seed": self.seed, "mixture_block": self.schedule.block,
                "sources": [[spec.name, spec.weight] for spec in self.specs]}

    def state_dict(self) -> dict:
        return {"samples_consumed": self.samples_consumed, "world_size": self._rank_and_world()[1], **self._order()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.samples_consumed = int(state_dict["samples_consumed"])
        changed = [f"{key} {state_dict[key]} -> {now}" for key, now in self._order().items()
                   if key in state_dict and state_dict[key] != now]
        if changed:
            rank_zero_warn(f"resuming with changed data settings ({'; '.join(changed)}): training continues after "
                           f"{self.samples_consumed} samples, but not in the order of an uninterrupted run")
        world_size = self._rank_and_world()[1]
        skipped = -self.samples_consumed % world_size
        if skipped:
            rank_zero_warn(f"resuming {self.samples_consumed} samples in on {world_size} ranks: {skipped} samples "
                           "are skipped so that every rank starts at the same step of the sample order")
