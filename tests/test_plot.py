"""rwkv7_train.plot: reading the metrics.csv that Lightning's CSVLogger writes (sparse columns, header rewrites,
a half-written last line), the figure it draws, and the `rwkv7-plot` command line."""
import math

import numpy as np
import pytest
from lightning.pytorch.loggers import CSVLogger
from matplotlib.image import imread

from rwkv7_train.plot import (CURVES_FILE, METRICS_FILE, MetricsError, ema, main, make_figure, plot_runs,
                              read_metrics, refresh, run_labels)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOKENS_PER_STEP = 4096


def log_run(run_dir, steps=40, loss_every=2, val_every=10, sources=(), lr_groups=(), seed=0) -> dict:
    """Log a run the way the trainer does, through CSVLogger(save_dir=RUN_DIR, name="", version=""): lr and tokens
    every step, loss every `loss_every` steps, validation every `val_every` steps (first at step `val_every`, so its
    columns appear later and the logger rewrites the header). Returns {metric: (steps, values)} as logged."""
    rng = np.random.default_rng(seed)
    logged: dict[str, tuple[list, list]] = {}

    def log(metrics, step):
        logger.log_metrics(metrics, step=step)
        for name, value in metrics.items():
            logged.setdefault(name, ([], []))[0].append(step)
            logged[name][1].append(value)

    run_dir.mkdir(parents=True, exist_ok=True)
    logger = CSVLogger(save_dir=run_dir, name="", version="")
    for step in range(steps):
        lr = 1e-3 * min(1.0, (step + 1) / 10) * (1 - step / (2 * steps))
        row = {"train/lr": lr, "train/tokens": float((step + 1) * TOKENS_PER_STEP), "epoch": 0.0}
        row.update({f"train/lr/{g}": lr * scale for g, scale in lr_groups})
        if step % loss_every == 0:
            row["train/loss"] = 10 * math.exp(-step / 15) + 2 + rng.normal(0, 0.3)
        log(row, step)
        if (step + 1) % val_every == 0:
            val = {f"val/{s}/loss": 2 + 8 * math.exp(-step / 15) + k * 0.5 for k, s in enumerate(sources)}
            val["val/loss"] = 2.1 + 8 * math.exp(-step / 15)
            log({**val, "epoch": 0.0}, step)
            logger.save()
    logger.save()
    return logged


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    image = imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.05  # not a blank canvas


def line_data(ax):
    return [(line.get_xdata(), line.get_ydata(), line.get_label(), line.get_linestyle()) for line in ax.lines]


@pytest.fixture
def run(tmp_path):
    """A run with two validation sources and two lr groups: (run_dir, what was logged)."""
    run_dir = tmp_path / "runs" / "a"
    return run_dir, log_run(run_dir, sources=("web", "code"), lr_groups=(("decay", 1.0), ("emb", 0.5)))


def test_read_metrics_is_what_was_logged(run):
    run_dir, logged = run
    header = (run_dir / METRICS_FILE).read_text().splitlines()[0].split(",")
    assert "val/web/loss" in header and "train/loss" in header  # the header was rewritten to take val columns
    metrics = read_metrics(run_dir)
    assert set(metrics) == set(logged)
    for name, (steps, values) in logged.items():
        assert metrics[name].steps.tolist() == steps, name
        np.testing.assert_allclose(metrics[name].values, values, rtol=1e-12, err_msg=name)
    assert metrics["train/loss"].steps.tolist() == list(range(0, 40, 2))  # sparse: empty cells are not values
    assert metrics["val/loss"].steps.tolist() == [9, 19, 29, 39]


def test_figure_draws_the_logged_series(run):
    run_dir, logged = run
    fig = make_figure([run_dir])
    loss_ax, val_ax, lr_ax = fig.axes[:3]

    (raw_x, raw_y, _, _), (ema_x, ema_y, ema_label, _) = line_data(loss_ax)
    assert raw_x.tolist() == logged["train/loss"][0] and ema_x.tolist() == raw_x.tolist()
    np.testing.assert_allclose(raw_y, logged["train/loss"][1])
    assert ema_label == "a"
    assert ema_y[0] == raw_y[0]  # debiased: the first point is the first value
    # Smoother than the raw loss: the noise, not the downward trend, makes the second differences.
    assert np.abs(np.diff(ema_y, 2)).sum() < 0.5 * np.abs(np.diff(raw_y, 2)).sum()

    val = {label: (x.tolist(), y, style) for x, y, label, style in line_data(val_ax)}
    assert set(val) == {"a", "a · code", "a · web"}
    for label, name in (("a", "val/loss"), ("a · web", "val/web/loss"), ("a · code", "val/code/loss")):
        assert val[label][0] == logged[name][0]
        np.testing.assert_allclose(val[label][1], logged[name][1])
    assert val["a"][2] == "-" and val["a · web"][2] == "--"

    lr = {label: (x.tolist(), y) for x, y, label, _ in line_data(lr_ax)}
    assert set(lr) == {"a", "a · decay", "a · emb"}
    np.testing.assert_allclose(lr["a · emb"][1], logged["train/lr/emb"][1])
    assert lr["a"][0] == list(range(40))


def test_ema_is_a_debiased_running_mean():
    x = np.array([4.0, 2.0, 6.0])
    beta = 0.5
    expected = [4.0, (beta * 4 + 2) / (beta + 1), (beta**2 * 4 + beta * 2 + 6) / (beta**2 + beta + 1)]
    np.testing.assert_allclose(ema(x, span=2), expected)
    np.testing.assert_array_equal(ema(x, span=0.3), x)  # under one point of span: no smoothing


