"""Upgrading RWKV-6 (x060) and RWKV-5.2 (x052) checkpoints to RWKV-7: rwkv7_train.upgrade, `rwkv7-convert upgrade-v6`
and `upgrade-v5`, and `rwkv7-train init_from=` an RWKV-6 checkpoint."""
import math
import os
import resource
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from cli_run import SMALL, cli, train
from reference import reference_logits, reference_model
from rwkv7_train import RWKV7, RWKV7Config, load_official
from rwkv7_train.convert import main as convert_main
from rwkv7_train.errors import UserError
from rwkv7_train.model import DECAY_SCALE
from rwkv7_train.upgrade import (NEW, UpgradeOptions, checkpoint_version, read_init_checkpoint, upgrade_x052,
                                 upgrade_x060)

FP32 = UpgradeOptions(dtype=torch.float32)
TOKENS = [3, 17, 42, 7, 250, 1, 99, 5, 64, 128]


def source_state_dict(version: str, seed=0, V=300, C=128, L=2, N=64, F=448, rank=64, mix=32) -> dict:
    """A random official x060 or x052 state dict of the shapes in RWKV7_FACTS (section 7) and RWKV-LM v5.2. Every norm
    has one negative weight (the recipe clamps it), and time_decay spans decays RWKV-7 can and cannot represent."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    def uniform(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    def norm(sd, prefix):
        sd[prefix + ".weight"] = 1 + randn(C, scale=0.3)
        sd[prefix + ".weight"][0] = -0.5
        sd[prefix + ".bias"] = randn(C, scale=0.1)

    sd = {"emb.weight": randn(V, C), "head.weight": randn(V, C, scale=C ** -0.5)}
    norm(sd, "blocks.0.ln0")
    norm(sd, "ln_out")
    for i in range(L):
        block = f"blocks.{i}."
        att, ffn = block + "att.", block + "ffn."
        norm(sd, block + "ln1")
        norm(sd, block + "ln2")
        norm(sd, att + "ln_x")
        for name in ("receptance", "key", "value", "gate", "output"):
            sd[att + name + ".weight"] = randn(C, C, scale=C ** -0.5)
        sd[att + "time_faaaa"] = randn(C // N, N, scale=0.3)
        sd[ffn + "key.weight"] = randn(F, C, scale=C ** -0.5)
        sd[ffn + "receptance.weight"] = randn(C, C, scale=C ** -0.5)
        sd[ffn + "value.weight"] = randn(C, F, scale=F ** -0.5)
        if version == "x060":
            for name in "xwkvrg":
                sd[att + "time_maa_" + name] = uniform(1, 1, C)
            sd[att + "time_maa_w1"] = randn(C, 5 * mix, scale=0.1)
            sd[att + "time_maa_w2"] = randn(5, mix, C, scale=0.1)
            sd[att + "time_decay"] = uniform(1, 1, C, lo=-8.0, hi=0.0)
            sd[att + "time_decay_w1"] = randn(C, rank, scale=0.1)
            sd[att + "time_decay_w2"] = randn(rank, C, scale=0.1)
            sd[ffn + "time_maa_k"], sd[ffn + "time_maa_r"] = uniform(1, 1, C), uniform(1, 1, C)
        else:
            for name in "rkvg":
                sd[att + "time_mix_" + name] = uniform(1, 1, C)
            sd[att + "time_decay"] = uniform(C // N, N, lo=-8.0, hi=0.0)
            sd[ffn + "time_mix_k"], sd[ffn + "time_mix_r"] = uniform(1, 1, C), uniform(1, 1, C)
    return sd


UPGRADE = {"x060": upgrade_x060, "x052": upgrade_x052}
COMMAND = {"x060": "upgrade-v6", "x052": "upgrade-v5"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Source checkpoints on disk: x060, x052, x070, RWKV-4, an unknown layout and a truncated file."""
    d = tmp_path_factory.mktemp("sources")
    paths = {v: d / f"{v}.pth" for v in ("x060", "x052", "x070", "x040", "unknown")}
    torch.save(source_state_dict("x060"), paths["x060"])
    torch.save(source_state_dict("x052"), paths["x052"])
    torch.save(RWKV7(RWKV7Config(vocab_size=300, n_layer=1, n_embd=64)).state_dict(), paths["x070"])
    torch.save({"blocks.0.att.time_first": torch.zeros(64), "blocks.0.att.time_mix_k": torch.zeros(1, 1, 64)},
               paths["x040"])
    torch.save({"encoder.weight": torch.zeros(4, 4)}, paths["unknown"])
    paths["truncated"] = d / "truncated.pth"
    paths["truncated"].write_bytes(paths["x060"].read_bytes()[:5000])
    return paths


