"""The one-screen summaries rank 0 prints at the start of a run (what will be trained, on what, where) and at its end
(what was done and where to find it)."""
import time
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger

from .flops import parameter_count
from .model import RWKV7Config
from .plot import CURVES_FILE, METRICS_FILE
from .provenance import describe


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def start_summary(cfg, model_cfg: RWKV7Config, code: dict, trainer, datamodule, run_dir: Path, total_tokens: int,
                  tokens_per_step: int) -> str:
    m = model_cfg
    total_weight = sum(spec.weight for spec in datamodule.specs)
    sources = ", ".join(f"{spec.name} ({spec.weight / total_weight:.0%})" for spec in datamodule.specs)
    strategy = cfg.strategy.get("name") or type(trainer.strategy).__name__
    return "\n".join([
        f"rwkv7-train: RWKV-7 L{m.n_layer} D{m.n_embd} ({_count(parameter_count(m))} parameters), vocab "
        f"{m.vocab_size}, ctx {cfg.data.ctx_len}, {trainer.precision}",
        f"  plan:     {cfg.trainer.max_steps} steps x {_count(tokens_per_step)} tokens = {_count(total_tokens)} "
        f"tokens (lr schedule over {_count(cfg.optim.total_tokens or total_tokens)})",
        f"  devices:  {trainer.num_devices} x {trainer.strategy.root_device.type} on {trainer.num_nodes} node(s), "
        f"{trainer.world_size} process(es), strategy {strategy}",
        f"  data:     {sources}; micro-batch {cfg.data.micro_bsz}",
        f"  run dir:  {run_dir}",
        f"  code:     {describe(code)}",
    ])


def end_summary(trainer, module, run_dir: Path, started: float) -> str:
    metrics = trainer.callback_metrics
    losses = ", ".join(f"{k} {float(metrics[k]):.4f}" for k in ("train/loss", "val/loss") if k in metrics)
    hours, rest = divmod(int(time.time() - started), 3600)
    lines = [f"rwkv7-train: done at step {trainer.global_step}: {_count(module.tokens_seen)} tokens in "
             f"{hours}:{rest // 60:02d}:{rest % 60:02d}; {losses or 'no loss logged'}",
             f"  checkpoints: {run_dir / 'checkpoints'} (last.ckpt is the newest)",
             f"  curves:      {run_dir / CURVES_FILE} (metrics: {run_dir / METRICS_FILE})"]
    for wandb_dir in sorted((run_dir / "wandb").glob("offline-run-*"))[-1:]:
        lines.append(f"  wandb:       {wandb_dir} (upload: wandb sync {wandb_dir})")
    for logger in trainer.loggers:   # an online run: its page (WANDB_SILENT hides wandb's own line)
        if isinstance(logger, WandbLogger) and not logger.experiment.offline and logger.experiment.url:
            lines.append(f"  wandb:       {logger.experiment.url}")
    return "\n".join(lines)
