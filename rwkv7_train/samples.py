"""Sample generations at each validation: greedy continuations of a few fixed prompts, so a run shows what its model
writes as it trains, next to the loss.

Each validation appends one row per prompt (step, prompt, completion) to RUN_DIR/samples.jsonl and, with a wandb
logger, logs every row so far as the table `val/samples`. Generation is rwkv7-generate's RNN mode, greedy, at most
`max_tokens` tokens, ending at end of document or before a blank line. Every rank runs the same forward calls (under
ZeRO-3 each one gathers parameters from all ranks), and rank 0 alone writes.
"""
import json
from functools import partial
from itertools import islice, takewhile
from pathlib import Path
from typing import Optional

import lightning as L

from .atomic import atomic_write
from .generate import TURN_END, decode, sample_next, text_pieces
from .tokenizer import WorldTokenizer

SAMPLES_FILE = "samples.jsonl"
COLUMNS = ["step", "prompt", "completion"]


def greedy_completion(model, tokenizer: WorldTokenizer, prompt: str, max_tokens: int) -> str:
    """The greedy continuation of `prompt`, as `rwkv7-generate --temperature 0` writes it, cut before a blank line."""
    ids = tokenizer.encode(prompt) or [0]
    # Always max_tokens steps, whatever the text: a rank that stopped early would leave ZeRO-3's gathers hanging.
    greedy = partial(sample_next, temperature=0, top_p=1.0, top_k=0, generator=None)
    tokens = list(islice(decode(model, ids, greedy), max_tokens))
    # An id with no text (a padding row of the embedding, which an untrained model may still pick) ends it.
    tokens = list(takewhile(lambda t: t == 0 or _has_text(tokenizer, t), tokens))
    return "".join(text_pieces(tokenizer, iter(tokens), stop=TURN_END))


def _has_text(tokenizer: WorldTokenizer, token: int) -> bool:
    try:
        tokenizer.decode_bytes([token])
        return True
    except ValueError:
        return False


class SampleGenerations(L.Callback):
    def __init__(self, run_dir, prompts: list[str], max_tokens: int, resumed_step: Optional[int] = None):
        """resumed_step: the global step of the checkpoint this run resumes from (None for a fresh run, which
        replaces any samples.jsonl already in run_dir)."""
        self.path = Path(run_dir) / SAMPLES_FILE
        self.prompts, self.max_tokens = list(prompts), max_tokens
        self._resumed_step = resumed_step
        self._tokenizer: Optional[WorldTokenizer] = None
        self._rows: Optional[list[dict]] = None   # every row of the file, read or started at the first write

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or not self.prompts or not self.max_tokens:
            return
        self._tokenizer = self._tokenizer or WorldTokenizer()
        model = pl_module.model
        if model.cfg.vocab_size != self._tokenizer.vocab_size:
            return   # a model with its own small vocab (tests, toy data): the World tokenizer cannot read it
        was_training = model.training
        model.eval()
        try:
            step = trainer.global_step
            rows = [{"step": step, "prompt": p, "completion": greedy_completion(model, self._tokenizer, p,
                                                                                 self.max_tokens)}
                    for p in self.prompts]
        finally:
            model.train(was_training)
        if trainer.is_global_zero:
            self._write(rows)
            self._log_table(trainer, step)

    def _write(self, rows: list[dict]) -> None:
        if self._rows is None:   # first write: a resume keeps the rows up to its checkpoint, so each step is once
            self._rows = self._earlier_rows()
            with atomic_write(self.path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in self._rows)
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        self._rows += rows

    def _earlier_rows(self) -> list[dict]:
        if self._resumed_step is None or not self.path.is_file():
            return []
        text = self.path.read_text(encoding="utf-8")
        complete = text[:text.rfind("\n") + 1]   # a SIGKILL can cut the last line
        return [r for r in map(json.loads, complete.splitlines()) if r["step"] <= self._resumed_step]

    def _log_table(self, trainer, step: int) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):   # the whole history: the newest table compares every step
                logger.log_text("val/samples", columns=COLUMNS, data=[[r[c] for c in COLUMNS] for r in self._rows],
                                step=step)
