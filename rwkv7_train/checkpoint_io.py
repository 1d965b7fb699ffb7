"""Lightning checkpoint I/O that never leaves a truncated checkpoint behind (write to a temp file, then rename)."""
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from .atomic import atomic_torch_save


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        atomic_torch_save(checkpoint, path)
