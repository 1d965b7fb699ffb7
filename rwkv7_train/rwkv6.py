"""The RWKV-6 (x060, "Finch") language model, top to bottom: small ones are trained here, then upgraded to RWKV-7.

Parameter names are the official x060 checkpoint's (`blocks.3.att.time_maa_w1`, `blocks.3.ffn.receptance.weight`,
...), so a BlinkDL RWKV-6 `.pth` loads with `load_state_dict` as it is, and a state_dict saved in bf16 is one.

    x = ln0(emb(idx));  per block: x += att(ln1(x)); x += ffn(ln2(x));  logits = head(ln_out(x))
"""
import math
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError
from .model import token_shift

CHUNK = 16  # WKV chunk length: the intra-chunk pass holds L x L x N decay factors per chunk and head


@dataclass
class RWKV6Config:
    vocab_size: int = 65536
    n_layer: int = 12
    n_embd: int = 768
    head_size: int = 64
    dim_ffn: Optional[int] = None   # default 3.5 * n_embd rounded down to a multiple of 32, as RWKV-LM v6
    dim_mix: int = 32               # rank of the token-shift LoRA (time_maa_w1/w2), shared by w, k, v, r, g
    dim_decay: int = 64             # rank of the decay LoRA (time_decay_w1/w2)

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "n_embd", "head_size"):
            if getattr(self, name) < 1:
                raise UserError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.head_size:
            raise UserError(f"model.n_embd={self.n_embd} is not a multiple of model.head_size={self.head_size}")
        if self.dim_ffn is None:
            self.dim_ffn = int(3.5 * self.n_embd) // 32 * 32
        for name in ("dim_ffn", "dim_mix", "dim_decay"):
            if getattr(self, name) < 1:
                raise UserError(f"model.{name} must be positive, got {getattr(self, name)} (set it explicitly)")

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size


def config_from_state_dict(sd: dict, source: str = "checkpoint") -> RWKV6Config:
    """The RWKV6Config of an official x060 state_dict, read from its tensor shapes."""
    required = ("emb.weight", "blocks.0.att.time_maa_x", "blocks.0.att.time_maa_w2", "blocks.0.att.time_decay_w1",
                "blocks.0.att.time_faaaa", "blocks.0.ffn.key.weight")
    missing = [k for k in required if k not in sd]
    if missing:
        hint = " (it looks like RWKV-7: load it with `load_official`)" if "blocks.0.att.r_k" in sd else ""
        raise UserError(f"{source} is not an RWKV-6 (x060) checkpoint: missing {missing[0]}{hint}")
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    vocab_size, n_embd = sd["emb.weight"].shape
    return RWKV6Config(
        vocab_size=vocab_size, n_layer=max(layers) + 1, n_embd=n_embd,
        head_size=sd["blocks.0.att.time_faaaa"].shape[1], dim_ffn=sd["blocks.0.ffn.key.weight"].shape[0],
        dim_mix=sd["blocks.0.att.time_maa_w2"].shape[1], dim_decay=sd["blocks.0.att.time_decay_w1"].shape[1],
    )


