import os

import torch

# Unit tests never talk to wandb; the CLI tests pick their own logger.
os.environ.setdefault("WANDB_MODE", "disabled")
# Without CUDA the Triton kernels run in Triton's interpreter. Triton reads this when it is first imported, and
# Lightning and DeepSpeed import it, so it is set here, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
