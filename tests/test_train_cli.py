"""`rwkv7-train`, `rwkv7-convert` and `rwkv7-generate` end to end, as a user runs them (subprocesses, real files)."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reference import reference_logits, reference_model

# A model small enough to train in seconds on 2 cores, still with the World vocab.
SMALL = ["model.n_layer=2", "model.n_embd=64", "model.head_size=32", "data.ctx_len=32", "data.micro_bsz=4",
         "data.val_windows=4"]


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    e = dict(os.environ)
    e["RWKV7_TRAIN_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    e["WANDB_MODE"] = "offline"
    e["WANDB_SILENT"] = "true"
    return e


def script(name):
    """A console script installed next to this Python (the venv need not be activated)."""
    return str(Path(sys.executable).parent / name)


def cli(args, env, cwd, check=True, timeout=600):
    args = [script(args[0]) if args[0].startswith("rwkv7-") else args[0], *args[1:]]
    proc = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def train(args, env, cwd, check=True):
    return cli(["rwkv7-train", *args], env, cwd, check)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, env):
    """One short training run with the default config (tiny sizes), from a directory outside the repo."""
    cwd = tmp_path_factory.mktemp("elsewhere")
    out = cwd / "run"
    train([*SMALL, "trainer.max_steps=40", "trainer.val_check_interval=20", "checkpoint.every_n_train_steps=20",
           "optim.lr_init=3e-3", "optim.lr_final=1e-3", "logger=wandb", f"hydra.run.dir={out}"], env, cwd)
    return out


def test_help_lists_the_config_groups(env, tmp_path):
    out = train(["--help"], env, tmp_path).stdout
    assert "rwkv7-train" in out
    for group in ("model:", "data:", "trainer:", "strategy:", "optim:", "logger:", "experiment:"):
        assert group in out
    assert "0.1b" in out and "deepspeed_stage_2" in out


def test_cfg_job_composes_groups_and_overrides(env, tmp_path):
    out = train(["model=0.4b", "optim.lr_init=1e-4", "--cfg", "job"], env, tmp_path).stdout
    assert "n_embd: 1024" in out and "n_layer: 24" in out and "lr_init: 0.0001" in out


def test_experiment_selects_model_data_and_strategy(env, tmp_path):
    out = train(["experiment=world_1.5b", "data.train_path=/x", "--cfg", "job"], env, tmp_path).stdout
    assert "n_embd: 2048" in out and "ctx_len: 4096" in out and "stage: 2" in out


def test_user_config_directory_is_searched(env, tmp_path):
    (tmp_path / "mine" / "model").mkdir(parents=True)
    (tmp_path / "mine" / "model" / "wide.yaml").write_text("vocab_size: 65536\nn_layer: 3\nn_embd: 320\nhead_size: 64\n")
    out = train(["--config-dir", str(tmp_path / "mine"), "model=wide", "--cfg", "job"], env, tmp_path).stdout
    assert "n_embd: 320" in out


def test_training_run_writes_checkpoints_config_and_offline_wandb(run_dir):
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert {"step20.ckpt", "step40.ckpt", "last.ckpt"} <= set(ckpts)
    assert not [n for n in ckpts if n.endswith(".tmp")]
    resolved = (run_dir / "resolved_config.yaml").read_text()
    assert "n_embd: 64" in resolved and "${" not in resolved
    assert list((run_dir / "wandb").glob("offline-run-*"))
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 40
    assert ckpt["tokens_seen"] == 40 * 4 * 32
    assert ckpt["hyper_parameters"]["run_config"]["model"]["n_embd"] == 64


def test_loss_falls_during_the_run(run_dir, env, tmp_path):
    # Re-run the same job briefly with the CSV logger to read the per-step losses.
    out = tmp_path / "csvrun"
    train([*SMALL, "trainer.max_steps=40", "trainer.val_check_interval=40", "trainer.log_every_n_steps=1",
           "optim.lr_init=3e-3", "optim.lr_final=1e-3", "logger=csv", f"hydra.run.dir={out}"], env, tmp_path)
    rows = list(csv.DictReader(open(next(out.glob("csv/*/metrics.csv")))))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert losses[0] > 10.5                       # ln(65536) = 11.09 at the start
    assert sum(losses[-5:]) / 5 < losses[0] - 3   # and clearly lower after 40 steps
    assert val and val[-1] < 8.5


def test_resume_continues_from_the_checkpoint(run_dir, env, tmp_path):
    out = tmp_path / "resumed"
    train([*SMALL, "trainer.max_steps=45", "trainer.val_check_interval=20", "logger=none",
           f"resume_from={run_dir / 'checkpoints' / 'step40.ckpt'}", f"hydra.run.dir={out}"], env, tmp_path)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 45
    assert ckpt["tokens_seen"] == 45 * 4 * 32


def test_export_gives_an_official_checkpoint_the_reference_loads(run_dir, env, tmp_path):
    pth = tmp_path / "exported.pth"
    out = cli(["rwkv7-convert", "export", str(run_dir / "checkpoints" / "last.ckpt"), str(pth)], env, tmp_path).stdout
    assert "official RWKV-7 layout" in out
    from rwkv7_train import load_official

    tokens = [510, 33, 2000, 7, 65000, 1]
    with torch.no_grad():
        ours = load_official(pth)(torch.tensor([tokens]))[0]
    ref = reference_logits(reference_model(pth), tokens)
    assert ((ours - ref).norm() / ref.norm()).item() <= 1e-4
    info = cli(["rwkv7-convert", "info", str(pth)], env, tmp_path).stdout
    assert "L2 D64" in info and "vocab 65536" in info


def test_generate_samples_text_from_a_checkpoint(run_dir, env, tmp_path):
    out = cli(["rwkv7-generate", str(run_dir / "checkpoints" / "last.ckpt"), "--prompt", "def ", "--max-tokens", "20",
               "--temperature", "0"], env, tmp_path).stdout
    assert out.startswith("def ") and len(out) > len("def \n")


def test_init_from_official_weights(run_dir, env, tmp_path):
    pth = tmp_path / "start.pth"
    cli(["rwkv7-convert", "export", str(run_dir / "checkpoints" / "last.ckpt"), str(pth)], env, tmp_path)
    out = tmp_path / "cont"
    train([*SMALL, "trainer.max_steps=1", "trainer.val_check_interval=1", "logger=csv", f"init_from={pth}",
           "trainer.log_every_n_steps=1", f"hydra.run.dir={out}"], env, tmp_path)
    rows = list(csv.DictReader(open(next(out.glob("csv/*/metrics.csv")))))
    first = [float(r["train/loss"]) for r in rows if r.get("train/loss")][0]
    assert first < 9.0   # starts from the trained weights, not from ln(65536)


@pytest.mark.parametrize("args,message", [
    (["model.n_layr=3"], "n_layr"),
    (["data=binidx"], "data.train_path"),
    (["data=binidx", "data.train_path=/nonexistent/corpus"], "/nonexistent/corpus"),
    (["model.vocab_size=1000", "trainer.max_steps=1"], "vocab"),
    (["init_from=/nonexistent/model.pth", "trainer.max_steps=1"], "/nonexistent/model.pth"),
])
def test_bad_input_stops_with_a_clear_message(env, tmp_path, args, message):
    proc = train([*SMALL, *args, f"hydra.run.dir={tmp_path / 'bad'}"], env, tmp_path, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_wrong_model_for_init_from_names_the_tensor(run_dir, env, tmp_path):
    pth = tmp_path / "m.pth"
    cli(["rwkv7-convert", "export", str(run_dir / "checkpoints" / "last.ckpt"), str(pth)], env, tmp_path)
    proc = train([*SMALL, "model.n_embd=128", "model.head_size=64", f"init_from={pth}", "trainer.max_steps=1",
                  f"hydra.run.dir={tmp_path / 'bad'}"], env, tmp_path, check=False)
    assert proc.returncode == 2
    assert "does not fit this RWKV-7 model" in proc.stderr and "Traceback" not in proc.stderr


def test_module_entry_point_runs(env, tmp_path):
    out = cli([sys.executable, "-m", "rwkv7_train.train", "--cfg", "job"], env, tmp_path).stdout
    assert "n_layer: 4" in out


def test_mixture_of_prepared_sources_logs_tokens_and_val_loss_per_source(env, tmp_path):
    """rwkv7-prep two sources (with held-out parts), then train a packed mixture of them from the command line."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    inputs = {"json_lib": sorted((stdlib / "json").glob("*.py")), "email_lib": sorted((stdlib / "email").glob("*.py"))}
    sources = []
    for name, files in inputs.items():
        cli(["rwkv7-prep", *map(str, files), "--output", str(tmp_path / name), "--val-every", "4", "--workers", "1"],
            env, tmp_path)
        sources.append(f"{{name: {name}, path: {tmp_path / name}, weight: {3 if name == 'email_lib' else 1}, "
                       f"val_path: {tmp_path / name}_val}}")
    out = tmp_path / "mix"
    train([*SMALL, "data=mixture", f"data.sources=[{','.join(sources)}]", "data.sampling=packed",
           "data.num_workers=0", "data.epoch_steps=100", "data.ctx_len=32", "data.micro_bsz=4",
           "trainer.max_steps=8", "trainer.val_check_interval=8", "trainer.log_every_n_steps=1", "logger=csv",
           f"hydra.run.dir={out}"], env, tmp_path)
    rows = list(csv.DictReader(open(next(out.glob("csv/*/metrics.csv")))))
    last = {k: v for r in rows for k, v in r.items() if v}
    seen = {n: float(last[f"train/tokens/{n}"]) for n in inputs}
    assert seen["json_lib"] + seen["email_lib"] == 8 * 4 * 32
    assert seen["email_lib"] > seen["json_lib"]          # weight 3 : 1
    for name in inputs:
        assert 0 < float(last[f"val/{name}/loss"]) < 12
    assert "val/loss" in last
