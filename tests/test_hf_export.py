"""`export_hf` writes a Hugging Face directory that flash-linear-attention's (fla) RWKV7ForCausalLM loads and that
computes our logits; `read_hf_dir` reads it back as the official state dict.

fla runs in a subprocess (tests/fla_logits.py): on the CPU its Triton kernels need the interpreter and an autotuner
patch that no other test should see. Where fla computes differently from x070, the test reproduces the difference.
"""
import json
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from cli_run import SMALL as CLI_SMALL
from cli_run import cli, train
from random_model import random_model
from rwkv7_train import save_official
from rwkv7_train.convert import main as convert_main
from rwkv7_train.errors import UserError
from rwkv7_train.hf import export_hf, is_hf_dir, read_hf_dir
from rwkv7_train.tokenizer import BUNDLED_VOCAB

SMALL = dict(vocab_size=100, n_layer=2, n_embd=128, head_size=64)
LAYER0_V = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")
FP32_NOISE = 1e-4   # largest |logit| difference we call equal (measured: 7e-6 torch norms, 2e-5 fla's fused norms)
FLA = find_spec("fla") is not None and find_spec("transformers") is not None
needs_fla = pytest.mark.skipif(not FLA, reason="flash-linear-attention and transformers are not installed")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random small model and its fp32 export: (model, directory)."""
    model = random_model(0, **SMALL).eval()
    return model, export_hf(model, tmp_path_factory.mktemp("hf") / "m", dtype=torch.float32)


def test_export_holds_config_weights_in_fla_names_and_the_world_vocab(exported):
    model, d = exported
    config = json.loads((d / "config.json").read_text())
    assert config["model_type"] == "rwkv7" and config["architectures"] == ["RWKV7ForCausalLM"]
    assert (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"], config["head_dim"]) == (
        100, 128, 2, 64)
    assert config["intermediate_size"] == 512 and config["norm_eps"] == 1e-5 and config["dtype"] == "float32"
    assert json.loads((d / "tokenizer_config.json").read_text())["vocab_file"] == BUNDLED_VOCAB.name
    assert (d / BUNDLED_VOCAB.name).read_bytes() == BUNDLED_VOCAB.read_bytes()
    with safe_open(d / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        assert f.metadata() == {"format": "pt"}
        assert f.get_tensor("model.layers.1.attn.w_lora.lora.2.bias").shape == (128,)          # w0, flat
        assert torch.equal(f.get_tensor("model.layers.1.attn.w_lora.lora.0.weight"), model.blocks[1].att.w1.T)
    assert {"model.embeddings.weight", "model.layers.0.pre_norm.weight", "model.layers.1.attn.v_lora.lora.0.weight",
            "model.layers.1.ffn.key.weight", "model.norm.bias", "lm_head.weight"} <= names
    assert not any(n.startswith("model.layers.0.attn.v_lora") for n in names)   # layer 0 has no value residual


def test_round_trip_gives_back_the_official_state_dict_bit_for_bit(exported):
    model, d = exported
    sd, back = model.state_dict(), read_hf_dir(d)
    assert back.keys() == sd.keys()
    for k in sd.keys() - set(LAYER0_V):
        assert back[k].dtype == torch.float32 and torch.equal(back[k], sd[k]), k
    for k in LAYER0_V:   # unused by x070, not stored by fla: they come back as zeros of the official shapes
        assert back[k].shape == sd[k].shape and not back[k].any(), k


def test_default_export_is_bf16(tmp_path):
    model = random_model(1, **SMALL)
    back = read_hf_dir(export_hf(model, tmp_path / "m"))
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(torch.equal(back[k], t.to(torch.bfloat16)) for k, t in model.state_dict().items() if k not in LAYER0_V)


def test_existing_directory_is_replaced_only_with_force_and_only_if_it_is_an_export(exported, tmp_path):
    model, _ = exported
    out = export_hf(model, tmp_path / "m", dtype=torch.float32)
    with pytest.raises(UserError, match="exists: pass --force"):
        export_hf(model, out)
    export_hf(model, out, force=True)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not a Hugging Face RWKV-7 directory: refusing"):
        export_hf(model, other, force=True)
    assert (other / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "notes"]   # no temporary directory left behind


def test_is_hf_dir_reads_only_config_json(exported, tmp_path):
    assert is_hf_dir(exported[1])
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert not is_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text("[not json")
    assert not is_hf_dir(tmp_path)
    assert not is_hf_dir(tmp_path / "config.json") and not is_hf_dir(tmp_path / "absent")


@pytest.mark.parametrize("config, files, message", [
    ({"model_type": "llama"}, {}, "is not a Hugging Face RWKV-7 model directory"),
    ({"model_type": "rwkv7", "attn": {"layers": [1]}}, {}, "cannot hold: it has softmax attention layers"),
    ({"model_type": "rwkv7"}, {"pytorch_model.bin": b"pickle"}, "has no model.safetensors .*only safetensors"),
    ({"model_type": "rwkv7"}, {"model.safetensors": b"truncated"}, "cannot read .* as a safetensors file"),
])
def test_read_hf_dir_refuses_what_is_not_an_x070_model_in_one_line(tmp_path, config, files, message):
    (tmp_path / "config.json").write_text(json.dumps(config))
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(UserError, match=message) as e:
        read_hf_dir(tmp_path)
    assert "\n" not in str(e.value)


def test_cli_exports_an_official_pth(exported, tmp_path):
    model, _ = exported
    save_official(model, tmp_path / "m.pth")
    convert_main(["export-hf", str(tmp_path / "m.pth"), str(tmp_path / "hf"), "--dtype", "fp32"])
    back = read_hf_dir(tmp_path / "hf")
    bf16 = {k: t.to(torch.bfloat16).float() for k, t in model.state_dict().items()}   # the .pth is bf16
    assert all(torch.equal(back[k], bf16[k]) for k in bf16.keys() - set(LAYER0_V))


def test_cli_refuses_an_existing_directory_with_exit_2(exported, tmp_path):
    exe = str(Path(sys.executable).parent / "rwkv7-convert")
    save_official(exported[0], tmp_path / "m.pth")
    proc = subprocess.run([exe, "export-hf", str(tmp_path / "m.pth"), str(exported[1])], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"rwkv7-convert: error: {exported[1]} exists: pass --force to replace it"


# ---- fla's RWKV7ForCausalLM against our RWKV7 -------------------------------------------------------------------


@pytest.fixture(scope="module")
def fla_runs(exported, tmp_path_factory):
    """(our models, fla's logits) for each run, all computed in one fla subprocess."""
    d = tmp_path_factory.mktemp("fla")
    ids = torch.randint(0, SMALL["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    small_y = random_model(1, **dict(SMALL, n_embd=64, head_size=32)).eval()   # heads of 32, small values
    tiny_kk = random_model(2, **SMALL).eval()                                  # |k * k_k| ~ 1e-3
    with torch.no_grad():
        for block in small_y.blocks:
            block.att.value.weight.mul_(0.01)   # GroupNorm's input variance near its eps, so the eps shows
        for block in tiny_kk.blocks:
            block.att.k_k.mul_(1e-3)
    models = {"x070": exported[0], "small_y": small_y, "tiny_kk": tiny_kk}
    dirs = {k: export_hf(models[k], d / k, dtype=torch.float32) for k in ("small_y", "tiny_kk")} | {"x070": exported[1]}
    runs = {f"{k}{'_fused' * fused}": {"dir": str(dirs[k]), "fuse_norm": fused} for k, fused in (
        ("x070", False), ("x070", True), ("small_y", False), ("tiny_kk", False), ("tiny_kk", True))}
    (d / "spec.json").write_text(json.dumps({"ids": ids.tolist(), "runs": runs}))
    env = dict(os.environ) | ({} if torch.cuda.is_available() else {"TRITON_INTERPRET": "1"})
    script = Path(__file__).with_name("fla_logits.py")
    proc = subprocess.run([sys.executable, str(script), str(d / "spec.json"), str(d / "logits.safetensors")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return models, ids, load_file(d / "logits.safetensors")


def max_diff(model, ids, logits) -> float:
    with torch.no_grad():
        return (model(ids) - logits).abs().max().item()


@needs_fla
def test_fla_computes_our_logits_with_torch_norms(fla_runs):
    models, ids, logits = fla_runs
    assert max_diff(models["x070"], ids, logits["x070"]) < FP32_NOISE


@needs_fla
def test_fla_computes_our_logits_with_its_fused_norms(fla_runs):
    models, ids, logits = fla_runs
    assert max_diff(models["x070"], ids, logits["x070_fused"]) < FP32_NOISE


@needs_fla
def test_fla_group_norm_eps_is_head_dim_times_1e5_not_64e5(fla_runs):
    models, ids, logits = fla_runs
    model = models["small_y"]
    assert max_diff(model, ids, logits["small_y"]) > 0.01       # x070: eps 64e-5 whatever the head size
    for block in model.blocks:
        block.att.ln_x.eps = 32e-5
    assert max_diff(model, ids, logits["small_y"]) < FP32_NOISE


@needs_fla
def test_fla_fused_l2_norm_adds_1e6_under_the_root(fla_runs, monkeypatch):
    models, ids, logits = fla_runs
    model = models["tiny_kk"]
    assert max_diff(model, ids, logits["tiny_kk"]) < FP32_NOISE          # torch's F.normalize, as x070
    assert max_diff(model, ids, logits["tiny_kk_fused"]) > 1e-3
    monkeypatch.setattr(F, "normalize", lambda x, dim, p, eps: x / (x.square().sum(dim, keepdim=True) + 1e-6).sqrt())
    assert max_diff(model, ids, logits["tiny_kk_fused"]) < FP32_NOISE


def test_init_from_a_hugging_face_directory_starts_from_its_weights(env, tmp_path):
    """rwkv7-train init_from=DIR says what it read, and (learning rate 0) ends with the exported weights."""
    model = random_model(3, vocab_size=65536, n_layer=2, n_embd=64, head_size=32)
    hf = export_hf(model, tmp_path / "hf", dtype=torch.float32)
    out = tmp_path / "run"
    proc = train([*CLI_SMALL, f"init_from={hf}", "trainer.max_steps=1", "optim.lr_init=0", "optim.lr_final=0",
                  "logger=none", f"hydra.run.dir={out}"], env, tmp_path)
    assert f"init_from={hf}: a Hugging Face RWKV-7 directory (fla's layout), read as x070" in proc.stdout
    cli(["rwkv7-convert", "export", str(out / "checkpoints" / "last.ckpt"), str(tmp_path / "trained.pth")], env,
        tmp_path)
    trained = torch.load(tmp_path / "trained.pth", weights_only=True)
    for k, t in model.state_dict().items():
        want = torch.zeros_like(t) if k in LAYER0_V else t
        assert torch.equal(trained[k], want.to(torch.bfloat16)), k
