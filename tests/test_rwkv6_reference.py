"""RWKV6 (x060) against BlinkDL's `rwkv` package, its chunked WKV against the step-by-step recurrence, its init."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from rwkv7_train.errors import UserError
from rwkv7_train.rwkv6 import RWKV6, RWKV6Config, config_from_state_dict, wkv6
from rwkv7_train.upgrade import checkpoint_version

SMALL = dict(vocab_size=300, n_layer=2, n_embd=128, head_size=64)

# The rest of the suite imports `rwkv.model` with RWKV_V7_ON=1, which makes `rwkv.model.RWKV` the x070 class;
# the x060 reference therefore runs in its own process, with the variable unset.
REFERENCE = """
import sys, torch
from rwkv.model import RWKV
name, tokens, out = sys.argv[1], [int(t) for t in sys.argv[2].split(",")], sys.argv[3]
logits, _ = RWKV(name, strategy="cpu fp32", verbose=False).forward(tokens, None, full_output=True)
torch.save(logits.float(), out)
"""


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def reference_logits(pth, tokens):
    """Logits [T, V] of the `rwkv` package's x060 forward for the checkpoint `pth` (a .pth path)."""
    env = {k: v for k, v in os.environ.items() if k != "RWKV_V7_ON"}
    env.update(RWKV_JIT_ON="0", RWKV_CUDA_ON="0")
    out = pth.with_suffix(".logits")
    subprocess.run([sys.executable, "-c", REFERENCE, str(pth)[: -len(".pth")], ",".join(map(str, tokens)), str(out)],
                   env=env, check=True, capture_output=True)
    return torch.load(out, weights_only=True)


def wkv6_naive(r, k, v, log_w, u):
    """The definition, one step at a time: y_t = r_t (S + diag(u) k_t^T v_t), S <- diag(w_t) S + k_t^T v_t."""
    B, T, H, N = r.shape
    S = r.new_zeros(B, H, N, N)
    y = torch.empty_like(r)
    for t in range(T):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]
        y[:, t] = torch.einsum("bhj,bhji->bhi", r[:, t], S + u[None, :, :, None] * kv)
        S = torch.exp(log_w[:, t, :, :, None]) * S + kv
    return y


def wkv_inputs(B, T, H, N, seed):
    """float64 inputs with decays from almost none to e^-20 per step (log_w = -exp(d), d in (-5, 3))."""
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g, dtype=torch.float64) for _ in range(3))
    log_w = -torch.exp(torch.rand(B, T, H, N, generator=g, dtype=torch.float64) * 8 - 5)
    u = torch.randn(H, N, generator=g, dtype=torch.float64)
    return r, k, v, log_w, u


