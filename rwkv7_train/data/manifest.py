"""A prepared source on disk: `DIR/manifest.json` plus binidx shards `DIR/shard-00000.bin/.idx`, ...

`rwkv7-prep` writes it; training reads it. manifest.json (version 1):

    {"format": "rwkv7-source", "version": 1, "name": str,
     "tokenizer": WorldTokenizer.identity, "vocab_size": int,
     "documents": int, "tokens": int,          # totals over the shards; tokens include one 0 after each document
     "complete": bool,                         # false while rwkv7-prep is still writing (or was interrupted)
     "inputs": [...], "options": {...},        # what was read and how: a re-run must match them to resume
     "skipped": {"empty": int, "invalid_utf8": int},
     "shards": [{"prefix": "shard-00000", "documents", "tokens", "first_document",
                 "sha256_bin", "sha256_idx", "bytes_bin", "bytes_idx"}, ...]}

Shards hold consecutive runs of the source's document stream: shard i starts at document `first_document`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from rwkv7_train.atomic import atomic_write
from rwkv7_train.data.binidx import bin_path, idx_path
from rwkv7_train.errors import UserError

FORMAT = "rwkv7-source"
VERSION = 1
MANIFEST_NAME = "manifest.json"
_SHARD_PREFIX = re.compile(r"shard-\d{5,}")  # plain names only: a manifest must not point outside its directory


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ShardInfo:
    prefix: str
    documents: int
    tokens: int
    first_document: int
    sha256_bin: str
    sha256_idx: str
    bytes_bin: int
    bytes_idx: int


@dataclass
class Manifest:
    source_dir: Path
    name: str
    tokenizer: str
    vocab_size: int
    documents: int = 0
    tokens: int = 0
    complete: bool = False
    inputs: list = field(default_factory=list)
    options: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=lambda: {"empty": 0, "invalid_utf8": 0})
    shards: list[ShardInfo] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.source_dir / MANIFEST_NAME

    def shard_prefixes(self) -> list[str]:
        """Absolute binidx prefixes of the shards, in document order."""
        return [str(self.source_dir.absolute() / s.prefix) for s in self.shards]

    def to_json(self) -> dict:
        # Shallow on purpose (no dataclasses.asdict deep copy): rwkv7-prep rewrites this after every shard.
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "source_dir"}  # a source can move
        d["shards"] = [vars(s) for s in self.shards]
        return {"format": FORMAT, "version": VERSION, **d}


def is_source_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file()


# One encoder for every item: json.dumps(x, ensure_ascii=False) builds a new one per call, which was most of the cost
# of rewriting a manifest that lists many small input files after every shard.
_encode = json.JSONEncoder(ensure_ascii=False).encode


def write_manifest(manifest: Manifest) -> None:
    """Replace DIR/manifest.json atomically: a reader sees the old or the new manifest, never half of one.

    One line per field and per list item: readable, and encoded by json's C encoder (indent= would use the pure
    Python one, slow for a manifest listing tens of thousands of inputs)."""
    def value(v) -> str:
        if isinstance(v, list) and v:
            return "[\n  " + ",\n  ".join(map(_encode, v)) + "\n ]"
        return _encode(v)

    text = "{\n" + ",\n".join(f" {_encode(k)}: {value(v)}" for k, v in manifest.to_json().items()) + "\n}\n"
    with atomic_write(manifest.path, "w", encoding="utf-8") as f:
        f.write(text)


def read_manifest(source_dir: str | os.PathLike, *, allow_incomplete: bool = False) -> Manifest:
    """Parse and sanity-check DIR/manifest.json (not the shards: see verify_shard).

    An incomplete source (rwkv7-prep still running or interrupted) is refused unless allow_incomplete.
    """
    source_dir = Path(source_dir)
    path = source_dir / MANIFEST_NAME
    rebuild = f"re-run rwkv7-prep with --output {source_dir} to rebuild it"
    if not path.is_file():
        hint = " (a binidx prefix? pass the prefix without .bin/.idx)" if bin_path(source_dir).is_file() else ""
        raise UserError(f"{path} not found{hint}; a prepared source is a directory written by rwkv7-prep --output")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not readable JSON ({e}); {rebuild}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise UserError(f"{path} is not an {FORMAT} manifest; {rebuild}")
    if raw.get("version") != VERSION:
        raise UserError(f"{path} has manifest version {raw.get('version')!r}, this rwkv7-train reads version "
                        f"{VERSION}; {rebuild}")
    try:
        shards = [_shard(s) for s in raw["shards"]]
        m = Manifest(source_dir=source_dir, name=raw["name"], tokenizer=raw["tokenizer"],
                     vocab_size=int(raw["vocab_size"]), documents=int(raw["documents"]), tokens=int(raw["tokens"]),
                     complete=bool(raw["complete"]), inputs=raw["inputs"], options=raw["options"],
                     skipped=raw["skipped"], shards=shards)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path} lacks or mistypes a field ({e}); {rebuild}") from None
    _check_consistent(m, rebuild)
    if not m.complete and not allow_incomplete:
        raise UserError(f"{path}: the source is incomplete ({len(m.shards)} shards so far: rwkv7-prep was stopped or "
                        "is still running); re-run the same rwkv7-prep command to finish it")
    return m


def _shard(entry: dict) -> ShardInfo:
    # Coerce each field to its declared type, so a hand-edited manifest fails here and not deep in training.
    return ShardInfo(**{f.name: (int if f.type == "int" else str)(entry[f.name]) for f in fields(ShardInfo)})


def _check_consistent(m: Manifest, rebuild: str) -> None:
    next_document = 0
    for s in m.shards:
        if not _SHARD_PREFIX.fullmatch(s.prefix):
            raise UserError(f"{m.path}: shard prefix {s.prefix!r} is not a plain shard-NNNNN name; {rebuild}")
        if s.first_document != next_document or s.documents <= 0 or s.tokens < 2 * s.documents:
            raise UserError(f"{m.path}: shard {s.prefix} does not continue the document stream (first_document "
                            f"{s.first_document}, expected {next_document}) or has impossible counts; {rebuild}")
        next_document += s.documents
    tokens = sum(s.tokens for s in m.shards)
    if (m.documents, m.tokens) != (next_document, tokens):
        raise UserError(f"{m.path}: totals ({m.documents} documents, {m.tokens} tokens) differ from the sum over its "
                        f"shards ({next_document}, {tokens}); {rebuild}")


def verify_shard(manifest: Manifest, i: int, full: bool = True) -> None:
    """UserError unless shard i's files exist with the recorded sizes and (when full) sha256 checksums."""
    s = manifest.shards[i]
    prefix = manifest.source_dir / s.prefix
    for path, size, digest in ((bin_path(prefix), s.bytes_bin, s.sha256_bin),
                               (idx_path(prefix), s.bytes_idx, s.sha256_idx)):
        fix = f"re-run rwkv7-prep on {manifest.source_dir} (same inputs and options) to rebuild it"
        if not path.is_file():
            raise UserError(f"{path} is missing (listed in {manifest.path}); {fix}")
        actual = path.stat().st_size
        if actual != size:
            raise UserError(f"{path} is {actual} bytes, {manifest.path} says {size}: truncated or replaced; {fix}")
        if full and sha256_file(path) != digest:
            raise UserError(f"{path} fails its sha256 checksum from {manifest.path}: the file is corrupt; {fix}")


def check_vocab(manifest: Manifest, vocab_size: int, tokenizer_identity: str | None = None) -> None:
    """UserError when the source was tokenized for another vocabulary than the model's."""
    if manifest.vocab_size != vocab_size:
        raise UserError(f"{manifest.path}: the source was tokenized for vocab_size {manifest.vocab_size} "
                        f"({manifest.tokenizer}) but the model has vocab_size {vocab_size}; set model.vocab_size="
                        f"{manifest.vocab_size} or re-run rwkv7-prep with the model's tokenizer")
    if tokenizer_identity is not None and manifest.tokenizer != tokenizer_identity:
        raise UserError(f"{manifest.path}: the source was tokenized with {manifest.tokenizer} but the model uses "
                        f"{tokenizer_identity}; re-run rwkv7-prep with the model's tokenizer")
