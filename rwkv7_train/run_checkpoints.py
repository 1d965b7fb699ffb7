"""A run's checkpoints on disk: names, completeness, the newest one, and which are kept.

RUN_DIR/checkpoints/stepN.ckpt is a file (single-process and DDP runs) or a directory of DeepSpeed shards (ZeRO);
last.ckpt is a relative link to the newest. Both are written under a hidden temporary name and renamed into place
only once every rank has finished writing, so a name that `complete_checkpoints` lists was written whole. A ZeRO
directory also holds COMPLETE, the size of every file in it, so one damaged afterwards (a partial copy) is refused
rather than loaded half.
"""
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

from .errors import UserError
from .safe_load import check_pickles, safe_torch_load

CHECKPOINT_RE = re.compile(r"^step(\d+)\.ckpt$")
COMPLETE = "COMPLETE.json"
LAST = "last.ckpt"


def checkpoint_dir(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"step{step}.ckpt"


def partial_name(step: int) -> str:
    """Where stepN.ckpt is written before it is complete (ignored by every reader)."""
    return f".{checkpoint_name(step)}.partial"


def mark_complete(directory: Path) -> None:
    """Record the size of every file of a finished ZeRO checkpoint directory in its COMPLETE file."""
    sizes = {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}
    (directory / COMPLETE).write_text(json.dumps(sizes, indent=1))


def verify(path) -> Path:
    """Return `path` if it is a whole checkpoint we can read safely; else one UserError saying what is wrong."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if path.is_file():
        safe_torch_load(path)   # memory-mapped: reads the pickle, not the tensors; refuses truncated files
        return path
    marker = path / COMPLETE
    if not marker.is_file():
        raise UserError(f"{path} is not a complete checkpoint (no {COMPLETE}: its writing was interrupted or it "
                        "is not a rwkv7-train checkpoint directory); resume from an earlier one")
    for name, size in json.loads(marker.read_text()).items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            raise UserError(f"{path} is damaged: {name} is {'missing' if not f.is_file() else 'truncated'}; "
                            "resume from an earlier checkpoint")
    check_pickles(path)
    return path


def complete_checkpoints(run_dir) -> list[tuple[int, Path]]:
    """(step, path) of every stepN.ckpt in the run directory, oldest first (finished writes only)."""
    folder = checkpoint_dir(run_dir)
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.match(p.name))] \
        if folder.is_dir() else []
    return sorted(found)


def latest(run_dir, warn: Callable[[str], None] = print) -> Optional[Path]:
    """The newest checkpoint of the run directory that verifies (`warn` is told of each one that does not), or
    None."""
    for _, path in reversed(complete_checkpoints(run_dir)):
        try:
            return verify(path)
        except UserError as e:
            warn(f"rwkv7-train: warning: skipping {e}")
    return None


def publish(tmp: Path, step: int) -> Path:
    """Rename a finished temporary checkpoint to stepN.ckpt and point last.ckpt at it (rank 0 only)."""
    if tmp.is_dir():
        mark_complete(tmp)
    final = tmp.parent / checkpoint_name(step)
    if final.is_dir():
        shutil.rmtree(final)
    os.replace(tmp, final)
    link = tmp.parent / f".{LAST}.{step}.tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(final.name)
    os.replace(link, tmp.parent / LAST)
    return final


def prune(run_dir, keep_last: int, keep_every_n_steps: Optional[int]) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints and those at multiples of keep_every_n_steps; returns
    what was deleted."""
    ckpts = complete_checkpoints(run_dir)
    keep = {step for step, _ in ckpts[-keep_last:]} if keep_last > 0 else set()
    if keep_every_n_steps:
        keep |= {step for step, _ in ckpts if step % keep_every_n_steps == 0}
    doomed = [p for step, p in ckpts if step not in keep]
    for p in doomed:
        _remove(p)
    return doomed


def remove_partials(run_dir) -> None:
    """Delete what interrupted writes left behind (nothing reads it)."""
    for p in checkpoint_dir(run_dir).glob(".step*.ckpt.partial"):
        _remove(p)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()
