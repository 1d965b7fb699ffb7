"""Every command the docs show is run by a test, and docs/configuration.md is what the configs say.

The convention, for README.md and docs/*.md:

- The commands are the lines of ```bash fenced blocks (a trailing `\\` continues a line; `#` starts a comment).
  A line is cut into simple commands at `&&`, `||`, `;` and `|`; leading `VAR=value` assignments are the
  environment, and `...` stands for "your other arguments" and is dropped.
- Our commands are checked; others (pip, rm, wandb, srun, ...) are the reader's business:
  * `rwkv7-train ...` (or `python -m rwkv7_train.train ...`) is composed as `rwkv7-train ... --cfg job` composes
    it: Hydra's flags are parsed, then `cli_errors.check_overrides` composes the config with the same search path,
    which is what the entry point does before Hydra runs and what makes a bad group option or key exit 2. This
    runs in this process (one subprocess compares it with the real `--cfg job`). Paths are not opened, so
    placeholders such as /data/world_v3 or outputs/DATE/TIME are fine.
  * `rwkv7-prep`, `rwkv7-convert`, `rwkv7-generate`, `rwkv7-plot` (or `python -m` their module) and
    `python scripts/NAME.py`: their argument parser reads the arguments as written (subcommand, options, types);
    nothing runs.
  * `scripts/NAME.sh` and `sbatch scripts/NAME`: the file exists and is executable; the overrides given to
    scripts/torchrun_train.sh are composed with what it adds (hydra.run.dir=RUN_DIR resume_from=auto).
- A ```yaml block whose first line is a comment naming a relative path (`# conf/data/world_mix.yaml`) is written
  to that path in the doc's sandbox directory, where its commands are checked (so `--config-dir conf` finds it).
- docs/quickstart.md is also run for real, in order, in one temp directory, through bash (globs are the shell's),
  with a fresh RWKV7_TRAIN_CACHE and wandb offline, after `texts/` is filled with text files (the doc's "your own
  text files"). A line there holds only our commands or none. A block preceded by `<!-- docs-test: not run ... -->`
  is checked as above but not run (the full default job, which takes minutes).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import re
import runpy
import shlex
import subprocess
import sys
import sysconfig
import textwrap
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf

from cli_run import script

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
QUICKSTART = ROOT / "docs" / "quickstart.md"

# Console scripts and the modules `python -m` runs for them.
CLIS = {"rwkv7-train", "rwkv7-prep", "rwkv7-convert", "rwkv7-generate", "rwkv7-plot"}
MODULES = {"rwkv7_train.train": "rwkv7-train", "rwkv7_train.convert": "rwkv7-convert",
           "rwkv7_train.generate": "rwkv7-generate", "rwkv7_train.plot": "rwkv7-plot",
           "rwkv7_data_prep.cli": "rwkv7-prep"}
# What scripts/torchrun_train.sh adds to the overrides it is given (it takes RUN_DIR first).
LAUNCHER_ADDS = ["hydra.run.dir={run_dir}", "resume_from=auto"]

# Doc commands that cannot be checked as written, each with the reason. Keep this short: prefer a doc command
# that runs (a yaml block can provide a config file the command needs).
NOT_CHECKED: dict[tuple[str, str], str] = {}

# The reader's own files that a doc's commands name but the doc does not show, by (doc, path): written into the
# doc's sandbox, which stands in for the home directory (`~`) too.
READER_FILES = {
    ("README.md", "~/my_configs/experiment/my_run.yaml"):
        "# @package _global_\ndefaults:\n  - override /model: 0.1b\ntrainer:\n  max_steps: 1000\n",
}


@dataclass(frozen=True)
class Command:
    doc: Path
    line: int            # of the doc, where the command's logical line starts
    text: str            # the logical line, as bash would read it
    argv: tuple          # the simple command: program and arguments, environment assignments and `...` dropped
    run: bool            # a quickstart command that is run for real

    @property
    def id(self) -> str:
        return f"{self.doc.name}:{self.line}:{' '.join(self.argv)[:60]}"


def blocks(doc: Path):
    """(language, first line number of the body, body, docs-test mark) of every fenced block."""
    text = doc.read_text()
    fence = re.compile(r"^(?:[ ]*<!--\s*docs-test:\s*(?P<mark>.*?)\s*-->\n)?(?P<indent>[ ]*)```(?P<lang>[\w-]*)\n"
                       r"(?P<body>.*?)^(?P=indent)```", re.M | re.S)   # a fence may be indented (in a list item)
    for m in fence.finditer(text):
        body = textwrap.dedent(m["body"])
        yield m["lang"], text.count("\n", 0, m.start("body")) + 1, body, m["mark"] or ""


def logical_lines(body: str, first: int):
    """(line number, text) of a shell block's lines, continuations joined."""
    pending, start = "", first
    for n, line in enumerate(body.splitlines(), first):
        if not pending:
            start = n
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield start, pending + line
        pending = ""
    if pending:
        yield start, pending


