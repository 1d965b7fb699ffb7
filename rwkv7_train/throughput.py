"""Speed and memory of a run, logged with the losses: tokens/s over all ranks, the wall time of each optimizer step
and the part of it spent waiting for the data loader on this process, MFU against the GPU's dense bf16 peak
(docs/mfu.md; omitted on CPU and on GPUs the peak table does not know, unless mfu_peak_tflops is set), and on CUDA
the peak memory PyTorch allocated (and reserved) since the run started.

Validation (with its sample generations) and checkpoint saves are not training: the time from their start to the
next training batch is left out of the step they fall in, so they do not understate tokens/s and MFU."""
import time
from typing import Optional

import lightning as L
import torch

from .flops import mfu, peak_flops


class Throughput(L.Callback):
    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_override: Optional[float] = None):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_override = peak_override
        self.peak = None
        self._last_step = None
        self._last_time = None
        self._batch_done = None   # when the last micro-batch ended: the loader's wait runs from there
        self._wait = 0.0          # seconds waited for data since the last optimizer step
        self._pause_start = None  # when a validation or checkpoint save began, until the next training batch
        self._paused = 0.0        # seconds of such pauses since the last optimizer step

    def on_train_start(self, trainer, pl_module):
        self._last_step, self._last_time = trainer.global_step, time.perf_counter()
        name = torch.cuda.get_device_name(pl_module.device) if pl_module.device.type == "cuda" else None
        self.peak = peak_flops(name, self.peak_override)

    def _pause(self, *_):
        if self._pause_start is None:
            self._pause_start = time.perf_counter()

    on_validation_start = on_save_checkpoint = _pause

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        if self._pause_start is not None:     # the pause ends here (its last data fetch counted in it)
            self._paused += now - self._pause_start
            self._pause_start = None
        elif self._batch_done is not None:
            self._wait += now - self._batch_done

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._batch_done = time.perf_counter()
        if trainer.global_step == self._last_step:   # inside gradient accumulation
            return
        steps = trainer.global_step - self._last_step
        # A save that began in this batch's end hooks (callbacks before this one) ends this step's time there.
        end = self._batch_done if self._pause_start is None else self._pause_start
        seconds = (end - self._last_time - self._paused) / steps
        self._last_step, self._last_time, self._paused = trainer.global_step, end, 0.0
        tokens_per_s = self.tokens_per_step / seconds
        pl_module.log("train/step_ms", 1000 * seconds, on_step=True, on_epoch=False)
        pl_module.log("train/data_wait_ms", 1000 * self._wait / steps, on_step=True, on_epoch=False)
        pl_module.log("train/tokens_per_s", tokens_per_s, prog_bar=True, on_step=True, on_epoch=False)
        self._wait = 0.0
        utilisation = mfu(tokens_per_s / trainer.world_size, self.flops_per_token, self.peak)
        if utilisation is not None:
            pl_module.log("train/mfu", utilisation, prog_bar=True, on_step=True, on_epoch=False)
        if pl_module.device.type == "cuda":
            pl_module.log("gpu/peak_allocated_gib", torch.cuda.max_memory_allocated() / 2**30, on_step=True,
                          on_epoch=False)
            pl_module.log("gpu/reserved_gib", torch.cuda.memory_reserved() / 2**30, on_step=True, on_epoch=False)
