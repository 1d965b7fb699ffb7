"""Atomic file writes: a crash mid-write never leaves a half file under the final name."""
import os
import secrets
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_write(path, mode: str = "wb", **open_kwargs):
    """Yield a file opened on a temporary name beside `path`; on success fsync it and rename it over `path`.

    The file gets the permissions a plain open() would give it (0666 less the umask), not mkstemp's 0600: on a shared
    cluster the other users of a prepared corpus or a checkpoint must be able to read it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj, path) -> None:
    import torch

    with atomic_write(path) as f:
        torch.save(obj, f)
