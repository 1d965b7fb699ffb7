"""Read a model from any checkpoint a user has: an official `.pth` or `.safetensors`, a rwkv7-train Lightning
`.ckpt`, or a DeepSpeed ZeRO checkpoint directory written by rwkv7-train. Every file is read weights-only."""
import tempfile
from pathlib import Path

import torch

from .model import RWKV7, RWKV7Config
from .official import config_from_state_dict, load_into, load_state_dict_file
from .run_checkpoints import verify
from .safe_load import safe_torch_load

PREFIX = "model."  # RWKV7LitModule keeps the RWKV7 under `self.model`


def client_state(path) -> dict:
    """Everything but the tensors' values of one of our checkpoints (step, config, data position, ...), read
    cheaply (memory-mapped); for a ZeRO directory, the model-states file of its rank 0."""
    path = verify(path)
    if path.is_file():
        return safe_torch_load(path)
    tag = (path / "latest").read_text().strip() if (path / "latest").is_file() else "checkpoint"
    states = sorted((path / tag).glob("*model_states.pt"))
    return safe_torch_load(states[0])


def _lightning_state(path: Path) -> tuple[dict, dict | None]:
    """(model state_dict, model config or None) from a checkpoint file or a DeepSpeed directory."""
    if path.is_dir():
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        verify(path)   # complete, and every pickle in it safe: DeepSpeed's own reader unpickles them bare
        with tempfile.TemporaryDirectory() as tmp:
            convert_zero_checkpoint_to_fp32_state_dict(str(path), f"{tmp}/consolidated.ckpt")
            ckpt = safe_torch_load(f"{tmp}/consolidated.ckpt", mmap=False)
    elif path.suffix in (".pth", ".safetensors"):
        ckpt = load_state_dict_file(path)
    else:
        ckpt = safe_torch_load(path)
    if "state_dict" not in ckpt:
        return ckpt, None
    sd = {k[len(PREFIX):]: v for k, v in ckpt["state_dict"].items() if k.startswith(PREFIX)}
    hp = ckpt.get("hyper_parameters", {})
    return sd, hp.get("model")


def read_checkpoint(path) -> tuple[dict, RWKV7Config]:
    """(RWKV7 state_dict, its config) from any checkpoint `load_model` accepts."""
    path = Path(path)
    sd, model_cfg = _lightning_state(path)
    cfg = RWKV7Config.from_dict(dict(model_cfg)) if model_cfg else config_from_state_dict(sd, source=str(path))
    return sd, cfg


def load_model(path, dtype=torch.float32, device="cpu") -> RWKV7:
    """An RWKV7 from an official `.pth`/`.safetensors`, a rwkv7-train `.ckpt` or a DeepSpeed checkpoint directory."""
    sd, cfg = read_checkpoint(path)
    with torch.device("meta"):
        model = RWKV7(cfg)
    load_into(model, {k: v.to(dtype, copy=True) for k, v in sd.items()}, source=str(path))
    return model.to(device)
