"""wkv7, the operator, and the one place that decides which implementation runs it:

    CPU tensors, or heads the kernels do not take    chunked_torch.py, one call per document (autograd's backward)
    CUDA tensors                                     triton_op.py, whose kernels are chosen here:
      forward     gluon_fwd.py where the Gluon kernels apply (_gluon_applies) and fwd_gluon, else triton_fwd.py
      backward    fused or split (_fused_backward); the fused one is gluon_bwd.py where _gluon_backward,
                  else triton_bwd.py's, as is the split one
"""
from functools import cache

import torch

from ..config import KernelConfig
from .chunked_torch import wkv7_chunked_torch
from .launch import interpreting

GLUON_TRITONS = ((3, 6), (3, 7))   # Gluon's API changes between releases: the versions these kernels are written for
# Shared memory a program of the Gluon backward asks for (bytes; the largest of its variants, float32 w: the CPU
# compile test holds the compiled figure to it). More than the 99 KB a block may have on sm_86 and sm_89 GPUs
# (consumer Ampere and Ada), which run the Triton backward instead; sm_80 allows 163 KB, sm_90 227 KB.
GLUON_BWD_SHARED = 111104


def wkv7(r, w, k, v, a, b, initial_state=None, output_final_state=False, cu_seqlens=None, config=None):
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
    config: the CUDA kernels' KernelConfig (None: the defaults); the CPU path has no settings.
    Memory (CUDA): for the backward, every chunk's entering state in float32 and, with keep_mats, its four
    [L, L] matrices: (N*N + 4 L^2) * 4 bytes per chunk and head (docs/kernels.md).

    Returns (y [B, T, H, N] in r's dtype, final state or None). Gradients flow to all inputs and initial_state.
    """
    _check_documents(r, cu_seqlens)
    if _backend(r) == "triton":
        from .triton_op import wkv7_triton   # imports Triton: only the CUDA path needs it
        y, s = wkv7_triton(r, w, k, v, a, b, initial_state, cu_seqlens, config)
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


def _check_documents(r, cu_seqlens):
    if cu_seqlens is not None and r.shape[0] != 1:
        raise ValueError(f"wkv7: cu_seqlens needs batch size 1, got {r.shape[0]}")


def _backend(x):
    """Which implementation runs `wkv7` on x: "triton" (triton_op.py) for CUDA tensors with a head size the
    kernels take (a multiple of 16 up to 128), else "torch" (chunked PyTorch: the CPU path)."""
    N = x.shape[-1]
    return "triton" if x.is_cuda and N % 16 == 0 and N <= 128 else "torch"


def forward_kernel(r, k, v, a, b, config: KernelConfig) -> str:
    """The forward that runs these inputs: "gluon" (gluon_fwd.py) or "triton" (triton_fwd.py)."""
    return "gluon" if config.fwd_gluon and _gluon_applies(r, k, v, a, b, L=config.chunk) else "triton"


def backward_kernel(programs, r, k, v, a, b, dy, kept, config: KernelConfig) -> str:
    """The backward that runs `programs` (sequences x heads) of these inputs, `kept`: whether the forward kept the
    chunk matrices. "gluon" (gluon_bwd.py, fused), "fused" or "split" (triton_bwd.py)."""
    gluon = _gluon_backward(r, k, v, a, b, dy, kept, config)
    if not _fused_backward(programs, r.device, gluon, config):
        return "split"
    return "gluon" if gluon else "fused"


def _gluon_applies(*xs, L):
    """Whether the Gluon kernels take these inputs: bf16 (w, not among xs, any float), heads of 64, chunks of 16,
    on a GPU with mma.sync (sm_80 on), under a Triton whose Gluon they are written for (GLUON_TRITONS; another
    version falls back rather than fail to compile)."""
    r = xs[0]
    return (r.is_cuda and not interpreting() and L == 16 and r.shape[-1] == 64 and _gluon_triton()
            and all(x.dtype == torch.bfloat16 for x in xs) and torch.cuda.get_device_capability(r.device)[0] >= 8)


@cache
def _gluon_triton():
    """Whether the installed Triton is one of GLUON_TRITONS."""
    import triton
    return tuple(int(part) for part in triton.__version__.split(".")[:2]) in GLUON_TRITONS


def _gluon_backward(r, k, v, a, b, dy, kept, config: KernelConfig):
    """Whether a fused backward of these inputs is the Gluon one (bwd_gluon; it reads the kept matrices and
    needs GLUON_BWD_SHARED bytes of shared memory, against the limit Triton's launcher checks)."""
    if not (config.bwd_gluon and kept and _gluon_applies(r, k, v, a, b, dy, L=config.chunk)):
        return False
    from triton.compiler.compiler import max_shared_mem      # in every Triton of GLUON_TRITONS
    return max_shared_mem(r.device.index) >= GLUON_BWD_SHARED


def _program_slots(device):
    """How many fused-backward programs the GPU runs at a time: two a multiprocessor (255 registers a thread)."""
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _fused_backward(programs, device, gluon, config: KernelConfig):
    """Whether the backward runs fused (bwd "fused"), split ("split") or, with "auto", fused when its `programs`
    (sequences x heads) keep enough of the GPU busy: a fused pass takes as long as its waves of programs
    (_program_slots at a time). The Triton fused backward wins when every wave is at least 90% full, the Gluon one
    (`gluon`: it runs) from a fifth of a wave (docs/benchmarks.md, "Fused or split backward: the auto rule")."""
    if config.bwd != "auto" or device.type != "cuda":
        return config.bwd != "split"
    slots = _program_slots(device)
    if gluon:
        return programs >= 0.2 * slots
    waves = -(-programs // slots)
    return programs >= 0.9 * waves * slots
