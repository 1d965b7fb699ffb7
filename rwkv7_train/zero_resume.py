"""Resuming a ZeRO checkpoint on another number of processes.

DeepSpeed cuts a ZeRO checkpoint's optimizer state into one shard per process of the run that wrote it, and loads
it only on as many. Its universal format (one file per parameter: fp32 weights and both Adam moments) loads on any
number. When the world size differs, global rank 0 converts the checkpoint once, in place (stepN.ckpt/TAG_universal
beside the shards, named in latest_universal only when complete), the other ranks wait for it, and the strategy is
told to load the universal copy.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

from .errors import UserError

LATEST_UNIVERSAL = "latest_universal"   # DeepSpeed's name for the file naming the universal folder


def _convert(path: Path) -> None:
    tag = (path / "latest").read_text().strip()
    tmp, final = path / f".{tag}_universal.partial", path / f"{tag}_universal"
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                           str(path / tag), "--output_folder", str(tmp), "--inject_missing_state"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"cannot convert {path} for another number of processes (DeepSpeed's ds_to_universal: "
                        f"{last}); resume on the number of processes that wrote it")
    os.replace(tmp, final)
    (path / f".{LATEST_UNIVERSAL}.tmp").write_text(final.name)
    os.replace(path / f".{LATEST_UNIVERSAL}.tmp", path / LATEST_UNIVERSAL)


def prepare(path: Path, saved_world_size: int, world_size: int, global_rank: int, strategy,
            timeout_s: float = 3600) -> bool:
    """Make the ZeRO checkpoint `path` loadable by `world_size` processes; True when it must load as universal."""
    if saved_world_size == world_size:
        return False
    done = path / LATEST_UNIVERSAL
    if global_rank == 0 and not done.exists():
        print(f"{path} was written by {saved_world_size} processes, this run has {world_size}: converting it to "
              "DeepSpeed's universal checkpoint format once")
        _convert(path)
    deadline = time.monotonic() + timeout_s
    while not done.exists():   # rank 0 of a torchrun/SLURM job converts while the others wait here
        if time.monotonic() > deadline:
            raise UserError(f"waited {timeout_s:.0f} s for rank 0 to convert {path}; is the run directory on a "
                            "filesystem every node shares?")
        time.sleep(1)
    strategy.config.setdefault("checkpoint", {})["load_universal"] = True
    return True
