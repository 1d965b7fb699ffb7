"""Training FLOPs of RWKV-7 per token, GPU peaks, and model FLOPs utilisation (MFU). See docs/mfu.md.

Every figure counts 2 FLOPs per multiply-add and only matrix products: the linear layers (r/k/v/o, the w/a/v/g
LoRAs, the FFN, the head) and the chunked WKV-7 recurrence. There is no attention term: RWKV-7 has no attention
(no T x T score matrix), so charging it ctx^2 FLOPs as some tools do would invent work the model never does.
Elementwise work (norms, token shift, activations, the loss) and the embedding lookup are not counted.

    python -m rwkv7_train.flops            # a table for every configs/model/*.yaml at ctx 4096
"""
import argparse
import math
import re
from pathlib import Path
from typing import NamedTuple, Optional

from rwkv7_kernels import KernelConfig

from .model import RWKV7Config

# Steps per WKV chunk: the CUDA kernels' default (KernelConfig.chunk), which the CPU path's chunks also have.
DEFAULT_CHUNK = KernelConfig().chunk


class WKVChunkFlops(NamedTuple):
    """FLOPs of the WKV-7 chunked algorithm for one chunk of L steps of one head (head size N), by part.

    Forward, as the Triton and Gluon kernels run it (state S: N x N; the chunk's tiles: L x N):
      interactions: the four masked L x L matrices M_ab, M_ak, M_rb, M_rk, each an [L,N]@[N,L] product: 4 L^2 N
      inverse:      (I - M_ab)^{-1} by blocked inversion on dense L x L tiles: 3 products inside the 4x4
                    diagonal blocks, then 2 per doubling of the block size up to L/2: (2 log2 L - 1) L^3
      intra:        M_ak V, (I - M_ab)^{-1} (...), M_rb U, M_rk V: 4 L^2 N
      state:        A~ S^T, R~ S^T (read the state), U^T B^, V^T K^ (write it): 4 L N^2
    Backward (the fused kernels, chunk matrices kept from the forward so not recomputed):
      backward_intra: 18 L^2 N = U again (M_ak V, inverse: 2), dX (M_rb^T dY, inverse^T: 2), dV (M_rk^T dY,
                      M_ak^T dX: 2), the four dM (4), dR~ and dA~ (4), dB^ and dK^ (4)
      backward_state: 9 L N^2 = U's A~ S_0^T, dX's B^ dS'^T, dV's K^ dS'^T, dY S_0, dX S_0, U dS', V dS', and
                      dS_0's dY^T R~ and dX^T A~
    Each product counted once: the kernels' float32-accuracy splits (bf16x3, split tf32: 2-3 tensor-core products
    per product) and the Triton fallback's prefix sums as products with a ones matrix (Gluon scans them) are
    technique, not work of the algorithm. Masked triangular matrices count dense, as the kernels compute them.
    Heads larger than 64 make the Triton forward recompute the chunk matrices per 64 value rows (not counted).
    """
    interactions: float
    inverse: float
    intra: float
    state: float
    backward_intra: float
    backward_state: float

    @property
    def forward(self) -> float:
        return self.interactions + self.inverse + self.intra + self.state

    @property
    def backward(self) -> float:
        return self.backward_intra + self.backward_state


def wkv_chunk_flops(head_size: int, chunk_len: int = DEFAULT_CHUNK) -> WKVChunkFlops:
    """FLOPs of one chunk of one head, forward and backward (see WKVChunkFlops)."""
    L, N = chunk_len, head_size
    if L < 4 or L & (L - 1):
        raise ValueError(f"chunk_len must be a power of two >= 4 (the kernels take 16, 32, 64), got {chunk_len}")
    mac = 2.0   # FLOPs per multiply-add
    return WKVChunkFlops(
        interactions=mac * 4 * L * L * N,
        inverse=mac * (2 * math.log2(L) - 1) * L ** 3,
        intra=mac * 4 * L * L * N,
        state=mac * 4 * L * N * N,
        backward_intra=mac * 18 * L * L * N,
        backward_state=mac * 9 * L * N * N,
    )


