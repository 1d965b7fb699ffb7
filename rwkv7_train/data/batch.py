"""The batch the DataModule hands to the LightningModule, and how windows are collated into it.

Every sample is one window of ctx_len + 1 tokens (RWKV-LM reads the same): idx is its first ctx_len tokens,
targets its last ctx_len. In packed mode the batch also carries cu_seqlens, the document starts in the flattened
B*T token axis, so the WKV kernel can restart its state at each document (kernels' `wkv7(..., cu_seqlens=)`).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from rwkv7_train.data.binidx import EOD


class Batch(NamedTuple):
    """idx, targets: [B, T] int64; source: [B] int64, index into the DataModule's source_names;
    cu_seqlens: packed mode only, int64 [D + 1]: 0, every document start (every row start b*T among them), B*T."""

    idx: Tensor
    targets: Tensor
    source: Tensor
    cu_seqlens: Optional[Tensor] = None


def document_starts(idx: Tensor) -> Tensor:
    """cu_seqlens for a [B, T] batch: a document starts at each row start and right after each token 0 (the 0
    ends the document it follows), so no document crosses a row."""
    B, T = idx.shape
    starts = torch.zeros(B * T + 1, dtype=torch.bool)
    starts[::T] = True  # 0, T, ..., B*T
    starts[1:] |= idx.reshape(-1) == EOD
    return torch.nonzero(starts).flatten()


def collate(samples: list[tuple[np.ndarray, int]], packed: bool) -> Batch:
    """Windows (ctx_len + 1 int64 tokens each) and their source indices -> one Batch."""
    windows, sources = zip(*samples)
    w = torch.from_numpy(np.stack(windows))
    idx, targets = w[:, :-1].contiguous(), w[:, 1:].contiguous()
    return Batch(idx, targets, torch.tensor(sources, dtype=torch.long), document_starts(idx) if packed else None)