def test_plot_runs_one_and_two_runs(tmp_path, run):
    run_dir, _ = run
    out = plot_runs([run_dir], tmp_path / "one.png")
    assert out == tmp_path / "one.png"
    assert_png(out)

    other = tmp_path / "other" / "a"  # the same name as the first run: labels need the parent too
    log_run(other, steps=30, loss_every=1, seed=1)
    assert run_labels([run_dir, other]) == ["runs/a", "other/a"]
    fig = make_figure([run_dir, other])
    loss_ax, val_ax = fig.axes[:2]
    assert [t.get_text() for t in loss_ax.get_legend().get_texts()] == ["runs/a", "other/a"]
    colours = {line.get_color() for line in loss_ax.lines}
    assert len(colours) == 2
    assert {line.get_label() for line in val_ax.lines} == {"runs/a", "runs/a · web", "runs/a · code", "other/a"}
    assert_png(plot_runs([run_dir, other], tmp_path / "two.png"))
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file


def test_partial_columns_still_plot(tmp_path):
    run_dir = tmp_path / "early"
    log_run(run_dir, steps=8, val_every=100)  # no validation yet
    assert "val/loss" not in read_metrics(run_dir)
    fig = make_figure([run_dir])
    assert fig.axes[0].lines and not fig.axes[1].lines and fig.axes[2].lines
    assert any("no validation yet" in t.get_text() for t in fig.axes[1].texts)
    assert_png(refresh(run_dir))


def test_missing_or_empty_metrics_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match=r"metrics\.csv: no such file"):
        plot_runs([tmp_path], tmp_path / "x.png")
    (tmp_path / METRICS_FILE).write_text("epoch,step,train/loss\r\n")
    with pytest.raises(MetricsError, match=r"metrics\.csv: no metrics logged yet"):
        plot_runs([tmp_path], tmp_path / "x.png")
    (tmp_path / METRICS_FILE).write_text("epoch,step,train/tokens_per_s\r\n0,1,12.5\r\n")
    with pytest.raises(MetricsError, match="no loss or lr logged yet"):
        plot_runs([tmp_path], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_every_cut_of_the_file_reads_as_its_complete_lines(tmp_path):
    """The logger appends, or rewrites the file from the header on, while refresh reads it: whatever prefix of the
    file a read sees, it gets the complete lines' values or 'nothing yet', never an error about the file."""
    run_dir = tmp_path / "r"
    log_run(run_dir, steps=12, val_every=6, sources=("web",))
    path = run_dir / METRICS_FILE
    full = path.read_bytes()
    complete = read_metrics(run_dir)
    for cut in range(len(full)):
        path.write_bytes(full[:cut])
        try:
            part = read_metrics(run_dir)
        except MetricsError as e:
            assert "no metrics logged yet" in str(e), cut
            assert full[:cut].count(b"\n") < 2, cut  # only before the first data row is complete
            continue
        for name, series in part.items():
            n = len(series.steps)
            assert series.steps.tolist() == complete[name].steps[:n].tolist(), (cut, name)
            assert series.values.tolist() == complete[name].values[:n].tolist(), (cut, name)
        # "epoch" is in every row: its length is the number of complete data rows.
        assert len(part["epoch"].steps) == full[:cut].count(b"\n") - 1, cut


def test_refresh_tolerates_a_half_written_last_line(tmp_path):
    run_dir = tmp_path / "r"
    logged = log_run(run_dir, steps=12)
    path = run_dir / METRICS_FILE
    full = path.read_bytes()
    path.write_bytes(full[:-7])  # inside the last row
    out = refresh(run_dir)
    assert out == run_dir / CURVES_FILE
    assert_png(out)
    assert read_metrics(run_dir)["train/lr"].steps.tolist() == logged["train/lr"][0][:-1]

    path.write_bytes(full[:9])  # the logger is rewriting the header
    assert refresh(run_dir) is None
    assert_png(out)  # the last good plot stays


def test_refresh_without_metrics_returns_none(tmp_path):
    assert refresh(tmp_path) is None
    assert not (tmp_path / CURVES_FILE).exists()


def test_main_writes_the_default_outputs(tmp_path, run, capsys, monkeypatch):
    run_dir, _ = run
    main([str(run_dir)])
    out = run_dir / CURVES_FILE
    assert capsys.readouterr().out.strip() == str(out)
    assert_png(out)

    other = tmp_path / "b"
    log_run(other, steps=20, seed=2)
    monkeypatch.chdir(tmp_path)
    main([str(run_dir), str(other)])
    assert capsys.readouterr().out.strip() == "runs.png"
    assert_png(tmp_path / "runs.png")

    main([str(run_dir), str(other), "-o", str(tmp_path / "cmp.png")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "cmp.png")
    assert_png(tmp_path / "cmp.png")


@pytest.mark.parametrize("case", ["missing dir", "no metrics.csv", "empty metrics.csv", "bad output"])
def test_main_bad_input_is_one_line_exit_2(tmp_path, run, capsys, case):
    run_dir, _ = run
    empty = tmp_path / "empty"
    empty.mkdir()
    argv, named = {
        "missing dir": ([str(tmp_path / "nope")], str(tmp_path / "nope")),
        "no metrics.csv": ([str(run_dir), str(empty)], str(empty / METRICS_FILE)),
        "empty metrics.csv": ([str(empty)], str(empty / METRICS_FILE)),
        "bad output": ([str(run_dir), "-o", str(tmp_path / "x.pdf")], str(tmp_path / "x.pdf")),
    }[case]
    if case == "empty metrics.csv":
        (empty / METRICS_FILE).write_text("")
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("rwkv7-plot: error: ") and named in lines[0], captured.err
