"""When a run writes checkpoints: every N steps, every M minutes, at its end, and when the cluster asks it to stop.

SIGTERM and SIGUSR1 (what schedulers send before preempting a job) make every rank finish its step, save, and
stop; the entry point then exits with errors.PREEMPTED (75) so a job script knows to requeue. All ranks decide
together (one small all-reduce a step), so they save the same step even when the signal or the clock reached only
some of them.

A checkpoint is written at the end of its step but published (renamed to stepN.ckpt) only at the next training
batch, validation or the end of training: after Lightning has logged that step's metrics, so that a run killed
once stepN.ckpt exists has every row up to step N in metrics.csv (a resumed run keeps those rows).
"""
import signal
import time
from pathlib import Path
from typing import Optional

import lightning as L
import torch

from . import run_checkpoints as layout
from .plot import refresh as refresh_curves

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_signalled = []   # set by the handler; a signal that came during start-up is acted on at the first step


def _on_signal(signum, frame):
    _signalled.append(signum)


def catch_stop_signals() -> dict:
    """Make SIGTERM/SIGUSR1 request a checkpoint and a clean stop (from process start, and again after Lightning
    installs its own handlers); returns the handlers replaced."""
    return {s: signal.signal(s, _on_signal) for s in SIGNALS}


class RunCheckpoints(L.Callback):
    def __init__(self, run_dir, every_n_steps: Optional[int], every_n_minutes: Optional[float], keep_last: int,
                 keep_every_n_steps: Optional[int]):
        self.run_dir = Path(run_dir)
        self.every_n_steps, self.every_n_minutes = every_n_steps, every_n_minutes
        self.keep_last, self.keep_every_n_steps = keep_last, keep_every_n_steps
        self.preempted = False      # a signal arrived; the entry point exits 75 after fit
        self.saved_step = -1
        self._last_time = time.monotonic()
        self._last_step = None
        self._previous = {}
        self._unpublished = None    # (temporary path, step) of a checkpoint written but not yet published

    # ---- signals -----------------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module):
        # Again after Lightning's own handlers, which would otherwise end the run without a checkpoint.
        self._previous = catch_stop_signals()
        self._last_step = trainer.global_step
        self.saved_step = trainer.global_step if trainer.ckpt_path else -1   # resumed: that step is on disk

    def teardown(self, trainer, pl_module, stage):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    # ---- when --------------------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == self._last_step:   # inside gradient accumulation: no optimizer step yet
            return
        self._last_step = step
        timed = self.every_n_minutes is not None and time.monotonic() - self._last_time >= 60 * self.every_n_minutes
        signalled, timed = self._any_rank(trainer, bool(_signalled), timed)
        if signalled or timed or (self.every_n_steps and step % self.every_n_steps == 0):
            self.save(trainer)
        if signalled:
            self.preempted = True
            trainer.should_stop = True
            if trainer.is_global_zero:
                print(f"rwkv7-train: stopping at step {step} on a signal; checkpoint saved, run the same command "
                      "with resume_from=auto to continue")

    @staticmethod
    def _any_rank(trainer, *flags: bool) -> list[bool]:
        t = torch.tensor([float(f) for f in flags], device=trainer.strategy.root_device)
        return [bool(v) for v in trainer.strategy.reduce(t, reduce_op="max").tolist()]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.publish(trainer)

    def on_validation_start(self, trainer, pl_module):
        self.publish(trainer)

    def on_train_end(self, trainer, pl_module):
        self.save(trainer)   # every run ends with its final state on disk
        self.publish(trainer)

    # ---- how ---------------------------------------------------------------------------------------------------
    def save(self, trainer) -> None:
        """Write the state of this step under a temporary name on every rank (publish() names it stepN.ckpt)."""
        self.publish(trainer)   # an earlier one still waiting goes first: the write below clears partial names
        step = trainer.global_step
        if step == self.saved_step:
            return
        folder = layout.checkpoint_dir(self.run_dir)
        tmp = folder / layout.partial_name(step)
        if trainer.is_global_zero:
            folder.mkdir(parents=True, exist_ok=True)
            layout.remove_partials(self.run_dir)
        trainer.strategy.barrier("rwkv7_checkpoint_start")
        trainer.save_checkpoint(tmp, weights_only=False)   # the full state: weights, optimizer, loops, data
        trainer.strategy.barrier("rwkv7_checkpoint_written")
        self._unpublished = (tmp, step)
        self.saved_step = step
        self._last_time = time.monotonic()

    def publish(self, trainer) -> None:
        """Rank 0 renames the written checkpoint to stepN.ckpt, prunes the old ones and redraws the curves."""
        if self._unpublished is None:
            return
        tmp, step = self._unpublished
        self._unpublished = None
        if trainer.is_global_zero:
            layout.publish(tmp, step)
            layout.prune(self.run_dir, self.keep_last, self.keep_every_n_steps)
            refresh_curves(self.run_dir)   # RUN_DIR/curves.png from metrics.csv, current at every checkpoint
        trainer.strategy.barrier("rwkv7_checkpoint_published")
