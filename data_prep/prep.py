"""Corpus files -> one tokenized binidx pair plus a JSON manifest (`rwkv7-prep`).

Three steps with plain boundaries, so a parallel `datasets`-based reader can replace the first later:
  iter_documents   files -> document strings (text: one per file; jsonl: one per line, field text_key)
  write_corpus     strings -> World token ids -> <prefix>.bin/.idx (each document followed by token 0)
  write_manifest   <prefix>.json: counts, sha256 of both files, tokenizer identity
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rwkv7_train.atomic import atomic_write
from rwkv7_train.data.binidx import BinidxWriter, bin_path, idx_path
from rwkv7_train.errors import UserError

log = logging.getLogger("rwkv7_data_prep")

FORMATS = ("auto", "text", "jsonl")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
MANIFEST_FORMAT = "rwkv7-binidx-manifest"


@dataclass
class Counts:
    """What happened to the input, for the manifest and the summary line."""
    documents: int = 0
    skipped_empty: int = 0
    skipped_invalid_utf8: int = 0
    per_file: list[dict] = field(default_factory=list)


def manifest_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.json")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def resolve_format(path: Path, fmt: str) -> str:
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt != "auto":
        return fmt
    return "jsonl" if path.suffix.lower() in JSONL_SUFFIXES else "text"


def _jsonl_documents(path: Path, text_key: str, counts: Counts) -> Iterator[str]:
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                counts.skipped_invalid_utf8 += 1
                log.warning("%s line %d: not valid UTF-8 (byte %d); line skipped", path, line_no, e.start)
                continue
            if not line.strip():
                continue  # blank lines separate nothing in jsonl; they are not documents
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {line_no}: not valid JSON ({e.msg}); "
                                "each line of a jsonl file must be one JSON object") from None
            if not isinstance(record, dict) or text_key not in record:
                raise UserError(f"{path} line {line_no}: no field {text_key!r}; "
                                "set --text-key to the field that holds the text")
            text = record[text_key]
            if not isinstance(text, str):
                raise UserError(f"{path} line {line_no}: field {text_key!r} is {type(text).__name__}, not a string; "
                                "set --text-key to the field that holds the text")
            yield text


def _text_document(path: Path, counts: Counts) -> Iterator[str]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        counts.skipped_invalid_utf8 += 1
        log.warning("%s: not valid UTF-8 (byte %d); file skipped", path, e.start)
        return
    yield text


def iter_documents(inputs: Iterable[str | os.PathLike], fmt: str, text_key: str, counts: Counts) -> Iterator[str]:
    """Non-empty documents of the inputs in order; empty ones and invalid UTF-8 are counted in `counts`."""
    for name in inputs:
        path = Path(name)
        kind = resolve_format(path, fmt)
        before = (counts.documents, counts.skipped_empty, counts.skipped_invalid_utf8)
        docs = _jsonl_documents(path, text_key, counts) if kind == "jsonl" else _text_document(path, counts)
        for text in docs:
            if not text:
                counts.skipped_empty += 1
                continue
            counts.documents += 1
            yield text
        after = (counts.documents, counts.skipped_empty, counts.skipped_invalid_utf8)
        counts.per_file.append({"path": str(path), "format": kind, "documents": after[0] - before[0],
                                "skipped_empty": after[1] - before[1], "skipped_invalid_utf8": after[2] - before[2]})


def check_inputs(inputs: Iterable[str | os.PathLike], fmt: str) -> list[Path]:
    """Fail before any work (and before loading the tokenizer) if an input is missing or the format is unknown."""
    paths = [Path(p) for p in inputs]
    if not paths:
        raise UserError("no input files given; pass one or more .txt or .jsonl files")
    for path in paths:
        resolve_format(path, fmt)
        if not path.is_file():
            raise UserError(f"input not found: {path}; pass existing .txt or .jsonl files")
    return paths


def write_corpus(documents: Iterable[str], output_prefix: str | os.PathLike, tokenizer) -> BinidxWriter:
    """Tokenize and write the binidx pair; returns the finished writer (counts and checksums)."""
    with BinidxWriter(output_prefix, vocab_size=tokenizer.vocab_size) as writer:
        for text in documents:
            writer.add_document(tokenizer.encode_to_numpy(text))
        if writer.n_documents == 0:  # raised inside the `with`, so no empty pair is left behind
            raise UserError(f"no non-empty documents in the inputs for {output_prefix}; check the files and --format")
    return writer


def write_json_atomically(path: Path, obj: dict) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def write_manifest(output_prefix: str | os.PathLike, writer: BinidxWriter, counts: Counts, tokenizer) -> dict:
    files = {}
    for kind, path in (("bin", bin_path(output_prefix)), ("idx", idx_path(output_prefix))):
        files[kind] = {"name": path.name, "bytes": path.stat().st_size, "sha256": writer.sha256[kind]}
    manifest = {
        "format": MANIFEST_FORMAT,
        "documents": writer.n_documents,
        "tokens": writer.n_tokens,  # including one end-of-document 0 per document
        "dtype": writer.dtype.name,
        "vocab_size": writer.vocab_size,
        "tokenizer": tokenizer.identity,
        "files": files,
        "skipped": {"empty": counts.skipped_empty, "invalid_utf8": counts.skipped_invalid_utf8},
        "inputs": counts.per_file,
    }
    # Written last: a manifest whose checksums match its files means the pair is complete.
    write_json_atomically(manifest_path(output_prefix), manifest)
    return manifest


def verify_manifest(prefix: str | os.PathLike) -> dict | None:
    """The manifest of a complete, unchanged corpus, or None (missing, unreadable, or checksums differ)."""
    try:
        manifest = json.loads(manifest_path(prefix).read_text(encoding="utf-8"))
        files = manifest["files"]
        for kind, path in (("bin", bin_path(prefix)), ("idx", idx_path(prefix))):
            if path.stat().st_size != files[kind]["bytes"] or sha256_file(path) != files[kind]["sha256"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest


def prepare(inputs: list[str], output_prefix: str, fmt: str = "auto", text_key: str = "text",
            tokenizer=None) -> dict:
    """Tokenize `inputs` with the World tokenizer into `<output_prefix>.bin/.idx/.json`; returns the manifest.

    fmt: "text" (each file is one document), "jsonl" (each line one document, field text_key) or "auto" (by
    suffix: .jsonl/.ndjson are jsonl, anything else text). Empty documents and invalid UTF-8 are skipped and counted.
    """
    check_inputs(inputs, fmt)
    if tokenizer is None:
        from rwkv7_train.tokenizer import WorldTokenizer  # loads the vocab: only once the inputs look right
        tokenizer = WorldTokenizer()
    counts = Counts()
    writer = write_corpus(iter_documents(inputs, fmt, text_key, counts), output_prefix, tokenizer)
    return write_manifest(output_prefix, writer, counts, tokenizer)
