"""Raw batches -> token batches: UTF-8 check, JSON parsing and World tokenizing, in worker processes.

A batch's kept documents go to the tokenizer as one buffer with their byte offsets (Arrow's layout of a string
column), in one call of `WorldTokenizer.encode_documents`: on the common path no Python object is made per document.
jsonl blocks go to a C scanner (_jsonl.c) when every line is a flat object of strings, the usual case; else to
Arrow's JSON reader (C++) wherever it is sure to agree with parsing line by line with `json.loads`, and line by line
otherwise, which also names the file and line of a bad one (see _jsonl_documents).

Results come back in input order whatever the number of workers, so the output does not depend on it. A bounded
number of batches is in flight (queued to workers, or finished and waiting for their turn), so an input larger than
memory streams through. Workers are spawned (not forked: the main process may run `datasets`/pyarrow threads) and
exit by themselves if the main process dies.
"""

from __future__ import annotations

import codecs
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
import pyarrow as pa
import pyarrow.json as pa_json

from rwkv7_data_prep import _jsonl
from rwkv7_data_prep.readers import RawBatch, read_file
from rwkv7_train.errors import UserError

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


def encode_batch(batch: RawBatch, tokenizer, text_key: str, tokenize: bool = True) -> Encoded:
    """Tokenize the batch's documents (or, when not tokenize, only count them: for skipping on resume)."""
    out = Encoded(documents=0)
    if batch.kind == "text":
        data, offsets = _drop_invalid(*_pack([read_file(path) for path in batch.payload]), batch, out)
    elif batch.kind == "jsonl":
        data, offsets = _jsonl_documents(batch, text_key, out)
    else:
        data, offsets = _drop_invalid(*_column_buffers(batch, text_key), batch, out)
    kept = np.unique(offsets)  # offsets are sorted: dropping repeats drops the empty documents
    out.empty += offsets.size - kept.size
    out.documents = kept.size - 1
    if tokenize:
        out.tokens, out.sizes = tokenizer.encode_documents(data, kept)
    return out


def _pack(documents: list) -> tuple[bytes, np.ndarray]:
    """Bytes-like documents -> one buffer and their n + 1 offsets."""
    return b"".join(documents), np.cumsum([0] + [len(d) for d in documents], dtype=np.int64)


def _arrow_buffers(array: pa.Array) -> tuple[pa.Buffer, np.ndarray]:
    """A string or binary Arrow array without nulls -> its data buffer and its int64 offsets into that buffer."""
    array = array.cast(pa.large_binary())
    _, offsets, data = array.buffers()
    return data, np.frombuffer(offsets, dtype=np.int64)[array.offset:array.offset + len(array) + 1]


def _utf8_valid(data, offsets: np.ndarray) -> bool:
    """Whether every document data[offsets[i]:offsets[i+1]] is UTF-8. Arrow's validator checks without building
    a str: about 4x faster than bytes.decode on non-ASCII text, which would otherwise cost a third of the
    tokenizer's time."""
    buffers = [None, pa.py_buffer(offsets), pa.py_buffer(data)]
    array = pa.Array.from_buffers(pa.large_string(), offsets.size - 1, buffers)
    try:
        array.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _drop_invalid(data, offsets: np.ndarray, batch: RawBatch, out: Encoded) -> tuple[bytes, np.ndarray]:
    """The documents without those that are not UTF-8, which are recorded in `out` with where they went wrong."""
    if _utf8_valid(data, offsets):
        return data, offsets
    view, valid = memoryview(data), []
    for j in range(offsets.size - 1):
        document = view[offsets[j]:offsets[j + 1]]
        try:
            str(document, "utf-8")  # for the offset, which Arrow does not report
        except UnicodeDecodeError as e:
            out.invalid.append((batch.where(j), e.start))
        else:
            valid.append(document)
    return _pack(valid)


_TEXT_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view, pa.types.is_binary,
               pa.types.is_large_binary, pa.types.is_binary_view)


