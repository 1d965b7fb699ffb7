"""Raw batches -> token batches: UTF-8 check, JSON parsing and World tokenizing, in worker processes.

Results come back in input order whatever the number of workers, so the output does not depend on it. A bounded
number of batches is in flight (queued to workers, or finished and waiting for their turn), so an input larger than
memory streams through. Workers are spawned (not forked: the main process may run `datasets`/pyarrow threads) and
exit by themselves if the main process dies.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from rwkv7_data_prep.readers import RawBatch, read_file
from rwkv7_train.errors import UserError

_EOD = np.zeros(1, dtype=np.uint16)  # token 0 after each document
# Batches this process may encode ahead of the oldest one still out: enough to cover the workers' start-up
# (about 0.4 s), at the cost of up to about 50 MB of finished tokens waiting in memory.
AHEAD = 64


@dataclass
class Encoded:
    documents: int  # documents kept: non-empty, valid UTF-8
    empty: int = 0
    invalid: list[tuple[str, int]] = field(default_factory=list)  # (where, offset) of each undecodable one
    tokens: np.ndarray | None = None  # the kept documents back to back, each followed by 0; None when only counted
    sizes: np.ndarray | None = None  # tokens per kept document, its 0 included


def _documents(batch: RawBatch, text_key: str, out: Encoded) -> Iterator[bytes]:
    """The batch's non-empty, valid documents as UTF-8 bytes; counts the others in `out`."""
    for j, item in enumerate(batch.items()):
        if batch.kind == "text":
            item = read_file(item)
        elif batch.kind == "jsonl":
            if not item.strip():
                continue  # blank lines separate nothing in jsonl; they are not documents
            try:
                item = _jsonl_text(item, batch.where(j), text_key)
            except UnicodeDecodeError as e:
                out.invalid.append((batch.where(j), e.start))
                continue
        elif item is not None and not isinstance(item, (str, bytes)):
            raise UserError(f"{batch.where(j)}: column {text_key!r} holds {type(item).__name__}, not text; "
                            "set --text-key to the column that holds the text")
        if not item:
            out.empty += 1
            continue
        if isinstance(item, str):
            try:
                item = item.encode("utf-8")
            except UnicodeEncodeError as e:  # lone surrogates, from JSON escapes such as "\\ud800"
                out.invalid.append((batch.where(j), e.start))
                continue
        elif (bad := _utf8_error(item)) is not None:
            out.invalid.append((batch.where(j), bad))
            continue
        yield item


def _utf8_error(data: bytes) -> int | None:
    """Offset of the first byte that is not UTF-8, or None. Arrow's validator checks without building a str:
    about 4x faster than bytes.decode on non-ASCII text, which would otherwise cost a third of the tokenizer's time."""
    if data.isascii():
        return None
    import pyarrow as pa  # here, not at the top: jsonl never needs it, and workers start faster without it

    offsets = pa.py_buffer(np.array([0, len(data)], dtype=np.int64))
    try:
        pa.Array.from_buffers(pa.large_string(), 1, [None, offsets, pa.py_buffer(data)]).validate(full=True)
    except pa.ArrowInvalid:
        try:
            data.decode("utf-8")  # for the offset, which Arrow does not report
        except UnicodeDecodeError as e:
            return e.start
    return None


def _jsonl_text(line: bytes, where: str, text_key: str) -> str | None:
    try:
        record = json.loads(line)  # decodes the bytes as UTF-8 itself (UnicodeDecodeError if they are not)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg}); each line of a jsonl file must be one JSON object"
                        ) from None
    if not isinstance(record, dict) or text_key not in record:
        raise UserError(f"{where}: no field {text_key!r}; set --text-key to the field that holds the text")
    text = record[text_key]
    if text is not None and not isinstance(text, str):
        raise UserError(f"{where}: field {text_key!r} is {type(text).__name__}, not a string; "
                        "set --text-key to the field that holds the text")
    return text


