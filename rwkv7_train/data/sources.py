"""Data sources: what a data config names, and opening one as a single stream of tokens.

A source's path is a prepared directory (manifest.json + shards, see manifest.py), a binidx prefix without
.bin/.idx (RWKV-LM's files as they are), or a list of those. Its shards are read back to back as one flat token
sequence, the way RWKV-LM reads its one .bin: a window may run from one shard into the next, and a source of one
file gives exactly RWKV-LM's windows.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Real
from pathlib import Path

import numpy as np

from rwkv7_train.data.binidx import BinidxReader, bin_path, idx_path
from rwkv7_train.data.manifest import check_vocab, read_manifest, verify_shard
from rwkv7_train.errors import UserError

SOURCE_KEYS = ("name", "path", "weight", "val_path")
PathSpec = str | os.PathLike | Sequence[str | os.PathLike]


@dataclass(frozen=True)
class SourceSpec:
    """One source as configured; path_key / val_key are the config keys that error messages name."""

    name: str
    path: PathSpec
    weight: float
    val_path: PathSpec | None
    path_key: str
    val_key: str


def single_source(train_path: PathSpec, val_path: PathSpec | None) -> SourceSpec:
    """The classic config (data.train_path / data.val_path) as a one-source mixture named after the (first) train
    file."""
    first = train_path if isinstance(train_path, (str, os.PathLike)) or not train_path else train_path[0]
    name = Path(os.fspath(first)).name if isinstance(first, (str, os.PathLike)) else ""
    return SourceSpec(name or "train", train_path, 1.0, val_path, "data.train_path", "data.val_path")


def parse_sources(sources: Sequence[Mapping]) -> list[SourceSpec]:
    """data.sources -> SourceSpecs; UserError naming the entry and key for anything malformed."""
    if isinstance(sources, (str, Mapping)) or not isinstance(sources, Sequence) or not sources:
        raise UserError("data.sources must be a non-empty list of {name, path, weight, val_path}; "
                        "see configs/data/mixture.yaml")
    specs, seen = [], set()
    for i, entry in enumerate(sources):
        key = f"data.sources.{i}"  # the spelling a Hydra override takes
        if not isinstance(entry, Mapping):
            raise UserError(f"{key} is {entry!r}, not a mapping; write it as {{name: ..., path: ..., weight: ...}}")
        unknown = sorted(set(entry) - set(SOURCE_KEYS))
        if unknown:
            raise UserError(f"{key} has unknown key(s) {', '.join(map(str, unknown))}; "
                            f"a source takes {', '.join(SOURCE_KEYS)}")
        name, path, weight = entry.get("name"), entry.get("path"), entry.get("weight")
        if not isinstance(name, str) or not name or "/" in name:
            raise UserError(f"{key}.name={name!r} must be a non-empty name without '/' (it is a metric name)")
        if name in seen:
            raise UserError(f"{key}.name={name!r} is used by another source; give each source its own name")
        seen.add(name)
        if path is None:
            raise UserError(f"{key}.path is required: a prepared directory, a binidx prefix or a list of them")
        if isinstance(weight, bool) or not isinstance(weight, Real) or not weight > 0 or weight == float("inf"):
            raise UserError(f"{key}.weight={weight!r} must be a positive number; set {key}.weight")
        specs.append(SourceSpec(name, path, float(weight), entry.get("val_path"), f"{key}.path", f"{key}.val_path"))
    return specs


class TokenStream:
    """The shards of one source read back to back as one token sequence."""

    def __init__(self, readers: list[BinidxReader], label: str):
        self.readers, self.label = readers, label
        self.offsets = np.concatenate([[0], np.cumsum([r.n_tokens for r in readers], dtype=np.int64)])
        self.n_tokens = int(self.offsets[-1])

    def where(self, pos: int) -> tuple[Path, int]:
        """The .bin file holding stream token `pos`, and the token's offset in it."""
        i = int(np.searchsorted(self.offsets, pos, side="right")) - 1
        return self.readers[i].bin_path, pos - int(self.offsets[i])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens start .. start+length-1 as int64, crossing shard boundaries as needed."""
        if start < 0 or start + length > self.n_tokens:
            raise UserError(f"{self.label}: a window at token {start} runs past the end ({self.n_tokens} tokens); "
                            "the files changed since they were opened, restart the run")
        out = np.empty(length, dtype=np.int64)
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        done = 0
        while done < length:
            local = start + done - int(self.offsets[i])
            take = min(length - done, self.readers[i].n_tokens - local)
            out[done:done + take] = self.readers[i].tokens[local:local + take]
            done, i = done + take, i + 1
        return out


def _open_one(path: str | os.PathLike, key: str, vocab_size: int, verify_checksums: bool) -> list[BinidxReader]:
    """The shards behind one path: a prepared directory's, checked against its manifest, or one binidx pair."""
    path = os.fspath(path)
    if Path(path).is_dir():
        manifest = read_manifest(path)  # a directory without manifest.json fails here, saying what it expects
        check_vocab(manifest, vocab_size)
        for i in range(len(manifest.shards)):
            verify_shard(manifest, i, full=verify_checksums)
        return [BinidxReader(prefix) for prefix in manifest.shard_prefixes()]
    if not (bin_path(path).is_file() and idx_path(path).is_file()):
        hint = " (give the prefix without .bin/.idx)" if path.endswith((".bin", ".idx")) else ""
        raise UserError(f"data file not found: {path}.bin/.idx{hint} — run rwkv7-prep or set {key}=...")
    return [BinidxReader(path)]


def open_source(path: PathSpec, key: str, vocab_size: int, verify_checksums: bool = False) -> TokenStream:
    """Open and check every shard of a source as one TokenStream. A prepared directory's shards are checked
    against its manifest: vocab_size and file sizes always, sha256 only if verify_checksums (hashing terabytes
    at every start is not acceptable by default); every .bin is checked against its .idx."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else path
    if not isinstance(paths, Sequence) or not paths or not all(isinstance(p, (str, os.PathLike)) for p in paths):
        raise UserError(f"{key}={path!r} must be a path or a non-empty list of paths")
    readers = [r for p in paths for r in _open_one(p, key, vocab_size, verify_checksums)]
    label = os.fspath(paths[0]) if len(paths) == 1 else f"{os.fspath(paths[0])} (+{len(paths) - 1} more)"
    return TokenStream(readers, label)
