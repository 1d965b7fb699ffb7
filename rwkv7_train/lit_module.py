"""The LightningModule: RWKV-7 + loss + the official optimiser recipe. Distribution is the strategy's business;
this module only adapts to what a strategy does to parameters (ZeRO-3 builds the model with them sharded)."""
import math
import sys
from typing import Optional

import lightning as L
import torch
from tqdm import tqdm

from .errors import UserError
from .model import RWKV7, RWKV7Config
from .official import load_into, load_partial
from .optim import lr_at, param_groups
from .preflight import kernel_config
from .rng import gather_rng_states, restore_rng_state
from .upgrade import read_init_checkpoint

NONFINITE_ACTIONS = ("stop", "skip")


class NonFiniteLoss(UserError):
    """The loss or the gradient norm of a step was NaN or inf (on any rank)."""


def _sharded(model: torch.nn.Module) -> bool:
    """True when a strategy built the model with its parameters partitioned (DeepSpeed ZeRO-3's placeholders)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _local_bytes(p: torch.Tensor) -> int:
    """Bytes of `p` this process holds: its ZeRO-3 partition where there is one, else all of it."""
    local = getattr(p, "ds_tensor", p)
    return local.numel() * local.element_size()


class RWKV7LitModule(L.LightningModule):
    def __init__(self, model: dict, optim: dict, tokens_per_step: int, total_tokens: int,
                 init_from: Optional[str] = None, init_grow: bool = False, activation_checkpointing: bool = False,
                 on_nonfinite: str = "stop", run_config: Optional[dict] = None, code: Optional[dict] = None,
                 kernel: Optional[dict] = None):
        """model: RWKV7Config fields; optim: lr_init, lr_final, warmup_steps, betas, eps, weight_decay;
        tokens_per_step: tokens in one optimizer step over all ranks; total_tokens: length of the schedule;
        init_from: official checkpoint to start from (init_grow: it may be smaller, see official.load_partial);
        activation_checkpointing: recompute each block in backward; on_nonfinite: "stop" or "skip" a step whose
        loss or gradient is NaN/inf; run_config: the resolved run config, stored in checkpoints; code: the package
        version and git commit (provenance.code_version), which the loggers (wandb's config) receive with the rest;
        kernel: KernelConfig fields, the WKV-7 kernels' settings (the `kernel` group; None: the defaults)."""
        super().__init__()
        if on_nonfinite not in NONFINITE_ACTIONS:
            raise UserError(f"on_nonfinite={on_nonfinite!r}: use one of {', '.join(NONFINITE_ACTIONS)}")
        self.save_hyperparameters()
        self.model_cfg = RWKV7Config.from_dict(dict(model))
        self.kernel_cfg = kernel_config(kernel)
        self.optim_cfg = dict(optim)
        self.model: Optional[RWKV7] = None
        self.tokens_seen = 0        # training tokens over all ranks up to the last optimizer step
        self._resumed_at = (0, 0)   # (step, tokens) where this process started: tokens_at counts from there
        self.wandb_run_id: Optional[str] = None   # of the run this one continues (resumed)
        self.nonfinite_steps = 0
        self._val_sums = self._val_counts = None

    # ---- building ----------------------------------------------------------------------------------------------
    def configure_model(self):
        # Built here rather than in __init__ so that ZeRO-3 can build it sharded: no rank holds the whole model.
        if self.model is not None:
            return
        model = RWKV7(self.model_cfg, kernel=self.kernel_cfg)
        model.activation_checkpointing = self.hparams.activation_checkpointing
        path = self.hparams.init_from
        if _sharded(model):
            self._fill_sharded(model, read_init_checkpoint(path)[0] if path else None)
        elif path:
            sd = read_init_checkpoint(path)[0]   # an RWKV-6/5.2 checkpoint is upgraded (preflight printed the note)
            if self.hparams.init_grow:
                print(load_partial(model, sd, source=str(path)))
            else:
                load_into(model, sd, source=str(path))
        self.model = model

    def _fill_sharded(self, model: RWKV7, sd: Optional[dict]) -> None:
        """Initialise (or load `sd` into) a ZeRO-3 model one part at a time: each part's parameters are gathered,
        rank 0 writes them, and DeepSpeed re-partitions them to every rank."""
        from deepspeed.runtime.zero.partition_parameters import restore_init_context, shutdown_init_context

        if sd is not None and self.hparams.init_grow:
            raise UserError("init_grow does not work with ZeRO-3: grow the checkpoint under deepspeed_stage_2 (or "
                            "rwkv7-train init_grow=true with one GPU), export it, then init_from it under ZeRO-3")
        # zero.Init recasts every tensor made inside it to the parameter dtype (the fp64 init arithmetic too):
        # lift that while filling, so that the values equal the unsharded model's.
        shutdown_init_context()
        try:
            self._fill_parts(model, sd)
        finally:
            restore_init_context()

    def _fill_parts(self, model: RWKV7, sd: Optional[dict]) -> None:
        from deepspeed import zero

        rank0 = self.global_rank == 0
        if sd is None:
            for part, init in model.init_parts():
                with zero.GatheredParameters(list(part.parameters()), modifier_rank=0):
                    if rank0:
                        init()
            return
        for prefix, module in model.named_modules():
            own = dict(module.named_parameters(prefix=prefix, recurse=False))
            with zero.GatheredParameters(list(own.values()), modifier_rank=0), torch.no_grad():
                if rank0:
                    for name, p in own.items():
                        p.copy_(sd[name])

    def forward(self, idx):
        return self.model(idx)

    # ---- training ----------------------------------------------------------------------------------------------
    def on_train_start(self):
        held = torch.tensor([sum(_local_bytes(p) for p in self.model.parameters())], device=self.device)
        per_rank = self.all_gather(held).flatten().tolist()
        total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in self.model.parameters())
        if self.trainer.is_global_zero:
            whole = total * next(self.model.parameters()).element_size()
            ranks = ", ".join(f"{b / 2**20:.2f}" for b in per_rank)
            # tqdm.write: on a line of its own above the progress bar, which is already drawn
            tqdm.write(f"parameters: {total / 1e6:.2f}M ({whole / 2**20:.2f} MiB); held per rank (MiB): {ranks}",
                       file=sys.stdout)

    def tokens_at(self, step: int) -> int:
        """Training tokens after `step` optimizer steps. From the steps, not counted in a hook: under DeepSpeed's
        gradient accumulation Lightning calls the optimizer hooks on every micro-batch."""
        start_step, start_tokens = self._resumed_at
        return start_tokens + (step - start_step) * self.hparams.tokens_per_step

    def on_train_batch_start(self, batch, batch_idx):
        self.tokens_seen = self.tokens_at(self.global_step)
        o = self.optim_cfg
        lr = lr_at(self.tokens_seen, self.global_step, o["lr_init"], o["lr_final"], o["warmup_steps"],
                   self.hparams.total_tokens)
        for opt in self.trainer.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr * group["lr_scale"]
                self.log(f"train/lr/{group['name']}", group["lr"], on_step=True, on_epoch=False)
        self.log("train/lr", lr, prog_bar=True, on_step=True, on_epoch=False)

    def training_step(self, batch, batch_idx):
        loss = self.model(batch.idx, cu_seqlens=batch.cu_seqlens, targets=batch.targets)
        # The mean over all ranks: the loss of the global batch, the same figure on every rank. Checking it here
        # finds a NaN/inf on any rank at the step it happens, before it reaches the weights.
        mean = self.trainer.strategy.reduce(loss.detach(), reduce_op="mean")
        if not torch.isfinite(mean):
            return self._nonfinite("loss", mean.item())
        self.log("train/loss", mean, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def on_before_optimizer_step(self, optimizer):
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads:  # plain and DDP strategies (before clipping); ZeRO keeps gradients in DeepSpeed's buffers
            norm = torch.nn.utils.get_total_norm(grads).item()
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)
            if not math.isfinite(norm):
                self._nonfinite("gradient norm", norm)
                for p in self.model.parameters():   # on_nonfinite=skip: AdamW passes over parameters without one
                    p.grad = None

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        optimizer.step(closure=optimizer_closure)
        engine = getattr(self.trainer.strategy, "deepspeed_engine", None)
        norm = engine.get_global_grad_norm() if engine is not None else None
        if norm is not None:  # DeepSpeed's norm of this step's gradients, before clipping
            norm = float(norm)
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)
            if not math.isfinite(norm):
                self._nonfinite("gradient norm", norm, after_step=True)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.tokens_seen = self.tokens_at(self.global_step)
        self.log("train/tokens", float(self.tokens_seen), on_step=True, on_epoch=False)
        # Tokens seen per data source over all ranks: the DataModule derives them from its sample count, so they
        # need no communication and stay exact across a resume.
        for name, n in self.trainer.datamodule.tokens_per_source().items():
            self.log(f"train/tokens/{name}", float(n), on_step=True, on_epoch=False)

    def _nonfinite(self, what: str, value: float, after_step: bool = False):
        """Report a NaN/inf at this step with the data position; stop (no checkpoint is written after it) or, with
        on_nonfinite=skip, drop the step. Returns None (Lightning's way to skip a step's backward)."""
        dm = self.trainer.datamodule
        n = self.trainer.world_size * dm.micro_bsz
        where = (f"step {self.global_step + 1}: {what} is {value} (global samples "
                 f"{dm.samples_consumed - n}..{dm.samples_consumed - 1}, data position {dm.samples_consumed})")
        self.nonfinite_steps += 1
        skippable = not after_step and getattr(self.trainer.strategy, "deepspeed_engine", None) is None
        if self.hparams.on_nonfinite == "skip" and skippable:
            if self.trainer.is_global_zero:
                print(f"rwkv7-train: warning: {where}; step skipped (on_nonfinite=skip)")
            self.log("train/nonfinite_steps", float(self.nonfinite_steps), on_step=True, on_epoch=False)
            return None
        hint = "" if skippable else " (DeepSpeed cannot skip a step: it stops)"
        raise NonFiniteLoss(f"{where}; stopped before any checkpoint holds it{hint}: resume from the last "
                            "checkpoint with a lower optim.lr_init, or set on_nonfinite=skip")

    # ---- validation --------------------------------------------------------------------------------------------
    def on_validation_epoch_start(self):
        n = len(self.trainer.datamodule.val_source_names)
        self._val_sums = torch.zeros(n, dtype=torch.float64, device=self.device)
        self._val_counts = torch.zeros(n, dtype=torch.float64, device=self.device)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        loss = self.model(batch.idx, cu_seqlens=batch.cu_seqlens, targets=batch.targets, reduction="sum")
        self._val_sums[dataloader_idx] += loss.double()
        self._val_counts[dataloader_idx] += batch.targets.numel()

    def on_validation_epoch_end(self):
        """val/<source>/loss and ppl per source with held-out data, and val/loss over all of them."""
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        counts = self.trainer.strategy.reduce(self._val_counts, reduce_op="sum")
        names = self.trainer.datamodule.val_source_names
        for name, total, count in zip(names, sums.tolist(), counts.tolist()):
            if count and len(names) > 1:
                self.log(f"val/{name}/loss", total / count, sync_dist=False, add_dataloader_idx=False)
                self.log(f"val/{name}/ppl", math.exp(min(total / count, 50.0)), sync_dist=False,
                         add_dataloader_idx=False)
        if counts.sum().item():
            mean = (sums.sum() / counts.sum()).item()
            self.log("val/loss", mean, prog_bar=True, sync_dist=False, add_dataloader_idx=False)
            self.log("val/ppl", math.exp(min(mean, 50.0)), sync_dist=False, add_dataloader_idx=False)

    # ---- optimiser and checkpoint state ------------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.optim_cfg
        groups = param_groups(self.model, o["weight_decay"])
        for g in groups:
            g["lr"] = o["lr_init"] * g["lr_scale"]
        ds_config = getattr(self.trainer.strategy, "config", None) or {}
        if ds_config.get("zero_optimization", {}).get("offload_optimizer"):
            # ZeRO-Offload steps on the CPU: DeepSpeed's vectorised CPU Adam (it refuses torch's optimisers there).
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, lr=o["lr_init"], betas=tuple(o["betas"]), eps=o["eps"], adamw_mode=True)
        # Not fused: Lightning refuses to clip the gradients of a fused AdamW under mixed precision.
        return torch.optim.AdamW(groups, lr=o["lr_init"], betas=tuple(o["betas"]), eps=o["eps"])

    def on_save_checkpoint(self, checkpoint):
        checkpoint["tokens_seen"] = self.tokens_at(self.global_step)   # saved after the step
        checkpoint["nonfinite_steps"] = self.nonfinite_steps
        checkpoint["wandb_run_id"] = self._wandb_run_id()
        checkpoint["rng_states"] = gather_rng_states()   # one entry per rank, in rank order

    def _wandb_run_id(self) -> Optional[str]:
        """The id a resumed run hands wandb to continue this run's charts (None without a wandb logger)."""
        from lightning.pytorch.loggers import WandbLogger

        wandb = [lg for lg in self.loggers if isinstance(lg, WandbLogger)]
        return wandb[0].version if wandb and self.trainer.is_global_zero else self.wandb_run_id

    def on_load_checkpoint(self, checkpoint):
        self.tokens_seen = checkpoint.get("tokens_seen", 0)
        self._resumed_at = (checkpoint["global_step"], self.tokens_seen)
        self.nonfinite_steps = checkpoint.get("nonfinite_steps", 0)
        self.wandb_run_id = checkpoint.get("wandb_run_id")
        states = checkpoint.get("rng_states") or []
        if self.global_rank < len(states):
            restore_rng_state(states[self.global_rank])
