"""How the Triton and Gluon kernels are launched: where the sequences and their chunk states lie (Layout), and the
options and dot modes each Triton kernel is compiled with (settings). Imports no Triton: dispatch.py reads it."""
import os

import torch

# Warps and software-pipelining stages of each Triton kernel. One stage for the sequential passes over the
# chunks (forward, fused backward): the pipeliner's prefetch pointers cost registers they do not have, and they
# spill (docs/benchmarks.md has the timings of the alternatives).
LAUNCH = {"fwd": dict(num_warps=4, num_stages=1), "bwd": dict(num_warps=4, num_stages=1),
          "dstate": dict(num_warps=4, num_stages=2), "grad": dict(num_warps=4, num_stages=2)}
BACKWARD_KERNELS = ("bwd", "dstate", "grad")


def interpreting():
    """Whether Triton runs the kernels in its interpreter (TRITON_INTERPRET=1: the CPU tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def settings(N, kernel, device, dtype, config):
    """Value block size and launch options of one Triton kernel ("fwd", "bwd", "dstate" or "grad") for inputs of
    `dtype` under `config` (a KernelConfig).

    The dot modes are chosen against the bf16 floor of bf16 inputs; for float32 inputs, whose users expect
    float32 results, every mode short of float32 accuracy becomes "tf32x3". The interpreter computes every tl.dot
    in IEEE float32 whatever its mode ("split" then adds two exact parts)."""
    bv = min(N, {"fwd": config.fwd_bv, "dstate": config.dstate_bv}.get(kernel, N))
    precs = dict(PREC=config.prec, PREC_S=config.prec_ds if kernel in BACKWARD_KERNELS else config.prec_s,
                 PREC_INV=config.prec_inv, PREC_RK=config.prec_rk)
    if kernel == "fwd":
        precs.update(PREC_RS=config.prec_rs, PREC_RKV=config.prec_rkv)
    extra = {}
    if kernel == "bwd":       # PTX prefetches: the interpreter has no use for them (nor a way to run them)
        extra["PREFETCH"] = config.prefetch if device.type == "cuda" and not interpreting() else 0
        extra["RESYNC"] = config.g_resync
    if device.type != "cuda" or interpreting():
        precs = {key: "split" if mode == "split" else "ieee" for key, mode in precs.items()}
        return bv, dict(num_warps=1, **precs, **extra)
    if dtype == torch.float32:
        precs = {key: mode if mode in ("ieee", "tf32x3") else "tf32x3" for key, mode in precs.items()}
    return bv, dict(**LAUNCH[kernel], **precs, **extra)


class Layout:
    """Sequences in the flattened [B*T] token axis: B rows of T, or the documents of cu_seqlens; and their chunks.

    State slots: sequence n owns n_chunks(n) + 1 consecutive slots (each chunk's entering state, then the final
    one). With cu_seqlens every size is an upper bound computed on the device (no host sync): sum_d ceil(len_d / L)
    <= T / L + D, and the chunk-parallel grid has that many programs, the surplus ones exiting at once.
    """

    def __init__(self, B, T, cu_seqlens, device, L):
        self.is_varlen = cu_seqlens is not None
        self.T, self.L = T, L
        if self.is_varlen:
            self.cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int64).contiguous()
            self.n_seq = cu_seqlens.numel() - 1
            n_chunks = torch.div(self.cu_seqlens[1:] - self.cu_seqlens[:-1] + L - 1, L, rounding_mode="floor")
            chunk_ends = torch.cumsum(n_chunks, 0)
            self.chunk_offsets = chunk_ends - n_chunks
            self.n_chunk_programs = -(-T // L) + self.n_seq
            # the document of each chunk-parallel program (n_seq past the last chunk)
            self.chunk_docs = torch.searchsorted(
                chunk_ends, torch.arange(self.n_chunk_programs, device=device), right=True)
            self.n_slots = self.n_chunk_programs + self.n_seq
        else:
            self.cu_seqlens = self.chunk_offsets = self.chunk_docs = None
            self.n_seq = B
            self.n_chunk_programs = -(-T // L)
            self.n_slots = B * (self.n_chunk_programs + 1)

    def chunk_grid(self, H):
        """Grid of the chunk-parallel kernels (see triton_bwd._chunk_of_program)."""
        return (self.n_chunk_programs, H if self.is_varlen else self.n_seq * H)
