"""Hugging Face model directories in flash-linear-attention's (fla) RWKV-7 layout, both ways.

`export_hf` writes a directory that fla's RWKV7ForCausalLM loads (`import fla`, then transformers'
`AutoModelForCausalLM.from_pretrained(DIR)`); `read_hf_dir` reads one back as an official x070 state dict.
fla holds the official tensors under its own names: each LoRA as two `nn.Linear`s (w1 -> w_lora.lora.0.weight = w1^T,
w2 -> w_lora.lora.2.weight = w2^T, w0 -> w_lora.lora.2.bias), k_k, k_a, ffn.x_k and the LoRA biases flat [C] instead
of [1, 1, C], and no value-residual LoRA in layer 0 (x070 never uses it there). Tensors are read with safetensors only.
"""
import json
import os
import re
import secrets
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from .atomic import atomic_write
from .errors import UserError
from .model import RWKV7Config
from .official import config_from_state_dict
from .tokenizer import BUNDLED_VOCAB

WEIGHTS = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
NORM_EPS = 1e-5   # x070's LayerNorm eps; fla's GroupNorm eps is head_dim * norm_eps (64e-5 only for heads of 64)

# official name -> (fla name, how the tensor changes: "T" transposed, "flat" [1, 1, C] -> [C], None kept); {i}: layer
_TO_FLA = {
    "emb.weight": ("model.embeddings.weight", None),
    "ln_out.weight": ("model.norm.weight", None),
    "ln_out.bias": ("model.norm.bias", None),
    "head.weight": ("lm_head.weight", None),
    **{f"blocks.{{i}}.{ours}.{p}": (f"model.layers.{{i}}.{fla}.{p}", None) for p in ("weight", "bias")
       for ours, fla in (("ln0", "pre_norm"), ("ln1", "attn_norm"), ("ln2", "ffn_norm"), ("att.ln_x", "attn.g_norm"))},
    **{f"blocks.{{i}}.{ours}.weight": (f"model.layers.{{i}}.{fla}.weight", None) for ours, fla in (
        ("att.receptance", "attn.r_proj"), ("att.key", "attn.k_proj"), ("att.value", "attn.v_proj"),
        ("att.output", "attn.o_proj"), ("ffn.key", "ffn.key"), ("ffn.value", "ffn.value"))},
    **{f"blocks.{{i}}.att.x_{c}": (f"model.layers.{{i}}.attn.x_{c}", None) for c in "rwkvag"},
    **{f"blocks.{{i}}.att.{c}{n}": (f"model.layers.{{i}}.attn.{c}_lora.lora.{fla}", how)
       for c in "wavg" for n, fla, how in (("0", "2.bias", "flat"), ("1", "0.weight", "T"), ("2", "2.weight", "T"))
       if (c, n) != ("g", "0")},
    "blocks.{i}.att.k_k": ("model.layers.{i}.attn.k_k", "flat"),
    "blocks.{i}.att.k_a": ("model.layers.{i}.attn.k_a", "flat"),
    "blocks.{i}.att.r_k": ("model.layers.{i}.attn.r_k", None),
    "blocks.{i}.ffn.x_k": ("model.layers.{i}.ffn.x_k", "flat"),
}
_TO_OFFICIAL = {fla: (ours, how) for ours, (fla, how) in _TO_FLA.items()}
_LAYER0_UNUSED = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")  # fla has no v_lora in layer 0


def _rename(name: str, table: dict):
    """(`name` under `table`, how its tensor changes), or None when the table has no such name."""
    m = re.match(r"(blocks|model\.layers)\.(\d+)\.", name)
    template = name if m is None else f"{m.group(1)}.{{i}}.{name[m.end():]}"
    if template not in table:
        return None
    target, how = table[template]
    return target.format(i=m.group(2) if m else ""), how


def to_fla(sd: dict, dtype: torch.dtype = torch.bfloat16) -> dict:
    """An official x070 state dict under fla's names and layout, as contiguous CPU tensors of `dtype`."""
    out = {}
    for name, t in sd.items():
        if name in _LAYER0_UNUSED:
            continue
        renamed = _rename(name, _TO_FLA)
        if renamed is None:
            raise UserError(f"{name} {tuple(t.shape)} is not part of an RWKV-7 x070 model: fla has no place for it")
        fla, how = renamed
        t = t.detach().to(device="cpu", dtype=dtype)
        out[fla] = (t.t() if how == "T" else t.reshape(-1) if how == "flat" else t).contiguous()
    return out


