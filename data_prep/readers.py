"""rwkv7-prep's inputs -> raw batches of documents, in input order.

The main process only lists text files and cuts jsonl into chunks of whole lines; the workers in encode.py do the
per-document work (reading text files, UTF-8 check, JSON parsing, tokenizing) in parallel.

  text     each file is one document, read whole as bytes
  jsonl    one JSON object per line, the document in field text_key; read line by line, so any size streams
  parquet  rows through `datasets` (load_dataset("parquet", streaming=True)), column text_key
  dataset  a Hugging Face dataset (hub name or local directory) through `datasets` streaming, column text_key

Text and jsonl are not read through `datasets`: its text builder re-opens files in text mode (rewriting \\r\\n), and
its json builder stops the whole file at the first byte that is not UTF-8 (datasets 5.2), where rwkv7-prep skips
and counts that one document.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISDIR
from typing import TYPE_CHECKING

from rwkv7_train.errors import UserError

if TYPE_CHECKING:
    import pyarrow as pa

FORMATS = ("auto", "text", "jsonl", "parquet")
SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
BATCH_BYTES = 1 << 20  # per raw batch: large enough to amortize inter-process traffic, small enough to balance
BATCH_FILES = 1024
BATCH_ROWS = 512


@dataclass(frozen=True)
class Input:
    """One thing to read: a file in a format (with its size and mtime when resolved), or a `datasets` dataset."""
    format: str  # "text", "jsonl", "parquet" or "dataset"
    path: Path | None = None
    bytes: int = 0
    mtime_ns: int = 0
    dataset: str | None = None
    config: str | None = None
    split: str = "train"

    @property
    def label(self) -> str:
        return str(self.path) if self.path is not None else f"dataset {self.dataset} (split {self.split})"

    def identity(self) -> dict:
        """What the manifest records; a resumed run must see the same (size and mtime stand in for content)."""
        if self.path is None:
            return {"dataset": self.dataset, "config": self.config, "split": self.split}
        return {"path": str(self.path.absolute()), "format": self.format, "bytes": self.bytes,
                "mtime_ns": self.mtime_ns}


@dataclass
class RawBatch:
    """Documents as read. text: payload is a list of file paths (the workers read them, in parallel); jsonl: whole
    lines of `label` as one bytes object (one object pickles much faster than many), from line `first`; column: an
    Arrow array (str or bytes values, or None) of `label` from row `first`, which pickles as its buffers."""
    kind: str
    payload: list | bytes | pa.Array
    input_index: int  # for jsonl and column batches, which never span two inputs
    label: str = ""
    first: int = 0

    def where(self, j: int) -> str:
        if self.kind == "text":
            return self.payload[j]
        unit = "line" if self.kind == "jsonl" else "row"
        return f"{self.label} {unit} {self.first + j}"


def resolve_inputs(paths: list[str], fmt: str, dataset: str | None = None, config: str | None = None,
                   split: str = "train") -> list[Input]:
    """Check the inputs before any work (and before the tokenizer loads): UserError naming a bad one."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if dataset is not None:
        if paths:
            raise UserError("give input files or --dataset, not both")
        return [Input("dataset", dataset=dataset, config=config, split=split)]
    if not paths:
        raise UserError("no inputs given; pass .txt/.jsonl/.parquet files or --dataset NAME")
    inputs = []
    for name in paths:
        path = Path(name)
        try:
            st = path.stat()
        except OSError:
            raise UserError(f"input not found: {path}; pass existing .txt, .jsonl or .parquet files") from None
        if S_ISDIR(st.st_mode):
            raise UserError(f"input {path} is a directory; pass its files (e.g. {path}/*.jsonl), "
                            f"or --dataset {path} for a dataset directory")
        kind = fmt if fmt != "auto" else SUFFIX_FORMATS.get(path.suffix.lower(), "text")
        # An empty text file is one empty document (skipped and counted); an empty container holds nothing at all.
        if kind != "text" and st.st_size == 0:
            raise UserError(f"input {path} is empty; remove it from the inputs")
        inputs.append(Input(kind, path=path, bytes=st.st_size, mtime_ns=st.st_mtime_ns))
    return inputs


def read_batches(inputs: list[Input], text_key: str) -> Iterator[RawBatch]:
    """All documents of the inputs, in order, as raw batches."""
    text: list[str] = []
    size = 0
    for i, inp in enumerate(inputs):
        if inp.format == "text":
            text.append(str(inp.path))
            size += inp.bytes
            if size >= BATCH_BYTES or len(text) >= BATCH_FILES:
                yield RawBatch("text", text, i)
                text, size = [], 0
            continue
        if text:  # keep the input order: flush the text files listed so far
            yield RawBatch("text", text, i - 1)
            text, size = [], 0
        if inp.format == "jsonl":
            yield from _jsonl_batches(inp, i)
        else:
            yield from _column_batches(inp, i, text_key)
    if text:
        yield RawBatch("text", text, len(inputs) - 1)


def read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"cannot read input {path} ({e.strerror}); check that it exists and is readable") from None


def _jsonl_batches(inp: Input, index: int) -> Iterator[RawBatch]:
    try:
        with open(inp.path, "rb") as f:
            line_no = 1
            while chunk := f.read(BATCH_BYTES):
                chunk += f.readline()  # end on a whole line
                yield RawBatch("jsonl", chunk, index, inp.label, line_no)
                line_no += chunk.count(b"\n")
    except OSError as e:
        raise UserError(f"cannot read input {inp.path} ({e.strerror}); check that it exists and is readable") from None


def _column_batches(inp: Input, index: int, text_key: str) -> Iterator[RawBatch]:
    import datasets  # slow to import: only when a parquet file or a dataset is read

    try:
        if inp.format == "parquet":
            ds = datasets.load_dataset("parquet", data_files=[str(inp.path)], split="train", streaming=True)
        else:
            ds = datasets.load_dataset(inp.dataset, inp.config, split=inp.split, streaming=True)
    except Exception as e:  # datasets raises many types (not found, bad split, offline, ...): all mean "cannot open"
        raise UserError(f"cannot open {inp.label} ({type(e).__name__}: {_first_line(e)}); check the name, --config "
                        "and --split (and the network, for a hub dataset)") from None
    if ds.column_names is not None and text_key not in ds.column_names:
        raise UserError(f"{inp.label} has no column {text_key!r} (columns: {', '.join(ds.column_names)}); "
                        "set --text-key to the column that holds the text")
    row = 0
    tables = ds.select_columns([text_key]).with_format("arrow").iter(batch_size=BATCH_ROWS)
    while True:
        try:
            table = next(tables, None)
        except Exception as e:  # a corrupt file or a lost connection surfaces while iterating
            raise UserError(f"cannot read {inp.label} at row {row} ({type(e).__name__}: {_first_line(e)}); "
                            "check the file, or re-download the dataset") from None
        if table is None:
            return
        values = table.column(text_key).combine_chunks()
        yield RawBatch("column", values, index, inp.label, row)
        row += len(values)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0]
