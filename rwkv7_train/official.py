"""BlinkDL's official RWKV-7 `.pth` layout: a plain state_dict in bf16, named exactly like `RWKV7`'s parameters.

Shapes define the model: H and N from `blocks.0.att.r_k`, V and C from `emb.weight`, L from the block indices,
the LoRA ranks and FFN width from their matrices (never from the formula: released models do not follow it).
"""
import re
from pathlib import Path

import torch

from .atomic import atomic_torch_save
from .errors import UserError
from .model import RWKV7, RWKV7Config


def config_from_state_dict(sd: dict, source: str = "checkpoint") -> RWKV7Config:
    """Infer the RWKV7Config of an official state_dict from its tensor shapes."""
    required = ("emb.weight", "blocks.0.att.r_k", "blocks.0.att.w1", "blocks.0.att.a1", "blocks.0.att.g1",
                "blocks.0.ffn.key.weight")
    missing = [k for k in required if k not in sd]
    if missing:
        hint = (" (it looks like RWKV-6: use `rwkv7-convert upgrade-v6`)" if "blocks.0.att.time_maa_x" in sd
                else "")
        raise UserError(f"{source} is not an RWKV-7 (x070) checkpoint: missing {missing[0]}{hint}")
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    n_head, head_size = sd["blocks.0.att.r_k"].shape
    vocab_size, n_embd = sd["emb.weight"].shape
    v1 = sd.get("blocks.0.att.v1", sd.get("blocks.1.att.v1"))
    return RWKV7Config(
        vocab_size=vocab_size, n_layer=max(layers) + 1, n_embd=n_embd, head_size=head_size,
        dim_ffn=sd["blocks.0.ffn.key.weight"].shape[0],
        dim_w=sd["blocks.0.att.w1"].shape[1], dim_a=sd["blocks.0.att.a1"].shape[1],
        dim_v=v1.shape[1] if v1 is not None else None, dim_g=sd["blocks.0.att.g1"].shape[1],
    )


def load_state_dict_file(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises many types for a file that is not a checkpoint
        raise UserError(f"cannot read {path} as a PyTorch checkpoint ({type(e).__name__}: {str(e)[:120]})") from None


def load_into(model: RWKV7, sd: dict, source: str) -> None:
    """Copy an official state_dict into `model`, with one clear error when the shapes do not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise UserError(f"{source} does not fit this RWKV-7 model: {what}")
    for k, t in own.items():
        if sd[k].shape != t.shape:
            raise UserError(f"{source} does not fit this RWKV-7 model: {k} has shape {tuple(sd[k].shape)}, "
                            f"the model expects {tuple(t.shape)} (check the model config)")
    model.load_state_dict(sd, assign=any(t.is_meta for t in own.values()))


def load_official(path, dtype=torch.float32, device="cpu") -> RWKV7:
    """Load any official RWKV-7 `.pth` (bf16 or fp32 tensors) into a new `RWKV7`."""
    sd = load_state_dict_file(path)
    cfg = config_from_state_dict(sd, source=str(path))
    with torch.device("meta"):
        model = RWKV7(cfg)
    load_into(model, {k: v.to(dtype, copy=True) for k, v in sd.items()}, source=str(path))
    return model.to(device=device)


def save_official(model: RWKV7, path) -> None:
    """Write `model` in the official layout (bf16, contiguous CPU tensors), atomically."""
    sd = {k: v.detach().to(device="cpu", dtype=torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    atomic_torch_save(sd, path)