def encode_batch(batch: RawBatch, tokenizer, text_key: str, tokenize: bool = True) -> Encoded:
    """Tokenize the batch's documents (or, when not tokenize, only count them: for skipping on resume)."""
    out = Encoded(documents=0)
    if not tokenize:
        out.documents = sum(1 for _ in _documents(batch, text_key, out))
        return out
    pieces = [tokenizer.encode_to_numpy(doc) for doc in _documents(batch, text_key, out)]
    out.documents = len(pieces)
    out.sizes = np.fromiter((p.size + 1 for p in pieces), dtype=np.int64, count=len(pieces))
    out.tokens = np.concatenate([x for p in pieces for x in (p, _EOD)]) if pieces else _EOD[:0]
    return out


# --- the worker side: one tokenizer per process, set by the pool initializer ---
_worker_tokenizer = None


def _init_worker(tokenizer, parent: int) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    # A killed main process cannot shut the pool down, and its workers would wait on the task queue forever.
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _started() -> None:
    pass


def _encode_in_worker(batch: RawBatch, text_key: str, tokenize: bool) -> Encoded:
    return encode_batch(batch, _worker_tokenizer, text_key, tokenize)


class Encoder:
    """Encodes raw batches in `workers` processes, this one included (workers - 1 are spawned); results in order.

    This process reads and writes, and rather than wait for the oldest batch in flight it encodes the next one
    itself: so it works while the spawned workers start (about half a second: imports, the vocab trie) instead of
    idling, and `workers` = the number of cores keeps every core busy without one process too many.
    """

    def __init__(self, tokenizer, text_key: str, workers: int):
        self.tokenizer, self.text_key, self.workers = tokenizer, text_key, workers
        self._pool = None
        if workers > 1:
            self._pool = ProcessPoolExecutor(workers - 1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker, initargs=(tokenizer, os.getpid()))
            # Nothing is queued to the workers before one has started: this process does the work meanwhile, and a
            # small input is done here before the workers are up. (This first submit spawns them. Starting it in a
            # thread, to skip the quarter second that spawning blocks for, made the runs slower: GIL contention.)
            self._started = self._pool.submit(_started)

    def _here(self, batch: RawBatch, tokenize: bool) -> Future:
        done = Future()
        done.set_result(encode_batch(batch, self.tokenizer, self.text_key, tokenize))
        return done

    def map(self, batches: Iterable[RawBatch], skip_documents: int = 0) -> Iterator[tuple[RawBatch, Encoded]]:
        """(batch, result) in input order. While fewer than skip_documents documents have been seen, batches are
        only counted (tokens None): a resumed run reads past its finished shards without tokenizing them again."""
        batches = iter(batches)
        window = 2 * self.workers + 1  # batches queued to the spawned workers
        pending: deque[tuple[Future, RawBatch, bool]] = deque()  # (result, batch, encoded by a spawned worker)
        counting, seen, spawned = skip_documents > 0, 0, 0

        def submit(batch: RawBatch) -> None:
            nonlocal spawned
            if self._pool is not None and spawned < window:
                pending.append((self._pool.submit(_encode_in_worker, batch, self.text_key, not counting), batch, True))
                spawned += 1
            else:
                pending.append((self._here(batch, not counting), batch, False))

        while True:
            if self._pool is None:
                if (batch := next(batches, None)) is not None:
                    submit(batch)
            else:
                while self._started.done() and spawned < window and (batch := next(batches, None)) is not None:
                    submit(batch)
                if not pending and (batch := next(batches, None)) is not None:  # no worker is up yet
                    pending.append((self._here(batch, not counting), batch, False))
                # Rather than wait for the oldest batch: take it back if no worker has started it, else encode the
                # next one here (bounded: finished results wait in memory).
                while pending and not pending[0][0].done():
                    f, b, _ = pending[0]
                    if f.cancel():
                        pending[0] = (self._here(b, not counting), b, False)
                        spawned -= 1
                    elif len(pending) < window + AHEAD and (batch := next(batches, None)) is not None:
                        pending.append((self._here(batch, not counting), batch, False))
                    else:
                        break
            if not pending:
                return
            future, batch, remote = pending.popleft()
            spawned -= remote
            out = future.result()
            if out.tokens is None and seen + out.documents > skip_documents:
                # This batch holds the first document to write: redo it and those in flight with tokens.
                counting = False
                redo = [batch]
                while pending:
                    f, b, remote = pending.popleft()
                    f.cancel()
                    spawned -= remote
                    redo.append(b)
                for b in redo:
                    submit(b)
                continue
            seen += out.documents
            yield batch, out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "Encoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
