"""RUN_DIR/metrics.csv: every logged metric of a run, one row per logging call, written by rank 0 whatever
experiment logger is configured (wandb or none), so that `rwkv7-plot` and scripts have the curves without an account.

A resumed run continues the same file: the rows logged after the checkpoint it resumes from (steps the killed run
did but that are done again) are dropped, so each step appears once. The header grows when a new metric appears
(the file is then rewritten atomically); otherwise rows are appended."""
import csv
from pathlib import Path
from typing import Optional

from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities import rank_zero_only

from .atomic import atomic_write
from .plot import METRICS_FILE   # the reader names the file; plot.py is light (no matplotlib until it draws)


class MetricsCSV(Logger):
    def __init__(self, run_dir, resumed_step: Optional[int] = None):
        """resumed_step: the global step of the checkpoint this run resumes from (None for a fresh run, which
        replaces any metrics.csv already in run_dir)."""
        super().__init__()
        self.path = Path(run_dir) / METRICS_FILE
        self._resumed_step = resumed_step
        self._rows: Optional[list[dict]] = None   # read (resume) or started (fresh) at the first save
        self._keys: list[str] = ["step"]
        self._pending: list[dict] = []

    @property
    def name(self) -> str:
        return "metrics"

    @property
    def version(self) -> str:
        return ""

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass   # the resolved config is RUN_DIR/resolved_config.yaml

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: Optional[int] = None) -> None:
        self._pending.append({"step": step, **{k: float(v) for k, v in metrics.items()}})

    @rank_zero_only
    def save(self) -> None:
        if not self._pending:
            return
        rewrite = self._rows is None
        if rewrite:
            self._rows = self._earlier_rows()
            for row in self._rows:
                self._add_keys(row)
        for row in self._pending:
            rewrite |= self._add_keys(row)
        self._rows += self._pending
        if rewrite:
            with atomic_write(self.path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self._keys)
                writer.writeheader()
                writer.writerows(self._rows)
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self._keys).writerows(self._pending)
        self._pending = []

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()

    def _add_keys(self, row: dict) -> bool:
        new = [k for k in row if k not in self._keys]
        self._keys += new
        return bool(new)

    def _earlier_rows(self) -> list[dict]:
        """The rows a resumed run keeps: those logged up to the step it resumes from (a complete line each)."""
        if self._resumed_step is None or not self.path.is_file():
            return []
        text = self.path.read_text()
        complete = text[:text.rfind("\n") + 1]   # a SIGKILL can cut the last line
        return [{k: v for k, v in row.items() if v not in ("", None)}
                for row in csv.DictReader(complete.splitlines())
                if row.get("step") and int(row["step"]) < self._resumed_step]
