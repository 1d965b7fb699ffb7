"""Training curves from the metrics.csv that the trainer writes in a run directory (metrics_csv.MetricsCSV):
`rwkv7-plot`, and `refresh`, which the trainer calls at each checkpoint to keep RUN_DIR/curves.png current.

The CSV has a "step" column plus one column per metric; each row is one logging call and leaves the metrics it did
not log empty. The logger appends to it while we read, and rewrites it whole when a new metric appears, so a read
can end inside a line: only complete lines count."""
import argparse
import csv
import io
import os
import re
import sys
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from .atomic import atomic_write
from .errors import UserError

METRICS_FILE = "metrics.csv"
CURVES_FILE = "curves.png"
# The EMA of the training loss spans this fraction of its points (the same look for short and long runs), and at
# least EMA_MIN_SPAN points so that an early plot is smoothed too.
EMA_FRACTION = 0.02
EMA_MIN_SPAN = 5

_VAL_SOURCE = re.compile(r"val/(.+)/loss")
_LR_GROUP = re.compile(r"train/lr/(.+)")


class MetricsError(UserError, ValueError):
    """A run directory's metrics.csv is missing, empty or unreadable; the message names the file."""


class Series(NamedTuple):
    steps: np.ndarray   # int64, in the order logged
    values: np.ndarray  # float64


def read_metrics(run_dir: Path) -> dict[str, Series]:
    """Every metric in RUN_DIR/metrics.csv as (steps, values), only the steps at which it was logged.

    An unterminated last line (the logger is writing it) is left out."""
    path = Path(run_dir) / METRICS_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MetricsError(f"{path}: no such file (is {run_dir} an rwkv7-train run directory?)") from None
    except OSError as e:
        raise MetricsError(f"{path}: cannot read it ({e.strerror})") from None
    # Cut at the last newline before decoding: a cut line may also end inside a UTF-8 character.
    rows = list(csv.reader(io.StringIO(data[:data.rfind(b"\n") + 1].decode("utf-8", "replace"), newline="")))
    if len(rows) < 2:
        raise MetricsError(f"{path}: no metrics logged yet")
    header = rows[0]
    if "step" not in header:
        raise MetricsError(f"{path}: no 'step' column, not a run's metrics file")
    step_col = header.index("step")
    collected: dict[str, tuple[list, list]] = {name: ([], []) for name in header if name != "step"}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise MetricsError(f"{path}:{line}: {len(row)} fields, the header has {len(header)}")
        try:
            step = int(float(row[step_col]))
            for name, cell in zip(header, row):
                if cell and name != "step":
                    collected[name][1].append(float(cell))
                    collected[name][0].append(step)
        except ValueError:
            raise MetricsError(f"{path}:{line}: a value is not a number") from None
    return {name: Series(np.array(s, dtype=np.int64), np.array(v, dtype=np.float64))
            for name, (s, v) in collected.items() if s}


def ema(values: np.ndarray, span: float) -> np.ndarray:
    """Exponential moving average over `span` points, debiased: each point is the weighted mean of those so far, so
    the start is not pulled towards the first value (or zero)."""
    beta = 1.0 - 1.0 / max(span, 1.0)
    out = np.empty_like(values)
    num = den = 0.0
    for i, x in enumerate(values):
        num = beta * num + x
        den = beta * den + 1.0
        out[i] = num / den
    return out


def run_labels(run_dirs: list[Path]) -> list[str]:
    """The fewest trailing path components that tell the runs apart (just the directory name when that does)."""
    parts = [Path(os.path.abspath(d)).parts for d in run_dirs]
    for k in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-k:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return labels  # the same directory given twice


def _ema_span(n_points: int) -> float:
    return max(EMA_MIN_SPAN, EMA_FRACTION * n_points)


def _plottable(metrics: dict[str, Series]) -> bool:
    return any(name in ("train/loss", "val/loss", "train/lr") or _VAL_SOURCE.fullmatch(name)
               or _LR_GROUP.fullmatch(name) for name in metrics)


