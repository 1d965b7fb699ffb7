"""Silence what the libraries print that a user of rwkv7-train cannot act on: Lightning's litlogger advert, its
model summary's empty FLOPs column (we print our own parameter line), a deprecation inside Lightning's own pytree
code, the "fit stopped" line the end summary repeats, and wandb's chatter (the end of the run says where the wandb
run is and how to upload it)."""
import logging
import os
import warnings

# "`Trainer.fit` stopped: `max_steps=N` reached." lands on the progress bar's line; the end summary says it
_LIGHTNING_NOISE = ("litlogger", "GPU available:", "TPU available:", "HPU available:", "`Trainer.fit` stopped")


class _DropLightningNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in _LIGHTNING_NOISE)


def quiet_libraries() -> None:
    os.environ.setdefault("WANDB_SILENT", "true")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropLightningNoise())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
