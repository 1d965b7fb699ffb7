"""`rwkv7-generate` and its parts: RNN-mode decoding against the parallel forward, the sampler's support and seed,
chat mode's stop at the turn end, and the command line on real checkpoint files (official .pth and our .ckpt)."""
import gc
from itertools import islice

import pytest
import torch

from cli_run import cli
from random_model import random_model
from rwkv7_train import RWKV7, RWKV7Config, WorldTokenizer, save_official
from rwkv7_train.generate import chat_prompt, decode, generate, main, sample_next

SMALL = dict(n_layer=2, n_embd=64, head_size=32)   # World vocab, so the CLI takes it
HELLO, NL, NL2, MORE, COLON = 36786, 11, 261, 31458, 59   # World ids of " Hello", "\n", "\n\n", " more", ":"


@pytest.fixture(scope="module")
def tokenizer():
    return WorldTokenizer()


@pytest.fixture(scope="module")
def model():
    return random_model(1, **SMALL).eval()


@pytest.fixture(scope="module")
def random_pth(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("random") / "model.pth"
    save_official(model, path)
    return path


def bigram_model(chain: dict[int, int]) -> RWKV7:
    """A real RWKV7 whose greedy next token after `a` is chain[a]. At the official init every block's output matrices
    are zero, so the logits are head(ln_out(ln0(emb[token]))): a function of the current token alone. Each token
    of the chain gets its own embedding direction, and head row b points along the normalised embedding of every
    `a` with chain[a] = b, by a margin that no temperature near 1 overturns."""
    torch.manual_seed(0)
    model = RWKV7(RWKV7Config(**SMALL)).eval()
    with torch.no_grad():
        model.head.weight.zero_()
        for slot, a in enumerate(chain):
            model.emb.weight[a] = torch.nn.functional.one_hot(torch.tensor(slot), SMALL["n_embd"]).float()
        for a, b in chain.items():
            u = model.ln_out(model.blocks[0].ln0(model.emb.weight[a]))
            model.head.weight[b] += 10 * u
    return model


def save_ckpt(model: RWKV7, path) -> None:
    """What load_model reads from a rwkv7-train .ckpt: the Lightning state_dict (model under `model.`) and the
    model config among the hyperparameters."""
    cfg = {k: getattr(model.cfg, k) for k in ("vocab_size", "n_layer", "n_embd", "head_size")}
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"model": cfg}}, path)


def pieces(model, tokenizer, prompt, **kw) -> list[str]:
    return list(generate(model, tokenizer, prompt, **{"max_tokens": 8, "temperature": 0, **kw}))


# ---- RNN mode -------------------------------------------------------------------------------------------------

def test_greedy_rnn_decoding_equals_argmax_of_full_reforwards(model):
    prompt = [510, 33, 2000, 7, 65000, 1, 300, 4000, 12, 9, 77, 15000, 8, 43, 600, 21, 5, 901]  # crosses 16
    seen = []

    def greedy(logits):
        seen.append(logits)
        return int(logits.argmax())

    generated = list(islice(decode(model, prompt, greedy), 20))
    with torch.no_grad():
        for i, token in enumerate(generated):
            full = model(torch.tensor([prompt + generated[:i]]))[0, -1]
            assert token == int(full.argmax())
            assert ((seen[i] - full).norm() / full.norm()).item() < 1e-5


def test_decoding_runs_the_prompt_once_then_one_token_per_step_in_constant_memory(model):
    lengths, live = [], []
    hook = model.emb.register_forward_hook(lambda module, args, out: lengths.append(args[0].shape[1]))

    def greedy(logits):
        assert not logits.requires_grad    # no autograd graph grows along the sequence
        if len(lengths) in (2, 10, 40):    # after the first, a middle and the last step
            gc.collect()
            tensors = [t for t in gc.get_objects() if issubclass(type(t), torch.Tensor)]
            live.append(sum(t.numel() * t.element_size() for t in tensors))
        return int(logits.argmax())

    try:
        list(islice(decode(model, [510, 33, 2000, 7, 9], greedy), 40))
    finally:
        hook.remove()
    assert lengths == [5] + [1] * 39      # one parallel prefill, then one token a step, none run after the last
    assert live[0] == live[1] == live[2]  # the live tensors (the state) do not grow with the length


# ---- sampler --------------------------------------------------------------------------------------------------

