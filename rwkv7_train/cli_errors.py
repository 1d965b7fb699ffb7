"""One-line messages for what a user gets wrong on the `rwkv7-train` command line.

Hydra reports a mistyped key or config option in several lines after it has made the run directory. We compose
the same config first (Hydra's compose API, same search path) and turn its complaint into one line with the
closest valid names, so nothing is created for a command that could never run."""
import difflib
import re
from typing import Optional

from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from .errors import UserError

# Flags after which we leave the command line to Hydra (help, completion, sweeps, another primary config).
_HANDS_OFF = {"-h", "--help", "--hydra-help", "-m", "--multirun", "-i", "--info", "-sc", "--shell-completion",
              "-cn", "--config-name", "-cp", "--config-path", "--version"}
_WITH_VALUE = {"-c", "--cfg", "-p", "--package", "-cd", "--config-dir"}


def _keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    out = []
    for key in cfg.keys():
        full = f"{prefix}{key}"
        node = cfg._get_node(key)
        out.append(full)
        if isinstance(node, DictConfig) and full != "hydra":
            out += _keys(node, full + ".")
    return out


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="rwkv7_train.configs", version_base="1.3"):
        return compose("config", overrides=overrides)


def check_overrides(argv: list[str]) -> Optional[str]:
    """None when Hydra can compose `argv`; otherwise one line saying what is wrong and what was likely meant."""
    from hydra.errors import ConfigCompositionException, MissingConfigException

    if any(a.split("=")[0] in _HANDS_OFF for a in argv):
        return None
    overrides, args = [], iter(argv)
    for a in args:
        flag, _, value = a.partition("=")
        if flag in _WITH_VALUE:
            value = value or next(args, "")
            if flag in ("-cd", "--config-dir"):
                overrides.append(f"hydra.searchpath=[file://{value}]")
        elif not a.startswith("-"):
            overrides.append(a)
    try:
        _compose(overrides)
        return None
    except MissingConfigException as e:
        text = str(e)
        m = re.search(r"Could not find '([^']+)/([^']+)'", text)
        if not m:
            return text.splitlines()[0]
        group, option = m.groups()
        options = re.findall(r"^\t(\S+)$", text.split("Config search path")[0], flags=re.M)
        close = difflib.get_close_matches(option, options, n=1)
        hint = f" (did you mean {group}={close[0]}?)" if close else ""
        return f"{group}={option}: no such {group} config{hint}; available: {', '.join(options)}"
    except ConfigCompositionException as e:
        m = re.search(r"Could not override '([^']+)'", str(e))
        if not m:
            return str(e).splitlines()[0]
        key = m.group(1)
        others = [o for o in overrides if o.split("=")[0].lstrip("+~") != key]
        try:
            known = _keys(_compose(others))
        except ConfigCompositionException:
            known = []
        parent = key.rpartition(".")[0]
        siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent]
        close = [f"{parent}.{k}" if parent else k
                 for k in difflib.get_close_matches(key.rpartition(".")[2], siblings, n=3, cutoff=0.6)]
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        return (f"{key} is not a config key{hint}; `rwkv7-train --cfg job` lists every key, and +{key}=VALUE "
                "adds a new one")


def one_line(e: Exception) -> str:
    """The message of a UserError or config error, as one line."""
    if isinstance(e, MissingMandatoryValue):
        key = re.sub(r"\[(\d+)\]", r".\1", e.full_key)  # OmegaConf says a[1].b, Hydra overrides take a.1.b
        return f"{key} is required: set it on the command line, e.g. {key}=..."
    # A UserError raised in a DataLoader worker arrives wrapped in a traceback: its last line is the message.
    lines = [line for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    line = lines[-1].removeprefix(f"{UserError.__module__}.UserError: ") if isinstance(e, UserError) else lines[0]
    key = getattr(e, "full_key", None)
    return f"{key}: {line}" if key and key not in line else line

