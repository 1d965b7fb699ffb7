"""`rwkv7-train`, `rwkv7-convert` and `rwkv7-generate` end to end, as a user runs them (subprocesses, real files)."""
import csv
import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from cli_run import SMALL, cli, train
from reference import reference_logits, reference_model

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, env):
    """One short training run with the default config (tiny sizes), from a directory outside the repo."""
    cwd = tmp_path_factory.mktemp("elsewhere")
    out = cwd / "run"
    train([*SMALL, "trainer.max_steps=40", "trainer.val_check_interval=20", "checkpoint.every_n_steps=20",
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


def test_kernel_settings_are_a_config_group(env, tmp_path):
    out = train(["kernel.bwd=split", "--cfg", "job"], env, tmp_path).stdout
    assert "kernel:" in out and "bwd: split" in out and "chunk: 16" in out


def test_training_run_writes_checkpoints_config_and_offline_wandb(run_dir):
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "step20.ckpt", "step40.ckpt"]   # no temporary leftovers
    assert (run_dir / "checkpoints" / "last.ckpt").resolve() == (run_dir / "checkpoints" / "step40.ckpt")
    resolved = (run_dir / "resolved_config.yaml").read_text()
    assert "n_embd: 64" in resolved and "${" not in resolved
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 40
    assert ckpt["tokens_seen"] == 40 * 4 * 32
    assert ckpt["hyper_parameters"]["run_config"]["model"]["n_embd"] == 64
    assert runs[0].name.endswith(ckpt["wandb_run_id"])          # the wandb run a resume continues
    # The code that ran: the installed version and, in a git checkout (CI's clone), its commit; in the wandb config
    code = ckpt["hyper_parameters"]["code"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    assert code["version"] == version("rwkv7-train")
    assert code["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    wandb_log = next(runs[0].glob("run-*.wandb")).read_bytes()   # the offline run's record log
    assert json.dumps(code, separators=(",", ":")).encode() in wandb_log
    assert ckpt["RWKVDataModule"]["samples_consumed"] == 40 * 4
    assert len(ckpt["rng_states"]) == 1 and ckpt["rng_states"][0]["torch"].dtype == torch.uint8


def test_every_run_saves_its_final_step_and_keeps_the_last_few(env, tmp_path):
    out = tmp_path / "run"
    train([*SMALL, "trainer.max_steps=23", "trainer.val_check_interval=23", "checkpoint.every_n_steps=5",
           "checkpoint.keep_last=2", "checkpoint.keep_every_n_steps=10", "logger=none", f"hydra.run.dir={out}"],
          env, tmp_path)
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "step10.ckpt", "step20.ckpt", "step23.ckpt"]
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 23


def test_checkpoints_by_wall_time(env, tmp_path):
    out = tmp_path / "run"
    train([*SMALL, "trainer.max_steps=4", "trainer.val_check_interval=4", "checkpoint.every_n_steps=null",
           "checkpoint.every_n_minutes=0.0001", "checkpoint.keep_last=10", "logger=none", f"hydra.run.dir={out}"],
          env, tmp_path)
    assert sorted(p.name for p in (out / "checkpoints").glob("step*.ckpt")) == [f"step{i}.ckpt" for i in (1, 2, 3, 4)]


def test_loss_falls_during_the_run(run_dir, env, tmp_path):
    # Re-run the same job briefly to read the per-step losses from RUN_DIR/metrics.csv.
    out = tmp_path / "csvrun"
    train([*SMALL, "trainer.max_steps=40", "trainer.val_check_interval=40", "trainer.log_every_n_steps=1",
           "optim.lr_init=3e-3", "optim.lr_final=1e-3", "logger=none", f"hydra.run.dir={out}"], env, tmp_path)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert losses[0] > 10.5                       # ln(65536) = 11.09 at the start
    assert sum(losses[-5:]) / 5 < losses[0] - 3   # and clearly lower after 40 steps
    assert val and val[-1] < 8.5
    # lr per parameter group (the schedule's lr; att.w0 at twice it)
    lr = [(float(r["train/lr"]), float(r["train/lr/decay"]), float(r["train/lr/no_decay"]), float(r["train/lr/w0"]))
          for r in rows if r.get("train/lr")]
    assert len(lr) == 40 and lr[0][0] < lr[-1][0] < lr[10][0]   # warmup, then the cosine falls
    for base, decay, no_decay, w0 in lr:
        assert decay == no_decay == base and w0 == pytest.approx(2 * base, rel=1e-6)


def test_validation_and_checkpoint_time_is_not_counted_as_step_time(env, tmp_path):
    # Validation with its sample generations (3 prompts x 32 tokens) and the checkpoint saves take several steps'
    # time on the CPU; the steps they fall between must still be timed as training alone.
    out = tmp_path / "speed"
    train([*SMALL, "trainer.max_steps=12", "trainer.val_check_interval=6", "checkpoint.every_n_steps=4",
           "trainer.log_every_n_steps=1", "logger=none", f"hydra.run.dir={out}"], env, tmp_path)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    step_ms = [float(r["train/step_ms"]) for r in rows if r.get("train/step_ms")][1:]   # the first compiles
    assert len(step_ms) == 11
    median = sorted(step_ms)[len(step_ms) // 2]
    assert max(step_ms) < 4 * median, step_ms
    wait_ms = [float(r["train/data_wait_ms"]) for r in rows if r.get("train/data_wait_ms")]
    assert max(wait_ms) < median, wait_ms                                        # nor as waiting for data
    for r in rows:
        if r.get("train/step_ms"):
            assert float(r["train/tokens_per_s"]) == pytest.approx(4 * 32 / (float(r["train/step_ms"]) / 1000))


def test_resume_continues_in_the_run_directory_of_the_checkpoint(run_dir, env, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, symlinks=True)
    proc = train([*SMALL, "trainer.max_steps=45", "trainer.val_check_interval=20", "logger=none",
                  f"resume_from={copy / 'checkpoints' / 'step40.ckpt'}"], env, tmp_path)
    assert not (tmp_path / "outputs").exists()                  # no new run directory
    ckpt = torch.load(copy / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 45
    assert ckpt["tokens_seen"] == 45 * 4 * 32
    log = proc.stdout + proc.stderr
    assert "40/45" in log and "/?" not in log                  # the bar counts the run's steps
    assert "not resumable" not in log


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
    train([*SMALL, "trainer.max_steps=1", "trainer.val_check_interval=1", "logger=none", f"init_from={pth}",
           "trainer.log_every_n_steps=1", f"hydra.run.dir={out}"], env, tmp_path)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    first = [float(r["train/loss"]) for r in rows if r.get("train/loss")][0]
    assert first < 9.0   # starts from the trained weights, not from ln(65536)


@pytest.mark.parametrize("args,message", [
    (["model.n_layr=3"], "model.n_layr is not a config key (did you mean model.n_layer?)"),
    (["model=tiyn"], "model=tiyn: no such model config (did you mean model=tiny?)"),
    (["data=binidx"], "data.train_path"),
    (["data=binidx", "data.train_path=/nonexistent/corpus"], "/nonexistent/corpus"),
    (["model.vocab_size=1000", "trainer.max_steps=1"], "vocab"),
    (["init_from=/nonexistent/model.pth", "trainer.max_steps=1"], "/nonexistent/model.pth"),
    (["resume_from=/nonexistent/step5.ckpt"], "checkpoint not found: /nonexistent/step5.ckpt"),
    (["trainer.max_steps=-5"], "trainer.max_steps=-5 must be an integer >= 1"),
    (["checkpoint.keep_last=0"], "checkpoint.keep_last=0 must be an integer >= 1"),
    (["data.micro_bsz=0"], "data.micro_bsz=0 must be an integer >= 1"),   # raised by the DataModule's constructor
    (["kernel.chunk=20"], "kernel.chunk=20: use 16, 32 or 64"),             # raised by KernelConfig
    (["strategy=deepspeed_stage_2", "+strategy.offload_parameters=true"], "needs ZeRO stage 3"),
    (["strategy=deepspeed_stage_2", "strategy.offload_parameters=true"], "(did you mean strategy.offload_optimizer?)"),
])
def test_bad_input_stops_with_one_line_and_leaves_no_run_directory(env, tmp_path, args, message):
    proc = train([*SMALL, *args, f"hydra.run.dir={tmp_path / 'bad'}"], env, tmp_path, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "bad").exists()


def test_a_failed_start_leaves_no_outputs_directory(env, tmp_path):
    proc = train([*SMALL, "trainer.max_steps=0"], env, tmp_path, check=False)
    assert proc.returncode == 2 and "trainer.max_steps=0" in proc.stderr
    assert not (tmp_path / "outputs").exists()


def test_deepspeed_without_a_gpu_says_so(env, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = train([*SMALL, "strategy=deepspeed_stage_2", f"hydra.run.dir={tmp_path / 'bad'}"], env, tmp_path,
                 check=False)
    assert proc.returncode == 2 and "needs CUDA GPUs" in proc.stderr and "strategy=ddp" in proc.stderr


def test_wrong_model_for_init_from_names_the_tensor(run_dir, env, tmp_path):
    pth = tmp_path / "m.pth"
    cli(["rwkv7-convert", "export", str(run_dir / "checkpoints" / "last.ckpt"), str(pth)], env, tmp_path)
    proc = train([*SMALL, "model.n_embd=128", "model.head_size=64", f"init_from={pth}", "trainer.max_steps=1",
                  f"hydra.run.dir={tmp_path / 'bad'}"], env, tmp_path, check=False)
    assert proc.returncode == 2
    assert "does not fit this RWKV-7 model" in proc.stderr and "Traceback" not in proc.stderr


def test_init_grow_starts_a_deeper_model_from_a_shallower_one(run_dir, env, tmp_path):
    """The new block starts with zero output matrices (the official init), so the grown model computes what the
    small one did: its first loss is the trained model's, not ln(65536)."""
    pth = tmp_path / "small.safetensors"
    cli(["rwkv7-convert", "export", str(run_dir / "checkpoints" / "last.ckpt"), str(pth)], env, tmp_path)
    out = tmp_path / "grown"
    proc = train([*SMALL, "model.n_layer=3", f"init_from={pth}", "init_grow=true",
                  "trainer.max_steps=1", "trainer.val_check_interval=1", "trainer.log_every_n_steps=1", "logger=none",
                  f"hydra.run.dir={out}"], env, tmp_path)
    assert "new at the official init" in proc.stdout
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [float(r["train/loss"]) for r in rows if r.get("train/loss")][0] < 9.0


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
           "trainer.max_steps=8", "trainer.val_check_interval=8", "trainer.log_every_n_steps=1", "logger=none",
           f"hydra.run.dir={out}"], env, tmp_path)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    last = {k: v for r in rows for k, v in r.items() if v}
    seen = {n: float(last[f"train/tokens/{n}"]) for n in inputs}
    assert seen["json_lib"] + seen["email_lib"] == 8 * 4 * 32
    assert seen["email_lib"] > seen["json_lib"]          # weight 3 : 1
    for name in inputs:
        assert 0 < float(last[f"val/{name}/loss"]) < 12
    assert "val/loss" in last
