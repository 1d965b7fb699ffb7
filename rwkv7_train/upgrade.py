"""Upgrade RWKV-6 (x060) and RWKV-5.2 (x052) official checkpoints into RWKV-7 (x070) ones: the RWKV-7 paper's recipe
(section 6) where it states one, an option with a documented default where it does not (docs/checkpoints.md has the
table, tensor by tensor).

Pure functions on state dicts. The shapes (C, L, H, N, V, FFN width, LoRA ranks) come from the tensors; every source
tensor is used or dropped by name, so a tensor of another layout is refused instead of silently lost.
"""
import math
import re
from dataclasses import dataclass, replace
from typing import NamedTuple, Optional

import torch

from .errors import UserError
from .hf import is_hf_dir, read_hf_dir
from .model import DECAY_SCALE, RWKV7, RWKV7Config
from .official import load_state_dict_file

NAMES = {"x070": "RWKV-7 (x070)", "x060": "RWKV-6 (x060)", "x052": "RWKV-5.2 (x052)", "x051": "RWKV-5.1",
         "x050": "RWKV-5.0", "x040": "RWKV-4", "unknown": "unknown"}
COMMANDS = {"x060": "upgrade-v6", "x052": "upgrade-v5"}
FFN_BOUND = 1e-3          # the paper: the FFN's new region is U(-1e-3, 1e-3)
DECAY_LORA_BOUND = 1e-4   # ... and the decay LoRA's U(-1e-4, 1e-4)
# RWKV-7 tensors no RWKV-6/5 tensor maps to: they take the x070 init (x052 has no decay LoRA and no decay lerp).
NEW = {"x060": ("x_a", "a0", "a1", "a2", "v0", "v1", "v2", "k_k", "k_a"),
       "x052": ("x_a", "a0", "a1", "a2", "v0", "v1", "v2", "k_k", "k_a", "x_w", "w1", "w2")}


def checkpoint_version(sd: dict) -> str:
    """The RWKV generation of an official state dict, from the keys of its first block (as BlinkDL's `rwkv` package
    tells them apart): "x070", "x060", "x052", "x051", "x050", "x040" (RWKV-4) or "unknown"."""
    att = "blocks.0.att."
    if att + "w0" in sd:
        return "x070"
    if att + "time_maa_x" in sd:
        return "x060"
    if att + "ln_x.weight" in sd:   # RWKV-5: multi-head state with a GroupNorm on its output
        if att + "gate.weight" not in sd:
            return "x050"
        decay = sd.get(att + "time_decay")
        return "x052" if decay is not None and decay.dim() == 2 and decay.shape[1] > 1 else "x051"
    if att + "time_first" in sd:
        return "x040"
    return "unknown"


def refuse(version: str, wanted: str, source: str) -> UserError:
    """The one-line error for a `source` of `version` given where a `wanted` ("x060" or "x052") checkpoint goes."""
    if version == "x070":
        return UserError(f"{source} is already an RWKV-7 (x070) checkpoint: there is nothing to upgrade")
    if version in COMMANDS:
        return UserError(f"{source} is an {NAMES[version]} checkpoint, not {NAMES[wanted]}: use "
                         f"`rwkv7-convert {COMMANDS[version]}`")
    what = "not an RWKV checkpoint of a known layout" if version == "unknown" else f"an {NAMES[version]} checkpoint"
    return UserError(f"{source} is {what}: only RWKV-6 (x060) and RWKV-5.2 (x052) checkpoints upgrade to RWKV-7")


@dataclass(frozen=True)
class UpgradeOptions:
    """The choices the paper leaves open; docs/checkpoints.md gives the reason for each default."""
    dim_w: Optional[int] = None    # decay LoRA rank; None: the x070 default for C, never below the source's rank
    dim_a: Optional[int] = None    # in-context learning rate LoRA rank; None: the x070 default for C
    dim_v: Optional[int] = None    # value residual LoRA rank; None: the x070 default for C
    dim_g: Optional[int] = None    # gate LoRA rank (where the gate's SVD is cut); None: the x070 default for C
    w0_max: float = 3.0            # cap on w0: the largest w0 of the x070 init, i.e. its fastest decay
    r_k_scale: float = 1.0         # r_k = r_k_scale * time_faaaa (both are the bonus term's per-channel weight)
    seed: int = 0                  # the x070 init of the new tensors and the draws of the widened regions
    dtype: torch.dtype = torch.bfloat16


class Upgraded(NamedTuple):
    state_dict: dict               # the official x070 layout, in options.dtype
    config: RWKV7Config
    gate_error: Optional[float]    # largest relative error of the gate LoRA over the layers (gate_lora); None: meta
    clamped: Optional[int]         # decay channels whose w0 is w0_max (decay_to_w0); None: meta


