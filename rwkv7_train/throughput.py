"""Speed and memory of a run, logged with the losses: tokens/s over all ranks and the wall time of each optimizer
step on this process, and on CUDA the peak memory PyTorch allocated (and reserved) since the run started."""
import time

import lightning as L
import torch


class Throughput(L.Callback):
    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self._last_step = None
        self._last_time = None

    def on_train_start(self, trainer, pl_module):
        self._last_step, self._last_time = trainer.global_step, time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self._last_step:   # inside gradient accumulation
            return
        now = time.perf_counter()
        seconds = (now - self._last_time) / (trainer.global_step - self._last_step)
        self._last_step, self._last_time = trainer.global_step, now
        pl_module.log("train/step_ms", 1000 * seconds, on_step=True, on_epoch=False)
        pl_module.log("train/tokens_per_s", self.tokens_per_step / seconds, on_step=True, on_epoch=False)
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            pl_module.log("gpu/peak_allocated_gib", torch.cuda.max_memory_allocated() / 2**30, on_step=True,
                          on_epoch=False)
            pl_module.log("gpu/reserved_gib", torch.cuda.memory_reserved() / 2**30, on_step=True, on_epoch=False)
