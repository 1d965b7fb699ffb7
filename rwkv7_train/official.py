"""BlinkDL's official RWKV-7 `.pth` layout: a plain state_dict in bf16, named exactly like `RWKV7`'s parameters.
The same tensors may also live in a `.safetensors` file.

Shapes define the model: H and N from `blocks.0.att.r_k`, V and C from `emb.weight`, L from the block indices,
the LoRA ranks and FFN width from their matrices (never from the formula: released models do not follow it).
"""
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save as safetensors_bytes

from .atomic import atomic_torch_save, atomic_write
from .errors import UserError
from .model import RWKV7, RWKV7Config
from .safe_load import safe_torch_load


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


def official_suffix(path) -> str:
    """The format `save_official` writes to `path`: ".pth" (torch.save) or ".safetensors"; any other suffix is refused."""
    suffix = Path(path).suffix
    if suffix not in (".pth", ".safetensors"):
        raise UserError(f"cannot write {path}: an official checkpoint's name ends in .pth or .safetensors")
    return suffix


def load_state_dict_file(path) -> dict:
    """The tensors of an official checkpoint on CPU: a `.safetensors` file, or any other name as torch.save's format
    (read weights-only: a file from elsewhere never runs code)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return safe_torch_load(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        return load_safetensors(path)
    except Exception as e:  # the reader raises several types for a file that is not safetensors, or a truncated one
        raise UserError(f"cannot read {path} as a safetensors file ({type(e).__name__}: {str(e)[:120]})") from None


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


def load_partial(model: RWKV7, sd: dict, source: str) -> str:
    """Start `model`, which holds the official init, from the official state_dict `sd` of a model no larger in any
    dimension (RWKV-LM's load_partial). A tensor of the same shape is copied; a larger model tensor takes the source
    in its leading slice (`t[:a, :b] = src`) and keeps its init elsewhere; a model tensor the source lacks (a new
    layer) keeps its init. Refuses, before changing anything, another head size and a source tensor with no place in
    the model. Returns a one-line summary of what was copied."""
    own = model.state_dict()
    fits = f"{source} does not fit in this RWKV-7 model"
    head_size = config_from_state_dict(sd, source).head_size
    if head_size != model.cfg.head_size:  # r_k is [H, N]: heads may be added, never resized
        r_k = "blocks.0.att.r_k"
        raise UserError(f"{fits}: {r_k} has shape {tuple(sd[r_k].shape)}, the model's {tuple(own[r_k].shape)}: "
                        f"growing keeps the head size (set model.head_size={head_size})")
    for k, t in sd.items():
        if k not in own:
            raise UserError(f"{fits}: it has {k} {tuple(t.shape)}, the model has no {k} "
                            f"(a model grown from it needs at least its layers)")
        if t.dim() != own[k].dim() or any(a > b for a, b in zip(t.shape, own[k].shape)):
            raise UserError(f"{fits}: {k} has shape {tuple(t.shape)}, larger than the model's "
                            f"{tuple(own[k].shape)} (a model can grow from a checkpoint, not shrink)")
    grown = 0
    for k, t in sd.items():
        if t.shape == own[k].shape:
            own[k].copy_(t)
        else:
            own[k][tuple(slice(0, n) for n in t.shape)].copy_(t)
            grown += 1
    return (f"init_from {source}: {len(sd) - grown} tensors copied, {grown} grown into larger ones, "
            f"{len(own) - len(sd)} new at the official init")


def load_official(path, dtype=torch.float32, device="cpu") -> RWKV7:
    """Load any official RWKV-7 `.pth` or `.safetensors` (bf16 or fp32 tensors) into a new `RWKV7`."""
    sd = load_state_dict_file(path)
    cfg = config_from_state_dict(sd, source=str(path))
    with torch.device("meta"):
        model = RWKV7(cfg)
    load_into(model, {k: v.to(dtype, copy=True) for k, v in sd.items()}, source=str(path))
    return model.to(device=device)


def save_state_dict(sd: dict, path) -> None:
    """Write the tensors `sd` atomically: with torch.save to a `.pth` path, as safetensors to a `.safetensors` one;
    any other suffix is refused. A failed write (a full disk) leaves no file and is one line."""
    suffix = official_suffix(path)
    try:
        if suffix == ".pth":
            atomic_torch_save(sd, path)
        else:
            # safetensors builds the whole file in memory (one more copy of the tensors) before it is written.
            with atomic_write(path) as f:
                f.write(safetensors_bytes(sd, metadata={"format": "pt"}))
    except (OSError, RuntimeError) as e:
        cause = e if isinstance(e, OSError) else e.__context__   # torch.save wraps the OSError of a failed write
        if not isinstance(cause, OSError):
            raise
        raise UserError(f"cannot write {path}: {cause.strerror or cause}") from None


def save_official(model: nn.Module, path) -> None:
    """Write `model` in the official layout (bf16, contiguous CPU tensors, the official names): see save_state_dict."""
    save_state_dict({k: v.detach().to(device="cpu", dtype=torch.bfloat16).contiguous()
                     for k, v in model.state_dict().items()}, path)
