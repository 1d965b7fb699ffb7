"""The default training corpus, built on first use from text every machine has: this Python's stdlib sources.

Nothing is shipped: the .py files of sysconfig's "stdlib" directory (no tests, site-packages or codec tables) are
taken in sorted order up to about 6 MB, one document per file, every 20th file held out for validation.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

from rwkv7_data_prep.prep import prepare, verify_manifest

MAX_BYTES = 6_000_000  # a corpus that tokenizes in a few seconds
VAL_EVERY = 20
TRAIN_NAME, VAL_NAME = "stdlib_train", "stdlib_val"
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

    Idempotent: if both manifests exist and their checksums match the files, nothing is rebuilt. Each pair is
    written atomically with its manifest last, so an interrupted build is never mistaken for a finished one.
    """
    out = Path(out_dir)
    train, val = str(out / TRAIN_NAME), str(out / VAL_NAME)
    if verify_manifest(train) is not None and verify_manifest(val) is not None:
        return train, val
    out.mkdir(parents=True, exist_ok=True)
    sources = stdlib_sources()
    held_out = [p for i, p in enumerate(sources) if (i + 1) % VAL_EVERY == 0]
    kept = [p for i, p in enumerate(sources) if (i + 1) % VAL_EVERY != 0]
    if tokenizer is None:
        from rwkv7_train.tokenizer import WorldTokenizer
        tokenizer = WorldTokenizer()
    prepare([str(p) for p in kept], train, fmt="text", tokenizer=tokenizer)
    prepare([str(p) for p in held_out], val, fmt="text", tokenizer=tokenizer)
    return train, val