class FlopSplit(NamedTuple):
    """Training (forward + backward) FLOPs per token: the linear layers, and the WKV recurrence."""
    matmul: float
    wkv: float

    @property
    def total(self) -> float:
        return self.matmul + self.wkv


def matmul_macs_per_token(cfg: RWKV7Config) -> dict:
    """Multiply-adds of the forward per token, by linear layer (summed over the blocks)."""
    C, L = cfg.n_embd, cfg.n_layer
    return {
        "att r/k/v/o": L * 4 * C * C,
        "lora w": L * 2 * C * cfg.dim_w,
        "lora a": L * 2 * C * cfg.dim_a,
        "lora g": L * 2 * C * cfg.dim_g,
        "lora v": (L - 1) * 2 * C * cfg.dim_v,   # layer 0 makes v_first: its value-residual LoRA is unused
        "ffn key/value": L * 2 * C * cfg.dim_ffn,
        "head": C * cfg.vocab_size,
    }


def training_flops_split(cfg: RWKV7Config, ctx_len: int, chunk_len: int = DEFAULT_CHUNK) -> FlopSplit:
    """Training FLOPs per token of sequences of ctx_len tokens, split into the linear layers and the WKV.

    Linear layers: 2 FLOPs per multiply-add, times 3 (the forward, then the backward's input and weight
    gradients). WKV: WKVChunkFlops per chunk and head, the sequence padded to whole chunks (a partial last chunk
    costs a full one in every kernel).
    """
    if ctx_len < 1:
        raise ValueError(f"ctx_len must be positive, got {ctx_len}")
    matmul = 6.0 * sum(matmul_macs_per_token(cfg).values())
    chunk = wkv_chunk_flops(cfg.head_size, chunk_len)
    chunks = math.ceil(ctx_len / chunk_len)
    wkv = cfg.n_layer * cfg.n_head * chunks * (chunk.forward + chunk.backward) / ctx_len
    return FlopSplit(matmul, wkv)


def training_flops_per_token(cfg: RWKV7Config, ctx_len: int, chunk_len: int = DEFAULT_CHUNK) -> float:
    """FLOPs of one forward + backward per token (linear layers + WKV, no attention term): see training_flops_split."""
    return training_flops_split(cfg, ctx_len, chunk_len).total


# Dense (no 2:4 sparsity) bf16 tensor-core peaks, FLOP/s, with float32 accumulation where the vendor lists both.
# Sources: NVIDIA datasheets (H100, H200, GH200, A100, A10, A30, A40, L4, L40, L40S, HGX B200, GB200 NVL72) and
# architecture whitepapers (Hopper for H100 SXM5/PCIe, Ampere GA102 for RTX 3090 and RTX A6000, Ada for RTX 4090),
# halving the "with sparsity" figures where only those are printed. A10G (AWS only, no NVIDIA datasheet): the
# figure AWS-oriented comparisons give (Baseten, "NVIDIA A10 vs A10G"); override it if it disagrees with yours.
# Patterns are tried in order against the lower-cased torch.cuda.get_device_name(); the first match wins.
GPU_PEAK_BF16 = [
    (r"\bgh200\b", "GH200", 989.4e12),
    (r"\bh200 nvl\b", "H200 NVL", 835.5e12),
    (r"\bh200\b", "H200 SXM", 989.4e12),
    (r"\bh100 nvl\b", "H100 NVL", 835.5e12),
    (r"\bh100 pcie\b", "H100 PCIe", 756.5e12),
    (r"\bh100\b.*\bhbm3", "H100 SXM", 989.4e12),       # "NVIDIA H100 80GB HBM3" is the SXM5 board
    (r"\bh100 sxm", "H100 SXM", 989.4e12),
    (r"\bgb200\b", "GB200", 2.5e15),
    (r"\bb200\b", "B200", 2.25e15),
    (r"\ba100\b", "A100", 312e12),                     # SXM4 and PCIe alike
    (r"\ba10g\b", "A10G", 70e12),
    (r"\ba10\b", "A10", 125e12),
    (r"\ba30\b", "A30", 165e12),
    (r"\ba40\b", "A40", 149.7e12),
    (r"\bl40s\b", "L40S", 362.05e12),
    (r"\bl40\b", "L40", 181.05e12),
    (r"\bl4\b", "L4", 121e12),
    (r"\brtx 4090\b", "RTX 4090", 165.2e12),
    (r"\brtx 3090\b(?! ti)", "RTX 3090", 71e12),
    (r"\brtx a6000\b", "RTX A6000", 154.8e12),
]


