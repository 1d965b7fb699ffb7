"""`rwkv7-generate`: sample text from an RWKV-7 checkpoint in RNN mode (constant memory per token).

The prompt runs through the model in one parallel forward; after that each token is one step from the recurrent
state alone (per layer two [C] vectors and the [H, N, N] WKV matrix), so memory does not grow with the length.
Sampling runs on the CPU with its own seeded generator: the same seed gives the same text on any device where the
model gives the same logits.
"""
import argparse
import codecs
import sys
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from .errors import UserError

# The World models' chat format: a user turn, then the assistant's, each turn ended by a blank line.
CHAT_TEMPLATE = "User: {prompt}\n\nAssistant:"
TURN_END = "\n\n"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
                generator: torch.Generator) -> int:
    """One token id from one position's logits [V]: the top_k most likely (0 = all), then the smallest set of those
    whose probability reaches top_p (nucleus), sampled at `temperature`; temperature 0 picks the argmax. Draws from
    `generator` only, so a seeded generator gives the same id for the same logits."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if 0 < top_k < logits.numel():
        values, order = torch.topk(logits, top_k)   # most likely first
        probs = torch.softmax(values, dim=-1)
    else:
        probs, order = torch.softmax(logits, dim=-1), None
    if top_p < 1:
        if order is None:
            probs, order = _most_likely(probs, top_p)
        probs = probs * (torch.cumsum(probs, dim=-1) - probs < top_p)   # always keeps the most likely token
    choice = torch.multinomial(probs, 1, generator=generator)          # multinomial normalises the kept mass
    return int(choice) if order is None else int(order[choice])


def _most_likely(probs: torch.Tensor, mass: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, ids) of the most likely tokens, most likely first, enough of them to reach `mass`: a nucleus
    is mostly a few tokens of the 65536, which a partial sort (topk) finds many times faster than a whole sort."""
    few, more = 64, 4096
    if probs.numel() > more:
        values, order = torch.topk(probs, few)
        if values.sum() >= mass:
            return values, order
        if values.sum() + (more - few) * values[-1] >= mass:   # the others are each no likelier than the last
            values, order = torch.topk(probs, more)
            if values.sum() >= mass:
                return values, order
    return torch.sort(probs, descending=True)


@torch.no_grad()
def decode(model, ids: list[int], pick: Callable[[torch.Tensor], int]) -> Iterator[int]:
    """Token ids continuing `ids`, without end: the prompt in one parallel forward, then one RNN step per token.
    `pick` chooses a token from the last position's logits (on the CPU). Stop by no longer asking for tokens: the
    next step only runs when the next token is asked for."""
    device = next(model.parameters()).device
    logits, state = model(torch.tensor([ids], device=device), return_state=True)
    while True:
        token = pick(logits[0, -1].cpu())
        yield token
        logits, state = model(torch.tensor([[token]], device=device), state=state, return_state=True)


