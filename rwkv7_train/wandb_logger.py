"""The wandb logger the `logger=wandb` config builds: Lightning's, without the `anonymous` argument it always hands
wandb.init (None unless set), which recent wandb answers with a deprecation warning a user cannot act on."""
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger


class WandbLogger(LightningWandbLogger):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:   # the kwargs Lightning passes to wandb.init
            self._wandb_init.pop("anonymous", None)
