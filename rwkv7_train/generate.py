"""`rwkv7-generate`: sample text from an RWKV-7 checkpoint in RNN mode (constant memory per token)."""
import argparse
import sys

import torch

from .errors import UserError


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Nucleus sampling from one position's logits; temperature 0 picks the argmax."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True)
    keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p   # always keeps the most likely token
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
    return int(order[choice])


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_tokens: int, temperature: float, top_p: float, seed: int):
    """Yield decoded text pieces as tokens are sampled; stops at token 0 (end of document)."""
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt) or [0]   # an empty prompt starts a fresh document
    logits, state = model(torch.tensor([ids], device=device), return_state=True)
    generator = torch.Generator().manual_seed(seed)
    pending = b""
    for _ in range(max_tokens):
        token = sample_next(logits[0, -1].cpu(), temperature, top_p, generator)
        if token == 0:
            break
        pending += tokenizer.decode_bytes([token])
        try:  # emit only complete UTF-8 characters; a token may end inside one
            text, pending = pending.decode("utf-8"), b""
            yield text
        except UnicodeDecodeError:
            pass
        logits, state = model(torch.tensor([[token]], device=device), state=state, return_state=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="rwkv7-generate",
                                     description="Generate text from an RWKV-7 checkpoint with the World tokenizer.")
    parser.add_argument("checkpoint", help="official .pth, rwkv7-train .ckpt, or DeepSpeed checkpoint directory")
    parser.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.85)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        from .checkpoints import load_model
        from .tokenizer import WorldTokenizer

        tokenizer = WorldTokenizer()
        model = load_model(args.checkpoint, device=args.device).eval()
        if model.cfg.vocab_size < tokenizer.vocab_size:
            raise UserError(f"{args.checkpoint} has vocab {model.cfg.vocab_size}, the World tokenizer needs "
                            f"{tokenizer.vocab_size}: this checkpoint was not trained with the World vocab")
        sys.stdout.write(args.prompt)
        for piece in generate(model, tokenizer, args.prompt, args.max_tokens, args.temperature, args.top_p, args.seed):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    except UserError as e:
        print(f"rwkv7-generate: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
