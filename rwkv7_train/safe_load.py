"""Read checkpoint files without running code from them.

A checkpoint is a pickle, and a pickle can name any importable function to call while it loads. Every checkpoint
we read, ours or from elsewhere, goes through `torch.load(weights_only=True)`: tensors, plain containers, and only
the few classes allowlisted here (what DeepSpeed's shard files hold besides tensors). DeepSpeed reads its own shard
files with a bare pickle; `check_pickles` reads each of them the safe way first, so a planted file is refused before
DeepSpeed opens it.
"""
import importlib
from pathlib import Path

import torch

from .errors import UserError

# module -> classes DeepSpeed's checkpoints pickle (loss scaler, ZeRO stage enum, fp32 fragment addresses).
_ALLOWED = {
    "deepspeed.runtime.fp16.loss_scaler": ("LossScaler", "DynamicLossScaler"),
    "deepspeed.runtime.zero.config": ("ZeroStageEnum",),
    "deepspeed.utils.tensor_fragment": ("fragment_address",),
}


def _allowed(name: str):
    """The allowlisted class called `name` ("module.Class"), imported; None if it is not on the list."""
    module, _, attr = name.rpartition(".")
    if attr not in _ALLOWED.get(module, ()):
        return None
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):  # without DeepSpeed there are no DeepSpeed checkpoints to read
        return None


def safe_torch_load(path, mmap: bool = True):
    """torch.load on the CPU with weights_only=True and our allowlist; one-line UserError for anything else: a
    missing file, a truncated or foreign one, or a pickle that asks for code to run."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    allowed = []   # DeepSpeed's classes are imported only for a file that names them (importing it is slow)
    while True:
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
        except Exception as e:  # torch raises many types for a file that is not a checkpoint
            text = " ".join(str(e).split())
            culprit = text.split("GLOBAL ")[1].split(" ")[0] if "GLOBAL " in text else None
            cls = _allowed(culprit) if culprit else None
            if cls is not None and cls not in allowed:
                allowed.append(cls)
                continue
            if mmap and "mmap can only be used" in text:   # the legacy (non-zip) format: read it whole
                mmap = False
                continue
            # "Unsupported operand": a byte that is no pickle instruction the safe loader takes (a text file, say)
            not_pickle = "Unsupported operand" in text
            if culprit or ("weights_only" in text and not not_pickle):
                what = f"asks for {culprit}" if culprit else "holds more than tensors and plain data"
                raise UserError(f"refusing to load {path}: its pickle {what}, which a checkpoint does not hold "
                                "(loading it could run code)") from None
            detail = text.split("WeightsUnpickler error: ")[-1]   # past torch's generic weights_only preamble
            raise UserError(f"cannot read {path} as a PyTorch checkpoint, it may be truncated or of another format "
                            f"({type(e).__name__}: {detail[:120]})") from None


def check_pickles(directory) -> None:
    """Read every `.pt` file under `directory` the safe way (memory-mapped: tensor data is not read)."""
    for path in sorted(Path(directory).rglob("*.pt")):
        safe_torch_load(path)
