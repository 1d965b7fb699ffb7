"""rwkv7_train.flops against measured counts: the linear layers against torch's FlopCounterMode on a real
forward + backward of the loss, the WKV term against the products the kernels really issue (the chunked PyTorch
path's forward under FlopCounterMode; every tl.dot of the Triton kernels in Triton's interpreter)."""
import math
import os
from dataclasses import fields

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from random_model import random_model
from rwkv7_kernels import KernelConfig, wkv7
from rwkv7_kernels.wkv7.chunked_torch import CHUNK, wkv7_chunked_torch
from rwkv7_kernels.wkv7.triton_op import wkv7_triton
from rwkv7_train import flops
from rwkv7_train.model import RWKV7Config
from wkv_inputs import wkv_inputs


def counted(fn):
    """FLOPs that FlopCounterMode sees while fn runs."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_matmul_part_matches_flop_counter():
    # Distinct LoRA ranks, so a rank swapped for another or a LoRA left out shows; T not a multiple of the chunk.
    # The agreement is exact (FlopCounterMode counts 2 m k n per product, as flops.py does).
    cfg = dict(vocab_size=256, n_layer=3, n_embd=64, head_size=16, dim_w=32, dim_a=48, dim_v=40, dim_g=64)
    B, T = 2, 40
    model = random_model(0, **cfg)
    idx = torch.randint(0, cfg["vocab_size"], (B, T + 1), generator=torch.Generator().manual_seed(1))

    def step():
        model(idx[:, :-1], targets=idx[:, 1:]).backward()   # the training path: the fused head + loss

    total = counted(step)
    c = model.cfg
    # The WKV calls, measured alone with the model's shapes (every input needs a gradient there too), come out.
    xs = [x.requires_grad_() for x in wkv_inputs(B, T, c.n_head, c.head_size, dtype=torch.float32)]
    gy = torch.randn(B, T, c.n_head, c.head_size)
    wkv_one = counted(lambda: (wkv7(*xs)[0] * gy).sum().backward())
    assert wkv_one > 0
    measured = total - c.n_layer * wkv_one
    expected = flops.training_flops_split(c, T).matmul * B * T
    assert measured == pytest.approx(expected, rel=1e-9)
    # Even at a 1% tolerance, counting layer 0's unused v-LoRA would fail at this size.
    v_lora = 6 * 2 * c.n_embd * c.dim_v * B * T
    assert v_lora > 0.01 * expected


def test_v_lora_absent_on_layer_0():
    one = flops.matmul_macs_per_token(RWKV7Config(vocab_size=256, n_layer=1, n_embd=64, head_size=16))
    assert one["lora v"] == 0
    two = flops.matmul_macs_per_token(RWKV7Config(vocab_size=256, n_layer=2, n_embd=64, head_size=16, dim_v=48))
    assert two["lora v"] == 2 * 64 * 48


def test_default_chunk_is_the_kernels():
    assert flops.DEFAULT_CHUNK == CHUNK == KernelConfig().chunk


@pytest.mark.parametrize("L", [16, 32])
def test_wkv_forward_matches_chunked_torch_path(L):
    """The CPU path's forward issues the same products as the kernels' forward except the inverse: it solves the
    two triangular systems (torch.linalg.solve_triangular, which FlopCounterMode does not count) instead of
    forming (I - M_ab)^{-1}. Its backward is autograd's, a different product list from the kernels' hand-written
    one, so only the forward is compared here; the kernels' backward is counted below."""
    B, T, H, N = 2, 3 * L - 5, 3, 32          # a partial last chunk: padded, it costs a full one
    xs = wkv_inputs(B, T, H, N, dtype=torch.float32)
    with torch.no_grad():
        measured = counted(lambda: wkv7_chunked_torch(*xs, chunk_size=L))
    per_chunk = flops.wkv_chunk_flops(N, L)
    chunks = B * H * math.ceil(T / L)
    assert measured == pytest.approx(chunks * (per_chunk.forward - per_chunk.inverse), rel=1e-12)


class DotCounter:
    """Multiply-adds of every tl.dot that Triton's interpreter runs, less the prefix sums that the Triton backward
    computes as products with a triangular matrix of ones (_step_sums; Gluon, the GPU's backward, scans them):
    those are counted apart, as dots."""

    def __init__(self, create_dot):
        self.create_dot = create_dot
        self.macs = 0
        self.step_sum_dots = 0

    def __call__(self, a, b, d, *args):
        x, y = a.data, b.data
        ones = np.ones_like(x)
        if x.ndim == 2 and x.shape[0] == x.shape[1] and (
                np.array_equal(x, np.tril(ones)) or np.array_equal(x, np.triu(ones))):
            self.step_sum_dots += 1
        else:
            self.macs += x.shape[-2] * x.shape[-1] * y.shape[-1]
        return self.create_dot(a, b, d, *args)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="counts dots in Triton's interpreter")
