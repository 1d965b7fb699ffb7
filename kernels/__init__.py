"""WKV-7 operators for rwkv7-train (import name `rwkv7_kernels`).

The one public entry point is `wkv7`; `wkv7_naive` (step-by-step definition) and `wkv7_chunked_torch` (the CPU
path) are exported for tests and benchmarks.
"""
import torch

from .chunked_torch import wkv7_chunked_torch
from .naive import wkv7_naive

__all__ = ["wkv7", "wkv7_naive", "wkv7_chunked_torch"]


def wkv7(r, w, k, v, a, b, initial_state=None, output_final_state=False, cu_seqlens=None):
    """The WKV-7 recurrence over a sequence, per batch row and head.

    Shapes: r, w, k, v, a, b are [B, T, H, N] (N = head size), any float dtype; computation is in float32.
    Decay encoding: `w` is the natural log of the per-key-channel decay, so the decay is exp(w). RWKV-7 uses
    w = -exp(-0.5) * sigmoid(d), computed in float32, which keeps the decay inside (exp(-exp(-0.5)), 1) =
    (0.545, 1) exactly; pass it in float32.
    State: float32 [B, H, N, N], S[b, h, i, j] with i the value index and j the key index (BlinkDL's layout).
    Recurrence, per step t:   S_ij <- S_ij exp(w_j) + (sum_j' S_ij' a_j') b_j + v_i k_j ;   y_i = sum_j S_ij r_j
    (RWKV-7 passes a = -kk and b = kk * iclr.)
    cu_seqlens: optional int tensor [D + 1] of document offsets into T (B must be 1); the state restarts from
    initial_state[d] (or zero) at each document, and the final states are [D, H, N, N]. Documents may have any
    length, 1 and 0 included.
    Backends (see `_backend`): on CUDA the Triton kernels (float32 chunk states, documents handled inside the
    kernel; for bf16 inputs and N = 64 the forward and the fused backward are gluon_wkv7.py's, in Triton's Gluon
    dialect); elsewhere the chunked PyTorch path, one call per document.
    Memory: for the backward the CUDA path keeps every 16-step chunk's entering state in float32 and its four
    16x16 chunk matrices (triton_wkv7.CONFIG["keep_mats"]): (N*N + 1024) * 4 bytes per chunk and head, 20 KB at
    N=64, i.e. 1.25 KB per token and head (2.7 GB at B=8, T=4096, H=64); activation checkpointing of the blocks
    recomputes them instead. During the backward, when B*H is too small to fill the GPU (see
    triton_wkv7._fused_backward), another N*N float32 per chunk and head holds dS for a moment.

    Returns (y [B, T, H, N] in r's dtype, final state or None). Gradients flow to all inputs and initial_state.
    """
    if cu_seqlens is not None and r.shape[0] != 1:
        raise ValueError(f"wkv7: cu_seqlens needs batch size 1, got {r.shape[0]}")
    if _backend(r) == "triton":
        from .triton_wkv7 import wkv7_triton   # handles cu_seqlens natively, one program per document
        y, s = wkv7_triton(r, w, k, v, a, b, initial_state, cu_seqlens)
        return y, (s if output_final_state else None)
    if cu_seqlens is None:
        y, s = wkv7_chunked_torch(r, w, k, v, a, b, initial_state)
        return y, (s.float() if output_final_state else None)
    bounds = cu_seqlens.tolist()
    ys, states = [], []
    for d, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        s0 = None if initial_state is None else initial_state[d:d + 1]
        y, s = wkv7_chunked_torch(*(x[:, lo:hi] for x in (r, w, k, v, a, b)), s0)
        ys.append(y)
        states.append(s)
    y = torch.cat(ys, dim=1)
    return y, (torch.cat(states).float() if output_final_state else None)


def _backend(x):
    """Which implementation runs `wkv7` on x: "triton" (kernels/triton_wkv7.py) for CUDA tensors with a head
    size the kernels take (a multiple of 16 up to 128), else "torch" (chunked PyTorch: the CPU path)."""
    N = x.shape[-1]
    return "triton" if x.is_cuda and N % 16 == 0 and N <= 128 else "torch"
