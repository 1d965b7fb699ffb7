"""Random WKV-7 inputs shaped like the model's: unit-normal r and v, 0.3-scaled k, a = -kk, b = kk * iclr."""
import math

import torch


def wkv_inputs(B, T, H, N, dtype=torch.float64, decay="mixed", seed=0):
    """decay: "mixed" spreads decays over (0.545, 1); "fast" pins them near 0.545; "slow" near 1."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    r = randn(B, T, H, N)
    k = randn(B, T, H, N) * 0.3
    v = randn(B, T, H, N)
    d = {"mixed": randn(B, T, H, N) * 3, "fast": torch.full((B, T, H, N), 12.0),
         "slow": torch.full((B, T, H, N), -12.0)}[decay]
    w = -math.exp(-0.5) * torch.sigmoid(d)
    kk = torch.nn.functional.normalize(randn(B, T, H, N), dim=-1)
    iclr = torch.sigmoid(randn(B, T, H, N))
    return [x.to(dtype) for x in (r, w, k, v, -kk, kk * iclr)]
