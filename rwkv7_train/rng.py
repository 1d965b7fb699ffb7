"""Random-number generator states of every rank, as plain data a weights-only checkpoint load accepts."""
import random

import numpy as np
import torch
import torch.distributed as dist


def rng_state() -> dict:
    """This process's Python, NumPy, torch CPU and (if present) CUDA generator states."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng_states() -> list[dict]:
    """Every rank's rng_state(), in rank order (a collective: every rank must call it)."""
    mine = rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return [{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in s.items()} for s in states]