def decay_to_w0(time_decay: torch.Tensor, w0_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The x070 w0 of the same decay as an x060/x052 `time_decay`: decay exp(-exp(time_decay)) equals the x070
    exp(-exp(-0.5) sigmoid(w0)) when sigmoid(w0) = exp(time_decay + 0.5). No w0 exists where time_decay >= -0.5 (a
    decay under exp(-exp(-0.5)) = 0.545, faster than x070's fastest); there, and wherever the solution exceeds
    w0_max, w0 = w0_max. Returns (w0 in float32, the mask of the clamped channels)."""
    log_p = time_decay.double() - math.log(DECAY_SCALE)   # log sigmoid(w0)
    w0 = log_p - torch.log(-torch.expm1(log_p))            # logit(p), exact for very negative time_decay; NaN for p > 1
    clamped = ~(w0 <= w0_max)
    return torch.where(clamped, torch.full_like(w0, w0_max), w0).float(), clamped


def gate_lora(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The x070 gate LoRA (g1 [C, rank], g2 [rank, C]) of an RWKV-6/5 gate matrix (nn.Linear layout [out, in]: the
    source gate is silu(x W_g^T)), rescaled by half: g1 @ g2 is the best rank-`rank` approximation of W_g^T / 2, the
    factors sharing the singular values evenly (g1 = U sqrt(S), g2 = sqrt(S) V^T of the SVD U S V^T of W_g^T / 2).
    Also returns its relative error ||g1 g2 - W_g^T/2||_F / ||W_g^T/2||_F = sqrt(dropped s_i^2 / all s_i^2)."""
    U, S, Vh = torch.linalg.svd(weight.t() / 2, full_matrices=False)
    root = S[:rank].sqrt()
    error = (S[rank:].square().sum() / S.square().sum().clamp_min(torch.finfo(S.dtype).tiny)).sqrt()
    return U[:, :rank] * root, root[:, None] * Vh[:rank], error


def _widen(t: torch.Tensor, shape: tuple, bound: float, gen: torch.Generator) -> torch.Tensor:
    """`t` in the leading slice of a `shape` tensor whose new region is drawn from U(-bound, bound)."""
    out = torch.empty(shape, device=t.device).uniform_(-bound, bound, generator=gen)
    out[: t.shape[0], : t.shape[1]] = t
    return out


def _x070_init(cfg: RWKV7Config, seed: int, wanted: set, meta: bool) -> dict:
    """The tensors named in `wanted` as RWKV7's own init makes them under torch.manual_seed(seed) (its init_weights,
    run one part at a time so that at most one block is materialised); meta: placeholders of their shapes."""
    with torch.device("meta"):
        model = RWKV7(cfg)
    if meta:
        return {k: t for k, t in model.state_dict().items() if k in wanted}
    out = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for part, init in model.init_parts():
            part.to_empty(device="cpu")
            init()
            out.update((k, t) for k, t in model.state_dict().items() if k in wanted and not t.is_meta)
            part.to_empty(device="meta")
    return out


class _Source:
    """The tensors of a source checkpoint: each is taken once, as float32, with its shape checked."""

    def __init__(self, sd: dict, version: str, source: str):
        self.left, self.version, self.source = dict(sd), version, source

    def shape(self, key: str) -> tuple:
        if key not in self.left:
            raise UserError(f"{self.source} is not a whole {NAMES[self.version]} checkpoint: {key} is missing")
        return tuple(self.left[key].shape)

    def take(self, key: str, shape: tuple) -> torch.Tensor:
        if self.shape(key) != tuple(shape):
            raise UserError(f"{self.source}: {key} has shape {self.shape(key)}, an {NAMES[self.version]} checkpoint "
                            f"of this size has {tuple(shape)}")
        return self.left.pop(key).float()

    def drop(self, *keys: str) -> None:
        for key in keys:
            self.shape(key)   # a dropped tensor must still be there: the layout is the one we think
            del self.left[key]

    def finish(self) -> None:
        if self.left:
            raise UserError(f"{self.source} holds tensors an {NAMES[self.version]} checkpoint does not: "
                            f"{sorted(self.left)[:3]}")


def _target_config(src: _Source, options: UpgradeOptions) -> RWKV7Config:
    """The x070 config: the source's sizes, FFN 4C (the paper), the LoRA ranks of the options or their defaults."""
    V, C = src.shape("emb.weight")
    H, N = src.shape("blocks.0.att.time_faaaa")
    if H * N != C:
        raise UserError(f"{src.source}: time_faaaa has {H} heads of {N}, which is not the width {C}")
    L = 1 + max(int(m.group(1)) for k in src.left if (m := re.match(r"blocks\.(\d+)\.", k)))
    base = RWKV7Config(vocab_size=V, n_layer=L, n_embd=C, head_size=N)   # the x070 default ranks for C
    source_w = src.shape("blocks.0.att.time_decay_w1")[1] if src.version == "x060" else 0
    cfg = replace(base, dim_ffn=4 * C, dim_w=options.dim_w or max(base.dim_w, source_w),
                  dim_a=options.dim_a or base.dim_a, dim_v=options.dim_v or base.dim_v,
                  dim_g=options.dim_g or base.dim_g)
    if cfg.dim_w < source_w:
        raise UserError(f"dim_w={cfg.dim_w} is below the source's decay LoRA rank {source_w}: the upgrade widens "
                        "the decay LoRA, it cannot narrow it")
    if cfg.dim_g > C:
        raise UserError(f"dim_g={cfg.dim_g} exceeds the width {C}: the gate LoRA comes from the SVD of a {C}x{C} "
                        "matrix")
    if src.shape("blocks.0.ffn.key.weight")[0] > cfg.dim_ffn:
        raise UserError(f"{src.source}: its FFN is wider than 4C = {cfg.dim_ffn}, the RWKV-7 FFN")
    return cfg


def _time_mix_x060(src, att, ffn, cfg, gen, out) -> torch.Tensor:
    """x060's static lerps have x070's form (x + (shift(x) - x) * mu): copied; the token-shift LoRA is dropped; the
    decay LoRA is widened. Returns time_decay."""
    C, rank = cfg.n_embd, src.shape(att + "time_decay_w1")[1]
    for name in "rwkvg":
        out[att + "x_" + name] = src.take(att + "time_maa_" + name, (1, 1, C))
    src.drop(att + "time_maa_x", att + "time_maa_w1", att + "time_maa_w2")
    out[att + "w1"] = _widen(src.take(att + "time_decay_w1", (C, rank)), (C, cfg.dim_w), DECAY_LORA_BOUND, gen)
    out[att + "w2"] = _widen(src.take(att + "time_decay_w2", (rank, C)), (cfg.dim_w, C), DECAY_LORA_BOUND, gen)
    out[ffn + "x_k"] = src.take(ffn + "time_maa_k", (1, 1, C))
    src.drop(ffn + "time_maa_r")
    return src.take(att + "time_decay", (1, 1, C))


def _time_mix_x052(src, att, ffn, cfg, gen, out) -> torch.Tensor:
    """x052's lerps are x * mu + shift(x) * (1 - mu) = x + (shift(x) - x) * (1 - mu): x070's mu is 1 - x052's (exact).
    x052 has no decay lerp nor decay LoRA (they take the x070 init). Returns time_decay."""
    C = cfg.n_embd
    for name in "rkvg":
        out[att + "x_" + name] = 1 - src.take(att + "time_mix_" + name, (1, 1, C))
    out[ffn + "x_k"] = 1 - src.take(ffn + "time_mix_k", (1, 1, C))
    src.drop(ffn + "time_mix_r")
    return src.take(att + "time_decay", (cfg.n_head, cfg.head_size))


def _upgrade(sd: dict, version: str, options: UpgradeOptions, source: str, time_mix) -> Upgraded:
    """The steps both generations share; `time_mix` maps what differs (lerps, decay LoRA, FFN lerp)."""
    src = _Source(sd, version, source)
    cfg = _target_config(src, options)
    V, C, H, N, F = cfg.vocab_size, cfg.n_embd, cfg.n_head, cfg.head_size, src.shape("blocks.0.ffn.key.weight")[0]
    meta = any(t.is_meta for t in sd.values())
    gen = torch.Generator().manual_seed(options.seed)
    out, gate_errors, clamped = {}, [], []

    def norm(prefix):   # the paper: norm weights clamped above zero, then square-rooted; biases halved
        out[prefix + ".weight"] = src.take(prefix + ".weight", (C,)).clamp(min=0).sqrt()
        out[prefix + ".bias"] = src.take(prefix + ".bias", (C,)) / 2

    out["emb.weight"] = src.take("emb.weight", (V, C)) / 2   # the paper halves emb, att receptance and att output
    norm("blocks.0.ln0")
    for i in range(cfg.n_layer):
        block = f"blocks.{i}."
        att, ffn = block + "att.", block + "ffn."
        norm(block + "ln1")
        norm(block + "ln2")
        norm(att + "ln_x")
        out[att + "receptance.weight"] = src.take(att + "receptance.weight", (C, C)) / 2
        out[att + "key.weight"] = src.take(att + "key.weight", (C, C))
        out[att + "value.weight"] = src.take(att + "value.weight", (C, C))
        out[att + "output.weight"] = src.take(att + "output.weight", (C, C)) / 2
        out[att + "r_k"] = src.take(att + "time_faaaa", (H, N)) * options.r_k_scale
        decay = time_mix(src, att, ffn, cfg, gen, out)
        out[att + "w0"], mask = decay_to_w0(decay.reshape(1, 1, C), options.w0_max)
        clamped.append(mask.sum())
        out[att + "g1"], out[att + "g2"], error = gate_lora(src.take(att + "gate.weight", (C, C)), cfg.dim_g)
        gate_errors.append(error)
        # the paper: FFN widened from its source width to 4C, new region U(+-1e-3); its receptance removed
        out[ffn + "key.weight"] = _widen(src.take(ffn + "key.weight", (F, C)), (cfg.dim_ffn, C), FFN_BOUND, gen)
        out[ffn + "value.weight"] = _widen(src.take(ffn + "value.weight", (C, F)), (C, cfg.dim_ffn), FFN_BOUND, gen)
        src.drop(ffn + "receptance.weight")
    norm("ln_out")
    out["head.weight"] = src.take("head.weight", (V, C))
    src.finish()
    wanted = {f"blocks.{i}.att.{name}" for i in range(cfg.n_layer) for name in NEW[version]}
    out.update(_x070_init(cfg, options.seed, wanted, meta))
    sd_out = {k: t.to(options.dtype).contiguous() for k, t in out.items()}
    if meta:
        return Upgraded(sd_out, cfg, None, None)
    return Upgraded(sd_out, cfg, max(float(e) for e in gate_errors), int(sum(clamped)))


def upgrade_x060(sd: dict, options: UpgradeOptions = UpgradeOptions(), source: str = "checkpoint") -> Upgraded:
    """An official RWKV-6 (x060) state dict -> an official RWKV-7 (x070) one. Tensors on the meta device give a
    meta result (every shape checked, no work done)."""
    if checkpoint_version(sd) != "x060":
        raise refuse(checkpoint_version(sd), "x060", source)
    return _upgrade(sd, "x060", options, source, _time_mix_x060)


def upgrade_x052(sd: dict, options: UpgradeOptions = UpgradeOptions(), source: str = "checkpoint") -> Upgraded:
    """An official RWKV-5.2 (x052) state dict -> an official RWKV-7 (x070) one (meta tensors as in upgrade_x060)."""
    if checkpoint_version(sd) != "x052":
        raise refuse(checkpoint_version(sd), "x052", source)
    return _upgrade(sd, "x052", options, source, _time_mix_x052)


UPGRADES = {"x060": upgrade_x060, "x052": upgrade_x052}


def read_init_checkpoint(path, shapes_only: bool = False) -> tuple[dict, Optional[str]]:
    """The official RWKV-7 state dict that `init_from=path` starts from, and a line to print about it (or None): an
    RWKV-7 checkpoint as it is, an RWKV-6/5.2 one upgraded with the default options (the weights `rwkv7-convert
    upgrade-v6/-v5` writes). shapes_only: for an upgrade, meta tensors of the right shapes (a quick check of a run's
    config); RWKV-4 and RWKV-5.0/5.1 are refused by name. A Hugging Face directory of fla's RWKV-7 (as `rwkv7-convert
    export-hf` writes) is read back into the official layout."""
    if is_hf_dir(path):
        return read_hf_dir(path), f"init_from={path}: a Hugging Face RWKV-7 directory (fla's layout), read as x070"
    sd = load_state_dict_file(path)
    version = checkpoint_version(sd)
    if version in ("x040", "x050", "x051"):
        raise UserError(f"init_from={path} is an {NAMES[version]} checkpoint: rwkv7-train starts from RWKV-7, RWKV-6 "
                        "(x060) and RWKV-5.2 (x052) checkpoints")
    if version not in UPGRADES:
        return sd, None   # x070; anything else is refused by the loader, naming the tensors that do not fit
    if shapes_only:
        sd = {k: t.to("meta") for k, t in sd.items()}
    upgraded = UPGRADES[version](sd, UpgradeOptions(), source=str(path))
    return upgraded.state_dict, (f"init_from={path}: an {NAMES[version]} checkpoint, upgraded to RWKV-7 with the "
                                 f"default options (as `rwkv7-convert {COMMANDS[version]}` does)")
