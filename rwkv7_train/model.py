"""The RWKV-7 (x070, "Goose") language model, top to bottom.

Parameter names are the official checkpoint's (`blocks.3.att.w0`, `blocks.3.ffn.key.weight`, ...), so a
BlinkDL `.pth` loads with `load_state_dict` as it is. The model knows nothing of Lightning or DeepSpeed.

    x = ln0(emb(idx));  per block: x += att(ln1(x)); x += ffn(ln2(x));  logits = head(ln_out(x))

Training passes the targets too and gets the loss (cross-entropy + L2Wrap) from the head, never the logits.
"""
import math
from dataclasses import dataclass, fields
from functools import partial
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rwkv7_kernels import KernelConfig, wkv7

from .errors import UserError
from .loss import head_loss

DECAY_SCALE = math.exp(-0.5)  # w = exp(-exp(-0.5) * sigmoid(d)) lies in (0.545, 1)


def lora_rank(x: float) -> int:
    """Default LoRA rank: max(32, x rounded to a multiple of 32)."""
    return max(32, round(x / 32) * 32)


@dataclass
class RWKV7Config:
    vocab_size: int = 65536
    n_layer: int = 12
    n_embd: int = 768
    head_size: int = 64
    dim_ffn: Optional[int] = None   # default 4 * n_embd
    dim_w: Optional[int] = None     # decay LoRA rank; defaults from the formula below
    dim_a: Optional[int] = None     # in-context learning rate LoRA rank
    dim_v: Optional[int] = None     # value residual LoRA rank
    dim_g: Optional[int] = None     # gate LoRA rank

    def __post_init__(self):
        if self.n_embd % self.head_size:
            raise UserError(f"model.n_embd={self.n_embd} is not a multiple of model.head_size={self.head_size}")
        for name in ("vocab_size", "n_layer", "n_embd", "head_size"):
            if getattr(self, name) < 1:
                raise UserError(f"model.{name} must be positive, got {getattr(self, name)}")
        C = self.n_embd
        self.dim_ffn = self.dim_ffn or 4 * C
        self.dim_w = self.dim_w or lora_rank(1.8 * C ** 0.5)
        self.dim_a = self.dim_a or lora_rank(1.8 * C ** 0.5)
        self.dim_v = self.dim_v or lora_rank(1.3 * C ** 0.5)
        self.dim_g = self.dim_g or lora_rank(0.6 * C ** 0.8)

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    @classmethod
    def from_dict(cls, d: dict) -> "RWKV7Config":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown model config key(s) {unknown}; valid keys: {sorted(known)}")
        return cls(**d)


class LayerState(NamedTuple):
    """Recurrent state of one block: last input of the time-mix and channel-mix, and the WKV matrix."""
    att_x: torch.Tensor   # [B, C]
    wkv: torch.Tensor     # [B, H, N, N] float32, S[b, h, value, key]
    ffn_x: torch.Tensor   # [B, C]


class Docs(NamedTuple):
    """Packed documents in a [1, T] sequence: start offsets (cu_seqlens, ending with T) and a [1, T] bool mask that
    is True at each document's first token. The WKV state and the token shift restart at every document."""
    cu_seqlens: torch.Tensor
    starts: torch.Tensor

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, total: int) -> "Docs":
        starts = torch.zeros(1, total, dtype=torch.bool, device=cu_seqlens.device)
        starts[0, cu_seqlens[:-1]] = True
        return cls(cu_seqlens, starts)


def token_shift(x: torch.Tensor, prev: Optional[torch.Tensor], docs: Optional[Docs] = None) -> torch.Tensor:
    """x_{t-1} for every t: the previous call's last token (or zeros) at t = 0, zeros at each document start."""
    first = torch.zeros_like(x[:, :1]) if prev is None else prev[:, None].to(x.dtype)
    shifted = torch.cat([first, x[:, :-1]], dim=1)
    return shifted if docs is None else shifted.masked_fill(docs.starts[..., None], 0.0)