def wkv6(r, k, v, log_w, u, chunk_size: int = CHUNK):
    """The WKV-6 recurrence over whole sequences from a zero state, per batch row and head.

    r, k, v, log_w: [B, T, H, N]; u (time_faaaa, the bonus of the current token): [H, N]. With S the N x N state
    (rows = key index, columns = value index) and w_t = exp(log_w_t) the per-key-channel decay:
        y_t = r_t (S_{t-1} + diag(u) k_t^T v_t),    S_t = diag(w_t) S_{t-1} + k_t^T v_t
    Chunked: with c the cumulative log decay inside a chunk (c_t inclusive, p_t = c_{t-1} exclusive), step t sees
    the entering state S_0 through r_t e^{p_t}, and step s < t of its own chunk through sum_j r_tj k_sj e^{p_tj - c_sj};
    the chunk hands on S_L = diag(e^{c_L}) S_0 + sum_s (k_s e^{c_L - c_s})^T v_s. Every exponent is <= 0, so the
    large decays of RWKV-6 (log_w down to -exp(d)) cannot overflow. Computes in float32 (float64 when r is float64);
    autograd gives the backward. Returns y [B, T, H, N] in r's dtype.
    """
    B, T, H, N = r.shape
    out_dtype = r.dtype
    cdtype = torch.float64 if r.dtype == torch.float64 else torch.float32
    L = chunk_size
    pad = (-T) % L
    n = (T + pad) // L

    def chunks(x):  # [B, T, H, N] -> [B, H, n, L, N]; padding steps (zero k and log decay) leave S unchanged
        return F.pad(x.to(cdtype), (0, 0, 0, 0, 0, pad)).view(B, n, L, H, N).permute(0, 3, 1, 2, 4)

    r, k, v, log_w = map(chunks, (r, k, v, log_w))
    u = u.to(cdtype)[None, :, None, None, :]
    c = torch.cumsum(log_w, dim=3)
    p = F.pad(c[..., :-1, :], (0, 0, 1, 0))           # c_{t-1}, the same floats as c (exact zero for s = t - 1)

    earlier = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(-1)[:, :, None]   # s < t
    decay_ts = torch.exp((p[..., :, None, :] - c[..., None, :, :]).masked_fill(~earlier, -math.inf))
    att = (r[..., :, None, :] * k[..., None, :, :] * decay_ts).sum(-1)                  # [B, H, n, L(t), L(s)]
    y = att @ v + (r * u * k).sum(-1, keepdim=True) * v

    r_in = r * torch.exp(p)                           # reads the entering state
    decay_end = torch.exp(c[..., -1:, :])             # e^{c_L}, [B, H, n, 1, N]
    k_out = k * torch.exp(c[..., -1:, :] - c)         # writes the leaving state
    S = r.new_zeros(B, H, N, N)
    from_state = []
    for i in range(n):                                # only the hand-over between chunks is sequential
        from_state.append(r_in[:, :, i] @ S)
        S = decay_end[:, :, i].transpose(-1, -2) * S + k_out[:, :, i].transpose(-1, -2) @ v[:, :, i]
    y = y + torch.stack(from_state, dim=2)
    return y.permute(0, 2, 3, 1, 4).reshape(B, n * L, H, N)[:, :T].to(out_dtype)


class TimeMix(nn.Module):
    def __init__(self, cfg: RWKV6Config):
        super().__init__()
        self.n_head, self.head_size = cfg.n_head, cfg.head_size
        C = cfg.n_embd

        def vec():
            return nn.Parameter(torch.empty(1, 1, C))

        self.time_maa_x, self.time_maa_w, self.time_maa_k = vec(), vec(), vec()
        self.time_maa_v, self.time_maa_r, self.time_maa_g = vec(), vec(), vec()
        self.time_maa_w1 = nn.Parameter(torch.empty(C, 5 * cfg.dim_mix))
        self.time_maa_w2 = nn.Parameter(torch.empty(5, cfg.dim_mix, C))
        self.time_decay = vec()
        self.time_decay_w1 = nn.Parameter(torch.empty(C, cfg.dim_decay))
        self.time_decay_w2 = nn.Parameter(torch.empty(cfg.dim_decay, C))
        self.time_faaaa = nn.Parameter(torch.empty(self.n_head, self.head_size))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.gate = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(self.n_head, C, eps=64e-5)   # RWKV-LM: 1e-5 * head_size_divisor**2, divisor 8

    def forward(self, x):
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        xx = token_shift(x, None) - x
        # data-dependent token shift: one LoRA gives the lerp offsets of w, k, v, r, g (in that order)
        lora = torch.tanh((x + xx * self.time_maa_x) @ self.time_maa_w1).view(B, T, 5, -1)
        mw, mk, mv, mr, mg = torch.einsum("btid,idc->ibtc", lora, self.time_maa_w2).unbind(0)
        xw = x + xx * (self.time_maa_w + mw)
        xk = x + xx * (self.time_maa_k + mk)
        xv = x + xx * (self.time_maa_v + mv)
        xr = x + xx * (self.time_maa_r + mr)
        xg = x + xx * (self.time_maa_g + mg)

        r = self.receptance(xr)
        k = self.key(xk)
        v = self.value(xv)
        g = F.silu(self.gate(xg))
        d = self.time_decay + torch.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2
        log_w = -torch.exp(d.float())                     # decay w = exp(-exp(d)) in (0, 1), kept in float32

        def heads(t):
            return t.view(B, T, H, N)

        y = wkv6(heads(r), heads(k), heads(v), heads(log_w), self.time_faaaa)
        y = self.ln_x(y.reshape(B * T, C)).view(B, T, C)
        return self.output(y * g)