def simple_commands(text: str) -> list[list[str]]:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    out, current = [], []
    for token in lexer:
        if token in ("&&", "||", ";", "|", "&"):
            out.append(current)
            current = []
        else:
            current.append(token)
    out.append(current)
    commands = []
    for c in out:
        while c and re.match(r"[A-Za-z_][A-Za-z0-9_]*=", c[0]):   # VAR=value before the program
            c = c[1:]
        if c:
            commands.append([t for t in c if t != "..."])
    return commands


def program(argv) -> str | None:
    """Which of our commands argv runs (a console script name, `script`, `launcher`), or None."""
    name = argv[0]
    if name in CLIS:
        return name
    if name in ("python", "python3") and len(argv) > 1:
        if argv[1] == "-m" and len(argv) > 2 and argv[2] in MODULES:
            return MODULES[argv[2]]
        if argv[1].startswith("scripts/"):
            return "script"
    if name.startswith("scripts/") or (name in ("sbatch", "bash") and len(argv) > 1 and argv[1].startswith("scripts/")):
        return "launcher"
    return None


def arguments(argv) -> list[str]:
    """The arguments after the program (after `python -m MODULE` or `python SCRIPT`)."""
    if argv[0] in ("python", "python3"):
        return list(argv[3:] if argv[1] == "-m" else argv[2:])
    return list(argv[1:])


def doc_commands(doc: Path) -> list[Command]:
    out = []
    for lang, first, body, mark in blocks(doc):
        if lang != "bash":
            continue
        run = doc == QUICKSTART and not mark.startswith("not run")
        for line, text in logical_lines(body, first):
            for argv in simple_commands(text):
                if program(argv):
                    out.append(Command(doc, line, text, tuple(argv), run))
    return out


def files_of(doc: Path) -> dict[str, str]:
    """The yaml blocks that name their path in their first line, by that path."""
    out = {}
    for lang, _, body, _ in blocks(doc):
        m = re.match(r"#\s*([\w./-]+\.ya?ml)\s*\n", body)
        if lang == "yaml" and m and not m.group(1).startswith("/"):
            out[m.group(1)] = body
    return out


ALL = [c for doc in DOCS for c in doc_commands(doc)]
QUICKSTART_RUN = [c for c in ALL if c.run]


# ---- checking a command without running it -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def sandboxes(tmp_path_factory):
    """Per doc, a directory holding the files its yaml blocks name: commands are checked from there."""
    out = {}
    for doc in DOCS:
        d = tmp_path_factory.mktemp(doc.stem)
        reader = {path.removeprefix("~/"): text for (name, path), text in READER_FILES.items() if name == doc.name}
        for rel, text in {**files_of(doc), **reader}.items():
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / rel).write_text(text)
        out[doc] = d
    return out


def compose_problem(args: list[str]) -> str | None:
    """What `rwkv7-train ARGS --cfg job` would stop on, or None when it composes."""
    from hydra._internal.utils import get_args_parser

    from rwkv7_train.cli_errors import check_overrides

    with parsed_only() as parsed:
        try:
            get_args_parser().parse_args([*args, "--cfg", "job"])
        except _Parsed:
            pass
        except SystemExit as e:
            return f"Hydra rejects the flags (exit {e.code}): {parsed.stderr}"
    return check_overrides([*args, "--cfg", "job"])


class _Parsed(Exception):
    """Raised by the argument parser once it has read the arguments: the command stops before doing anything."""


class _Capture:
    stderr = ""


@contextmanager
def parsed_only():
    """Make ArgumentParser.parse_args (the top-level parse every CLI here makes first) stop the program with
    _Parsed once the arguments have been read; argparse's own errors still exit 2, their message kept."""
    original = argparse.ArgumentParser.parse_args
    capture = _Capture()

    def parse_args(self, args=None, namespace=None):
        original_error = self.error

        def error(message):
            capture.stderr = message
            original_error(message)
        self.error = error
        original(self, args, namespace)
        raise _Parsed

    argparse.ArgumentParser.parse_args = parse_args
    try:
        yield capture
    finally:
        argparse.ArgumentParser.parse_args = original


def console_main(name: str):
    found = [ep for ep in importlib.metadata.entry_points(group="console_scripts") if ep.name == name]
    assert found, f"{name} is not installed (no console script of that name): pip install -e ."
    return found[0].load()


def parse_problem(name: str, run, args: list[str], monkeypatch) -> str | None:
    """None when NAME's argument parser accepts ARGS (run: calls the program's main with sys.argv set)."""
    monkeypatch.setattr(sys, "argv", [name, *args])
    with parsed_only() as parsed:
        try:
            run()
        except _Parsed:
            return None
        except SystemExit as e:
            if e.code in (0, None):   # --help
                return None
            return f"{name} rejects its arguments (exit {e.code}): {parsed.stderr}"
    return f"{name} ran without parsing its arguments with argparse: this test cannot check it"


