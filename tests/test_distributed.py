"""Data-parallel training on 2 CPU processes over gloo, as `rwkv7-train ... trainer.devices=2` runs it: DeepSpeed
ZeRO 1, 2 and 3 (through tests/cpu_deepspeed.py) and DDP give the losses of one process with the same global batch,
ZeRO-3 holds half the parameters on each rank, and checkpoints resume on another number of processes."""
import re

import pytest
import torch

from cli_run import CPU_ZERO, SMALL, losses, train, with_tests_on_path

STEPS = 6
# Global batch 4 windows a step: 4 on one process, 2 on each of two. Schedule fixed in tokens (9 steps long).
ONE = [*SMALL, "data.micro_bsz=4", "trainer.devices=1"]
TWO = [*SMALL, "data.micro_bsz=2", "trainer.devices=2"]
COMMON = ["trainer.accelerator=cpu", "trainer.log_every_n_steps=1", "trainer.val_check_interval=3",
          "checkpoint.every_n_steps=3", "optim.total_tokens=1152", "logger=none"]


@pytest.fixture(scope="module")
def zenv(env):
    return with_tests_on_path(env)


@pytest.fixture(scope="module")
def single(tmp_path_factory, zenv):
    """The reference: one process, 9 steps."""
    out = tmp_path_factory.mktemp("single") / "run"
    train([*ONE, *COMMON, "trainer.max_steps=9", f"hydra.run.dir={out}"], zenv, out.parent)
    return losses(out)


def _close(got: dict, expected: dict, tol: float):
    assert sorted(got) == sorted(expected)
    worst = max(abs(got[s] - expected[s]) for s in expected)
    assert worst <= tol, (worst, got, expected)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_on_two_processes_gives_the_single_process_losses(single, zenv, tmp_path, stage):
    out = tmp_path / "run"
    proc = train([*TWO, *COMMON, *CPU_ZERO, f"strategy=deepspeed_stage_{stage}", f"trainer.max_steps={STEPS}",
                  f"hydra.run.dir={out}"], zenv, tmp_path)
    _close(losses(out), {s: l for s, l in single.items() if s < STEPS}, tol=5e-5)
    m = re.search(r"parameters: [\d.]+M \(([\d.]+) MiB\); held per rank \(MiB\): ([\d., ]+)", proc.stdout)
    whole, held = float(m.group(1)), [float(x) for x in m.group(2).split(",")]
    assert len(held) == 2
    print(f"ZeRO-{stage}: model {whole:.2f} MiB, held per rank {held} MiB")
    if stage == 3:
        assert all(abs(h - whole / 2) < 0.01 * whole for h in held)   # each rank holds half
    else:
        assert all(abs(h - whole) < 1e-6 * whole for h in held)
    ckpt = out / "checkpoints" / f"step{STEPS}.ckpt"
    assert ckpt.is_dir() and (ckpt / "COMPLETE.json").is_file()


def test_ddp_two_processes_then_one_then_two_keeps_the_curve(single, zenv, tmp_path):
    """A checkpoint written by 2 processes resumes on 1 and back on 2: the data position and the schedule carry
    over, so the losses stay those of one uninterrupted process (no window repeated or skipped)."""
    out = tmp_path / "run"
    base = [*COMMON, "strategy=ddp", f"hydra.run.dir={out}", "resume_from=auto"]
    train([*TWO, *base, "trainer.max_steps=3"], zenv, tmp_path)
    train([*ONE, *base, "trainer.max_steps=6"], zenv, tmp_path)
    train([*TWO, *base, "trainer.max_steps=9"], zenv, tmp_path)
    _close(losses(out), single, tol=5e-5)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["RWKVDataModule"]["samples_consumed"] == 9 * 4
    assert ckpt["tokens_seen"] == 9 * 4 * 32