# Four likely tokens at scattered ids (0.4, 0.25, 0.15, 0.1), the remaining 0.1 spread over 46 others.
TOP = [17, 3, 42, 29]
PROBS = torch.full((50,), 0.1 / 46)
PROBS[TOP] = torch.tensor([0.4, 0.25, 0.15, 0.1])
LOGITS = PROBS.log()


def draws(n=3000, seed=0, **kw) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    args = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, **kw}
    return [sample_next(LOGITS, generator=generator, **args) for _ in range(n)]


@pytest.mark.parametrize("kw,support", [
    ({"top_k": 3}, TOP[:3]),
    ({"top_p": 0.6}, TOP[:2]),                   # 0.4 < 0.6 <= 0.65: the two most likely reach it
    ({"top_p": 0.7}, TOP[:3]),
    ({"top_k": 2, "top_p": 0.7}, TOP[:2]),       # both apply: the smaller set wins
    ({"top_k": 1, "temperature": 3.0}, TOP[:1]),
])
def test_top_k_and_top_p_restrict_the_support(kw, support):
    got = draws(**kw)
    assert set(got) == set(support)
    share = got.count(support[0]) / len(got)
    assert abs(share - PROBS[support[0]].item() / PROBS[support].sum().item()) < 0.04   # renormalised, in proportion


@pytest.mark.parametrize("head", [3, 1000, 60000])   # a nucleus found among 64, among 4096, or by a whole sort
def test_top_p_keeps_the_nucleus_of_a_world_sized_vocab(head):
    """`head` likely tokens (distinct probabilities) holding 0.8 of the mass; the nucleus at top_p 0.5 is the
    most likely of them whose mass before each stays below 0.5, as a whole sort finds it."""
    weights = torch.zeros(65536, dtype=torch.float64)
    ids = torch.randperm(65536, generator=torch.Generator().manual_seed(0))
    weights[ids[:head]] = 0.8 * torch.linspace(2, 1, head, dtype=torch.float64) / torch.linspace(2, 1, head).sum()
    weights[ids[head:]] = 0.2 / (65536 - head)
    probs, order = torch.sort(weights, descending=True)
    nucleus = set(order[(torch.cumsum(probs, 0) - probs) < 0.5].tolist())
    generator = torch.Generator().manual_seed(0)
    got = {sample_next(weights.log(), 1.0, 0.5, 0, generator) for _ in range(200)}
    assert got <= nucleus and len(got) >= min(len(nucleus), 200) * 0.6


def test_unrestricted_sampling_reaches_the_tail():
    assert len(set(draws())) > 30