@pytest.mark.parametrize("L", [16, 32])
def test_wkv_matches_triton_kernel_products(L, monkeypatch):
    """Every product of the Triton forward and fused backward (the CUDA path; the Gluon kernels issue the same
    ones, stacked), counted as the kernels run in the interpreter, against wkv_chunk_flops: forward and backward
    apart."""
    from triton.runtime import interpreter

    # one dot per product (no float32-accuracy splits)
    config = KernelConfig(chunk=L, **{f.name: "ieee" for f in fields(KernelConfig) if f.name.startswith("prec")})
    counter = DotCounter(interpreter.interpreter_builder.create_dot)
    monkeypatch.setattr(interpreter.interpreter_builder, "create_dot", counter)

    B, T, H, N = 1, 2 * L + 3, 2, 32         # a partial last chunk: masked, it costs a full one
    xs = [x.requires_grad_() for x in wkv_inputs(B, T, H, N, dtype=torch.float32)]
    y, _ = wkv7_triton(*xs, config=config)
    fwd, fwd_step_sums = counter.macs, counter.step_sum_dots
    counter.macs = counter.step_sum_dots = 0
    (y * torch.randn_like(y)).sum().backward()

    per_chunk = flops.wkv_chunk_flops(N, L)
    chunks = B * H * math.ceil(T / L)
    assert 2 * fwd == pytest.approx(chunks * per_chunk.forward, rel=1e-12)
    assert fwd_step_sums == 0
    assert 2 * counter.macs == pytest.approx(chunks * per_chunk.backward, rel=1e-12)
    assert counter.step_sum_dots == chunks * 4     # c and dw, each two tf32 parts: what the count leaves out


def test_wkv_term_per_token():
    cfg = RWKV7Config(vocab_size=256, n_layer=3, n_embd=128, head_size=64)
    c = flops.wkv_chunk_flops(64, 16)
    assert flops.training_flops_split(cfg, 4096).wkv == pytest.approx(3 * 2 * (c.forward + c.backward) / 16)
    # 17 tokens take two chunks: the padded one costs as much as a full one
    assert flops.training_flops_split(cfg, 17).wkv == pytest.approx(3 * 2 * 2 * (c.forward + c.backward) / 17)
    # the chunk length enters the count: longer chunks, more intra-chunk work per token
    assert flops.training_flops_split(cfg, 4096, 32).wkv > flops.training_flops_split(cfg, 4096, 16).wkv
    with pytest.raises(ValueError):
        flops.wkv_chunk_flops(64, 24)


@pytest.mark.parametrize("name, label", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"),
    ("NVIDIA H200 NVL", "H200 NVL"),
    ("NVIDIA GH200 480GB", "GH200"),
    ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA A100 80GB PCIe", "A100"),
    ("NVIDIA A10G", "A10G"),
    ("NVIDIA A10", "A10"),
    ("NVIDIA L4", "L4"),
    ("NVIDIA L40S", "L40S"),
    ("NVIDIA L40", "L40"),
    ("NVIDIA GeForce RTX 4090", "RTX 4090"),
    ("NVIDIA GeForce RTX 3090", "RTX 3090"),
    ("NVIDIA B200", "B200"),
    ("NVIDIA GB200", "GB200"),
])
def test_peak_flops_known(name, label):
    found = flops.known_gpu(name)
    assert found is not None and found[0] == label
    assert flops.peak_flops(name, None) == found[1]


def test_peak_flops_table_is_dense_bf16():
    # dense figures, not the doubled "with sparsity" ones: spot checks against the datasheets
    assert flops.peak_flops("NVIDIA H100 80GB HBM3", None) == pytest.approx(989.4e12)
    assert flops.peak_flops("NVIDIA A100-SXM4-40GB", None) == pytest.approx(312e12)


@pytest.mark.parametrize("name", [None, "", "cpu", "Intel(R) Xeon(R) CPU", "NVIDIA GeForce RTX 3090 Ti",
                                  "NVIDIA Tesla T4", "Tesla V100-SXM2-16GB", "AMD Instinct MI300X"])
def test_peak_flops_unknown_is_none(name):
    assert flops.peak_flops(name, None) is None
    assert flops.mfu(1e5, 1e9, flops.peak_flops(name, None)) is None


def test_peak_override_wins():
    assert flops.peak_flops("NVIDIA H100 80GB HBM3", 500e12) == 500e12
    assert flops.peak_flops(None, 123e12) == 123e12
    with pytest.raises(ValueError):
        flops.peak_flops("NVIDIA H100 80GB HBM3", 0.0)


def test_mfu():
    peak = flops.peak_flops("NVIDIA H100 80GB HBM3", None)
    assert flops.mfu(2e5, 1e9, peak) == pytest.approx(2e5 * 1e9 / peak)


def test_main_prints_every_config(capsys):
    flops.main([])
    out = capsys.readouterr().out
    for name in ("0.1b", "1.5b", "7b"):
        assert f" {name} " in out