def test_zero2_checkpoint_of_two_processes_resumes_on_one(single, zenv, tmp_path):
    out = tmp_path / "run"
    base = [*COMMON, *CPU_ZERO, "strategy=deepspeed_stage_2", f"hydra.run.dir={out}", "resume_from=auto"]
    train([*TWO, *base, f"trainer.max_steps={STEPS}"], zenv, tmp_path)
    proc = train([*ONE, *base, "trainer.max_steps=9"], zenv, tmp_path)
    assert "converting it to DeepSpeed's universal checkpoint format" in proc.stdout
    _close(losses(out), single, tol=5e-5)


def test_zero_checkpoint_under_another_stage_is_refused(zenv, tmp_path):
    out = tmp_path / "run"
    base = [*ONE, *COMMON, *CPU_ZERO, f"hydra.run.dir={out}", "trainer.max_steps=3"]
    train([*base, "strategy=deepspeed_stage_2"], zenv, tmp_path)
    proc = train([*base, "strategy=deepspeed_stage_3", "resume_from=auto", "trainer.max_steps=4"], zenv, tmp_path,
                 check=False)
    assert proc.returncode == 2
    assert "written under ZeRO stage 2 (strategy=deepspeed_stage_2)" in proc.stderr and "Traceback" not in proc.stderr
    proc = train([*ONE, *COMMON, "strategy=ddp", f"hydra.run.dir={out}", "resume_from=auto", "trainer.max_steps=4"],
                 zenv, tmp_path, check=False)
    assert proc.returncode == 2 and "written under ZeRO stage 2" in proc.stderr


def _relative_difference(a: dict, b: dict) -> float:
    """|a - b| / |b| over all parameters together. Not tensor by tensor: Adam's eps of 1e-18 turns float noise in a
    near-zero gradient into a full-lr step, so a tensor still near zero after a few steps differs by its own size."""
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k].float() - b[k].float()).flatten() for k in b])
    return (diff.norm() / torch.cat([b[k].float().flatten() for k in b]).norm()).item()


def test_gradient_accumulation_under_zero2_matches_one_process(zenv, tmp_path):
    """2 processes x 1 window x 2 accumulated batches = one process x 4 windows: the same weights after 3 steps."""
    from rwkv7_train.checkpoints import read_checkpoint

    one, two = tmp_path / "one", tmp_path / "two"
    train([*ONE, *COMMON, "trainer.max_steps=3", f"hydra.run.dir={one}"], zenv, tmp_path)
    train([*SMALL, "data.micro_bsz=1", "trainer.devices=2", "trainer.accumulate_grad_batches=2", *COMMON, *CPU_ZERO,
           "strategy=deepspeed_stage_2", "trainer.max_steps=3", f"hydra.run.dir={two}"], zenv, tmp_path)
    (a, _), (b, _) = (read_checkpoint(run / "checkpoints" / "last.ckpt") for run in (one, two))
    assert _relative_difference(b, a) < 1e-4
    assert torch.load(one / "checkpoints" / "last.ckpt", weights_only=True)["tokens_seen"] == 3 * 4 * 32


def test_zero3_checkpoint_exports_to_official_safetensors(zenv, tmp_path):
    """rwkv7-convert export consolidates a sharded ZeRO-3 directory into the official layout."""
    from cli_run import cli
    from rwkv7_train.checkpoints import read_checkpoint
    from rwkv7_train.official import load_state_dict_file

    one, three = tmp_path / "one", tmp_path / "three"
    train([*ONE, *COMMON, "trainer.max_steps=3", f"hydra.run.dir={one}"], zenv, tmp_path)
    train([*TWO, *COMMON, *CPU_ZERO, "strategy=deepspeed_stage_3", "trainer.max_steps=3", f"hydra.run.dir={three}"],
          zenv, tmp_path)
    out = tmp_path / "model.safetensors"
    cli(["rwkv7-convert", "export", str(three / "checkpoints" / "step3.ckpt"), str(out)], zenv, tmp_path)
    exported = load_state_dict_file(out)
    single, _ = read_checkpoint(one / "checkpoints" / "last.ckpt")
    assert all(t.dtype == torch.bfloat16 for t in exported.values())
    assert _relative_difference(exported, single) < 1e-2     # bf16 rounding of the same weights
