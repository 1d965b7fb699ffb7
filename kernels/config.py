"""KernelConfig: the launch and precision settings of the CUDA kernels, from the `kernel` config group.

The defaults are the measured best on Hopper (docs/kernels.md explains every field, docs/benchmarks.md has the
figures). None of them changes the operator's contract; the dot modes and g_resync change its rounding error.
"""
from dataclasses import dataclass, fields

BACKWARDS = ("auto", "fused", "split")
# tl.dot's own input precisions, and the two written out in triton_chunk._mm
DOT_MODES = ("tf32", "tf32x3", "ieee", "bf16x3", "split")


@dataclass(frozen=True)
class KernelConfig:
    """Settings of the WKV-7 CUDA path (the CPU path has none).

    chunk: steps per chunk, 16, 32 or 64 (the Gluon kernels take 16; other lengths run the Triton ones).
    fwd_gluon, bwd_gluon: the forward and the fused backward run the Gluon kernels where they apply (bf16 inputs,
        heads of 64, chunks of 16, a GPU and Triton they support: see dispatch.py); else the Triton ones.
    keep_mats: the forward keeps every chunk's four [L, L] matrices for the backward instead of it recomputing
        them (4 L^2 floats per chunk and head, a quarter of a chunk state at L = 16; the Gluon backward needs them).
    bwd: "fused" (one pass per sequence and head), "split" (a sequential dS pass, then all chunks in parallel) or
        "auto" (fused when its programs fill the GPU: dispatch._fused_backward).
    fwd_bv, dstate_bv: value rows of S per program in the Triton forward and of dS in the split backward's dS
        pass (heads of 128 run in two blocks of 64).
    prec, prec_s, prec_ds, prec_inv, prec_rk, prec_rkv, prec_rs: dot modes of the Triton kernels' float32
        products (one of DOT_MODES): the chunk-internal ones; those reading or writing the state in the forward;
        the backward's products with S and dS; inside (I - M_ab)^{-1}; M_rk = R~ K^T (forward and backward); M_rk V;
        R~ S^T. Chosen against the bf16 floor of bf16 inputs; float32 inputs raise every mode short of float32
        accuracy to "tf32x3". Gluon computes every product in bf16x3.
    prefetch: how many chunks ahead the Triton fused backward asks the L2 cache for a chunk's inputs (0: off).
    g_resync: every how many chunks the Triton fused backward recomputes sum_i (S_L dS)_i in float32 instead of
        stepping it back through tf32 products, whose rounding adds up over the chunks.
    """
    chunk: int = 16
    fwd_gluon: bool = True
    bwd_gluon: bool = True
    keep_mats: bool = True
    bwd: str = "auto"
    fwd_bv: int = 64
    dstate_bv: int = 64
    prec: str = "tf32"
    prec_s: str = "bf16x3"
    prec_ds: str = "tf32"
    prec_inv: str = "tf32"
    prec_rk: str = "bf16x3"
    prec_rkv: str = "split"
    prec_rs: str = "bf16x3"
    prefetch: int = 1
    g_resync: int = 8

    def __post_init__(self):
        def need(ok, name, allowed):
            if not ok:
                raise ValueError(f"kernel.{name}={getattr(self, name)!r}: use {allowed}")

        need(self.chunk in (16, 32, 64), "chunk", "16, 32 or 64")
        need(self.bwd in BACKWARDS, "bwd", " or ".join(BACKWARDS))
        for name in ("fwd_bv", "dstate_bv"):
            need(getattr(self, name) in (16, 32, 64, 128), name, "16, 32, 64 or 128")
        for f in fields(self):
            if f.name.startswith("prec"):
                need(getattr(self, f.name) in DOT_MODES, f.name, "one of " + ", ".join(DOT_MODES))
        need(isinstance(self.prefetch, int) and self.prefetch >= 0, "prefetch", "an integer >= 0")
        need(isinstance(self.g_resync, int) and self.g_resync >= 1, "g_resync", "an integer >= 1")
