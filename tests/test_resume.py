"""Full-state checkpoints as a user meets them: a run killed mid-step resumes onto the uninterrupted loss curve,
preemption signals save and exit 75, NaNs stop a run before a checkpoint holds them, and a damaged or planted
checkpoint is refused with one line. Real runs of `rwkv7-train` on the CPU in float32."""
import os
import shutil
import signal

import pytest
import torch

from cli_run import SMALL, cli, losses, train, train_until

# 30 steps on a schedule that does not depend on where a run stops (total_tokens fixed).
RUN = [*SMALL, "trainer.max_steps=30", "trainer.val_check_interval=30", "trainer.log_every_n_steps=1",
       "checkpoint.every_n_steps=10", "optim.total_tokens=3840", "logger=none"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, env):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    train([*RUN, f"hydra.run.dir={out}"], env, out.parent)
    return out


def test_sigkill_mid_step_then_resume_gives_the_same_losses_bitwise(uninterrupted, env, tmp_path):
    out = tmp_path / "run"
    args = [*RUN, f"hydra.run.dir={out}", "resume_from=auto"]
    status, _ = train_until(args, env, tmp_path, ready=out / "checkpoints" / "step10.ckpt", sig=signal.SIGKILL)
    assert status == -signal.SIGKILL
    assert not (out / "checkpoints" / "step30.ckpt").exists()
    proc = train(args, env, tmp_path)                               # the same command continues the run
    assert "resuming from" in proc.stdout and "step10.ckpt" in proc.stdout
    expected, got = losses(uninterrupted), losses(out)
    assert sorted(got) == list(range(30))
    assert got == expected                                          # float for float, every step


def test_sigterm_saves_the_step_and_exits_75(uninterrupted, env, tmp_path):
    out = tmp_path / "run"
    args = [*RUN, f"hydra.run.dir={out}", "resume_from=auto"]
    status, log = train_until(args, env, tmp_path, ready=out / "checkpoints" / "step10.ckpt", sig=signal.SIGTERM)
    assert status == 75, log[-2000:]
    saved = [p.name for p in (out / "checkpoints").glob("step*.ckpt")]
    stopped = max(int(n[4:-5]) for n in saved)
    assert 10 < stopped < 30 and f"stopping at step {stopped}" in log
    train(args, env, tmp_path)
    assert losses(out) == losses(uninterrupted)


def test_sigusr1_preempts_like_sigterm(env, tmp_path):
    out = tmp_path / "run"
    args = [*RUN, f"hydra.run.dir={out}", "resume_from=auto", "logger=none"]
    status, _ = train_until(args, env, tmp_path, ready=out / "checkpoints" / "step10.ckpt", sig=signal.SIGUSR1)
    assert status == 75


def test_a_nonfinite_loss_stops_the_run_before_any_checkpoint_holds_it(env, tmp_path):
    out = tmp_path / "run"
    proc = train([*SMALL, "trainer.max_steps=20", "checkpoint.every_n_steps=1", "optim.lr_init=1e30",
                  "optim.warmup_steps=0", "logger=none", f"hydra.run.dir={out}"], env, tmp_path, check=False)
    assert proc.returncode == 1
    line = [l for l in proc.stderr.splitlines() if "rwkv7-train: error" in l]
    assert len(line) == 1 and ("is nan" in line[0] or "is inf" in line[0])
    step = int(line[0].split("step ")[1].split(":")[0])
    assert "data position" in line[0] and "Traceback" not in proc.stderr
    saved = sorted(int(p.name[4:-5]) for p in (out / "checkpoints").glob("step*.ckpt"))
    assert saved and max(saved) == step - 1                       # every step before it, none after
    for p in (out / "checkpoints").glob("step*.ckpt"):
        sd = torch.load(p, weights_only=True)["state_dict"]
        assert all(torch.isfinite(t).all() for t in sd.values())


def test_on_nonfinite_skip_drops_the_step_and_goes_on(env, tmp_path):
    out = tmp_path / "run"
    proc = train([*SMALL, "trainer.max_steps=4", "optim.lr_init=1e30", "optim.warmup_steps=0", "logger=none",
                  "on_nonfinite=skip", f"hydra.run.dir={out}"], env, tmp_path)
    assert "step skipped (on_nonfinite=skip)" in proc.stdout
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["nonfinite_steps"] >= 1


@pytest.fixture(scope="module")
def finished(uninterrupted):
    return uninterrupted / "checkpoints"


def test_a_truncated_checkpoint_is_refused(finished, env, tmp_path):
    bad = tmp_path / "run" / "checkpoints" / "step20.ckpt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes((finished / "step20.ckpt").read_bytes()[:200_000])
    proc = train([*RUN, f"resume_from={bad}"], env, tmp_path, check=False)
    assert proc.returncode == 2 and "may be truncated" in proc.stderr and "Traceback" not in proc.stderr


def test_resume_auto_skips_a_damaged_newest_checkpoint(finished, env, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(finished / "step20.ckpt", run / "checkpoints" / "step20.ckpt")
    (run / "checkpoints" / "step30.ckpt").write_bytes(b"not a checkpoint")
    (run / "checkpoints" / ".step40.ckpt.partial").write_bytes(b"an interrupted write")
    proc = train([*RUN, f"hydra.run.dir={run}", "resume_from=auto", "logger=none"], env, tmp_path)
    assert "skipping" in proc.stdout and "resuming from" in proc.stdout and "step20.ckpt" in proc.stdout
    assert not (run / "checkpoints" / ".step40.ckpt.partial").exists()


def test_a_checkpoint_of_another_model_is_refused(finished, env, tmp_path):
    proc = train([*RUN, "model.n_layer=3", f"resume_from={finished / 'step20.ckpt'}",
                  f"hydra.run.dir={tmp_path / 'x'}"], env, tmp_path, check=False)
    assert proc.returncode == 2 and "holds another model: model.n_layer=2 (now 3)" in proc.stderr
    assert not (tmp_path / "x").exists()


class _Planted:
    """A pickle that would create a file when loaded (how a malicious checkpoint runs code)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


@pytest.mark.parametrize("use", ["resume", "export", "generate", "init_from"])
def test_a_checkpoint_whose_pickle_runs_code_is_refused(finished, env, tmp_path, use):
    marker = tmp_path / "pwned"
    ckpt = torch.load(finished / "step20.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["run_config"]["note"] = _Planted(marker)
    planted = tmp_path / "run" / "checkpoints" / ("step20.ckpt" if use != "init_from" else "model.pth")
    planted.parent.mkdir(parents=True)
    torch.save(ckpt if use != "init_from" else {"emb.weight": _Planted(marker)}, planted)
    commands = {"resume": ["rwkv7-train", *RUN, f"resume_from={planted}"],
                "export": ["rwkv7-convert", "export", str(planted), str(tmp_path / "out.pth")],
                "generate": ["rwkv7-generate", str(planted), "--max-tokens", "2"],
                "init_from": ["rwkv7-train", *RUN, f"init_from={planted}", f"hydra.run.dir={tmp_path / 'x'}"]}
    proc = cli(commands[use], env, tmp_path, check=False)
    assert proc.returncode == 2
    assert "refusing to load" in proc.stderr and "posix.system" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()