def x070_init(cfg: RWKV7Config, seed: int) -> dict:
    """RWKV7's own init_weights under torch.manual_seed(seed), the whole model at once."""
    with torch.device("meta"):
        model = RWKV7(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    return model.state_dict()


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_checkpoint_version_tells_the_generations_apart():
    x052 = source_state_dict("x052", L=1)
    x051 = {**x052, "blocks.0.att.time_decay": torch.zeros(2)}
    x050 = {k: t for k, t in x052.items() if "gate" not in k}
    assert checkpoint_version(RWKV7(RWKV7Config(vocab_size=300, n_layer=1, n_embd=64)).state_dict()) == "x070"
    assert checkpoint_version(source_state_dict("x060", L=1)) == "x060"
    assert [checkpoint_version(sd) for sd in (x052, x051, x050)] == ["x052", "x051", "x050"]
    assert checkpoint_version({"blocks.0.att.time_first": torch.zeros(8)}) == "x040"
    assert checkpoint_version({"encoder.weight": torch.zeros(4, 4)}) == "unknown"


def test_rwkv_package_reads_the_source_fixtures_as_v6_and_v5_2(files):
    """The random sources are the real layouts: BlinkDL's `rwkv` (RWKV-6/5 mode, its own process) detects and runs
    them."""
    script = ("import sys, torch\nfrom rwkv.model import RWKV\nfor name in sys.argv[1:]:\n"
              "    out, _ = RWKV(name, strategy='cpu fp32').forward([3, 17, 42], None)\n"
              "    print('finite', bool(torch.isfinite(out).all()))\n")
    env = {k: v for k, v in os.environ.items() if k != "RWKV_V7_ON"}
    names = [str(files[v])[: -len(".pth")] for v in ("x060", "x052")]
    out = subprocess.run([sys.executable, "-c", script, *names], env={**env, "RWKV_JIT_ON": "0"},
                         capture_output=True, text=True, check=True).stdout
    assert "Model detected: v6.0" in out and "Model detected: v5.2" in out
    assert out.count("finite True") == 2


def test_x060_tensors_follow_the_recipe():
    src = source_state_dict("x060")
    sd = upgrade_x060(src, UpgradeOptions(dtype=torch.float32, dim_w=96)).state_dict
    assert sd["emb.weight"].equal(src["emb.weight"] / 2) and sd["head.weight"].equal(src["head.weight"])
    for norm in ("blocks.0.ln0", "ln_out", "blocks.1.ln1", "blocks.1.ln2", "blocks.1.att.ln_x"):
        assert sd[norm + ".weight"].equal(src[norm + ".weight"].clamp(min=0).sqrt())
        assert sd[norm + ".weight"][0] == 0   # the negative weight, clamped
        assert sd[norm + ".bias"].equal(src[norm + ".bias"] / 2)
    for i in range(2):
        att, ffn = f"blocks.{i}.att.", f"blocks.{i}.ffn."
        assert sd[att + "receptance.weight"].equal(src[att + "receptance.weight"] / 2)
        assert sd[att + "output.weight"].equal(src[att + "output.weight"] / 2)
        assert sd[att + "key.weight"].equal(src[att + "key.weight"])
        assert sd[att + "value.weight"].equal(src[att + "value.weight"])
        for name in "rwkvg":
            assert sd[att + "x_" + name].equal(src[att + "time_maa_" + name])
        assert sd[ffn + "x_k"].equal(src[ffn + "time_maa_k"])
        assert sd[att + "r_k"].equal(src[att + "time_faaaa"])
        # decay LoRA 64 -> 96: the old region kept, the new one U(+-1e-4)
        assert sd[att + "w1"][:, :64].equal(src[att + "time_decay_w1"])
        assert sd[att + "w2"][:64].equal(src[att + "time_decay_w2"])
        for new in (sd[att + "w1"][:, 64:], sd[att + "w2"][64:]):
            assert new.abs().max() <= 1e-4 and new.std() > 1e-5
        # FFN 448 -> 4C = 512: the old region kept, the new one U(+-1e-3)
        assert sd[ffn + "key.weight"][:448].equal(src[ffn + "key.weight"])
        assert sd[ffn + "value.weight"][:, :448].equal(src[ffn + "value.weight"])
        for new in (sd[ffn + "key.weight"][448:], sd[ffn + "value.weight"][:, 448:]):
            assert new.abs().max() <= 1e-3 and new.std() > 1e-4
    assert not any("time_" in k or "gate" in k or k.endswith("ffn.receptance.weight") for k in sd)
    cfg = RWKV7Config(vocab_size=300, n_layer=2, n_embd=128, dim_w=96, dim_a=32, dim_v=32, dim_g=32)
    with torch.device("meta"):
        expected = RWKV7(cfg).state_dict()
    assert {k: t.shape for k, t in sd.items()} == {k: t.shape for k, t in expected.items()}


def test_x052_tensors_follow_the_recipe():
    """x052 lerps mix the other way round (x * mu + shift * (1 - mu)): RWKV-7's are 1 - mu, the same function."""
    src = source_state_dict("x052")
    sd = upgrade_x052(src, FP32).state_dict
    for i in range(2):
        att, ffn = f"blocks.{i}.att.", f"blocks.{i}.ffn."
        for name in "rkvg":
            assert sd[att + "x_" + name].equal(1 - src[att + "time_mix_" + name])
        assert sd[ffn + "x_k"].equal(1 - src[ffn + "time_mix_k"])
        assert sd[att + "receptance.weight"].equal(src[att + "receptance.weight"] / 2)
        assert sd[att + "r_k"].equal(src[att + "time_faaaa"])
        assert sd[ffn + "key.weight"][:448].equal(src[ffn + "key.weight"])
        assert (sd[att + "w1"] == 0).all()   # no decay LoRA in x052: w1 = 0 keeps the decay at w0
    assert not any("time_" in k or "gate" in k for k in sd) and "blocks.0.ffn.receptance.weight" not in sd


@pytest.mark.parametrize("version", ["x060", "x052"])
def test_new_tensors_are_the_x070_init_of_the_same_config(version):
    up = UPGRADE[version](source_state_dict(version), UpgradeOptions(dtype=torch.float32, seed=7))
    init = x070_init(up.config, seed=7)
    for i in range(2):
        for name in NEW[version]:
            key = f"blocks.{i}.att.{name}"
            assert up.state_dict[key].equal(init[key]), key


def test_gate_lora_is_half_the_gate_matrix_within_the_stated_error():
    """g1 @ g2 is the best rank-Dg approximation of W_g^T / 2: its relative error is sqrt(dropped s^2 / all s^2)."""
    src = source_state_dict("x060")
    up = upgrade_x060(src, FP32)
    errors = []
    for i in range(2):
        att = f"blocks.{i}.att."
        half = src[att + "gate.weight"].t().double() / 2
        s = torch.linalg.svdvals(half)
        stated = (s[32:].square().sum() / s.square().sum()).sqrt().item()
        product = up.state_dict[att + "g1"].double() @ up.state_dict[att + "g2"].double()
        assert rel(product, half) == pytest.approx(stated, rel=1e-4)
        errors.append(stated)
    assert up.gate_error == pytest.approx(max(errors), rel=1e-4)
    full = upgrade_x060(src, UpgradeOptions(dtype=torch.float32, dim_g=128)).state_dict
    g = full["blocks.0.att.g1"].double() @ full["blocks.0.att.g2"].double()
    assert rel(g, src["blocks.0.att.gate.weight"].t().double() / 2) < 1e-5   # rank C: W_g^T / 2 itself


@pytest.mark.parametrize("version", ["x060", "x052"])
def test_decay_is_kept_where_rwkv7_can_represent_it(version):
    """With the decay LoRA's input at zero, RWKV-7's decay exp(-exp(-0.5) sigmoid(w0)) is the source's
    exp(-exp(time_decay)); decays faster than RWKV-7's range (or needing w0 > w0_max) get w0 = w0_max."""
    src = source_state_dict(version)
    up = UPGRADE[version](src, FP32)
    clamped = 0
    for i in range(2):
        td = src[f"blocks.{i}.att.time_decay"].double().flatten()
        w0 = up.state_dict[f"blocks.{i}.att.w0"].double().flatten()
        wanted = torch.exp(-torch.exp(td))
        got = torch.exp(-DECAY_SCALE * torch.sigmoid(w0))
        fits = td + 0.5 < math.log(torch.sigmoid(torch.tensor(3.0, dtype=torch.float64)).item())
        assert torch.allclose(got[fits], wanted[fits], rtol=1e-6, atol=0)
        assert (w0[~fits] == 3.0).all()
        clamped += int((~fits).sum())
    assert 0 < clamped < 256 and up.clamped == clamped


def test_decay_lora_moves_the_decay_the_same_way():
    """x060: log(-log decay) = time_decay + u; x070: log(-log decay) = -0.5 + log sigmoid(w0 + u), u the same LoRA
    output: a u that speeds a channel's decay in RWKV-6 speeds it in RWKV-7."""
    src = source_state_dict("x060")
    sd = upgrade_x060(src, FP32).state_dict
    xw = torch.randn(16, 128, generator=torch.Generator().manual_seed(1))
    u = torch.tanh(xw @ sd["blocks.0.att.w1"]) @ sd["blocks.0.att.w2"]
    w0 = sd["blocks.0.att.w0"].reshape(128)
    u6 = torch.tanh(xw @ src["blocks.0.att.time_decay_w1"]) @ src["blocks.0.att.time_decay_w2"]
    assert u.equal(u6)
    moved = F.logsigmoid(w0 + u) - F.logsigmoid(w0)
    big = u.abs() > 1e-4
    assert (moved[big].sign() == u[big].sign()).all()


def test_options_that_cannot_hold_are_refused():
    src = source_state_dict("x060", L=1)
    with pytest.raises(UserError, match="dim_w=32 is below the source's decay LoRA rank 64"):
        upgrade_x060(src, UpgradeOptions(dim_w=32))
    with pytest.raises(UserError, match="dim_g=256 exceeds the width 128"):
        upgrade_x060(src, UpgradeOptions(dim_g=256))
    with pytest.raises(UserError, match=r"holds tensors an RWKV-6 \(x060\) checkpoint does not: \['blocks.0.att.time"):
        upgrade_x060({**src, "blocks.0.att.time_state": torch.zeros(2, 64, 64)})
    with pytest.raises(UserError, match="blocks.0.att.gate.weight is missing"):
        upgrade_x060({k: t for k, t in src.items() if k != "blocks.0.att.gate.weight"})


def test_shapes_only_read_checks_without_upgrading(files):
    sd, note = read_init_checkpoint(files["x060"], shapes_only=True)
    real, _ = read_init_checkpoint(files["x060"])
    assert all(t.is_meta for t in sd.values()) and "upgraded to RWKV-7" in note
    assert {k: t.shape for k, t in sd.items()} == {k: t.shape for k, t in real.items()}
    assert read_init_checkpoint(files["x070"])[1] is None


@pytest.mark.parametrize("version", ["x060", "x052"])
def test_upgrade_cli_writes_what_the_reference_loads_as_rwkv7(files, env, tmp_path, version):
    dst = tmp_path / "up.pth"
    out = cli([sys.executable, "-m", "rwkv7_train.convert", COMMAND[version], str(files[version]), str(dst),
               "--dtype", "fp32"], env, tmp_path).stdout
    assert out.count("\n") == 1 and out.startswith(f"upgraded RWKV-") and "L2 D128" in out and "fp32 pth" in out
    ref = reference_logits(reference_model(dst), TOKENS)
    with torch.no_grad():
        ours = load_official(dst)(torch.tensor([TOKENS]))[0]
    assert torch.isfinite(ref).all() and ref.abs().max() > 0
    assert rel(ours, ref) <= 1e-5


def test_output_is_bf16_by_default_and_reproducible_for_a_seed(files, tmp_path, capsys):
    a, b, c, st = tmp_path / "a.pth", tmp_path / "b.pth", tmp_path / "c.pth", tmp_path / "a.safetensors"
    for dst, seed in ((a, "0"), (b, "0"), (c, "1"), (st, "0")):
        convert_main(["upgrade-v6", str(files["x060"]), str(dst), "--seed", seed])
    sa, sb, sc = (torch.load(p, weights_only=True) for p in (a, b, c))
    assert all(t.dtype == torch.bfloat16 for t in sa.values())
    assert all(sa[k].equal(sb[k]) for k in sa)
    key = "blocks.0.ffn.key.weight"
    assert sa[key][:448].equal(sc[key][:448]) and not sa[key][448:].equal(sc[key][448:])
    assert not sa["blocks.0.att.a2"].equal(sc["blocks.0.att.a2"])
    safetensors = load_official(st).state_dict()
    assert all(safetensors[k].equal(sa[k].float()) for k in sa)


def _limit_file_size():   # a write past 64 KiB fails as on a full disk (Python ignores SIGXFSZ: write gets EFBIG)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))


@pytest.mark.parametrize("command,source,extra,message", [
    ("upgrade-v6", "x040", [], "is an RWKV-4 checkpoint: only RWKV-6 (x060) and RWKV-5.2 (x052) checkpoints upgrade"),
    ("upgrade-v6", "unknown", [], "is not an RWKV checkpoint of a known layout"),
    ("upgrade-v6", "x070", [], "is already an RWKV-7 (x070) checkpoint"),
    ("upgrade-v5", "x060", [], "is an RWKV-6 (x060) checkpoint, not RWKV-5.2 (x052): use `rwkv7-convert upgrade-v6`"),
    ("upgrade-v6", "x052", [], "is an RWKV-5.2 (x052) checkpoint, not RWKV-6 (x060): use `rwkv7-convert upgrade-v5`"),
    ("upgrade-v6", "truncated", [], "may be truncated"),
    ("upgrade-v6", "x060", ["--dim-w", "32"], "dim_w=32 is below the source's decay LoRA rank 64"),
    ("upgrade-v6", "x060", ["exists"], "exists: pass --force to overwrite it"),
    ("upgrade-v6", "x060", ["full disk"], "File too large"),
])
def test_bad_input_is_one_line_exit_2_and_leaves_no_output(files, env, tmp_path, command, source, extra, message):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dst = out_dir / "up.pth"
    if extra == ["exists"]:
        dst.write_bytes(b"keep me")
    args = [a for a in extra if a not in ("exists", "full disk")]
    proc = subprocess.run([sys.executable, "-m", "rwkv7_train.convert", command, str(files[source]), str(dst), *args],
                          env=env, cwd=tmp_path, capture_output=True, text=True,
                          preexec_fn=_limit_file_size if extra == ["full disk"] else None)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    left = sorted(p.name for p in out_dir.iterdir())
    assert left == (["up.pth"] if extra == ["exists"] else [])   # nor any half-written temporary file
    if extra == ["exists"]:
        assert dst.read_bytes() == b"keep me"


def test_init_from_an_rwkv6_checkpoint_starts_from_its_upgrade(env, tmp_path):
    """rwkv7-train init_from=RWKV-6.pth says it upgrades, and (learning rate 0) ends with exactly the weights that
    `rwkv7-convert upgrade-v6` writes; a source that does not fit the model is refused before the run starts."""
    src = tmp_path / "x060.pth"
    torch.save(source_state_dict("x060", V=65536, C=64, N=32, F=224), src)
    out = tmp_path / "run"
    proc = train([*SMALL, "+model.dim_w=64", f"init_from={src}", "trainer.max_steps=1", "optim.lr_init=0",
                  "optim.lr_final=0", "logger=none", f"hydra.run.dir={out}"], env, tmp_path)
    assert f"init_from={src}: an RWKV-6 (x060) checkpoint, upgraded to RWKV-7 with the default options" in proc.stdout
    upgraded, trained = tmp_path / "upgraded.pth", tmp_path / "trained.pth"
    cli(["rwkv7-convert", "upgrade-v6", str(src), str(upgraded)], env, tmp_path)
    cli(["rwkv7-convert", "export", str(out / "checkpoints" / "last.ckpt"), str(trained)], env, tmp_path)
    a, b = torch.load(upgraded, weights_only=True), torch.load(trained, weights_only=True)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)

    bad = train([*SMALL, f"init_from={src}", "trainer.max_steps=1", f"hydra.run.dir={tmp_path / 'bad'}"], env,
                tmp_path, check=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "does not fit this RWKV-7 model: blocks.0.att.w1 has shape (64, 64)" in bad.stderr
    assert not (tmp_path / "bad").exists()
