"""Loss (cross-entropy + L2Wrap), AdamW parameter groups and the learning-rate schedule."""
import math

import pytest
import torch
import torch.nn.functional as F

from rwkv7_train import RWKV7, RWKV7Config
from rwkv7_train.loss import lm_loss
from rwkv7_train.optim import lr_at, param_groups


def test_loss_value_is_plain_cross_entropy():
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    assert lm_loss(logits, targets).item() == pytest.approx(F.cross_entropy(logits.view(-1, 11), targets.view(-1)).item())


def test_l2wrap_adds_to_the_argmax_logit_gradient():
    B, T, V = 2, 3, 7
    logits = torch.randn(B, T, V, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (B, T))
    lm_loss(logits, targets).backward()
    plain = logits.detach().clone().requires_grad_()
    F.cross_entropy(plain.view(-1, V), targets.view(-1)).backward()
    extra = logits.grad - plain.grad
    top = logits.detach().argmax(-1)
    for b in range(B):
        for t in range(T):
            expected = torch.zeros(V, dtype=torch.float64)
            expected[top[b, t]] = 1e-4 / (B * T) * logits[b, t].max().item()
            assert torch.allclose(extra[b, t], expected, atol=1e-15)


def test_param_groups_decay_only_2d_weights_and_double_w0_lr():
    model = RWKV7(RWKV7Config(vocab_size=50, n_layer=2, n_embd=64, head_size=32))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: g for g in param_groups(model, 0.1)}
    assert [(g["weight_decay"], g["lr_scale"]) for g in groups.values()] == [(0.1, 1.0), (0.0, 1.0), (0.0, 2.0)]
    decayed, plain, w0 = ({names[id(p)] for p in groups[n]["params"]} for n in ("decay", "no_decay", "w0"))
    assert w0 == {"blocks.0.att.w0", "blocks.1.att.w0"}
    assert {"emb.weight", "head.weight", "blocks.1.att.receptance.weight", "blocks.1.att.output.weight",
            "blocks.0.ffn.key.weight", "blocks.0.ffn.value.weight"} <= decayed
    assert all(n.endswith(".weight") for n in decayed)
    assert {"blocks.0.att.w1", "blocks.0.att.r_k", "blocks.0.att.ln_x.weight", "ln_out.weight", "blocks.0.att.x_r"} <= plain
    assert len(decayed) + len(plain) + len(w0) == len([p for p in model.parameters() if p.requires_grad])


def test_schedule_warmup_then_cosine_in_tokens():
    kw = dict(lr_init=1e-3, lr_final=1e-5, warmup_steps=10, total_tokens=1000)
    assert lr_at(0, 0, **kw) == pytest.approx(1e-5)                # 0.01 * lr_init at step 0
    assert lr_at(50, 5, **kw) == pytest.approx((1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 0.05))) * 0.505)
    assert lr_at(500, 50, **kw) == pytest.approx(0.5 * (1e-3 + 1e-5))  # half way: the mean
    assert lr_at(1000, 100, **kw) == pytest.approx(1e-5)
    assert lr_at(5000, 500, **kw) == pytest.approx(1e-5)             # stays at lr_final past the end
