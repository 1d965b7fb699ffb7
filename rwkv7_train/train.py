"""`rwkv7-train`: compose the Hydra config, check it, build data + model + trainer, fit.

    rwkv7-train                                   # tiny model on the bundled sample corpus
    rwkv7-train model=0.1b data=binidx data.train_path=/data/world_v3 strategy=deepspeed_stage_2
    rwkv7-train hydra.run.dir=/shared/runs/a resume_from=auto   # start, or continue after a stop or preemption
    rwkv7-train --cfg job                         # print the composed config
    rwkv7-train --config-dir ~/my_configs experiment=mine
"""
import fcntl
import os
import shutil
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .checkpointing import catch_stop_signals
from .cli_errors import check_overrides, one_line
from .errors import BAD_INPUT, PREEMPTED, UserError

CACHE_DIR = Path(os.environ.get("RWKV7_TRAIN_CACHE", Path.home() / ".cache" / "rwkv7-train"))
STARTED = time.time()


def _sample_corpus(split: str) -> str:
    """Resolver `${rwkv7_sample:train|val}`: build the sample corpus once, return its source directory (whose
    manifest lets a vocab mismatch be found before training starts)."""
    from rwkv7_data_prep.sample import build_sample_corpus

    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / "sample.lock", "w") as lock:   # ranks of a torchrun/SLURM job start together
        fcntl.flock(lock, fcntl.LOCK_EX)
        train, val = build_sample_corpus(str(CACHE_DIR / "sample"))
    return str(Path({"train": train, "val": val}[split]).parent)


def _run_dir(resume_from) -> str:
    """Resolver for hydra.run.dir: resuming from RUN/checkpoints/stepN.ckpt continues in RUN; otherwise a new
    outputs/DATE/TIME (resume_from=auto looks in hydra.run.dir, so give it one)."""
    if resume_from not in (None, "auto"):
        ckpt = Path(str(resume_from)).absolute()
        if ckpt.parent.name == "checkpoints" and ckpt.exists():
            return str(ckpt.parent.parent)
    return datetime.now().strftime("outputs/%Y-%m-%d/%H-%M-%S")


OmegaConf.register_new_resolver("auto_precision", lambda: "bf16-mixed" if torch.cuda.is_available() else "32-true")
OmegaConf.register_new_resolver("rwkv7_sample", _sample_corpus, use_cache=True)
OmegaConf.register_new_resolver("rwkv7_run_dir", _run_dir, use_cache=True)


