"""Read a model from any checkpoint a user has: an official `.pth`, a rwkv7-train Lightning `.ckpt`, or a
DeepSpeed checkpoint directory written by rwkv7-train."""
import tempfile
from pathlib import Path

import torch

from .errors import UserError
from .model import RWKV7, RWKV7Config
from .official import config_from_state_dict, load_into, load_state_dict_file

PREFIX = "model."  # RWKV7LitModule keeps the RWKV7 under `self.model`


def _lightning_state(path: Path) -> tuple[dict, dict | None]:
    """(model state_dict, model config or None) from a Lightning checkpoint file or DeepSpeed directory."""
    if path.is_dir():
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        with tempfile.TemporaryDirectory() as tmp:
            convert_zero_checkpoint_to_fp32_state_dict(str(path), f"{tmp}/consolidated.ckpt")
            ckpt = torch.load(f"{tmp}/consolidated.ckpt", map_location="cpu", weights_only=False)
    else:
        ckpt = load_state_dict_file(path) if path.suffix == ".pth" else _load_ckpt(path)
    if "state_dict" not in ckpt:
        return ckpt, None
    sd = {k[len(PREFIX):]: v for k, v in ckpt["state_dict"].items() if k.startswith(PREFIX)}
    hp = ckpt.get("hyper_parameters", {})
    return sd, hp.get("model")


def _load_ckpt(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        # Lightning checkpoints hold the run config (plain containers) besides tensors.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"cannot read {path} as a checkpoint ({type(e).__name__}: {str(e)[:120]})") from None


def read_checkpoint(path) -> tuple[dict, RWKV7Config]:
    """(RWKV7 state_dict, its config) from any checkpoint `load_model` accepts."""
    path = Path(path)
    sd, model_cfg = _lightning_state(path)
    cfg = RWKV7Config.from_dict(dict(model_cfg)) if model_cfg else config_from_state_dict(sd, source=str(path))
    return sd, cfg


def load_model(path, dtype=torch.float32, device="cpu") -> RWKV7:
    """An RWKV7 from an official `.pth`, a rwkv7-train `.ckpt` or a DeepSpeed checkpoint directory."""
    sd, cfg = read_checkpoint(path)
    with torch.device("meta"):
        model = RWKV7(cfg)
    load_into(model, {k: v.to(dtype, copy=True) for k, v in sd.items()}, source=str(path))
    return model.to(device)
