"""The training progress bar counts optimizer steps of the whole run (step 120/150), not batches of a mini-epoch,
so it reads the same before and after a resume, with a rate measured from where this process started."""
import sys

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm


class StepProgressBar(TQDMProgressBar):
    def init_train_tqdm(self) -> Tqdm:
        return Tqdm(desc="Training", total=self.trainer.max_steps, initial=self.trainer.global_step,
                    position=2 * self.process_position, disable=self.is_disabled, leave=True, dynamic_ncols=True,
                    file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT)

    def init_validation_tqdm(self) -> Tqdm:
        # Validation is a few seconds between steps; its result shows in the training bar (val/loss).
        return Tqdm(disable=True)

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)   # the logger's run id says nothing about progress
        return metrics

    def on_train_epoch_start(self, trainer, *_):
        pass   # one bar for the whole run: mini-epochs are the data's bookkeeping, not the user's

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if not self.train_progress_bar.disable and self._should_update(step, trainer.max_steps):
            self.train_progress_bar.n = step
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer, pl_module):
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
