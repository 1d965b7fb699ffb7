"""The default training corpus, built on first use from text every machine has: this Python's stdlib sources.

Nothing is shipped: the .py files of sysconfig's "stdlib" directory (no tests, site-packages or codec tables) are
taken in sorted order up to about 6 MB, one document per file, every 20th document held out for validation
(rwkv7-prep's --val-every), into the sources OUT/stdlib and OUT/stdlib_val, one shard each.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

from rwkv7_data_prep.prep import prepare

MAX_BYTES = 6_000_000  # a corpus that tokenizes in a few seconds
VAL_EVERY = 20
SOURCE_NAME = "stdlib"
# Tests and third-party packages are not the stdlib's own code; encodings/ is mostly generated charmap tables.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings"}


def stdlib_sources(max_bytes: int = MAX_BYTES) -> list[Path]:
    """The stdlib .py files in sorted relative-path order, stopping before the total passes max_bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        found += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    # Sort by path relative to the root, as strings, so the order does not depend on the file system.
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    picked, total = [], 0
    for path in found:
        size = path.stat().st_size
        if total + size > max_bytes:
            break
        picked.append(path)
        total += size
    return picked


def build_sample_corpus(out_dir: str, *, tokenizer=None) -> tuple[str, str]:
    """Build (or find already built) the sample corpus under out_dir; returns the (train, val) binidx prefixes.

    Idempotent: a complete source whose shards pass their checksums is not rebuilt, and an interrupted build
    resumes (rwkv7-prep's own behaviour). The corpus is far below the default shard size: one shard per source.
    """
    train, val = prepare([str(p) for p in stdlib_sources()], Path(out_dir) / SOURCE_NAME, fmt="text",
                         val_every=VAL_EVERY, workers=1, tokenizer=tokenizer)
    return train.shard_prefixes()[0], val.shard_prefixes()[0]