def _column_buffers(batch: RawBatch, text_key: str) -> tuple[pa.Buffer, np.ndarray]:
    """A parquet or dataset column of str or bytes values -> its buffers, a null (None) being an empty document."""
    column = batch.payload
    value_type = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
    if column.null_count == len(column):
        column = pa.nulls(len(column), pa.large_binary())
    elif not any(is_text(value_type) for is_text in _TEXT_TYPES):
        j = column.is_valid().index(True).as_py()  # the first value that is not None
        raise UserError(f"{batch.where(j)}: column {text_key!r} holds {type(column[j].as_py()).__name__}, not text; "
                        "set --text-key to the column that holds the text")
    # One layout whatever the column's (str or bytes, 32- or 64-bit offsets, dictionary), so one filler for None.
    return _arrow_buffers(column.cast(pa.large_binary()).fill_null(b""))


def _jsonl_documents(batch: RawBatch, text_key: str, out: Encoded) -> tuple[bytes | pa.Buffer, np.ndarray]:
    """A jsonl block's text values and their offsets, by the fastest of three parsers that is sure to agree with
    json.loads line by line: the C scanner for lines that are flat objects of strings, Arrow's JSON reader, or
    json.loads itself (which also counts and names the bad lines)."""
    fast = _jsonl.texts(batch.payload, text_key)
    if fast is not None:
        return fast[0], np.frombuffer(fast[1], dtype=np.int64)
    column = _jsonl_column(batch.payload, text_key)
    return _pack(_jsonl_lines(batch, text_key, out)) if column is None else _arrow_buffers(column)


def _jsonl_column(block: bytes, text_key: str) -> pa.Array | None:
    """The text_key values of a block of jsonl lines, parsed by Arrow's JSON reader; None where that could differ
    from parsing line by line with json.loads, and the block must take that path.

    Checked against json.loads (pyarrow 26): Arrow fails on what json.loads rejects, except that it does not check
    UTF-8 (json.loads raises on any field's bad bytes, decoding the whole line), it splits lines also at a lone CR and
    reads several objects on one line as several rows, and it skips a byte-order mark only at the start of the
    block (json.loads at the start of every line). It also reads a missing text_key as null, like an explicit null,
    which json.loads tells apart. So: the block must be UTF-8 and not start with a mark, Arrow must give exactly one
    row per non-blank line (each such line gives at least one, so equal counts mean one each), and no nulls.
    """
    if block.startswith(codecs.BOM_UTF8) or not _utf8_valid(block, np.array([0, len(block)], dtype=np.int64)):
        return None
    try:
        table = pa_json.read_json(pa.BufferReader(block), read_options=_JSON_READ, parse_options=_json_parse(text_key))
    except pa.ArrowInvalid:  # not JSON, not an object, text_key not a string, or it appears twice: see the lines
        return None
    column = table.column(text_key)
    if column.null_count or table.num_rows != sum(1 for line in block.split(b"\n") if line.strip()):
        return None
    return column.combine_chunks()


# One thread: the worker processes are the parallelism. Blocks hold 1-2 MB (readers.BATCH_BYTES plus a line), so
# 16 MB keeps each in one chunk.
_JSON_READ = pa_json.ReadOptions(use_threads=False, block_size=16 << 20)


def _json_parse(text_key: str) -> pa_json.ParseOptions:
    return pa_json.ParseOptions(explicit_schema=pa.schema([(text_key, pa.string())]),
                                unexpected_field_behavior="ignore")


def _jsonl_lines(batch: RawBatch, text_key: str, out: Encoded) -> list[bytes]:
    """The block's non-empty, valid documents, each line parsed by json.loads; counts the others in `out`."""
    documents = []
    for j, line in enumerate(batch.payload.split(b"\n")):
        if not line.strip():
            continue  # blank lines separate nothing in jsonl; they are not documents
        try:
            text = _jsonl_text(line, batch.where(j), text_key)
        except UnicodeDecodeError as e:
            out.invalid.append((batch.where(j), e.start))
            continue
        if not text:
            out.empty += 1
            continue
        try:
            documents.append(text.encode("utf-8"))
        except UnicodeEncodeError as e:  # lone surrogates, from JSON escapes such as "\\ud800"
            out.invalid.append((batch.where(j), e.start))
    return documents


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
        if self._pool is None:
            return
        if not self._started.done():
            # The input ended before any worker was up (a small input): it has no task, and waiting for it to finish
            # starting only to exit would add its start-up (about half a second) to the run.
            for process in self._pool._processes.values():  # the executor has no public way to stop its processes
                process.terminate()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "Encoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
