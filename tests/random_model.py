"""An RWKV7 with every parameter perturbed, so zero-initialised tensors (LoRA inputs, output matrices) matter."""
import torch

from rwkv7_train import RWKV7, RWKV7Config


def random_model(seed: int, scale: float = 0.2, **cfg) -> RWKV7:
    torch.manual_seed(seed)
    model = RWKV7(RWKV7Config(**cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model
