"""RWKV7 against BlinkDL's `rwkv` package on official-layout checkpoints of several shapes."""
import pytest
import torch

from random_model import random_model
from reference import reference_logits, reference_model
from rwkv7_train import load_official, save_official


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


SHAPES = [
    dict(vocab_size=500, n_layer=1, n_embd=64, head_size=64),
    dict(vocab_size=500, n_layer=2, n_embd=64, head_size=32),
    dict(vocab_size=1000, n_layer=3, n_embd=128, head_size=64, dim_w=32, dim_a=64, dim_v=32, dim_g=96),
    dict(vocab_size=65536, n_layer=4, n_embd=256, head_size=64, dim_w=64, dim_a=32, dim_v=64, dim_g=64, dim_ffn=512),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"L{s['n_layer']}C{s['n_embd']}N{s['head_size']}V{s['vocab_size']}")
def test_logits_match_reference(tmp_path, shape):
    save_official(random_model(0, **shape), tmp_path / "m.pth")
    model = load_official(tmp_path / "m.pth")
    tokens = torch.randint(0, shape["vocab_size"], (45,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens[None])[0]
    ref = reference_logits(reference_model(tmp_path / "m.pth"), tokens.tolist())
    assert ours.shape == (45, shape["vocab_size"])
    assert rel(ours, ref) <= 1e-4


def test_loader_reads_shapes_from_tensors(tmp_path):
    shape = SHAPES[2]
    save_official(random_model(0, **shape), tmp_path / "m.pth")
    cfg = load_official(tmp_path / "m.pth").cfg
    assert (cfg.vocab_size, cfg.n_layer, cfg.n_embd, cfg.head_size) == (1000, 3, 128, 64)
    assert (cfg.dim_w, cfg.dim_a, cfg.dim_v, cfg.dim_g, cfg.dim_ffn) == (32, 64, 32, 96, 512)


def test_fp32_checkpoint_loads_and_matches_reference(tmp_path):
    model = random_model(3, **SHAPES[1])
    torch.save({k: v.float() for k, v in model.state_dict().items()}, tmp_path / "f.pth")
    ours = load_official(tmp_path / "f.pth")
    tokens = list(range(0, 480, 13))
    with torch.no_grad():
        out = ours(torch.tensor([tokens]))[0]
    assert rel(out, reference_logits(reference_model(tmp_path / "f.pth"), tokens)) <= 1e-4
    assert rel(out, model(torch.tensor([tokens]))[0].detach()) <= 1e-5  # fp32 file: no rounding at all


def test_saved_checkpoint_is_official_bf16_layout(tmp_path):
    model = random_model(0, **SHAPES[1])
    save_official(model, tmp_path / "m.pth")
    sd = torch.load(tmp_path / "m.pth", weights_only=True)
    assert set(sd) == set(model.state_dict())
    assert all(t.dtype == torch.bfloat16 and t.is_contiguous() for t in sd.values())
    assert sd["blocks.0.att.r_k"].shape == (2, 32)
    assert sd["blocks.1.att.receptance.weight"].shape == (64, 64)
    assert sd["blocks.1.att.x_r"].shape == (1, 1, 64)


def test_load_official_in_bf16_keeps_dtype(tmp_path):
    save_official(random_model(0, **SHAPES[0]), tmp_path / "m.pth")
    model = load_official(tmp_path / "m.pth", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.no_grad():
        fp32 = load_official(tmp_path / "m.pth")(torch.tensor([[1, 2, 3, 4]]))
        bf16 = model(torch.tensor([[1, 2, 3, 4]]))
    assert bf16.dtype == torch.float32 and rel(bf16, fp32) < 5e-2


def test_rnn_mode_continues_a_parallel_pass(tmp_path):
    model = random_model(5, **SHAPES[2])
    tokens = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
        pieces, state = [], None
        for lo, hi in [(0, 17), (17, 18), (18, 33), (33, 40)]:
            logits, state = model(tokens[:, lo:hi], state=state, return_state=True)
            pieces.append(logits)
    assert rel(torch.cat(pieces, dim=1), full) < 1e-5


def test_rnn_state_matches_reference_state(tmp_path):
    save_official(random_model(6, **SHAPES[1]), tmp_path / "m.pth")
    model = load_official(tmp_path / "m.pth")
    tokens = [5, 77, 3, 400, 2, 9, 11]
    ref = reference_model(tmp_path / "m.pth")
    with torch.no_grad():
        _, ref_state = ref.forward(tokens, None)
        _, state = model(torch.tensor([tokens]), return_state=True)
    for i, layer in enumerate(state):
        assert rel(layer.att_x[0], ref_state[3 * i]) < 1e-5
        assert rel(layer.wkv[0], ref_state[3 * i + 1]) < 1e-4
        assert rel(layer.ffn_x[0], ref_state[3 * i + 2]) < 1e-5


def test_packed_documents_equal_separate_sequences():
    model = random_model(7, **SHAPES[2])
    g = torch.Generator().manual_seed(4)
    rows = torch.randint(1, 1000, (2, 30), generator=g)
    # row 0 holds documents [0, 7), [7, 8), [8, 30); row 1 holds [0, 19), [19, 30)
    cu = torch.tensor([0, 7, 8, 30, 49, 60])
    with torch.no_grad():
        packed = model(rows, cu_seqlens=cu)
        flat = rows.reshape(1, -1)
        separate = torch.cat([model(flat[:, lo:hi]) for lo, hi in zip(cu[:-1].tolist(), cu[1:].tolist())], dim=1)
    assert packed.shape == (2, 30, 1000)
    assert rel(packed.reshape(1, 60, -1), separate) < 1e-5
    with torch.no_grad():  # without boundaries the second document would see the first
        assert rel(model(rows), separate.reshape(2, 30, -1)) > 1e-3
