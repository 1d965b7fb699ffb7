"""DeepSpeed ZeRO on CPU processes over gloo, for tests: Lightning's DeepSpeedStrategy refuses a CPU accelerator on
purpose, DeepSpeed itself runs there. Used as `strategy._target_=cpu_deepspeed.CPUDeepSpeedStrategy` with tests/
on PYTHONPATH; everything else (sharding, checkpoints, the engine) is DeepSpeed's and Lightning's own code."""
import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    def __init__(self, **kwargs):
        super().__init__(process_group_backend="gloo", **kwargs)

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)   # skips DeepSpeedStrategy's CUDA-only check

    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", 0)