def test_logits_match_rwkv_package_reference(tmp_path):
    torch.manual_seed(0)
    model = RWKV6(RWKV6Config(**SMALL))
    with torch.no_grad():   # perturb every parameter, so the zero-initialised ones (LoRA inputs, outputs) matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    torch.save({k: t.float() for k, t in model.state_dict().items()}, tmp_path / "m.pth")
    tokens = torch.randint(0, SMALL["vocab_size"], (20,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens[None])[0]
    ref = reference_logits(tmp_path / "m.pth", tokens.tolist())
    assert ours.shape == ref.shape == (20, SMALL["vocab_size"])
    assert rel(ours, ref) < 1e-5
    assert (ours - ref).abs().max() < 1e-4 * ref.abs().max()


def test_parameters_are_the_official_x060_layout():
    cfg = RWKV6Config(**SMALL)
    C, F_, H = cfg.n_embd, cfg.dim_ffn, cfg.n_head
    with torch.device("meta"):
        sd = RWKV6(cfg).state_dict()
    assert F_ == 448   # 3.5 * 128 rounded down to a multiple of 32
    expected = {"emb.weight": (300, C), "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,),
                "ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (300, C)}
    for i in range(cfg.n_layer):
        b = f"blocks.{i}."
        expected.update({b + f"ln{j}.{w}": (C,) for j in (1, 2) for w in ("weight", "bias")})
        expected.update({b + f"att.time_maa_{x}": (1, 1, C) for x in "xwkvrg"})
        expected.update({b + "att.time_maa_w1": (C, 5 * 32), b + "att.time_maa_w2": (5, 32, C),
                         b + "att.time_decay": (1, 1, C), b + "att.time_decay_w1": (C, 64),
                         b + "att.time_decay_w2": (64, C), b + "att.time_faaaa": (H, 64),
                         b + "att.ln_x.weight": (C,), b + "att.ln_x.bias": (C,),
                         b + "ffn.time_maa_k": (1, 1, C), b + "ffn.time_maa_r": (1, 1, C),
                         b + "ffn.key.weight": (F_, C), b + "ffn.receptance.weight": (C, C),
                         b + "ffn.value.weight": (C, F_)})
        expected.update({b + f"att.{m}.weight": (C, C) for m in ("receptance", "key", "value", "gate", "output")})
    assert {k: tuple(t.shape) for k, t in sd.items()} == expected


@pytest.mark.parametrize("T, chunk_size", [(37, 16), (37, 5), (16, 16), (1, 16)])
def test_chunked_wkv_equals_step_by_step_recurrence(T, chunk_size):
    r, k, v, log_w, u = wkv_inputs(2, T, 3, 8, seed=T + chunk_size)
    y = wkv6(r, k, v, log_w, u, chunk_size=chunk_size)
    assert y.dtype == torch.float64 and y.shape == (2, T, 3, 8)
    assert rel(y, wkv6_naive(r, k, v, log_w, u)) < 1e-12


def test_chunked_wkv_in_float32_stays_close_to_float64():
    x = wkv_inputs(2, 100, 2, 16, seed=3)
    y32 = wkv6(*(t.float() for t in x))
    assert y32.dtype == torch.float32 and torch.isfinite(y32).all()
    assert rel(y32, wkv6_naive(*x)) < 1e-5


def test_chunked_wkv_gradients_equal_step_by_step_recurrence():
    inputs = [t.requires_grad_() for t in wkv_inputs(1, 21, 2, 8, seed=5)]
    dy = torch.randn(1, 21, 2, 8, dtype=torch.float64)
    chunked = torch.autograd.grad((wkv6(*inputs, chunk_size=8) * dy).sum(), inputs)
    naive = torch.autograd.grad((wkv6_naive(*inputs) * dy).sum(), inputs)
    for name, a, b in zip(("r", "k", "v", "log_w", "u"), chunked, naive):
        assert rel(a, b) < 1e-10, name


def test_init_gives_loss_near_ln_vocab_and_finite_gradients():
    torch.manual_seed(0)
    model = RWKV6(RWKV6Config(vocab_size=300, n_layer=2, n_embd=64, head_size=32))
    idx = torch.randint(0, 300, (2, 33))
    logits = model(idx[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, 300), idx[:, 1:].reshape(-1))
    assert abs(loss.item() - math.log(300)) < 0.5
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_bf16_model_keeps_bf16_activations_and_returns_float_logits():
    model = RWKV6(RWKV6Config(vocab_size=300, n_layer=1, n_embd=64, head_size=32)).to(torch.bfloat16)
    x = torch.randn(1, 9, 64, dtype=torch.bfloat16)
    assert model.blocks[0].att(x).dtype == torch.bfloat16
    logits = model(torch.tensor([[1, 2, 3]]))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_init_follows_rwkv_lm_x060_formulas():
    model = RWKV6(RWKV6Config(vocab_size=300, n_layer=4, n_embd=64, head_size=32))
    first, last = model.blocks[0].att, model.blocks[3].att
    assert first.time_decay[0, 0, 0] == -6 and first.time_decay[0, 0, -1] == -1
    assert torch.allclose(first.time_faaaa.flatten()[:3], torch.tensor([0.0, 0.1, -0.1]))   # layer 0: zigzag only
    assert last.time_faaaa.flatten()[0].item() == pytest.approx(1.0)
    assert last.time_maa_v[0, 0, 0].item() == pytest.approx(1 - 0.3)
    assert last.ln_x.weight[0] == 1.0 and first.ln_x.weight[0].item() == pytest.approx(0.25 ** 0.7)
    assert not first.time_maa_w1.any() and not first.time_decay_w1.any() and not first.output.weight.any()
    assert 0 < first.time_maa_w2.abs().max() <= 0.01
    assert not model.blocks[1].ffn.receptance.weight.any() and not model.blocks[1].ffn.value.weight.any()
    assert model.emb.weight.abs().max() <= 1e-4


def test_config_from_state_dict_round_trips():
    cfg = RWKV6Config(vocab_size=300, n_layer=3, n_embd=96, head_size=32, dim_ffn=160, dim_mix=16, dim_decay=48)
    with torch.device("meta"):
        sd = RWKV6(cfg).state_dict()
    assert checkpoint_version(sd) == "x060"
    assert config_from_state_dict(sd) == cfg


def test_config_from_state_dict_refuses_rwkv7():
    sd = {"emb.weight": torch.zeros(10, 64), "blocks.0.att.r_k": torch.zeros(1, 64)}
    assert checkpoint_version(sd) != "x060"
    with pytest.raises(UserError, match="not an RWKV-6.*RWKV-7"):
        config_from_state_dict(sd, source="m.pth")


@pytest.mark.parametrize("bad", [dict(n_layer=0), dict(dim_mix=0), dict(dim_decay=-1), dict(n_embd=100),
                                 dict(n_embd=8, head_size=8)])
def test_config_rejects_bad_sizes(bad):
    with pytest.raises(UserError, match="model\\."):
        RWKV6Config(**{**SMALL, **bad})
