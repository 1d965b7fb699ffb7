import os

# Unit tests never talk to wandb; the CLI tests pick their own logger.
os.environ.setdefault("WANDB_MODE", "disabled")
