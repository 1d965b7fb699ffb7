"""Running our console scripts as a user does: subprocesses of the installed entry points, real files."""
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).parent

# A model small enough to train in seconds on 2 cores, still with the World vocab.
SMALL = ["model.n_layer=2", "model.n_embd=64", "model.head_size=32", "data.ctx_len=32", "data.micro_bsz=4",
         "data.val_windows=4"]
# DeepSpeed on 2 CPU processes over gloo (tests/cpu_deepspeed.py); add strategy=deepspeed_stage_N.
CPU_ZERO = ["strategy._target_=cpu_deepspeed.CPUDeepSpeedStrategy", "trainer.accelerator=cpu"]


def script(name):
    """A console script installed next to this Python (the venv need not be activated)."""
    return str(Path(sys.executable).parent / name)


def command(args):
    return [script(args[0]) if args[0].startswith("rwkv7-") else args[0], *args[1:]]


def with_tests_on_path(env):
    """`env` with tests/ importable (for the CPU DeepSpeed strategy) in every process a run starts."""
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))}


def cli(args, env, cwd, check=True, timeout=600):
    proc = subprocess.run(command(args), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def train(args, env, cwd, check=True):
    return cli(["rwkv7-train", *args], env, cwd, check)


def train_until(args, env, cwd, ready: Path, sig=signal.SIGKILL, delay=0.5, timeout=600):
    """Start a training run, wait until `ready` exists, wait `delay` more seconds (into the next steps), send
    `sig` to the run and every process it started; returns (exit status, stdout + stderr)."""
    proc = subprocess.Popen(command(["rwkv7-train", *args]), env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            out = proc.communicate()[0]
            raise AssertionError(f"{ready} never appeared (exit {proc.returncode})\n{out[-3000:]}")
        time.sleep(0.05)
    time.sleep(delay)
    os.killpg(proc.pid, sig) if sig == signal.SIGKILL else proc.send_signal(sig)
    out = proc.communicate(timeout=timeout)[0]
    return proc.returncode, out


def metrics(run_dir: Path) -> dict[int, dict[str, float]]:
    """Every logged value by step in RUN_DIR/metrics.csv (a resumed run continues it); a step logged twice keeps
    the later value."""
    by_step: dict[int, dict[str, float]] = {}
    for f in [Path(run_dir) / "metrics.csv"]:
        for row in csv.DictReader(open(f)):
            for key, value in row.items():
                if value and key != "step":
                    by_step.setdefault(int(row["step"]), {})[key] = float(value)
    return by_step


def losses(run_dir: Path) -> dict[int, float]:
    return {s: v["train/loss"] for s, v in metrics(run_dir).items() if "train/loss" in v}