def known_gpu(device_name: Optional[str]) -> Optional[tuple[str, float]]:
    """(table name, dense bf16 peak FLOP/s) for a torch.cuda.get_device_name() string, or None if unknown."""
    if not device_name:
        return None
    name = device_name.lower()
    for pattern, label, peak in GPU_PEAK_BF16:
        if re.search(pattern, name):
            return label, peak
    return None


def peak_flops(device_name: Optional[str], override: Optional[float] = None) -> Optional[float]:
    """Peak FLOP/s per GPU that MFU is measured against: `override` (FLOP/s; the run config's mfu_peak_tflops
    times 1e12) if given, else the table's dense bf16 peak for device_name, else None (CPU, no name, or a GPU not
    in the table: MFU is then left out rather than made up)."""
    if override is not None:
        if not override > 0:
            raise ValueError(f"the peak FLOP/s override must be positive, got {override}")
        return float(override)
    found = known_gpu(device_name)
    return None if found is None else found[1]


def mfu(tokens_per_s_per_gpu: float, flops_per_token: float, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation: achieved FLOP/s per GPU over its peak; None when the peak is unknown."""
    if peak is None:
        return None
    return tokens_per_s_per_gpu * flops_per_token / peak


def _model_configs() -> list[tuple[str, RWKV7Config]]:
    from omegaconf import OmegaConf

    folder = Path(__file__).resolve().parent.parent / "configs" / "model"
    if not folder.is_dir():   # installed, not run from a checkout: the configs ship as rwkv7_train.configs
        from importlib.resources import files
        folder = Path(str(files("rwkv7_train.configs") / "model"))
    out = []
    for path in sorted(folder.glob("*.yaml")):
        d = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        out.append((path.stem, RWKV7Config.from_dict(d)))
    return out


def parameter_count(cfg: RWKV7Config, embedding: bool = True) -> int:
    """Parameters of RWKV7(cfg), counted on the meta device (no memory); embedding=False leaves out emb.weight,
    a lookup that costs no FLOPs."""
    import torch

    from .model import RWKV7

    with torch.device("meta"):
        model = RWKV7(cfg)
    return sum(p.numel() for name, p in model.named_parameters() if embedding or name != "emb.weight")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m rwkv7_train.flops",
                                description="Training FLOPs per token for every configs/model/*.yaml.")
    p.add_argument("--ctx-len", type=int, default=4096)
    p.add_argument("--chunk-len", type=int, default=DEFAULT_CHUNK)
    args = p.parse_args(argv)
    print(f"training (forward + backward) FLOPs per token, ctx {args.ctx_len}, WKV chunk {args.chunk_len}")
    print(f"{'config':>7} {'L':>3} {'C':>5} {'matmul GFLOP':>13} {'wkv GFLOP':>10} {'total GFLOP':>12} "
          f"{'wkv share':>9} {'6N GFLOP':>9}")
    for name, cfg in _model_configs():
        s = training_flops_split(cfg, args.ctx_len, args.chunk_len)
        six_n = 6 * parameter_count(cfg, embedding=False)
        print(f"{name:>7} {cfg.n_layer:>3} {cfg.n_embd:>5} {s.matmul / 1e9:>13.4f} {s.wkv / 1e9:>10.4f} "
              f"{s.total / 1e9:>12.4f} {s.wkv / s.total:>9.2%} {six_n / 1e9:>9.4f}")
    print("6N: 6 x parameters without the embedding, for comparison (it counts layer 0's unused v-LoRA)")
    print("GPU dense bf16 peaks (TFLOP/s), matched from torch.cuda.get_device_name():")
    for label, peak in dict((label, peak) for _, label, peak in GPU_PEAK_BF16).items():
        print(f"  {label:>10} {peak / 1e12:8.2f}")


if __name__ == "__main__":
    main()
