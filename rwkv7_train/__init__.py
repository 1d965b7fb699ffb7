"""rwkv7-train: pretraining RWKV-7 ("Goose") language models.

Public names load on first use, so light entry points (rwkv7-prep, --help) do not pay for importing torch.
"""
from importlib import import_module

_PUBLIC = {
    "RWKV7": ".model",
    "RWKV7Config": ".model",
    "load_official": ".official",
    "save_official": ".official",
    "WorldTokenizer": ".tokenizer",
}
__all__ = list(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name], __name__), name)
    raise AttributeError(f"module 'rwkv7_train' has no attribute {name!r}")
