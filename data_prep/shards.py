"""One source being written: binidx shards of about `shard_tokens` tokens, the manifest rewritten after each.

Resumable: a shard is listed in manifest.json only once both its files are in place (BinidxWriter renames them
there when complete), and the manifest is replaced atomically; so after a kill the manifest lists exactly the
finished shards, and a re-run continues at the next document. A shard ends after the document that brings it to
`shard_tokens` or more, so the shards depend only on the documents, not on batching, workers or restarts.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from rwkv7_train.data.binidx import BinidxWriter
from rwkv7_train.data.manifest import (
    MANIFEST_NAME, Manifest, ShardInfo, read_manifest, shard_name, verify_shard, write_manifest,
)
from rwkv7_train.errors import UserError

log = logging.getLogger("rwkv7_data_prep")


class SourceWriter:
    """Appends documents to the source in `manifest.source_dir`, shard by shard."""

    def __init__(self, manifest: Manifest, shard_tokens: int, skipped: dict):
        self.manifest, self.shard_tokens = manifest, shard_tokens
        self.skipped = skipped  # the reader's running counts, copied into each manifest written
        self._writer: BinidxWriter | None = None

    @classmethod
    def open(cls, source_dir: Path, name: str, tokenizer, inputs: list, options: dict,
             skipped: dict) -> "SourceWriter":
        """Resume the source in source_dir if a run with the same inputs and options started it, else start one."""
        fresh = Manifest(source_dir=source_dir, name=name, tokenizer=tokenizer.identity,
                         vocab_size=tokenizer.vocab_size, inputs=inputs, options=options)
        if source_dir.is_dir():
            _remove_stale_temporaries(source_dir)
        if not (source_dir / MANIFEST_NAME).is_file():
            return cls(fresh, options["shard_tokens"], skipped)
        try:
            old = read_manifest(source_dir, allow_incomplete=True)
        except UserError as e:
            log.warning("%s; starting %s over", e, source_dir)
            return cls(fresh, options["shard_tokens"], skipped)
        for key in ("tokenizer", "vocab_size", "name", "inputs", "options"):
            if getattr(old, key) != getattr(fresh, key):
                change = _difference(getattr(old, key), getattr(fresh, key))
                raise UserError(f"{old.path} was written with other {key} ({change}); pass the same inputs and "
                                f"options to resume it, or remove {source_dir} to start over")
        for i in range(len(old.shards)):
            try:
                verify_shard(old, i, full=True)
            except UserError as e:
                log.warning("%s; rebuilding %s from %s on", e, source_dir, old.shards[i].prefix)
                old.shards = old.shards[:i]
                old.documents = sum(s.documents for s in old.shards)
                old.tokens = sum(s.tokens for s in old.shards)
                old.complete = False
                write_manifest(old)
                break
        return cls(old, options["shard_tokens"], skipped)

    @property
    def complete(self) -> bool:
        return self.manifest.complete

    def add(self, tokens: np.ndarray, sizes: np.ndarray) -> None:
        """Append documents (each followed by its 0), closing a shard whenever it reaches shard_tokens."""
        while sizes.size:
            if self._writer is None:
                prefix = self.manifest.source_dir / shard_name(len(self.manifest.shards))
                self._writer = BinidxWriter(prefix, vocab_size=self.manifest.vocab_size)
            ends = np.cumsum(sizes)
            full = int(np.searchsorted(ends, self.shard_tokens - self._writer.n_tokens))  # first doc that fills it
            if full >= sizes.size:
                self._writer.add_documents(tokens, sizes)
                return
            cut = int(ends[full])
            self._writer.add_documents(tokens[:cut], sizes[:full + 1])
            self._finish_shard()
            tokens, sizes = tokens[cut:], sizes[full + 1:]

    def _finish_shard(self) -> None:
        w, m = self._writer, self.manifest
        w.finish()
        m.shards.append(ShardInfo(
            prefix=Path(w.prefix).name, documents=w.n_documents, tokens=w.n_tokens, first_document=m.documents,
            sha256_bin=w.sha256["bin"], sha256_idx=w.sha256["idx"],
            bytes_bin=w.bin_path.stat().st_size, bytes_idx=w.idx_path.stat().st_size))
        m.documents += w.n_documents
        m.tokens += w.n_tokens
        self._writer = None
        m.skipped = dict(self.skipped)
        write_manifest(m)
        log.info("%s: %s done, %d documents, %d tokens", m.source_dir, m.shards[-1].prefix, w.n_documents,
                 w.n_tokens)

    def finish(self) -> None:
        """Close the last shard and mark the source complete."""
        if self._writer is not None:
            self._finish_shard()
        self.manifest.complete = True
        self.manifest.skipped = dict(self.skipped)
        write_manifest(self.manifest)

    def abort(self) -> None:
        """Drop the unfinished shard's temporary files; finished shards and the manifest stay for a resume."""
        if self._writer is not None:
            self._writer.abort()
            self._writer = None


def _difference(old, new) -> str:
    """old vs new for an error message; for lists (the inputs: there may be a million) only the first difference."""
    if not (isinstance(old, list) and isinstance(new, list)):
        return f"{old!r}, now {new!r}"
    i = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
    was = repr(old[i]) if i < len(old) else "nothing"
    now = repr(new[i]) if i < len(new) else "nothing"
    return f"{len(old)} of them, now {len(new)}; the first that differs, number {i + 1}: {was}, now {now}"


def _remove_stale_temporaries(source_dir: Path) -> None:
    # BinidxWriter's temporaries are named "<file>.tmp-<pid>": those of dead processes are leftovers of a kill.
    for path in source_dir.glob("shard-*.tmp-*"):
        pid = path.name.rsplit(".tmp-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