def test_top_k_1_and_temperature_0_are_greedy(model, tokenizer):
    logits = torch.randn(65536, generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(0)
    assert {sample_next(logits, 2.0, 0.9, 1, generator) for _ in range(50)} == {int(logits.argmax())}
    greedy = pieces(model, tokenizer, "The", max_tokens=12)
    assert pieces(model, tokenizer, "The", max_tokens=12, temperature=1.0, top_k=1, seed=5) == greedy


def test_same_seed_same_samples():
    assert draws(seed=7) == draws(seed=7)
    assert draws(seed=7) != draws(seed=8)


# ---- text: UTF-8 and chat mode --------------------------------------------------------------------------------

def test_only_complete_utf8_characters_are_streamed(tokenizer):
    b1, b2, b3 = (tokenizer.encode_bytes(bytes([b]))[0] for b in "日".encode())   # one character, three tokens
    model = bigram_model({COLON: b1, b1: b2, b2: b3, b3: HELLO, HELLO: 0})
    assert pieces(model, tokenizer, "Assistant:") == ["日", " Hello"]


@pytest.mark.parametrize("chain,plain,reply", [
    ({HELLO: NL, NL: NL2, NL2: MORE, MORE: MORE}, " Hello\n\n\n" + " more" * 5, " Hello"),  # across two tokens
    ({HELLO: NL2, NL2: MORE, MORE: MORE}, " Hello\n\n" + " more" * 6, " Hello"),             # in one token
    ({HELLO: NL, NL: MORE, MORE: MORE}, " Hello\n" + " more" * 6, " Hello\n" + " more" * 6),  # a lone "\n" goes on
    ({HELLO: 0}, " Hello", " Hello"),                                                       # end of document
])
def test_chat_stops_at_the_turn_end(tokenizer, chain, plain, reply):
    model = bigram_model({COLON: HELLO, **chain})
    assert "".join(pieces(model, tokenizer, "User: hi\n\nAssistant:")) == plain
    assert "".join(pieces(model, tokenizer, "hi", chat=True)) == reply   # nothing of the turn end is streamed


def test_chat_prompt_keeps_the_user_turn_whole():
    assert chat_prompt(" a\n\n\nb\r\n\r\nc\n") == "User: a\nb\nc\n\nAssistant:"


# ---- command line ---------------------------------------------------------------------------------------------

def generate_cli(args, env, cwd, check=True):
    return cli(["rwkv7-generate", *map(str, args), "--device", "cpu"], env, cwd, check=check)


@pytest.mark.parametrize("fmt", ["pth", "ckpt"])
def test_cli_plain_and_chat_modes_from_either_checkpoint(fmt, env, tmp_path):
    model = bigram_model({COLON: HELLO, HELLO: NL, NL: NL2, NL2: MORE, MORE: MORE})
    path = tmp_path / f"bigram.{fmt}"
    save_official(model, path) if fmt == "pth" else save_ckpt(model, path)
    plain = generate_cli([path, "--prompt", "Assistant:", "--max-tokens", 5], env, tmp_path)
    assert plain.stdout == "Assistant: Hello\n\n\n more more\n" and plain.stderr == ""
    chat = generate_cli([path, "--prompt", "hi", "--chat", "--top-p", 0.5, "--top-k", 3], env, tmp_path).stdout
    assert chat == " Hello\n"


def test_cli_same_seed_same_text_and_prompt_file(random_pth, env, tmp_path):
    prompt = "Ünïcode prompt:"
    (tmp_path / "prompt.txt").write_text(prompt, encoding="utf-8")
    sample = [random_pth, "--max-tokens", 16, "--temperature", 1.0, "--top-p", 0.9]
    first = generate_cli([*sample, "--prompt", prompt, "--seed", 1], env, tmp_path).stdout
    assert first.startswith(prompt) and len(first) > len(prompt) + 1
    assert generate_cli([*sample, "--prompt-file", tmp_path / "prompt.txt", "--seed", 1], env, tmp_path).stdout == first
    assert generate_cli([*sample, "--prompt", prompt, "--seed", 2], env, tmp_path).stdout != first


@pytest.mark.parametrize("args,message", [
    (["--top-p", 0], "--top-p must be in (0, 1], got 0.0"),
    (["--top-p", 1.5], "--top-p must be in (0, 1], got 1.5"),
    (["--top-k", -1], "--top-k must be >= 0, got -1"),
    (["--temperature", -0.5], "--temperature must be >= 0, got -0.5"),
    (["--max-tokens", -3], "--max-tokens must be >= 0, got -3"),
    (["--prompt", "a", "--prompt-file", "p.txt"], "not allowed with argument"),
    (["--prompt-file", "/nonexistent/p.txt"], "prompt file not found: /nonexistent/p.txt"),
    (["--prompt-file", "latin1.txt"], "prompt file latin1.txt is not UTF-8 text (byte offset 1)"),
    (["--dtype", "fp8"], "invalid choice: 'fp8'"),
])
def test_bad_options_are_one_line_and_exit_2(random_pth, tmp_path, monkeypatch, capsys, args, message):
    """The entry point in this process: each refusal comes before the checkpoint is read."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1")[2:])   # b"f\xe9": not UTF-8
    with pytest.raises(SystemExit) as stop:
        main([str(random_pth), *map(str, args)])
    out, err = capsys.readouterr()
    assert stop.value.code == 2 and out == ""
    assert err.count("\n") == 1 and message in err


@pytest.mark.parametrize("what", ["missing", "text", "directory", "small vocab"])
def test_cli_bad_checkpoints_are_one_line_and_exit_2(what, env, tmp_path):
    path = {"missing": tmp_path / "none.pth", "text": tmp_path / "notes.pth", "directory": tmp_path,
            "small vocab": tmp_path / "v1024.pth"}[what]
    if what == "text":
        path.write_text("not a checkpoint\n")
    if what == "small vocab":
        save_official(random_model(0, vocab_size=1024, **SMALL), path)
    proc = generate_cli([path, "--max-tokens", 2], env, tmp_path, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and str(path) in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is there")
def test_cli_device_without_cuda_is_one_line_and_exit_2(random_pth, env, tmp_path):
    proc = cli(["rwkv7-generate", str(random_pth), "--device", "cuda"], env, tmp_path, check=False)
    assert proc.returncode == 2 and "--device cuda cannot be used here" in proc.stderr
    assert proc.stderr.count("\n") == 1
