"""Lightning checkpoint I/O for single-file checkpoints: written atomically (a temp file, then a rename), read
weights-only with our allowlist (a checkpoint handed to resume_from never runs code)."""
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from .atomic import atomic_torch_save
from .safe_load import safe_torch_load


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return safe_torch_load(path, mmap=False)   # on the CPU; Lightning moves each part where it belongs