def hf_config(c: RWKV7Config, dtype: torch.dtype = torch.bfloat16) -> dict:
    """config.json for fla's RWKV7ForCausalLM: every field that defines the model (the rest keep fla's defaults)."""
    return {
        "architectures": ["RWKV7ForCausalLM"],
        "model_type": "rwkv7",
        "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd,
        "num_hidden_layers": c.n_layer,
        "head_dim": c.head_size,
        "num_heads": c.n_head,
        "intermediate_size": c.dim_ffn,
        "hidden_ratio": c.dim_ffn / c.n_embd,
        "decay_low_rank_dim": c.dim_w,
        "a_low_rank_dim": c.dim_a,
        "v_low_rank_dim": c.dim_v,
        "gate_low_rank_dim": c.dim_g,
        "value_dim": [c.n_embd] * c.n_layer,
        "hidden_act": "sqrelu",
        "norm_first": True,
        "norm_bias": True,
        "norm_eps": NORM_EPS,
        "attn": None,                 # every layer is RWKV-7 time-mix, none softmax attention
        "attn_mode": "chunk",
        "fuse_norm": True,            # fla's Triton norms; from_pretrained(DIR, fuse_norm=False) for torch's
        "fuse_cross_entropy": True,
        "fuse_linear_cross_entropy": False,
        "use_l2warp": True,           # the official loss: cross-entropy plus L2Wrap
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": 0,            # World vocab: token 0 ends (and so precedes) every document
        "eos_token_id": 0,
        "pad_token_id": None,         # a padding_idx would freeze token 0's embedding when fine-tuning
        "dtype": DTYPE_NAMES[dtype],
        "torch_dtype": DTYPE_NAMES[dtype],   # the same, for transformers 4.x
    }


def _tokenizer_config() -> dict:
    # No transformers tokenizer class exists for the World vocab: docs/checkpoints.md says how to tokenize.
    return {"vocab_file": BUNDLED_VOCAB.name, "tokenizer": "RWKV World (greedy longest match over UTF-8 bytes)",
            "eos_token_id": 0, "model_max_length": 1 << 30}


def is_hf_dir(path) -> bool:
    """Whether `path` is a directory whose config.json says model_type "rwkv7" (fla's RWKV-7); reads only that file."""
    config = Path(path) / "config.json"
    try:
        return config.is_file() and json.loads(config.read_text()).get("model_type") == "rwkv7"
    except (OSError, ValueError, AttributeError):   # unreadable, not JSON, or JSON that is not an object
        return False


def _check_target(out: Path, force: bool) -> None:
    if not out.exists():
        return
    if not force:
        raise UserError(f"{out} exists: pass --force to replace it")
    if not (out.is_dir() and (is_hf_dir(out) or not any(out.iterdir()))):
        raise UserError(f"{out} exists and is not a Hugging Face RWKV-7 directory: refusing to replace it, even with "
                        f"--force (remove it yourself, or pick another name)")


