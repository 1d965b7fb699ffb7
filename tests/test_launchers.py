"""scripts/torchrun_train.sh and scripts/slurm_train.sbatch, run as a user runs them: real training on 2 CPU
processes of the bundled sample corpus, real checkpoints, real signals. SLURM is not installed here: `srun` and
`scontrol` are small stand-ins (one node; srun starts the tasks with the SLURM variables Lightning reads)."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = REPO / "scripts" / "torchrun_train.sh"
SBATCH = REPO / "scripts" / "slurm_train.sbatch"
PREEMPTED = 75
# Two CPU processes, a model that trains in seconds, checkpoints only where a test asks for them.
TINY = ["trainer.accelerator=cpu", "strategy=ddp", "model.n_layer=2", "model.n_embd=64", "model.head_size=32",
        "data.ctx_len=32", "data.micro_bsz=2", "data.val_windows=2", "logger=none"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """This venv's bin first on PATH (torchrun, python3), a fresh cache holding the sample corpus already built
    (a multi-process run reads a prepared corpus: its ranks would otherwise all build it at once)."""
    from rwkv7_data_prep.sample import build_sample_corpus

    cache = tmp_path_factory.mktemp("cache")
    build_sample_corpus(str(cache / "sample"))
    e = dict(os.environ)
    e.update(RWKV7_TRAIN_CACHE=str(cache), WANDB_MODE="disabled", PYTHONUNBUFFERED="1",
             PATH=os.pathsep.join([str(Path(sys.executable).parent), e.get("PATH", "")]))
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints of a run (stepN.ckpt; what is still being written has another name)."""
    names = [p.name for p in (run_dir / "checkpoints").iterdir()] if (run_dir / "checkpoints").is_dir() else []
    return sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"step(\d+)\.ckpt", n)))


def start(cmd, env, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, cwd=log.parent, stdout=log.open("w"), stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, timeout=300) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise AssertionError(f"{proc.args} did not end in {timeout} s\n{explain(log)}")


def stop(proc: subprocess.Popen) -> None:
    """End a launcher and what it started: SIGTERM first (passed on to the training processes, which
    outlive a SIGKILLed torchrun), then SIGKILL."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_for_checkpoint(proc, run_dir: Path, log: Path, after: int, timeout=180):
    """Wait until the run has a checkpoint newer than step `after` (it is training)."""
    deadline = time.monotonic() + timeout
    while not [s for s in checkpoint_steps(run_dir) if s > after]:
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise AssertionError(f"no checkpoint after step {after} (exit {proc.poll()})\n{explain(log)}")
        time.sleep(0.05)


def explain(log: Path) -> str:
    return log.read_text()[-3000:]


# ---- both scripts --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [TORCHRUN, SBATCH], ids=lambda p: p.name)
def test_script_parses(path):
    subprocess.run(["bash", "-n", str(path)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
@pytest.mark.parametrize("path", [TORCHRUN, SBATCH], ids=lambda p: p.name)
def test_script_is_shellcheck_clean(path):
    proc = subprocess.run(["shellcheck", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


# ---- torchrun ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,message", [([], "RUN_DIR is missing"), (["model=0.1b"], "'model=0.1b' is an override")])
def test_torchrun_launcher_without_run_dir_prints_usage(env, args, message):
    proc = subprocess.run([str(TORCHRUN), *args], env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "usage: scripts/torchrun_train.sh RUN_DIR" in proc.stderr and message in proc.stderr


def test_torchrun_launcher_rejects_a_node_rank_outside_the_job(env, tmp_path):
    proc = subprocess.run([str(TORCHRUN), str(tmp_path / "run")], env={**env, "NNODES": "2", "NODE_RANK": "2"},
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "NODE_RANK (2) must be below NNODES (2)" in proc.stderr


@pytest.mark.slow
def test_torchrun_two_processes_train_and_checkpoint(env, tmp_path):
    run, log = tmp_path / "run", tmp_path / "train.log"
    e = {**env, "GPUS_PER_NODE": "2", "NNODES": "1", "MASTER_PORT": str(free_port())}
    proc = start([str(TORCHRUN), str(run), *TINY, "trainer.max_steps=3", "trainer.val_check_interval=3"], e, log)
    assert finish(proc, log) == 0, explain(log)
    assert checkpoint_steps(run) == [3], explain(log)
    assert (run / "resolved_config.yaml").is_file()


@pytest.mark.slow
def test_torchrun_sigterm_makes_every_rank_checkpoint_and_the_launcher_exit_75(env, tmp_path):
    run, log = tmp_path / "run", tmp_path / "train.log"
    e = {**env, "GPUS_PER_NODE": "2", "MASTER_PORT": str(free_port())}
    proc = start([str(TORCHRUN), str(run), *TINY, "trainer.max_steps=16", "trainer.val_check_interval=16",
                  "checkpoint.every_n_steps=4"], e, log)
    wait_for_checkpoint(proc, run, log, after=0)
    proc.send_signal(signal.SIGTERM)
    assert finish(proc, log) == PREEMPTED, explain(log)
    assert 4 < checkpoint_steps(run)[-1] < 16, explain(log)   # the signal's checkpoint: after step 4, before the end


# ---- SLURM ---------------------------------------------------------------------------------------------------------
FAKE_SRUN = '''#!{python}
"""srun on one node: SLURM_NTASKS_PER_NODE tasks of the command, with the task variables Lightning reads; passes
SIGTERM/SIGUSR1 on to them; exits with the highest task status (128 + N for a task killed by signal N)."""
import os, signal, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_SLURM_LOG"], "a") as f:
    f.write("srun " + " ".join(args) + "\\n")
while args[0].startswith("--"):
    args.pop(0)
n = int(os.environ["SLURM_NTASKS_PER_NODE"])
os.environ.update(SLURM_NTASKS=str(n), SLURM_NODEID="0", SLURM_STEP_ID="0")
tasks = [subprocess.Popen(args, env={{**os.environ, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)}})
         for i in range(n)]
for s in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(s, lambda sig, _: [t.send_signal(sig) for t in tasks])
with open(os.environ["FAKE_SLURM_LOG"] + ".srun_pid", "w") as f:
    f.write(str(os.getpid()))
sys.exit(max(c if c >= 0 else 128 - c for c in (t.wait() for t in tasks)))
'''
FAKE_SCONTROL = '''#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_SLURM_LOG"
if [[ $1 == show && $2 == hostnames ]]; then printf 'localhost\\nnode002\\n'; fi
'''


@pytest.fixture
def slurm(env, tmp_path):
    """(job script with its EDIT block filled in for this machine, environment of a one-node allocation)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"srun": FAKE_SRUN.format(python=sys.executable), "scontrol": FAKE_SCONTROL}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    job_id = free_port()   # the script's MASTER_PORT is 20000 + job id % 20000: this free port when below 40000
    while not 20000 <= job_id < 40000:
        job_id = free_port()

    def job(run_dir: Path, train_args: list[str]) -> Path:
        text = SBATCH.read_text()
        text = re.sub(r"^RUN_DIR=.*$", f"RUN_DIR={run_dir}", text, count=1, flags=re.M)
        text = re.sub(r"^TRAIN_ARGS=\(\n(.*?\n)*?\)$", "TRAIN_ARGS=(" + " ".join(train_args) + ")", text,
                      count=1, flags=re.M)
        text = re.sub(r"^PYTHON=.*$", f"PYTHON={sys.executable}", text, count=1, flags=re.M)
        path = tmp_path / "job.sbatch"
        path.write_text(text)
        return path

    e = {**env, "PATH": os.pathsep.join([str(bin_dir), env["PATH"]]), "FAKE_SLURM_LOG": str(tmp_path / "slurm.log"),
         "SLURM_JOB_ID": str(job_id), "SLURM_JOB_NAME": "rwkv7-train", "SLURM_JOB_NODELIST": "localhost",
         "SLURM_NNODES": "1", "SLURM_NTASKS_PER_NODE": "2", "SLURM_CPUS_PER_TASK": "1"}
    return job, e


