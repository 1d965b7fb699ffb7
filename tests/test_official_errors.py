"""Checkpoints that are not RWKV-7, or do not fit, stop with one clear line."""
import pytest
import torch

from rwkv7_train import RWKV7, RWKV7Config, load_official, save_official
from rwkv7_train.errors import UserError
from rwkv7_train.official import load_into


def small(**kw):
    return RWKV7(RWKV7Config(**{**dict(vocab_size=100, n_layer=2, n_embd=64, head_size=32), **kw}))


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        load_official(tmp_path / "nope.pth")


@pytest.mark.parametrize("text", [b"this is not a torch file", b"def f(x):\n    return x\n", b"xxx"])
def test_file_that_is_not_a_checkpoint(tmp_path, text):
    # Text files whose first byte is a pickle opcode the safe loader does not take: not read as a refused pickle
    (tmp_path / "x.pth").write_bytes(text)
    with pytest.raises(UserError, match="cannot read .*x.pth as a PyTorch checkpoint") as e:
        load_official(tmp_path / "x.pth")
    assert "refusing" not in str(e.value) and "In PyTorch 2.6" not in str(e.value)


def test_rwkv6_checkpoint_is_named_as_such(tmp_path):
    torch.save({"emb.weight": torch.zeros(10, 64), "blocks.0.att.time_maa_x": torch.zeros(1, 1, 64)}, tmp_path / "v6.pth")
    with pytest.raises(UserError, match="RWKV-6.*upgrade-v6"):
        load_official(tmp_path / "v6.pth")


def test_shape_mismatch_names_the_tensor(tmp_path):
    save_official(small(), tmp_path / "m.pth")
    sd = torch.load(tmp_path / "m.pth", weights_only=True)
    with pytest.raises(UserError, match=r"emb.weight has shape \(100, 64\).*expects \(200, 64\)"):
        load_into(small(vocab_size=200), sd, source="m.pth")


def test_wrong_layer_count(tmp_path):
    save_official(small(), tmp_path / "m.pth")
    sd = torch.load(tmp_path / "m.pth", weights_only=True)
    with pytest.raises(UserError, match="missing"):
        load_into(small(n_layer=3), sd, source="m.pth")


def test_bad_config_values():
    with pytest.raises(UserError, match="not a multiple of model.head_size"):
        RWKV7Config(n_embd=100, head_size=64)
    with pytest.raises(UserError, match="unknown model config key"):
        RWKV7Config.from_dict({"n_layr": 3})