def _build(node: DictConfig, **kwargs):
    """hydra.utils.instantiate, raising a UserError that the constructor raised (a bad value it found) as itself,
    not inside Hydra's multi-line "Error in call to target" wrapper."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from None
        raise


def fit(cfg: DictConfig) -> int:
    """Run one training job described by `cfg`; returns the exit status (0, or PREEMPTED after a signal)."""
    import lightning as L
    from lightning.pytorch.plugins.environments import SLURMEnvironment
    from lightning.pytorch.utilities import rank_zero_only

    from .checkpoint_io import AtomicCheckpointIO
    from .checkpointing import RunCheckpoints
    from .lit_module import RWKV7LitModule
    from .metrics_csv import MetricsCSV
    from .preflight import check_init_from, check_resume, check_settings, resume_path
    from . import zero_resume
    from .progress import StepProgressBar
    from .quiet import quiet_libraries
    from .samples import SampleGenerations
    from .summary import end_summary, start_summary
    from .throughput import Throughput
    from .flops import training_flops_per_token
    from .model import RWKV7Config
    from .provenance import code_version

    quiet_libraries()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    check_settings(cfg)
    datamodule = _build(cfg.data)
    datamodule.setup("fit")  # bad data paths fail here, before a logger run or a checkpoint exists
    strategy = "auto" if cfg.strategy.get("name") == "auto" else _build(cfg.strategy)
    resume = resume_path(cfg.resume_from, run_dir)
    state = check_resume(resume, resolved, strategy) if resume else {}
    if resume is None and cfg.init_from:
        check_init_from(cfg.init_from, resolved["model"], cfg.init_grow)
    if resume is not None and rank_zero_only.rank == 0:
        print(f"resuming from {resume} (step {state.get('global_step')})")

    if rank_zero_only.rank == 0:
        (run_dir / "resolved_config.yaml").write_text(OmegaConf.to_yaml(resolved))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")
    loggers = [MetricsCSV(run_dir, state.get("global_step") if resume else None)]   # RUN_DIR/metrics.csv, always
    if cfg.logger.get("_target_"):
        resumed_id = state.get("wandb_run_id")
        extra = {"id": resumed_id, "resume": "allow"} if resumed_id and "Wandb" in cfg.logger._target_ else {}
        loggers.append(_build(cfg.logger, **extra))
    c = cfg.checkpoint
    checkpoints = RunCheckpoints(run_dir, c.every_n_steps, c.every_n_minutes, c.keep_last, c.keep_every_n_steps)
    plugins = [] if "deepspeed" in type(strategy).__name__.lower() else [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():   # preemption is ours (RunCheckpoints, exit 75), not Lightning's own requeue
        plugins.append(SLURMEnvironment(auto_requeue=False))
    trainer = L.Trainer(**cfg.trainer, strategy=strategy, logger=loggers, plugins=plugins, default_root_dir=run_dir,
                        callbacks=[checkpoints, *([StepProgressBar()] if cfg.trainer.enable_progress_bar else [])],
                        enable_checkpointing=False)

    if resume is not None and resume.is_dir():   # ZeRO shards are cut for the world size that wrote them
        zero_resume.prepare(resume, state.get("dp_world_size", trainer.world_size), trainer.world_size,
                            trainer.global_rank, strategy)
    tokens_per_step = (cfg.data.micro_bsz * cfg.data.ctx_len * trainer.world_size
                       * cfg.trainer.accumulate_grad_batches)
    model_cfg = RWKV7Config.from_dict(dict(resolved["model"]))
    flops = training_flops_per_token(model_cfg, cfg.data.ctx_len, cfg.kernel.chunk)   # as the CUDA kernels chunk
    peak_tflops = cfg.get("mfu_peak_tflops")
    if peak_tflops is not None and not peak_tflops > 0:
        raise UserError(f"mfu_peak_tflops={peak_tflops}: give the GPU's dense bf16 peak in TFLOP/s, or null")
    trainer.callbacks.append(Throughput(tokens_per_step, flops, peak_tflops and peak_tflops * 1e12))
    prompts, sample_tokens = cfg.get("sample_prompts") or [], cfg.get("sample_tokens", 0)
    if isinstance(sample_tokens, bool) or not isinstance(sample_tokens, int) or sample_tokens < 0:
        raise UserError(f"sample_tokens={sample_tokens!r}: give the tokens per sample (an integer >= 0; 0 = none)")
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise UserError("sample_prompts must be a list of strings (e.g. sample_prompts='[\"Hello\",\"Hi\"]')")
    trainer.callbacks.append(SampleGenerations(run_dir, list(prompts), sample_tokens,
                                               state.get("global_step") if resume else None))
    total_tokens = cfg.optim.total_tokens or tokens_per_step * cfg.trainer.max_steps
    code = code_version()
    if trainer.is_global_zero:
        print(start_summary(cfg, model_cfg, code, trainer, datamodule, run_dir, total_tokens, tokens_per_step),
              flush=True)
    module = RWKV7LitModule(model=resolved["model"], optim=resolved["optim"], tokens_per_step=tokens_per_step,
                            total_tokens=total_tokens, init_grow=cfg.init_grow,
                            init_from=None if resume else cfg.init_from,   # a resume has its own weights
                            activation_checkpointing=cfg.activation_checkpointing,
                            on_nonfinite=cfg.on_nonfinite, run_config=resolved, code=code, kernel=resolved["kernel"])
    with warnings.catch_warnings():
        # The DataModule restores the data position exactly (its state is in the checkpoint); Lightning cannot
        # see that and warns on every mid-epoch resume.
        warnings.filterwarnings("ignore", message=r".*dataloader is not resumable.*")
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    if trainer.is_global_zero:
        print(end_summary(trainer, module, run_dir, STARTED))
    return PREEMPTED if checkpoints.preempted else 0


def _remove_unstarted_run_dir(run_dir: Path) -> None:
    """A run that failed before it saved anything leaves no directory behind: remove the run directory, and
    Hydra's empty outputs/DATE parents, when every file in it was made by this process."""
    if not run_dir.is_dir() or (run_dir / "checkpoints").exists():
        return
    if any(p.stat().st_mtime < STARTED - 1 for p in [run_dir, *run_dir.rglob("*")]):
        return   # an existing directory the user pointed us at
    shutil.rmtree(run_dir, ignore_errors=True)
    for parent in list(run_dir.parents)[:2]:
        if parent.is_dir() and not any(parent.iterdir()) and parent.stat().st_mtime >= STARTED - 1:
            parent.rmdir()


@hydra.main(version_base="1.3", config_path="pkg://rwkv7_train.configs", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.utilities import rank_zero_only

    from .lit_module import NonFiniteLoss

    try:
        status = fit(cfg)
    except NonFiniteLoss as e:   # the run started and saved what came before: keep its directory
        if rank_zero_only.rank == 0:
            print(f"rwkv7-train: error: {e}", file=sys.stderr)
        sys.exit(1)
    except (UserError, OmegaConfBaseException, MisconfigurationException) as e:
        if rank_zero_only.rank == 0:
            print(f"rwkv7-train: error: {one_line(e)}", file=sys.stderr)
            _remove_unstarted_run_dir(Path(HydraConfig.get().runtime.output_dir))
        sys.exit(BAD_INPUT)
    if status:
        sys.exit(status)


def main() -> None:
    catch_stop_signals()   # a preemption notice during start-up still ends in a checkpoint and exit 75
    problem = check_overrides(sys.argv[1:])
    if problem:
        print(f"rwkv7-train: error: {problem}", file=sys.stderr)
        sys.exit(BAD_INPUT)
    _hydra_main()


if __name__ == "__main__":
    main()
