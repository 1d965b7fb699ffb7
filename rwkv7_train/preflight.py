"""Checks made before a run creates anything (a logger run, a checkpoint): impossible settings, the checkpoint to
resume from and the one to start from. Each problem is one UserError naming the setting and the fix."""
from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from rwkv7_kernels import KernelConfig

from .errors import UserError
from .model import RWKV7, RWKV7Config
from .official import load_into
from .run_checkpoints import latest, verify
from .upgrade import read_init_checkpoint


def _need_int(key: str, value, least: int, none_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        extra = " or null" if none_ok else ""
        raise UserError(f"{key}={value!r} must be an integer >= {least}{extra}")


def kernel_config(kernel) -> KernelConfig:
    """The `kernel` group (a mapping of KernelConfig fields, or None: the defaults) as the kernels take it."""
    try:
        return KernelConfig(**dict(kernel or {}))
    except (TypeError, ValueError) as e:   # a value the kernels do not take: the user's to fix
        raise UserError(str(e)) from None


def _is_deepspeed(strategy) -> bool:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return isinstance(strategy, DeepSpeedStrategy)


def check_settings(cfg: DictConfig) -> None:
    t, c = cfg.trainer, cfg.checkpoint
    kernel_config(cfg.get("kernel"))
    _need_int("trainer.max_steps", t.max_steps, 1)
    _need_int("trainer.accumulate_grad_batches", t.accumulate_grad_batches, 1)
    _need_int("trainer.num_nodes", t.num_nodes, 1)
    _need_int("trainer.log_every_n_steps", t.log_every_n_steps, 1)
    if t.devices != "auto" and not isinstance(t.devices, (list, str)):
        _need_int("trainer.devices", t.devices, 1)
    _need_int("checkpoint.every_n_steps", c.every_n_steps, 1, none_ok=True)
    _need_int("checkpoint.keep_last", c.keep_last, 1)
    _need_int("checkpoint.keep_every_n_steps", c.keep_every_n_steps, 1, none_ok=True)
    if c.every_n_minutes is not None and not (isinstance(c.every_n_minutes, (int, float)) and c.every_n_minutes > 0):
        raise UserError(f"checkpoint.every_n_minutes={c.every_n_minutes!r} must be a positive number or null")
    s = cfg.strategy
    if "stage" in s:
        if s.stage not in (1, 2, 3):
            raise UserError(f"strategy.stage={s.stage!r}: DeepSpeed ZeRO has stages 1, 2 and 3")
        if s.get("offload_parameters") and s.stage != 3:
            raise UserError("strategy.offload_parameters=true needs ZeRO stage 3 (strategy=deepspeed_stage_3); "
                            "stages 1 and 2 keep every parameter on each GPU")
        if cfg.on_nonfinite == "skip":
            raise UserError("on_nonfinite=skip does not work under DeepSpeed (it cannot undo a step); use "
                            "on_nonfinite=stop and resume from the last checkpoint")
        if not torch.cuda.is_available() and s._target_ == "lightning.pytorch.strategies.DeepSpeedStrategy":
            raise UserError(f"strategy=deepspeed_stage_{s.stage} needs CUDA GPUs and none is visible; on this "
                            "machine use strategy=auto or strategy=ddp")


def resume_path(resume_from, run_dir: Path) -> Optional[Path]:
    """The checkpoint to resume from: None (fresh), `auto` (the newest complete one in the run directory, or a
    fresh start when there is none), or a path that must be a whole checkpoint."""
    if resume_from is None:
        return None
    if str(resume_from) == "auto":
        found = latest(run_dir, warn=rank_zero_only(print))
        if found is None and rank_zero_only.rank == 0:
            print(f"resume_from=auto: no checkpoint in {run_dir / 'checkpoints'} yet, starting fresh")
        return found
    return verify(resume_from)


def check_resume(path: Path, resolved: dict, strategy) -> dict:
    """The checkpoint's saved state without its tensors, after checking that this run can continue it: the same
    model, and a strategy that reads its layout (one file, or ZeRO shards of the same stage)."""
    from .checkpoints import client_state

    state = client_state(path)
    saved = (state.get("hyper_parameters") or {}).get("run_config") or {}
    if "model" not in saved:
        raise UserError(f"{path} is not a rwkv7-train checkpoint (no run config in it); to start from weights "
                        "use init_from=")
    old, new = RWKV7Config.from_dict(dict(saved["model"])), RWKV7Config.from_dict(dict(resolved["model"]))
    diff = [f"model.{k}={getattr(old, k)} (now {getattr(new, k)})"
            for k in vars(old) if getattr(old, k) != getattr(new, k)]
    if diff:
        raise UserError(f"{path} holds another model: {', '.join(diff)}; resume with the same model config")
    saved_stage = (saved.get("strategy") or {}).get("stage") if path.is_dir() else None
    stage = resolved["strategy"].get("stage") if _is_deepspeed(strategy) else None
    if saved_stage != stage:
        was = f"ZeRO stage {saved_stage} (strategy=deepspeed_stage_{saved_stage})" if saved_stage else \
            "a single-file strategy (strategy=auto or ddp)"
        raise UserError(f"{path} was written under {was}; resume it with that strategy, or export it with "
                        "rwkv7-convert export and start a new run from it with init_from=")
    return state


def check_init_from(path, model: dict, grow: bool) -> None:
    """init_from must be an official checkpoint (RWKV-7, or RWKV-6/5.2 to upgrade: checked here by shape only, the
    upgrade runs in configure_model) that fits the configured model (with grow: no larger)."""
    sd, note = read_init_checkpoint(path, shapes_only=True)
    if note and rank_zero_only.rank == 0:
        print(note)
    if grow:
        return  # official.load_partial checks every tensor when it runs
    with torch.device("meta"):
        target = RWKV7(RWKV7Config.from_dict(dict(model)))
    load_into(target, sd, source=str(path))