def _extrapolating_interp(x, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """Piecewise-linear through (xp, fp), continued past both ends along the end segments (axis ticks lie there)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.interp(x, xp, fp)
    lo, hi = x < xp[0], x > xp[-1]
    y[lo] = fp[0] + (x[lo] - xp[0]) * (fp[1] - fp[0]) / (xp[1] - xp[0])
    y[hi] = fp[-1] + (x[hi] - xp[-1]) * (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
    return y


def _short_count(x, _pos=None) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def _add_tokens_axis(ax, tokens: Series) -> None:
    """A top x-axis in training tokens, from the step -> train/tokens mapping (needs it strictly increasing)."""
    steps, values = tokens.steps.astype(np.float64), tokens.values
    if len(steps) < 2 or np.any(np.diff(steps) <= 0) or np.any(np.diff(values) <= 0):
        return
    top = ax.secondary_xaxis("top", functions=(lambda s: _extrapolating_interp(s, steps, values),
                                               lambda t: _extrapolating_interp(t, values, steps)))
    top.xaxis.set_major_formatter(_short_count)
    top.set_xlabel("tokens")


def make_figure(run_dirs: list[Path]):
    """The figure plot_runs saves: training loss, validation loss and lr against step, one colour per run.

    Raises MetricsError naming the file when a run has no metrics.csv or nothing in it to plot."""
    # Import here: the trainer imports this module and most runs never plot. A Figure with an Agg canvas needs no
    # pyplot and leaves the process-wide backend alone (a notebook's stays as it is).
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not run_dirs:
        raise ValueError("make_figure needs at least one run directory")
    runs = []
    for d in run_dirs:
        metrics = read_metrics(d)
        if not _plottable(metrics):
            raise MetricsError(f"{Path(d) / METRICS_FILE}: no loss or lr logged yet")
        runs.append(metrics)

    fig = Figure(figsize=(10, 11), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, val_ax, lr_ax = fig.subplots(3, 1, sharex=True)
    colours = colormaps["tab10"].colors
    markers = "osD^vP*Xh<>"
    group_styles = [":", "-.", (0, (5, 2, 1, 2, 1, 2)), (0, (1, 3))]
    for i, (label, metrics) in enumerate(zip(run_labels(run_dirs), runs)):
        c = colours[i % len(colours)]
        if "train/loss" in metrics:
            s = metrics["train/loss"]
            loss_ax.plot(s.steps, s.values, color=c, alpha=0.25, linewidth=0.8)
            loss_ax.plot(s.steps, ema(s.values, _ema_span(len(s.values))), color=c, linewidth=1.6, label=label)
        if "val/loss" in metrics:
            s = metrics["val/loss"]
            val_ax.plot(s.steps, s.values, color=c, marker="o", markersize=4, label=label)
        sources = sorted(m[1] for m in map(_VAL_SOURCE.fullmatch, metrics) if m)
        for j, source in enumerate(sources):
            s = metrics[f"val/{source}/loss"]
            val_ax.plot(s.steps, s.values, color=c, linestyle="--", linewidth=1, marker=markers[j % len(markers)],
                        markersize=3, label=f"{label} · {source}")
        if "train/lr" in metrics:
            s = metrics["train/lr"]
            lr_ax.plot(s.steps, s.values, color=c, label=label)
        groups = sorted(m[1] for m in map(_LR_GROUP.fullmatch, metrics) if m)
        for j, group in enumerate(groups):
            s = metrics[f"train/lr/{group}"]
            lr_ax.plot(s.steps, s.values, color=c, linestyle=group_styles[j % len(group_styles)], linewidth=1,
                       label=f"{label} · {group}")

    panels = ((loss_ax, f"training loss (light: raw; solid: EMA over {EMA_FRACTION:.0%} of the points, at least "
               f"{EMA_MIN_SPAN})",
               "no training loss yet"),
              (val_ax, "validation loss (dashed: per data source)", "no validation yet"),
              (lr_ax, "learning rate", "no learning rate logged"))
    for ax, title, empty in panels:
        ax.set_title(title, loc="left", fontsize=10)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center", va="center", color="0.5")
    lr_ax.yaxis.set_major_formatter(lambda x, _pos: f"{x:.2g}")
    lr_ax.set_xlabel("step")
    # Tokens per step can differ between runs, so a tokens axis only for one run.
    if len(runs) == 1 and "train/tokens" in runs[0]:
        _add_tokens_axis(loss_ax, runs[0]["train/tokens"])
    return fig


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    """Write the curves of `run_dirs` (overlaid) to the PNG `out`, atomically; returns `out`."""
    fig = make_figure(run_dirs)
    out = Path(out)
    with atomic_write(out) as f:
        fig.savefig(f, format="png", dpi=100)
    return out


def refresh(run_dir: Path) -> Optional[Path]:
    """Rewrite RUN_DIR/curves.png from RUN_DIR/metrics.csv; None (and no file) while there is nothing to plot.

    A missing, empty or unreadable metrics.csv is never an error here: a plot must not stop a training run."""
    try:
        return plot_runs([Path(run_dir)], Path(run_dir) / CURVES_FILE)
    except MetricsError:
        return None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="rwkv7-plot",
        description="Plot training loss, validation loss and learning rate against step from the metrics.csv of "
                    "rwkv7-train run directories. Several runs are overlaid, one colour each. The "
                    f"training loss is drawn raw (light) and as an EMA over {EMA_FRACTION:.0%} of its points (at least "
                    f"{EMA_MIN_SPAN}).")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", type=Path, help="a run directory with metrics.csv")
    parser.add_argument("-o", "--output", metavar="OUT.png", type=Path,
                        help=f"the PNG to write (default: RUN_DIR/{CURVES_FILE} for one run, which the trainer "
                             "also refreshes at each checkpoint; ./runs.png for several)")
    args = parser.parse_args(argv)
    out = args.output or (args.run_dirs[0] / CURVES_FILE if len(args.run_dirs) == 1 else Path("runs.png"))
    try:
        for d in args.run_dirs:
            if not d.is_dir():
                raise UserError(f"{d}: no such directory")
        if out.suffix.lower() != ".png":
            raise UserError(f"{out}: the output is a PNG, give it a .png name")
        if out.is_dir():
            raise UserError(f"{out} is a directory; give the PNG's file name")
        print(plot_runs(args.run_dirs, out))
    except UserError as e:
        print(f"rwkv7-plot: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
