import os

import pytest
import torch

# Unit tests never talk to wandb; the CLI tests pick their own logger.
os.environ.setdefault("WANDB_MODE", "disabled")
# Without CUDA the Triton kernels run in Triton's interpreter. Triton reads this when it is first imported, and
# Lightning and DeepSpeed import it, so it is set here, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """The environment of the console scripts the CLI tests run: a fresh cache, wandb offline and quiet."""
    e = dict(os.environ)
    e["RWKV7_TRAIN_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    e["WANDB_MODE"] = "offline"
    e["WANDB_SILENT"] = "true"
    return e
