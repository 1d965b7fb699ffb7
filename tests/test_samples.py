"""Sample generations at each validation: RUN_DIR/samples.jsonl and the wandb table val/samples, from a real run."""
import json
from pathlib import Path

import pytest

from cli_run import SMALL, train
from rwkv7_train.checkpoints import load_model
from rwkv7_train.generate import TURN_END, generate
from rwkv7_train.tokenizer import WorldTokenizer

PROMPTS = ["The capital of France is", "中国的首都是"]
TOKENS = 12


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, env):
    """4 steps of the tiny World-vocab model, validating (and saving) every 2 steps, logging to offline wandb."""
    cwd = tmp_path_factory.mktemp("samples")
    out = cwd / "run"
    train([*SMALL, "trainer.max_steps=4", "trainer.val_check_interval=2", "checkpoint.every_n_steps=2",
           "checkpoint.keep_last=5", "optim.lr_init=3e-3", "logger=wandb",
           f"sample_prompts={json.dumps(PROMPTS, ensure_ascii=False)}", f"sample_tokens={TOKENS}", f"hydra.run.dir={out}"], env, cwd)
    return out


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text(encoding="utf-8").splitlines()]


def test_each_validation_writes_one_row_per_prompt(run_dir):
    assert [(r["step"], r["prompt"]) for r in rows(run_dir)] == [(s, p) for s in (2, 4) for p in PROMPTS]


def test_completions_are_the_greedy_generation_of_the_checkpoint_at_that_step(run_dir):
    tokenizer = WorldTokenizer()
    for r in rows(run_dir):
        model = load_model(run_dir / "checkpoints" / f"step{r['step']}.ckpt").eval()
        text = "".join(generate(model, tokenizer, r["prompt"], TOKENS, temperature=0))
        assert r["completion"] == text.split(TURN_END)[0]
        assert r["completion"]   # 12 tokens of a model this young are not all a blank line


def test_wandb_gets_the_table_of_every_sample_so_far(run_dir):
    tables = list((run_dir / "wandb").glob("offline-run-*/files/media/table/val/samples_*.table.json"))
    newest = max(tables, key=lambda p: int(p.name.split("_")[1]))   # samples_<wandb step>_<hash>.table.json
    table = json.loads(newest.read_text(encoding="utf-8"))
    assert table["columns"] == ["step", "prompt", "completion"]
    assert table["data"] == [[r["step"], r["prompt"], r["completion"]] for r in rows(run_dir)]


def test_sample_tokens_zero_writes_no_samples(env, tmp_path):
    out = tmp_path / "run"
    train([*SMALL, "trainer.max_steps=1", "trainer.val_check_interval=1", "logger=none", "sample_tokens=0",
           f"hydra.run.dir={out}"], env, tmp_path)
    assert (out / "checkpoints" / "step1.ckpt").exists() and not (out / "samples.jsonl").exists()


def test_bad_sample_tokens_is_one_line(env, tmp_path):
    proc = train([*SMALL, "trainer.max_steps=1", "logger=none", "sample_tokens=-1", f"hydra.run.dir={tmp_path / 'r'}"],
                 env, tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["rwkv7-train: error: sample_tokens=-1: give the tokens per sample "
                                                "(an integer >= 0; 0 = none)"]