@pytest.mark.parametrize("cmd", ALL, ids=lambda c: c.id)
def test_doc_command_is_valid(cmd, sandboxes, monkeypatch):
    if (cmd.doc.name, " ".join(cmd.argv)) in NOT_CHECKED:
        pytest.skip(NOT_CHECKED[(cmd.doc.name, " ".join(cmd.argv))])
    monkeypatch.chdir(sandboxes[cmd.doc])
    monkeypatch.setenv("HOME", str(sandboxes[cmd.doc]))
    name = program(cmd.argv)
    args = [os.path.expanduser(a) if a.startswith("~/") else a for a in arguments(cmd.argv)]   # as bash does
    if name == "rwkv7-train":
        problem = compose_problem(args)
    elif name == "launcher":
        path = ROOT / (cmd.argv[1] if cmd.argv[0] in ("sbatch", "bash") else cmd.argv[0])
        assert path.is_file(), f"{cmd.id}: {path.relative_to(ROOT)} does not exist"
        if cmd.argv[0].startswith("scripts/"):   # run as a program: it must be executable
            assert os.access(path, os.X_OK), f"{cmd.id}: {path.relative_to(ROOT)} is not executable"
        problem = None
        if path.name == "torchrun_train.sh":
            assert args, f"{cmd.id}: scripts/torchrun_train.sh needs RUN_DIR first"
            problem = compose_problem([a.format(run_dir=args[0]) for a in LAUNCHER_ADDS] + args[1:])
    elif name == "script":
        path = ROOT / cmd.argv[1]
        assert path.is_file(), f"{cmd.id}: {cmd.argv[1]} does not exist"
        monkeypatch.syspath_prepend(str(path.parent))   # as `python SCRIPT` does: its siblings import
        problem = parse_problem(cmd.argv[1], lambda: runpy.run_path(str(path), run_name="__main__"), args,
                                monkeypatch)
    else:
        problem = parse_problem(name, console_main(name), args, monkeypatch)
    assert problem is None, f"{cmd.doc.relative_to(ROOT)} line {cmd.line}: {' '.join(cmd.argv)}\n  {problem}"


def test_the_docs_show_commands_of_every_kind():
    """The parametrized test above sees the docs' commands (a parser that found none would pass vacuously)."""
    seen = {program(c.argv) for c in ALL}
    assert {"rwkv7-train", "rwkv7-prep", "rwkv7-convert", "rwkv7-generate", "launcher"} <= seen
    assert len(QUICKSTART_RUN) >= 6


def test_a_wrong_key_or_option_is_caught(sandboxes, monkeypatch):
    monkeypatch.chdir(sandboxes[DOCS[0]])
    assert "did you mean model.n_layer" in compose_problem(["model.nlayer=3"])
    assert "no such model config" in compose_problem(["model=0.2b"])
    assert "Hydra rejects" in compose_problem(["--cfgg", "job"])
    with monkeypatch.context() as m:
        assert "invalid choice" in parse_problem("rwkv7-convert", console_main("rwkv7-convert"),
                                                 ["exprot", "a.ckpt", "b.pth"], m)


@pytest.mark.slow
def test_in_process_compose_is_what_cfg_job_prints(env, tmp_path):
    """The in-process check composes the config `rwkv7-train --cfg job` prints, and placeholder paths are not
    opened: no cache, corpus or run directory is created."""
    from hydra import compose, initialize_config_module

    args = ["model=0.1b", "data=binidx", "data.train_path=/data/world_v3", "strategy=deepspeed_stage_2",
            "trainer.devices=8", "resume_from=outputs/DATE/TIME/checkpoints/last.ckpt", "init_from=/data/x.pth"]
    cache = tmp_path / "cache"
    proc = subprocess.run([script("rwkv7-train"), *args, "--cfg", "job"], cwd=tmp_path, capture_output=True,
                          text=True, env={**env, "RWKV7_TRAIN_CACHE": str(cache)}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with initialize_config_module(config_module="rwkv7_train.configs", version_base="1.3"):
        cfg = compose("config", overrides=args)
    assert proc.stdout.strip() == OmegaConf.to_yaml(cfg).strip()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---- the quickstart, run for real ---------------------------------------------------------------------------------
def write_texts(directory: Path, max_bytes: int = 400_000, max_file: int = 30_000) -> None:
    """The quickstart's "your own text files": small standard-library sources, one document per .txt file (about
    40 documents, 150K tokens: enough windows for the quickstart's ctx_len 128, and 4 held out)."""
    directory.mkdir(parents=True)
    total = 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text) > max_file:
            continue
        (directory / f"{path.stem}.txt").write_text(text)
        total += len(text)
        if total > max_bytes:
            break