def text_pieces(tokenizer, tokens: Iterator[int], stop: Optional[str] = None) -> Iterator[str]:
    """The text of `tokens` piece by piece, ending at token 0 (end of document) or before the first `stop`.
    A piece holds only complete UTF-8 characters (a token may end inside one); stray bytes become U+FFFD. Text that
    may be the start of `stop` is held back until the next token tells."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    held = ""
    for token in tokens:
        if token == 0:
            break
        held += decoder.decode(tokenizer.decode_bytes([token]))
        if stop:
            cut = held.find(stop)
            if cut >= 0:
                if held[:cut]:
                    yield held[:cut]
                return
            keep = next((n for n in range(min(len(stop) - 1, len(held)), 0, -1) if stop.startswith(held[-n:])), 0)
            piece, held = held[:len(held) - keep], held[len(held) - keep:]
        else:
            piece, held = held, ""
        if piece:
            yield piece
    rest = held + decoder.decode(b"", final=True)
    if rest:
        yield rest


def chat_prompt(prompt: str) -> str:
    """`prompt` as the user's turn of the World chat format; blank lines inside it, which would end the turn early,
    become single line breaks."""
    text = prompt.replace("\r\n", "\n").strip()
    while TURN_END in text:
        text = text.replace(TURN_END, "\n")
    return CHAT_TEMPLATE.format(prompt=text)


def generate(model, tokenizer, prompt: str, max_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
             top_k: int = 0, seed: int = 0, chat: bool = False) -> Iterator[str]:
    """Text pieces continuing `prompt` (plain), or the assistant's reply to it (chat, ending at the turn end),
    as they are sampled: at most max_tokens tokens, ending at token 0."""
    text = chat_prompt(prompt) if chat else prompt
    ids = tokenizer.encode(text) or [0]   # an empty prompt starts a fresh document
    generator = torch.Generator().manual_seed(seed)
    tokens = decode(model, ids, lambda logits: sample_next(logits, temperature, top_p, top_k, generator))
    return text_pieces(tokenizer, islice(tokens, max_tokens), stop=TURN_END if chat else None)


def read_prompt_file(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"prompt file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"prompt file {path} is not UTF-8 text (byte offset {e.start})") from None
    except OSError as e:
        raise UserError(f"cannot read prompt file {path}: {e.strerror}") from None


def check_device(name: str) -> torch.device:
    """`name` as a torch.device that can hold tensors here; UserError otherwise (no such device, no CUDA)."""
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:   # torch raises AssertionError when built without CUDA
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"--device {name} cannot be used here ({reason}); try --device cpu") from None
    return device


def check_sampling(args) -> None:
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    for flag, value in (("--top-k", args.top_k), ("--temperature", args.temperature),
                        ("--max-tokens", args.max_tokens)):
        if not value >= 0:   # NaN is refused too
            raise UserError(f"{flag} must be >= 0, got {value}")


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # argparse's errors as one line, like every other bad input
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv=None) -> None:
    parser = _Parser(prog="rwkv7-generate",
                     description="Generate text from an RWKV-7 checkpoint with the World tokenizer, in RNN mode, "
                                 "streaming tokens as they come. Plain mode prints the prompt and its continuation; "
                                 "--chat prints the model's reply to the prompt.")
    parser.add_argument("checkpoint", help="official .pth or .safetensors, rwkv7-train .ckpt, or DeepSpeed "
                                           "checkpoint directory")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    source.add_argument("--prompt-file", metavar="PATH", help="read the prompt from this UTF-8 text file")
    parser.add_argument("--chat", action="store_true",
                        help=f"wrap the prompt as {CHAT_TEMPLATE!r} (the World models' chat format) and stop at the "
                             "end of the reply (a blank line)")
    parser.add_argument("--max-tokens", type=int, default=200, help="at most this many new tokens (default 200)")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    parser.add_argument("--top-p", type=float, default=0.85, help="nucleus sampling mass, in (0, 1] (default 0.85)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the K most likely tokens; 0 = off")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampler (default 0)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda, cuda:N (default: cuda if available)")
    parser.add_argument("--dtype", choices=DTYPES, help="weights' dtype (default: bf16 on CUDA, fp32 on CPU)")
    args = parser.parse_args(argv)
    try:
        check_sampling(args)
        device = check_device(args.device)
        dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
        prompt = read_prompt_file(args.prompt_file) if args.prompt_file is not None else args.prompt

        from .checkpoints import load_model
        from .tokenizer import WorldTokenizer

        tokenizer = WorldTokenizer()
        model = load_model(args.checkpoint, dtype=dtype, device=device).eval()
        if model.cfg.vocab_size < tokenizer.vocab_size:
            raise UserError(f"{args.checkpoint} has vocab {model.cfg.vocab_size}, the World tokenizer needs "
                            f"{tokenizer.vocab_size}: this checkpoint was not trained with the World vocab")
        if not args.chat:
            sys.stdout.write(prompt)
            sys.stdout.flush()
        for piece in generate(model, tokenizer, prompt, args.max_tokens, args.temperature, args.top_p, args.top_k,
                              args.seed, chat=args.chat):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    except UserError as e:
        print(f"rwkv7-generate: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