def slurm_calls(env) -> list[str]:
    log = Path(env["FAKE_SLURM_LOG"])
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.slow
def test_slurm_job_requeues_itself_after_a_signal_checkpoint_but_not_when_cancelled(slurm, tmp_path):
    job, e = slurm
    run = tmp_path / "run"
    script = ["bash", str(job(run, [*TINY, "trainer.max_steps=24", "trainer.val_check_interval=24",
                                    "checkpoint.every_n_steps=4"]))]
    srun_pid = Path(e["FAKE_SLURM_LOG"] + ".srun_pid")

    # Near the time limit: SIGUSR1 to the tasks (--signal=USR1@...); they checkpoint, the job requeues itself.
    log = tmp_path / "first.log"
    proc = start(script, e, log)
    wait_for_checkpoint(proc, run, log, after=0)
    os.kill(int(srun_pid.read_text()), signal.SIGUSR1)
    assert finish(proc, log) == PREEMPTED, explain(log)
    calls = slurm_calls(e)
    assert calls[-1] == f"scontrol requeue {e['SLURM_JOB_ID']}", calls
    srun = next(c for c in calls if c.startswith("srun "))
    assert f"hydra.run.dir={run} resume_from=auto trainer.devices=2 trainer.num_nodes=1" in srun
    first = checkpoint_steps(run)[-1]
    assert 4 < first < 24

    # The requeued job resumes; then scancel: SIGTERM to the batch shell and the tasks. It checkpoints, but a job
    # SLURM is ending does not requeue itself.
    e["SLURM_RESTART_COUNT"] = "1"
    log = tmp_path / "second.log"
    proc = start(script, e, log)
    wait_for_checkpoint(proc, run, log, after=first)
    proc.send_signal(signal.SIGTERM)
    os.kill(int(srun_pid.read_text()), signal.SIGTERM)
    assert finish(proc, log) == PREEMPTED, explain(log)
    assert f"resuming from {run / 'checkpoints' / f'step{first}.ckpt'}" in log.read_text()
    assert "not requeued" in log.read_text()
    assert sum(c.startswith("scontrol requeue") for c in slurm_calls(e)) == 1
    assert first < checkpoint_steps(run)[-1] < 24


def test_slurm_job_that_fails_is_not_requeued(slurm, tmp_path):
    job, e = slurm
    script = job(tmp_path / "run", [*TINY, "model.n_layr=3"])
    log = tmp_path / "job.log"
    assert finish(start(["bash", str(script)], e, log), log) == 2, explain(log)
    assert not [c for c in slurm_calls(e) if c.startswith("scontrol requeue")]
    assert "not requeued" in log.read_text()