@pytest.fixture(scope="module")
def quickstart(env, tmp_path_factory):
    """Runs the quickstart's commands in order in one directory; returns it and each command's process."""
    cwd = tmp_path_factory.mktemp("quickstart")
    write_texts(cwd / "texts")
    run_env = {**env, "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
               "OMP_NUM_THREADS": "1"}   # one thread per process: CI's 2 cores, DataLoader workers included
    by_line, results = {}, {}
    for cmd in QUICKSTART_RUN:
        others = [a for a in simple_commands(cmd.text) if not program(a)]
        assert not others, f"quickstart line {cmd.line} mixes our commands with others: {cmd.text}"
        if (cmd.line, cmd.text) not in by_line:   # a line holding several of our commands runs once
            by_line[cmd.line, cmd.text] = subprocess.run(["bash", "-c", cmd.text], cwd=cwd, env=run_env,
                                                         capture_output=True, text=True, timeout=600)
        results[cmd] = by_line[cmd.line, cmd.text]
    return cwd, results


@pytest.mark.slow
@pytest.mark.parametrize("cmd", QUICKSTART_RUN, ids=lambda c: c.id)
def test_quickstart_command_runs(cmd, quickstart):
    proc = quickstart[1][cmd]
    assert proc.returncode == 0, (f"docs/quickstart.md line {cmd.line}: `{cmd.text}` exited {proc.returncode}\n"
                                  f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def quickstart_output(quickstart, starts: str) -> str:
    """stdout + stderr of the quickstart commands whose text starts with `starts`, in order."""
    return "".join(p.stdout + p.stderr for c, p in quickstart[1].items() if c.text.startswith(starts))


@pytest.mark.slow
def test_quickstart_writes_what_it_promises(quickstart):
    cwd = quickstart[0]
    run = cwd / "runs" / "mytext"
    assert (cwd / "data" / "mytext" / "manifest.json").is_file()
    assert (cwd / "data" / "mytext_val" / "manifest.json").is_file()
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "step10.ckpt", "step20.ckpt", "step30.ckpt"]
    assert (run / "resolved_config.yaml").is_file()
    assert list((run / "wandb").glob("offline-run-*"))
    assert (cwd / "mytext.pth").is_file()
    train_out = quickstart_output(quickstart, "rwkv7-train")
    assert "resuming from" in train_out and "(step 20)" in train_out
    assert str(run) in train_out   # the summaries name the run directory


@pytest.mark.slow
def test_quickstart_run_directory_has_metrics_and_curves(quickstart):
    """metrics.csv and curves.png are written into the run directory at each checkpoint."""
    run = quickstart[0] / "runs" / "mytext"
    assert (run / "metrics.csv").is_file()
    assert (run / "curves.png").is_file()
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert "train/loss" in header


# ---- docs/configuration.md ----------------------------------------------------------------------------------------
def config_reference():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_configuration_md_is_generated_from_the_configs():
    ref = config_reference()
    assert ref.OUTPUT.read_text() == ref.render(), \
        "docs/configuration.md is out of date with configs/: run python scripts/config_reference.py"


def leaf_keys(node, prefix: str) -> list[str]:
    """Dotted keys of a composed config's values; a list counts by its items (data.sources.0)."""
    if isinstance(node, DictConfig):
        return [k for key in node.keys() for k in leaf_keys(node._get_node(key), f"{prefix}.{key}".lstrip("."))]
    if isinstance(node, ListConfig) and len(node) and isinstance(node._get_node(0), DictConfig):
        return [f"{prefix}.{i}" for i in range(len(node))]
    return [prefix]


def test_configuration_md_lists_every_key_hydra_composes():
    """Every key of every group option, and every top-level key, as Hydra composes them, is in the reference."""
    from hydra import compose, initialize_config_module

    ref = config_reference()
    text = ref.OUTPUT.read_text()
    missing = []
    with initialize_config_module(config_module="rwkv7_train.configs", version_base="1.3"):
        cfg = compose("config")
        groups = ref.groups()
        top = [k for k in leaf_keys(cfg, "") if k.split(".")[0] not in groups and not k.startswith("hydra.")]
        missing += [k for k in top if f"`{k}`" not in text]
        for group, options in groups.items():
            if group == "experiment":   # experiments set keys of other groups: their rows are their own file's
                continue
            for option in options:
                section = text.split(f"### `{group}={option}`")[1].split("\n### ")[0]
                composed = compose("config", overrides=[f"{group}={option}"])
                missing += [f"{group}={option}: {k}" for k in leaf_keys(composed[group], group)
                            if f"`{k}`" not in section]
    assert not missing, f"keys missing from docs/configuration.md: {missing}"
