"""`save_official` writes the official layout as `.pth` or `.safetensors` by the path's suffix; both read back
the same."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from random_model import random_model
from rwkv7_train import load_official, save_official
from rwkv7_train.convert import main as convert_main
from rwkv7_train.errors import UserError
from rwkv7_train.official import load_state_dict_file

SMALL = dict(vocab_size=100, n_layer=2, n_embd=64, head_size=32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random small model, saved in both formats: (model, .pth path, .safetensors path)."""
    d = tmp_path_factory.mktemp("export")
    model = random_model(0, **SMALL)
    save_official(model, d / "m.pth")
    save_official(model, d / "m.safetensors")
    return model, d / "m.pth", d / "m.safetensors"


def bf16_state(model):
    return {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_both_formats_hold_the_model_bitwise_in_bf16(saved):
    model, pth, st = saved
    expected = bf16_state(model)
    assert_same_tensors(load_state_dict_file(pth), expected)
    assert_same_tensors(load_state_dict_file(st), expected)


def test_safetensors_file_has_the_official_names_in_bf16(saved):
    model, _, st = saved
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    with safe_open(st, framework="pt") as f:  # the safetensors reader itself, not ours
        names = set(f.keys())
        assert names == set(shapes)
        for k in names:
            t = f.get_tensor(k)
            assert t.dtype == torch.bfloat16 and t.shape == shapes[k], k
    assert {"emb.weight", "blocks.0.ln0.weight", "blocks.1.att.r_k", "blocks.1.ffn.key.weight", "head.weight"} <= names


def test_load_official_gives_the_same_logits_from_either_format(saved):
    _, pth, st = saved
    idx = torch.randint(0, SMALL["vocab_size"], (2, 16))
    with torch.no_grad():
        assert torch.equal(load_official(st)(idx), load_official(pth)(idx))


def test_truncated_safetensors_is_refused_in_one_line(saved, tmp_path):
    data = saved[2].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"cannot read .*cut\.safetensors as a safetensors file") as e:
        load_official(cut)
    assert "\n" not in str(e.value)


def test_unknown_suffix_is_refused_naming_both_formats(tmp_path):
    with pytest.raises(UserError, match=r"\.pth or \.safetensors"):
        save_official(random_model(0, **SMALL), tmp_path / "m.bin")
    assert not list(tmp_path.iterdir())


def convert(*args):
    """`rwkv7-convert`, as a user runs it: the console script next to this Python."""
    exe = str(Path(sys.executable).parent / "rwkv7-convert")
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=300)


def test_cli_exports_safetensors_and_reads_it_back(saved, tmp_path):
    _, pth, _ = saved
    out = tmp_path / "y.safetensors"
    proc = convert("export", pth, out)
    assert proc.returncode == 0, proc.stderr
    assert_same_tensors(load_state_dict_file(out), load_state_dict_file(pth))

    proc = convert("info", out)
    assert proc.returncode == 0, proc.stderr
    assert "L2 D64 heads 2x32 vocab 100" in proc.stdout

    proc = convert("export", pth, out)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"rwkv7-convert: error: {out} exists: pass --force to overwrite it"


def test_export_force_overwrites(saved, tmp_path):
    _, pth, _ = saved
    out = tmp_path / "y.safetensors"
    out.write_bytes(b"an older export")
    convert_main(["export", "--force", str(pth), str(out)])  # in-process: the subprocess runs are the slow part
    assert_same_tensors(load_state_dict_file(out), load_state_dict_file(pth))
