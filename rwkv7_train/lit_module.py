"""The LightningModule: RWKV-7 + loss + the official optimiser recipe. Distribution is the strategy's business."""
import math
from typing import Optional

import lightning as L
import torch

from .loss import lm_loss
from .model import RWKV7, RWKV7Config
from .official import load_into, load_state_dict_file
from .optim import lr_at, param_groups


class RWKV7LitModule(L.LightningModule):
    def __init__(self, model: dict, optim: dict, tokens_per_step: int, total_tokens: int,
                 init_from: Optional[str] = None, activation_checkpointing: bool = False,
                 run_config: Optional[dict] = None):
        """model: RWKV7Config fields; optim: lr_init, lr_final, warmup_steps, betas, eps, weight_decay;
        tokens_per_step: tokens in one optimizer step over all ranks; total_tokens: length of the schedule;
        init_from: official `.pth` to start from; activation_checkpointing: recompute each block in backward;
        run_config: the resolved run config, stored in checkpoints."""
        super().__init__()
        self.save_hyperparameters()
        self.model_cfg = RWKV7Config.from_dict(dict(model))
        self.optim_cfg = dict(optim)
        self.model: Optional[RWKV7] = None
        self.tokens_seen = 0
        self._val_sums = self._val_counts = None

    def configure_model(self):
        # Built here rather than in __init__ so that sharded strategies (ZeRO-3) can wrap construction.
        if self.model is not None:
            return
        self.model = RWKV7(self.model_cfg)
        self.model.activation_checkpointing = self.hparams.activation_checkpointing
        if self.hparams.init_from:
            path = self.hparams.init_from
            load_into(self.model, load_state_dict_file(path), source=str(path))

    def forward(self, idx):
        return self.model(idx)

    def on_train_batch_start(self, batch, batch_idx):
        o = self.optim_cfg
        lr = lr_at(self.tokens_seen, self.global_step, o["lr_init"], o["lr_final"], o["warmup_steps"],
                   self.hparams.total_tokens)
        for opt in self.trainer.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr * group["lr_scale"]
        self.log("train/lr", lr, prog_bar=True, on_step=True, on_epoch=False)

    def training_step(self, batch, batch_idx):
        loss = lm_loss(self.model(batch.idx, cu_seqlens=batch.cu_seqlens), batch.targets)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # Tokens seen per data source over all ranks: the DataModule derives them from its sample count, so they
        # need no communication and stay exact across a resume.
        for name, n in self.trainer.datamodule.tokens_per_source().items():
            self.log(f"train/tokens/{name}", float(n), on_step=True, on_epoch=False)

    def on_before_optimizer_step(self, optimizer):
        self.tokens_seen += self.hparams.tokens_per_step
        self.log("train/tokens", float(self.tokens_seen), on_step=True, on_epoch=False)

    def on_validation_epoch_start(self):
        n = len(self.trainer.datamodule.val_source_names)
        self._val_sums = torch.zeros(n, dtype=torch.float64, device=self.device)
        self._val_counts = torch.zeros(n, dtype=torch.float64, device=self.device)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        logits = self.model(batch.idx, cu_seqlens=batch.cu_seqlens)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.targets.reshape(-1),
                                                 reduction="sum")
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

    def configure_optimizers(self):
        o = self.optim_cfg
        groups = param_groups(self.model, o["weight_decay"])
        for g in groups:
            g["lr"] = o["lr_init"] * g["lr_scale"]
        return torch.optim.AdamW(groups, lr=o["lr_init"], betas=tuple(o["betas"]), eps=o["eps"])

    def on_save_checkpoint(self, checkpoint):
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint):
        self.tokens_seen = checkpoint.get("tokens_seen", 0)