def _fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` (new names, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def export_hf(model_or_state_dict, out_dir, dtype: torch.dtype = torch.bfloat16, force: bool = False) -> Path:
    """Write `out_dir` as a Hugging Face model directory for fla's RWKV7ForCausalLM: config.json, model.safetensors
    (fla's names, `dtype`), the World vocab file and a tokenizer_config.json naming it.

    All or nothing: the files go to a hidden directory beside `out_dir`, renamed to `out_dir` at the end. An existing
    `out_dir` is refused unless `force`, and even then only a former export (or an empty directory) is replaced."""
    sd = model_or_state_dict
    if isinstance(sd, torch.nn.Module):
        sd = sd.state_dict()
    if dtype not in DTYPE_NAMES:
        raise UserError(f"cannot export in {dtype}: choose one of {list(DTYPE_NAMES)}")
    out = Path(out_dir)
    _check_target(out, force)
    config = hf_config(config_from_state_dict(sd, source="the model to export"), dtype)
    tensors = to_fla(sd, dtype)
    tmp = out.parent / f".{out.name}.{secrets.token_hex(8)}.tmp"
    try:
        tmp.mkdir(parents=True)
        # Built in memory (one more copy of the weights): safetensors' own file writer makes files only the owner reads.
        with atomic_write(tmp / WEIGHTS) as f:
            f.write(safetensors_bytes(tensors, metadata={"format": "pt"}))   # "pt": transformers refuses others
        for name, content in (("config.json", config), ("tokenizer_config.json", _tokenizer_config())):
            with atomic_write(tmp / name, "w", encoding="utf-8") as f:
                f.write(json.dumps(content, indent=2) + "\n")
        with atomic_write(tmp / BUNDLED_VOCAB.name) as f:
            f.write(BUNDLED_VOCAB.read_bytes())
        _fsync_dir(tmp)
        if out.exists():  # --force: move the old export aside, then remove it once the new one is in place
            old = out.parent / f".{out.name}.{secrets.token_hex(8)}.old"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):   # a full disk, a read-only directory: one line
            raise UserError(f"cannot write {out}: {e.strerror or e}") from None
        raise
    return out


def _load_tensors(path: Path) -> dict:
    """The tensors of model.safetensors, or of every shard its index names (never a pickle: pytorch_model.bin)."""
    if (path / WEIGHTS).is_file():
        files = [path / WEIGHTS]
    elif (path / SHARD_INDEX).is_file():
        try:
            shards = json.loads((path / SHARD_INDEX).read_text())["weight_map"].values()
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"{path / SHARD_INDEX} is not a safetensors index (no weight_map)") from None
        files = [path / name for name in sorted(set(shards))]
    else:
        raise UserError(f"{path} has no {WEIGHTS} (nor {SHARD_INDEX}): only safetensors weights are read")
    tensors = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as st:
                tensors.update({name: st.get_tensor(name) for name in st.keys()})
        except Exception as e:  # missing shard, truncated or foreign file: the reader raises several types
            raise UserError(f"cannot read {f} as a safetensors file ({type(e).__name__}: {str(e)[:120]})") from None
    return tensors


def _check_x070(config: dict, path: Path) -> None:
    """Refuse fla RWKV-7 variants that x070 cannot hold."""
    hidden, layers = config.get("hidden_size"), config.get("num_hidden_layers")
    value_dim = config.get("value_dim")
    problems = [
        (config.get("attn") is not None, "it has softmax attention layers (attn)"),
        (value_dim not in (None, hidden, [hidden] * (layers or 0)), "its value_dim is not hidden_size"),
        (config.get("hidden_act", "sqrelu") != "sqrelu", f"its hidden_act is {config.get('hidden_act')}, not sqrelu"),
        (config.get("norm_first", True) is not True, "its norm_first is false"),
        (config.get("norm_bias", True) is not True, "its norms have no bias"),
        (config.get("tie_word_embeddings", False), "it ties the embedding and the head"),
    ]
    for bad, what in problems:
        if bad:
            raise UserError(f"{path} is an fla RWKV-7 model that RWKV-7 x070 cannot hold: {what}")


def read_hf_dir(path) -> dict:
    """The official x070 state dict (the tensors' dtype as stored) of a Hugging Face directory of fla's RWKV-7.

    Layer 0's value-residual LoRA, which fla does not store and x070 never uses, comes back as zeros."""
    path = Path(path)
    if not is_hf_dir(path):
        raise UserError(f"{path} is not a Hugging Face RWKV-7 model directory (no config.json with model_type rwkv7)")
    config = json.loads((path / "config.json").read_text())
    _check_x070(config, path)
    sd = {}
    for name, t in _load_tensors(path).items():
        renamed = _rename(name, _TO_OFFICIAL)
        if renamed is None:
            raise UserError(f"{path} has {name} {tuple(t.shape)}, which RWKV-7 x070 has no place for")
        ours, how = renamed
        sd[ours] = t.t().contiguous() if how == "T" else t.reshape(1, 1, -1) if how == "flat" else t
    if "emb.weight" not in sd or "blocks.0.att.w1" not in sd:
        raise UserError(f"{path}/{WEIGHTS} holds no RWKV-7 model (no model.embeddings.weight or layer 0 w_lora)")
    C, dtype = sd["emb.weight"].shape[1], sd["emb.weight"].dtype
    v1 = sd.get("blocks.1.att.v1")
    rank = v1.shape[1] if v1 is not None else int(config.get("v_low_rank_dim", 16))   # 16: fla's default
    sd |= {"blocks.0.att.v0": torch.zeros(1, 1, C, dtype=dtype), "blocks.0.att.v1": torch.zeros(C, rank, dtype=dtype),
           "blocks.0.att.v2": torch.zeros(rank, C, dtype=dtype)}
    config_from_state_dict(sd, source=str(path))   # names what is missing, if anything is
    return sd
