"""Corpus -> prepared sources (`rwkv7-prep`): read, tokenize in parallel, write resumable binidx shards.

    readers.py  inputs -> raw batches (text, jsonl; parquet and Hugging Face datasets through `datasets`)
    encode.py   raw batches -> token batches, in worker processes, in input order
    shards.py   token batches -> DIR/shard-NNNNN.bin/.idx + DIR/manifest.json, resumable
    this file   one run: options, the hold-out split, resuming, counting what was skipped

Hold-out (val_every=K): the K-th, 2K-th, 3K-th ... kept document goes to a second source `DIR_val` instead of DIR.
It depends only on the document order, so a resumed run splits the same way.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from rwkv7_data_prep.encode import Encoded, Encoder
from rwkv7_data_prep.readers import Input, read_batches, resolve_inputs
from rwkv7_data_prep.shards import SourceWriter
from rwkv7_train.data.manifest import Manifest
from rwkv7_train.errors import UserError

log = logging.getLogger("rwkv7_data_prep")

DEFAULT_SHARD_TOKENS = 100_000_000
MAX_WARNINGS = 20  # invalid-UTF-8 warnings shown; all are counted in the manifest


def all_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def val_dir(output: str | os.PathLike) -> Path:
    """DIR_val beside DIR."""
    out = Path(output)
    if out.name in ("", ".", ".."):  # nothing to append "_val" to
        out = out.resolve()
    return out.with_name(out.name + "_val")


class HoldOut:
    """Splits the stream of kept documents: document g (from 0) is held out when (g + 1) % every == 0."""

    def __init__(self, every: int | None):
        self.every = every

    def route(self, g0: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """For documents g0 .. g0+n-1: their part (0 = DIR, 1 = DIR_val) and their index within that part."""
        g = np.arange(g0, g0 + n, dtype=np.int64)
        if not self.every:
            return np.zeros(n, dtype=np.int64), g
        held_through = (g + 1) // self.every  # held-out documents among 0..g
        held = (g + 1) % self.every == 0
        return held.astype(np.int64), np.where(held, held_through - 1, g - held_through)

    def first_of(self, part: int, index: int) -> int:
        """The stream position of document `index` of `part` (the inverse of route)."""
        if part == 1:
            return self.every * (index + 1) - 1
        return index + index // (self.every - 1) if self.every else index


def prepare(inputs: list[str], output: str | os.PathLike, *, name: str | None = None, fmt: str = "auto",
            text_key: str = "text", shard_tokens: int = DEFAULT_SHARD_TOKENS, workers: int | None = None,
            val_every: int | None = None, dataset: str | None = None, config: str | None = None,
            split: str = "train", tokenizer=None) -> list[Manifest]:
    """Tokenize the inputs (files, or a `datasets` dataset) into the source `output` (and `output`_val when
    val_every); returns their manifests. Resumes an interrupted run with the same inputs and options."""
    sources = resolve_inputs(inputs, fmt, dataset, config, split)
    if shard_tokens < 1:
        raise UserError(f"--shard-tokens must be at least 1, not {shard_tokens}")
    if val_every is not None and val_every < 2:
        raise UserError(f"--val-every must be at least 2 (every K-th document held out), not {val_every}")
    workers = all_cores() if workers is None else workers
    if workers < 1:
        raise UserError(f"--workers must be at least 1, not {workers}")
    if tokenizer is None:
        from rwkv7_train.tokenizer import WorldTokenizer  # loads the vocab: only once the inputs look right
        tokenizer = WorldTokenizer()

    out = Path(output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file; give a directory for the source (it is created)")
    name = name or out.resolve().name
    identity = [inp.identity() for inp in sources]
    options = {"text_key": text_key, "shard_tokens": shard_tokens, "val_every": val_every}
    skipped = {"empty": 0, "invalid_utf8": 0}
    parts = [(out, name, "train")] + ([(val_dir(out), f"{name}_val", "val")] if val_every else [])
    writers = [SourceWriter.open(d, n, tokenizer, identity, {**options, "part": p}, skipped) for d, n, p in parts]
    if all(w.complete for w in writers):
        for w in writers:
            log.info("%s is complete (%d documents, %d tokens, checksums verified); nothing to do",
                     w.manifest.source_dir, w.manifest.documents, w.manifest.tokens)
        return [w.manifest for w in writers]

    try:
        _run(sources, text_key, tokenizer, workers, HoldOut(val_every), writers, skipped)
    except BaseException:
        for w in writers:
            w.abort()
        raise
    return [w.manifest for w in writers]


def _run(sources: list[Input], text_key: str, tokenizer, workers: int, hold: HoldOut,
         writers: list[SourceWriter], skipped: dict) -> None:
    done = [w.manifest.documents for w in writers]  # documents already in finished shards
    start = min(hold.first_of(p, done[p]) for p, w in enumerate(writers) if not w.complete)
    kept = [0] * len(sources)  # per input, for "this input holds no documents"
    checked = 0  # inputs before this one are fully read
    g = 0  # stream position of the next kept document
    with Encoder(tokenizer, text_key, workers) as encoder:
        for batch, enc in encoder.map(read_batches(sources, text_key), skip_documents=start):
            _count_skipped(enc, skipped)
            kept[batch.input_index] += enc.documents
            checked = _check_read(sources, kept, checked, batch.input_index)
            if enc.tokens is not None:
                _write(enc, g, hold, writers, done)
            g += enc.documents
    _check_read(sources, kept, checked, len(sources))
    if g == 0:
        raise UserError(f"no documents in {', '.join(s.label for s in sources)} ({skipped['empty']} empty, "
                        f"{skipped['invalid_utf8']} not valid UTF-8); check the inputs, --format and --text-key")
    if hold.every and g < hold.every:
        raise UserError(f"--val-every {hold.every} holds out none of the {g} documents; remove "
                        f"{writers[0].manifest.source_dir} and re-run with a smaller --val-every")
    for w in writers:
        if not w.complete:
            w.finish()


def _count_skipped(enc: Encoded, skipped: dict) -> None:
    before = skipped["invalid_utf8"]
    skipped["empty"] += enc.empty
    skipped["invalid_utf8"] += len(enc.invalid)
    for n, (where, offset) in enumerate(enc.invalid, start=before + 1):
        if n <= MAX_WARNINGS:
            log.warning("%s: not valid UTF-8 (at offset %d); document skipped", where, offset)
        if n == MAX_WARNINGS:
            log.warning("further invalid-UTF-8 documents are skipped without a warning; the manifest counts them")


def _check_read(sources: list[Input], kept: list[int], checked: int, reading: int) -> int:
    """UserError for a file or dataset read to its end (before `reading`) that gave no document."""
    for i in range(checked, reading):
        # A text file is one document: an empty one is counted like an empty jsonl line, not an error.
        if sources[i].format != "text" and kept[i] == 0:
            raise UserError(f"{sources[i].label} holds no non-empty, valid UTF-8 document; "
                            "check --format and --text-key, or remove it from the inputs")
    return max(checked, reading)


def _write(enc: Encoded, g0: int, hold: HoldOut, writers: list[SourceWriter], done: list[int]) -> None:
    part, index = hold.route(g0, enc.documents)
    for p, w in enumerate(writers):
        keep = (part == p) & (index >= done[p])  # documents of finished shards were written by an earlier run
        if keep.all():
            w.add(enc.tokens, enc.sizes)
        elif keep.any():
            w.add(enc.tokens[np.repeat(keep, enc.sizes)], enc.sizes[keep])