class TimeMix(nn.Module):
    def __init__(self, cfg: RWKV7Config, layer_id: int, kernel: Optional[KernelConfig] = None):
        super().__init__()
        self.layer_id = layer_id
        self.kernel = kernel   # the WKV kernels' launch and precision settings (None: their defaults)
        self.n_head, self.head_size = cfg.n_head, cfg.head_size
        C = cfg.n_embd

        def vec():
            return nn.Parameter(torch.empty(1, 1, C))

        self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g = (vec() for _ in range(6))
        self.w0, self.w1, self.w2 = vec(), nn.Parameter(torch.empty(C, cfg.dim_w)), nn.Parameter(torch.empty(cfg.dim_w, C))
        self.a0, self.a1, self.a2 = vec(), nn.Parameter(torch.empty(C, cfg.dim_a)), nn.Parameter(torch.empty(cfg.dim_a, C))
        self.v0, self.v1, self.v2 = vec(), nn.Parameter(torch.empty(C, cfg.dim_v)), nn.Parameter(torch.empty(cfg.dim_v, C))
        self.g1, self.g2 = nn.Parameter(torch.empty(C, cfg.dim_g)), nn.Parameter(torch.empty(cfg.dim_g, C))
        self.k_k, self.k_a = vec(), vec()
        self.r_k = nn.Parameter(torch.empty(self.n_head, self.head_size))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(self.n_head, C, eps=64e-5)

    def forward(self, x, v_first, prev_x=None, prev_wkv=None, return_state=False, docs: Optional[Docs] = None):
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        xx = token_shift(x, prev_x, docs) - x
        xr, xw, xk, xv, xa, xg = (x + xx * m for m in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))

        r = self.receptance(xr)
        d = self.w0 + torch.tanh(xw @ self.w1) @ self.w2
        k = self.key(xk)
        v = self.value(xv)
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)     # in-context learning rate
        g = torch.sigmoid(xg @ self.g1) @ self.g2

        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0, eps=1e-12)
        k = k * (1 + (a - 1) * self.k_a)
        if self.layer_id == 0:
            v_first = v
        else:  # value residual: mix in the first layer's value
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        log_w = -DECAY_SCALE * torch.sigmoid(d.float())           # log decay, kept in float32

        def heads(t):
            return t.view(B, T, H, N)

        y, wkv_state = wkv7(heads(r), heads(log_w), heads(k), heads(v), -kk, kk * heads(a),
                            initial_state=prev_wkv, output_final_state=return_state,
                            cu_seqlens=None if docs is None else docs.cu_seqlens, config=self.kernel)
        y = self.ln_x(y.reshape(B * T, C)).view(B, T, C)
        bonus = (heads(r) * heads(k) * self.r_k).sum(dim=-1, keepdim=True) * heads(v)
        y = y + bonus.reshape(B, T, C)
        out = self.output(y * g)
        return out, v_first, (x[:, -1], wkv_state)


class ChannelMix(nn.Module):
    def __init__(self, cfg: RWKV7Config):
        super().__init__()
        self.x_k = nn.Parameter(torch.empty(1, 1, cfg.n_embd))
        self.key = nn.Linear(cfg.n_embd, cfg.dim_ffn, bias=False)
        self.value = nn.Linear(cfg.dim_ffn, cfg.n_embd, bias=False)

    def forward(self, x, prev_x=None, docs: Optional[Docs] = None):
        xx = token_shift(x, prev_x, docs) - x
        k = torch.relu(self.key(x + xx * self.x_k)) ** 2
        return self.value(k), x[:, -1]


class Block(nn.Module):
    def __init__(self, cfg: RWKV7Config, layer_id: int, kernel: Optional[KernelConfig] = None):
        super().__init__()
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(cfg.n_embd)
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.att = TimeMix(cfg, layer_id, kernel)
        self.ffn = ChannelMix(cfg)

    def forward(self, x, v_first, state: Optional[LayerState] = None, return_state=False, docs=None):
        att_x, wkv, ffn_x = state if state is not None else (None, None, None)
        dx, v_first, (att_last, wkv) = self.att(self.ln1(x), v_first, att_x, wkv, return_state, docs)
        x = x + dx
        dx, ffn_last = self.ffn(self.ln2(x), ffn_x, docs)
        x = x + dx
        return x, v_first, LayerState(att_last, wkv, ffn_last)


