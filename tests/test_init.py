"""The default initialisation and sizes follow the official RWKV-7 recipe (RWKV7_FACTS sections 2 and 3)."""
import math

import pytest
import torch

from random_model import random_model
from rwkv7_train import RWKV7, RWKV7Config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return RWKV7(RWKV7Config(vocab_size=1000, n_layer=3, n_embd=128, head_size=64))


def test_lerp_and_decay_vectors_follow_the_formulas(model):
    C, L = 128, 3
    for l, block in enumerate(model.blocks):
        att = block.att
        r0, r1 = l / (L - 1), 1 - l / L
        for n in (0, 1, 63, 64, 127):
            ddd = n / C
            lin = n / (C - 1) - 0.5
            s = ((n % 64) - 31.5) / 31.5
            zig = s * abs(s)
            assert att.x_r[0, 0, n].item() == pytest.approx(1 - ddd ** (0.2 * r1), abs=1e-6)
            assert att.x_w[0, 0, n].item() == pytest.approx(1 - ddd ** (0.9 * r1), abs=1e-6)
            assert att.x_k[0, 0, n].item() == pytest.approx(1 - ddd ** (0.7 * r1), abs=1e-6)
            assert att.x_g[0, 0, n].item() == pytest.approx(1 - ddd ** (0.2 * r1), abs=1e-6)
            assert block.ffn.x_k[0, 0, n].item() == pytest.approx(1 - ddd ** (r1 ** 4), abs=1e-6)
            w0 = -6 + 6 * (n / (C - 1)) ** (1 + r0 ** 0.3) + 0.5 + 2.5 * zig
            assert att.w0[0, 0, n].item() == pytest.approx(w0, abs=1e-5)
            assert att.a0[0, 0, n].item() == pytest.approx(-0.19 + 0.3 * zig + 0.4 * lin, abs=1e-6)
            assert att.v0[0, 0, n].item() == pytest.approx(0.73 - 0.4 * lin, abs=1e-6)
            assert att.k_k[0, 0, n].item() == pytest.approx(0.71 - 0.1 * lin, abs=1e-6)
        assert torch.all(att.k_a == 1.02) and torch.all(att.r_k == -0.04)
        assert torch.allclose(att.ln_x.weight, torch.full((C,), ((1 + l) / L) ** 0.7))


def test_zero_and_orthogonal_matrices(model):
    for block in model.blocks:
        att = block.att
        for p in (att.w1, att.a1, att.v1, att.g1, att.output.weight, block.ffn.value.weight):
            assert torch.count_nonzero(p) == 0
        # orthogonal with gain g: rows (or columns) are orthonormal times g
        k = att.key.weight
        assert torch.allclose(k @ k.T, 0.01 * torch.eye(128), atol=1e-5)
        r = att.receptance.weight
        assert torch.allclose(r @ r.T, torch.eye(128), atol=1e-5)
        w2 = att.w2  # [rank, C]: orthonormal rows times 0.1
        assert torch.allclose(w2 @ w2.T, 0.01 * torch.eye(w2.shape[0]), atol=1e-5)
        fk = block.ffn.key.weight  # [4C, C], tall: gain sqrt(4) on orthonormal columns
        assert torch.allclose(fk.T @ fk, 4 * torch.eye(128), atol=1e-4)
    head = model.head.weight  # [V, C]: gain 0.5 sqrt(V/C)
    assert torch.allclose(head.T @ head, 0.25 * (1000 / 128) * torch.eye(128), atol=1e-4)
    assert model.emb.weight.abs().max() <= 1e-4


@pytest.mark.parametrize("L,C,ranks,millions", [
    (12, 768, (64, 64, 32, 128), 191.1), (24, 1024, (64, 64, 32, 128), 450.8),
    (24, 2048, (96, 96, 64, 256), 1527.7), (32, 2560, (96, 96, 64, 320), 2948.1)])
def test_released_sizes_have_the_published_parameter_counts(L, C, ranks, millions):
    w, a, v, g = ranks
    with torch.device("meta"):
        model = RWKV7(RWKV7Config(n_layer=L, n_embd=C, dim_w=w, dim_a=a, dim_v=v, dim_g=g))
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == millions


@pytest.mark.parametrize("C,expected", [(768, (64, 64, 32, 128)), (2048, (96, 96, 64, 256)), (2560, (96, 96, 64, 320))])
def test_default_lora_ranks_follow_the_formula(C, expected):
    cfg = RWKV7Config(n_embd=C)
    assert (cfg.dim_w, cfg.dim_a, cfg.dim_v, cfg.dim_g) == expected
    assert cfg.dim_w == max(32, round(1.8 * math.sqrt(C) / 32) * 32)


def test_model_configs_shipped_with_the_package_build_those_sizes():
    from importlib.resources import files

    import yaml

    for name, millions in [("0.1b", 191.1), ("0.4b", 450.8), ("1.5b", 1527.7), ("2.9b", 2948.1)]:
        cfg = yaml.safe_load((files("rwkv7_train.configs") / "model" / f"{name}.yaml").read_text())
        with torch.device("meta"):
            model = RWKV7(RWKV7Config.from_dict(cfg))
        assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == millions


def test_every_trainable_parameter_gets_a_gradient():
    # DDP requires it; layer 0's unused value-residual LoRA is frozen rather than left without a gradient.
    model = random_model(0, scale=0.1, vocab_size=100, n_layer=2, n_embd=64, head_size=32)
    model(torch.randint(0, 100, (2, 20))).logsumexp(-1).mean().backward()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
