"""The official optimiser recipe: AdamW parameter groups and the learning-rate schedule."""
import math

import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay only on 2-D `.weight` matrices (emb, head, r/k/v/o, ffn); `att.w0` learns at 2x lr.

    Each group carries `lr_scale`, which the schedule multiplies into the learning rate, and a `name` (decay,
    no_decay, w0) under which its learning rate is logged."""
    decay, no_decay, w0 = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("att.w0"):
            w0.append(p)
        elif name.endswith(".weight") and p.dim() == 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
        {"name": "w0", "params": w0, "weight_decay": 0.0, "lr_scale": 2.0},
    ]
    return [g for g in groups if g["params"]]


def lr_at(tokens: float, step: int, lr_init: float, lr_final: float, warmup_steps: int, total_tokens: float) -> float:
    """Cosine from lr_init to lr_final over `total_tokens`; the first `warmup_steps` steps scale it by
    0.01 + 0.99 * step / warmup_steps."""
    progress = min(max(tokens / total_tokens, 0.0), 1.0) if total_tokens > 0 else 0.0
    lr = lr_final + 0.5 * (lr_init - lr_final) * (1.0 + math.cos(math.pi * progress))
    if warmup_steps > 0 and step < warmup_steps:
        lr *= 0.01 + 0.99 * step / warmup_steps
    return lr