class Head(nn.Linear):
    """The output projection `head.weight` [V, C]. Given targets it returns the loss instead of the logits, fused
    with the matmul chunk by chunk (loss.head_loss): the [B*T, V] logits never exist at once. The loss is made in
    the head's own forward because ZeRO-3 gathers a module's parameters only there."""

    def __init__(self, cfg: RWKV7Config):
        super().__init__(cfg.n_embd, cfg.vocab_size, bias=False)

    def forward(self, x, targets: Optional[torch.Tensor] = None, reduction: str = "mean"):
        if targets is None:
            return super().forward(x)
        return head_loss(x.reshape(-1, x.shape[-1]), self.weight, targets.reshape(-1), reduction)


class RWKV7(nn.Module):
    def __init__(self, cfg: RWKV7Config, kernel: Optional[KernelConfig] = None):
        """kernel: how the WKV kernels run (not part of the model: checkpoints do not hold it)."""
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i, kernel) for i in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = Head(cfg)
        # Recompute each block's activations in backward instead of storing them (training memory ~ one block).
        self.activation_checkpointing = False
        # Layer 0's value-residual LoRA is in the official layout but never used (layer 0 makes v_first):
        # frozen, so DDP sees no parameter without a gradient.
        for p in (self.blocks[0].att.v0, self.blocks[0].att.v1, self.blocks[0].att.v2):
            p.requires_grad_(False)
        # Placeholders (meta tensors, or parameters a sharding wrapper has emptied) leave the init to the caller.
        if not any(p.is_meta or p.numel() == 0 for p in self.parameters()):
            self.init_weights()

    def forward(self, idx: torch.Tensor, state: Optional[list] = None, return_state: bool = False,
                cu_seqlens: Optional[torch.Tensor] = None, targets: Optional[torch.Tensor] = None,
                reduction: str = "mean"):
        """idx [B, T] -> logits [B, T, V] (float). With return_state, also the per-layer `LayerState` list
        after the last token; pass it back as `state` to continue the sequence (RNN mode).

        cu_seqlens: packed documents, as int64 start offsets into the flattened B*T tokens (0, every row start,
        each document start, and B*T); every document then starts from a fresh state.
        targets: [B, T] next tokens; the result is then the loss in place of the logits: the cross-entropy's
        mean with L2Wrap's gradient (training), or with reduction="sum" its sum (validation)."""
        if idx.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"RWKV7 expects integer token ids, got {idx.dtype}")
        B, T = idx.shape
        docs = None
        if cu_seqlens is not None:
            if state is not None or return_state:
                raise ValueError("RWKV7: cu_seqlens (packed documents) does not combine with RNN state")
            idx = idx.reshape(1, B * T)
            docs = Docs.from_cu_seqlens(cu_seqlens, B * T)
        x = self.blocks[0].ln0(self.emb(idx))
        v_first = None
        new_state = []
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            args = (x, v_first, None if state is None else state[i], return_state, docs)
            x, v_first, s = checkpoint(block, *args, use_reentrant=False) if recompute else block(*args)
            new_state.append(s)
        x = self.ln_out(x)
        out = self.head(x).float().reshape(B, T, -1) if targets is None else self.head(x, targets, reduction)
        return (out, new_state) if return_state else out

    def init_parts(self) -> list[tuple[nn.Module, Callable[[], None]]]:
        """The official initialisation as (module, function) pairs in the order they draw random numbers: the
        embeddings and head, each block, the output norm. A sharded strategy runs each with only that module's
        parameters gathered, and gets the same values as `init_weights`."""
        return ([(nn.ModuleList([self.emb, self.head]), self._init_embeddings)]
                + [(block, partial(self._init_block, l)) for l, block in enumerate(self.blocks)]
                + [(self.ln_out, self._init_ln_out)])

    @torch.no_grad()
    def init_weights(self):
        """The official RWKV-7 initialisation (RWKV-LM train_temp)."""
        for _, init in self.init_parts():
            init()

    @staticmethod
    def _ortho(p, scale):  # RWKV-LM's rule: gain sqrt(rows/cols) for tall matrices, times scale
        rows, cols = p.shape
        gain = math.sqrt(rows / cols) if rows > cols else 1.0
        if p.dtype == torch.float32:
            nn.init.orthogonal_(p, gain=gain * scale)
        else:  # ZeRO-3 builds bf16 parameters, and CUDA has no bf16 QR: draw in fp32, then round
            fp32 = torch.empty(p.shape, dtype=torch.float32, device=p.device)
            p.copy_(nn.init.orthogonal_(fp32, gain=gain * scale))

    @torch.no_grad()
    def _init_embeddings(self):
        nn.init.uniform_(self.emb.weight, -1e-4, 1e-4)
        self._ortho(self.head.weight, 0.5)

    @torch.no_grad()
    def _init_block(self, l: int):
        cfg = self.cfg
        C, L, N = cfg.n_embd, cfg.n_layer, cfg.head_size
        n = torch.arange(C, dtype=torch.float64)
        ddd = n / C
        linear = n / (C - 1) - 0.5 if C > 1 else torch.zeros(C, dtype=torch.float64)
        s = ((n % N) - (N - 1) / 2) / ((N - 1) / 2) if N > 1 else torch.zeros(C, dtype=torch.float64)
        zigzag = s * s.abs()

        def set_(p, values):
            p.copy_(values.to(p.dtype).reshape(p.shape))

        ortho = self._ortho
        block = self.blocks[l]
        r0 = l / (L - 1) if L > 1 else 0.0
        r1 = 1.0 - l / L
        att, ffn = block.att, block.ffn
        set_(att.x_r, 1 - ddd ** (0.2 * r1))
        set_(att.x_w, 1 - ddd ** (0.9 * r1))
        set_(att.x_k, 1 - ddd ** (0.7 * r1))
        set_(att.x_v, 1 - ddd ** (0.7 * r1))
        set_(att.x_a, 1 - ddd ** (0.9 * r1))
        set_(att.x_g, 1 - ddd ** (0.2 * r1))
        frac = n / (C - 1) if C > 1 else torch.zeros(C, dtype=torch.float64)
        set_(att.w0, -6 + 6 * frac ** (1 + r0 ** 0.3) + 0.5 + 2.5 * zigzag)
        set_(att.a0, -0.19 + 0.3 * zigzag + 0.4 * linear)
        set_(att.v0, 0.73 - 0.4 * linear)
        set_(att.k_k, 0.71 - 0.1 * linear)
        att.k_a.fill_(1.02)
        att.r_k.fill_(-0.04)
        for lora_in, lora_out in ((att.w1, att.w2), (att.a1, att.a2), (att.v1, att.v2), (att.g1, att.g2)):
            lora_in.zero_()
            ortho(lora_out, 0.1)
        ortho(att.receptance.weight, 1.0)
        ortho(att.key.weight, 0.1)
        ortho(att.value.weight, 1.0)
        att.output.weight.zero_()
        att.ln_x.weight.fill_(((1 + l) / L) ** 0.7)
        att.ln_x.bias.zero_()
        set_(ffn.x_k, 1 - ddd ** (r1 ** 4))
        ortho(ffn.key.weight, 1.0)
        ffn.value.weight.zero_()
        for ln in [block.ln1, block.ln2] + ([block.ln0] if l == 0 else []):
            ln.weight.fill_(1.0)
            ln.bias.zero_()

    @torch.no_grad()
    def _init_ln_out(self):
        self.ln_out.weight.fill_(1.0)
        self.ln_out.bias.zero_()
