"""`rwkv7-train`: compose the Hydra config, build data + model + trainer, fit.

    rwkv7-train                                   # tiny model on the bundled sample corpus
    rwkv7-train model=0.1b data=binidx data.train_path=/data/world_v3 strategy=deepspeed_stage_2
    rwkv7-train --cfg job                         # print the composed config
    rwkv7-train --config-dir ~/my_configs experiment=mine
"""
import os
import re
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from .errors import UserError

CACHE_DIR = Path(os.environ.get("RWKV7_TRAIN_CACHE", Path.home() / ".cache" / "rwkv7-train"))


def _sample_corpus(split: str) -> str:
    """Resolver `${rwkv7_sample:train|val}`: build the sample corpus once, return its binidx prefix."""
    from rwkv7_data_prep.sample import build_sample_corpus

    train, val = build_sample_corpus(str(CACHE_DIR / "sample"))
    return {"train": train, "val": val}[split]


OmegaConf.register_new_resolver("auto_precision", lambda: "bf16-mixed" if torch.cuda.is_available() else "32-true")
OmegaConf.register_new_resolver("rwkv7_sample", _sample_corpus, use_cache=True)


def _build_strategy(cfg: DictConfig):
    if cfg.get("name") == "auto":
        return "auto"
    return hydra.utils.instantiate(cfg)


def fit(cfg: DictConfig) -> Path:
    """Run one training job described by `cfg`; returns the run directory."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from .checkpoint_io import AtomicCheckpointIO
    from .lit_module import RWKV7LitModule

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    (run_dir / "resolved_config.yaml").write_text(OmegaConf.to_yaml(resolved))
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")  # bad data paths fail here, before a logger run or a checkpoint directory exists
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    strategy = _build_strategy(cfg.strategy)
    logger = hydra.utils.instantiate(cfg.logger) if cfg.logger.get("_target_") else False
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="step{step}", auto_insert_metric_name=False,
                                 every_n_train_steps=cfg.checkpoint.every_n_train_steps,
                                 save_last=cfg.checkpoint.save_last, save_top_k=cfg.checkpoint.save_top_k)
    plugins = [] if "deepspeed" in type(strategy).__name__.lower() else [AtomicCheckpointIO()]
    trainer = L.Trainer(**cfg.trainer, strategy=strategy, logger=logger, callbacks=[checkpoint], plugins=plugins,
                        default_root_dir=run_dir)

    tokens_per_step = (cfg.data.micro_bsz * cfg.data.ctx_len * trainer.world_size
                       * cfg.trainer.accumulate_grad_batches)
    total_tokens = cfg.optim.total_tokens or tokens_per_step * max(cfg.trainer.max_steps, 1)
    module = RWKV7LitModule(model=resolved["model"], optim=resolved["optim"], tokens_per_step=tokens_per_step,
                            total_tokens=total_tokens, init_from=cfg.init_from,
                            activation_checkpointing=cfg.activation_checkpointing, run_config=resolved)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.resume_from)
    if trainer.is_global_zero:
        print(f"run directory: {run_dir}")
    return run_dir


@hydra.main(version_base="1.3", config_path="pkg://rwkv7_train.configs", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        fit(cfg)
    except (UserError, OmegaConfBaseException) as e:
        print(f"rwkv7-train: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)


def _one_line(e: Exception) -> str:
    if isinstance(e, MissingMandatoryValue):
        key = re.sub(r"\[(\d+)\]", r".\1", e.full_key)  # OmegaConf says a[1].b, Hydra overrides take a.1.b
        return f"{key} is required: set it on the command line, e.g. {key}=..."
    # A UserError raised in a DataLoader worker arrives wrapped in a traceback: its last line is the message.
    lines = [line for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    line = lines[-1].removeprefix(f"{UserError.__module__}.UserError: ") if isinstance(e, UserError) else lines[0]
    key = getattr(e, "full_key", None)
    return f"{key}: {line}" if key and key not in line else line


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
