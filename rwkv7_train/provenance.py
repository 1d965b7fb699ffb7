"""Which code a run used: the package version, and the git commit when the package is a git checkout (an editable
install of a clone). Stored with the run's hyperparameters (checkpoints, the wandb config) and printed at the start."""
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Optional

_PACKAGE_DIR = Path(__file__).resolve().parent


def _git(*args: str) -> Optional[str]:
    try:
        done = subprocess.run(["git", "-C", str(_PACKAGE_DIR), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_version() -> dict:
    """{"version", "git_commit", "git_dirty"}. The commit is given only when this package's folder is tracked by the
    git repository around it: a package installed into a virtualenv that sits inside some other checkout gets None."""
    try:
        package = version("rwkv7-train")
    except PackageNotFoundError:
        package = None
    tracked = bool(_git("ls-files", "--", "."))
    commit = _git("rev-parse", "HEAD") if tracked else None
    changes = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"version": package, "git_commit": commit, "git_dirty": None if changes is None else bool(changes)}


def describe(code: dict) -> str:
    """One line for the start summary: `rwkv7-train 0.1.0, git 85aaa84 (with local changes)`."""
    text = f"rwkv7-train {code['version'] or '(not installed)'}"
    if code["git_commit"]:
        text += f", git {code['git_commit'][:7]}" + (" (with local changes)" if code["git_dirty"] else "")
    return text