class ChannelMix(nn.Module):
    def __init__(self, cfg: RWKV6Config):
        super().__init__()
        self.time_maa_k = nn.Parameter(torch.empty(1, 1, cfg.n_embd))
        self.time_maa_r = nn.Parameter(torch.empty(1, 1, cfg.n_embd))
        self.key = nn.Linear(cfg.n_embd, cfg.dim_ffn, bias=False)
        self.receptance = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.value = nn.Linear(cfg.dim_ffn, cfg.n_embd, bias=False)

    def forward(self, x):
        xx = token_shift(x, None) - x
        k = torch.relu(self.key(x + xx * self.time_maa_k)) ** 2
        return torch.sigmoid(self.receptance(x + xx * self.time_maa_r)) * self.value(k)


class Block(nn.Module):
    def __init__(self, cfg: RWKV6Config, layer_id: int):
        super().__init__()
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(cfg.n_embd)
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.att = TimeMix(cfg)
        self.ffn = ChannelMix(cfg)

    def forward(self, x):
        x = x + self.att(self.ln1(x))
        return x + self.ffn(self.ln2(x))


class RWKV6(nn.Module):
    def __init__(self, cfg: RWKV6Config):
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        # Meta tensors (a model about to receive a checkpoint) leave the init to the caller.
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [B, T] -> logits [B, T, V] (float)."""
        if idx.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"RWKV6 expects integer token ids, got {idx.dtype}")
        x = self.blocks[0].ln0(self.emb(idx))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_out(x)).float()

    @torch.no_grad()
    def init_weights(self):
        """RWKV-LM's RWKV-6 (x060) training initialisation."""
        V, C = self.cfg.vocab_size, self.cfg.n_embd
        nn.init.uniform_(self.emb.weight, -1e-4, 1e-4)
        nn.init.orthogonal_(self.head.weight, gain=0.5 * math.sqrt(V / C) if V > C else 0.5)
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):   # ln0, ln1, ln2, ln_out: weight 1, bias 0
                m.reset_parameters()
        for l, block in enumerate(self.blocks):
            self._init_block(l, block)

    @torch.no_grad()
    def _init_block(self, l: int, block: Block):
        C, L = self.cfg.n_embd, self.cfg.n_layer
        n = torch.arange(C, dtype=torch.float64)
        ddd = n / C
        frac = n / max(C - 1, 1)
        r0 = l / (L - 1) if L > 1 else 0.0            # 0 at the first layer, 1 at the last
        r1 = 1.0 - l / L                              # 1 at the first layer, 1/L at the last

        def set_(p, values):
            p.copy_(values.to(p.dtype).reshape(p.shape))

        att, ffn = block.att, block.ffn
        for p in (att.time_maa_x, att.time_maa_w, att.time_maa_k):
            set_(p, 1 - ddd ** r1)
        set_(att.time_maa_v, 1 - (ddd ** r1 + 0.3 * r0))
        set_(att.time_maa_r, 1 - ddd ** (0.5 * r1))
        set_(att.time_maa_g, 1 - ddd ** (0.5 * r1))
        set_(att.time_decay, -6 + 5 * frac ** (0.7 + 1.3 * r0))
        set_(att.time_faaaa, r0 * (1 - frac) + ((n + 1) % 3 - 1) * 0.1)   # plus a zigzag of period 3
        for lora_in, lora_out in ((att.time_maa_w1, att.time_maa_w2), (att.time_decay_w1, att.time_decay_w2)):
            lora_in.zero_()
            nn.init.uniform_(lora_out, -0.01, 0.01)
        nn.init.orthogonal_(att.receptance.weight, gain=1.0)
        nn.init.orthogonal_(att.key.weight, gain=0.1)
        nn.init.orthogonal_(att.value.weight, gain=1.0)
        nn.init.orthogonal_(att.gate.weight, gain=0.1)
        att.output.weight.zero_()
        att.ln_x.weight.fill_(((1 + l) / L) ** 0.7)
        att.ln_x.bias.zero_()
        set_(ffn.time_maa_k, 1 - ddd ** r1)
        set_(ffn.time_maa_r, 1 - ddd ** r1)
        nn.init.orthogonal_(ffn.key.weight, gain=1.0)
        ffn.receptance.weight.zero_()
        ffn.value.weight.zero_()
