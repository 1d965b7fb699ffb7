"""Write docs/configuration.md, the reference of every config group, option and key, from the files in configs/.

    python scripts/config_reference.py            # (re)write docs/configuration.md
    python scripts/config_reference.py --check    # exit 1 if docs/configuration.md is not what this would write

Defaults are shown as written in the YAML (`6e-4`, `${model.vocab_size}`, `???`) and descriptions are the YAML's own
comments: the comment at the end of a key's line, else the comment lines right above it; a file's leading comment
describes the option. An option whose defaults list names another option of its group (deepspeed_stage_2_offload)
shows the keys it inherits too. The YAML subset the configs use is read line by line: mappings by indentation,
flow lists, block lists (the `defaults` list; a list of mappings becomes one row per item) and block scalars.
tests/test_docs.py runs the --check comparison, and checks that every key Hydra composes appears here.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
OUTPUT = ROOT / "docs" / "configuration.md"
PRIMARY = "config.yaml"


@dataclass
class Key:
    path: str          # dotted, relative to the file's package (model.n_layer is `n_layer` in model/*.yaml)
    default: str       # as written in the file, or a rendering of the parsed value
    comment: str = ""
    literal: bool = True   # the default is YAML to show as code (not a remark such as "(3 lines of text)")


@dataclass
class ConfigFile:
    description: str = ""
    package: str = ""                                     # "_global_" for `# @package _global_`
    defaults: list[str] = field(default_factory=list)     # the defaults list's entries, as written
    keys: list[Key] = field(default_factory=list)


def _split_comment(text: str) -> tuple[str, str]:
    """(code, comment) of one line: the first `#` outside quotes that starts the line or follows a space."""
    quote = None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1] in " \t"):
            return text[:i].rstrip(), text[i + 1:].strip()
    return text.rstrip(), ""


def _flow(value) -> str:
    """A parsed YAML value in one line of flow style: {name: web_en, path: ???, weight: 0.4, val_path: null}."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def parse(path: Path) -> ConfigFile:
    """Keys, defaults as written, and comments of one config file."""
    lines = path.read_text().splitlines()
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    out = ConfigFile()

    # The leading comment block describes the file (the option); `# @package` is Hydra's directive.
    i = 0
    header = []
    while i < len(lines) and lines[i].lstrip().startswith("#"):
        text = lines[i].lstrip()[1:].strip()
        m = re.fullmatch(r"@package\s+(\S+)", text)
        if m:
            out.package = m.group(1)
        else:
            header.append(text)
        i += 1
    out.description = _join(header)

    stack: list[tuple[int, str]] = []   # (indent, key) of the mappings that enclose the current line
    above: list[str] = []               # comment lines waiting for the key below them
    while i < len(lines):
        raw = lines[i]
        code, comment = _split_comment(raw)
        i += 1
        if not code.strip():
            # A comment line is kept for the key below it; a blank line ends such a block.
            above = above + [comment] if comment or raw.strip().startswith("#") else []
            continue
        indent = len(code) - len(code.lstrip())
        m = re.fullmatch(r"([^:#\s][^:]*?):(?:\s+(.*))?", code.strip())
        if not m:
            raise SystemExit(f"{path}:{i}: cannot read this line (not a `key: value`): {raw.strip()}")
        key, value = m.group(1), (m.group(2) or "").strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([k for _, k in stack] + [key])
        note = comment or _join(above)
        above = []

        nested = [ln for ln in _block(lines, i, indent)]
        if value in ("|", ">", "|-", ">-", "|+", ">+"):    # block scalar: its text is the value
            i += len(nested)
            text = _get(values, dotted)
            out.keys.append(Key(dotted, f"({text.count(chr(10))} lines of text)", note, literal=False))
        elif not value and nested and nested[0].lstrip().startswith("- "):   # block list
            i += len(nested)
            items = _get(values, dotted)
            if dotted == "defaults" and not stack:
                out.defaults = [_flow(item) if not isinstance(item, dict) else
                                ", ".join(f"{k}: {_flow(v)}" for k, v in item.items()) for item in items]
            else:
                out.keys += [Key(f"{dotted}.{n}", _flow(item),
                                 note if n == 0 else f"another item like `{dotted}.0`") for n, item in enumerate(items)]
        elif not value and nested:                          # a mapping: its keys follow
            stack.append((indent, key))
            if note:   # a comment on the mapping itself applies to all its keys: keep it on a row of its own
                out.keys.append(Key(dotted, "", note))
        else:
            out.keys.append(Key(dotted, value if value else "null", note))
    return out


def _block(lines: list[str], start: int, indent: int) -> list[str]:
    """The lines after a key that belong to it: more indented than the key (a block list may sit at its indent)."""
    block = []
    for line in lines[start:]:
        code = _split_comment(line)[0]
        if code.strip():
            this = len(code) - len(code.lstrip())
            if this < indent or (this == indent and not code.lstrip().startswith("- ")):
                break
        block.append(line)
    while block and not _split_comment(block[-1])[0].strip():   # trailing comments belong to what follows
        block.pop()
    return block


def _get(values, dotted: str):
    for part in dotted.split("."):
        values = values[part]
    return values


def _join(comments: list[str]) -> str:
    """Comment lines as one run of text: an example line (`#   rwkv7-train ...`) and `key=value` settings become
    code, and a line that ends without punctuation before one that starts a sentence gets its full stop."""
    parts = []
    for c in comments:
        if not c:
            continue
        if re.match(r"(rwkv7-\w+|python)\b", c) and parts:
            command, *rest = re.split(r"\s{3,}", c, maxsplit=1)   # a remark after the command, set off by spaces
            c = f"`{command}`" + "".join(f" {r}" for r in rest)
            if not parts[-1].endswith(":"):
                c = f"Example: {c}"
        else:
            c = re.sub(r"\s{2,}", " ", c)
            c = re.sub(r"(?<![`\w])([\w.]+=[^\s`]*[^\s,;.`)])", r"`\1`", c)
        if parts and not re.search(r"[.:;,!?)]$", parts[-1]) and re.match(r"[A-Z`]", c):
            parts[-1] += "."
        parts.append(c)
    return " ".join(parts)


# ---- rendering ---------------------------------------------------------------------------------------------------
def _md(text: str) -> str:
    """Comment text as Markdown: `<name>` outside code spans is escaped (it would read as an HTML tag)."""
    pieces = text.split("`")
    for i in range(0, len(pieces), 2):   # the even pieces are outside code spans
        pieces[i] = pieces[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(pieces)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


def _table(rows: list[Key], prefix: str) -> list[str]:
    out = ["| key | default | description |", "|---|---|---|"]
    for k in rows:
        default = _code(k.default) if k.literal else k.default
        out.append(f"| `{prefix}{k.path}` | {_cell(default)} | {_cell(_md(_join([k.comment])))} |")
    return out


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def groups(configs: Path = CONFIGS) -> dict[str, dict[str, Path]]:
    """Every group (a directory holding .yaml files) and its options, in the primary config's defaults order, then
    any other group by name."""
    primary = parse(configs / PRIMARY)
    order = [d.split(":")[0].strip() for d in primary.defaults if ":" in d]
    found = {p.parent.relative_to(configs).as_posix() for p in configs.glob("*/**/*.yaml")}
    names = [g for g in order if g in found] + sorted(found - set(order))
    return {g: {p.stem: p for p in sorted((configs / g).glob("*.yaml"))} for g in names}


def _inherited(group_dir: Path, cfg: ConfigFile, seen=()) -> list[Key]:
    """The keys of the options this one's defaults list names (same group), then its own: each key once, at its
    first place, with this file's value and comment where it sets them (its parent's comment otherwise)."""
    keys: dict[str, Key] = {}
    for entry in cfg.defaults:
        if entry == "_self_" or ":" in entry or entry in seen:
            continue
        parent = parse(group_dir / f"{entry}.yaml")
        for k in _inherited(group_dir, parent, (*seen, entry)):
            keys[k.path] = k
    for k in cfg.keys:
        inherited = keys[k.path].comment if k.path in keys else ""
        keys[k.path] = Key(k.path, k.default, k.comment or inherited, k.literal)
    return list(keys.values())


def render(configs: Path = CONFIGS) -> str:
    primary = parse(configs / PRIMARY)
    chosen = {d.split(":")[0].strip(): d.split(":", 1)[1].strip() for d in primary.defaults if ":" in d}
    all_groups = groups(configs)

    out = ["# Configuration reference", "",
           "<!-- Generated by scripts/config_reference.py from configs/: edit the YAML files and their comments, then "
           "run `python scripts/config_reference.py`. tests/test_docs.py fails when this file is out of date. -->",
           "",
           "Every config group, option and key of `rwkv7-train`, with its default as written in `configs/` and the "
           "comment beside it there. Pick an option with `group=option`, set a key with `key=value`, add a key that "
           "is not in the config with `+key=value`; `rwkv7-train [overrides] --cfg job` prints the composed config "
           "without running anything, and a key that does not exist stops with one line naming the closest ones. "
           "`???` marks a value you must give; `${...}` is an interpolation, resolved when the run starts. "
           "`--config-dir DIR` adds your own files (`DIR/GROUP/OPTION.yaml`) to these groups "
           "([data.md](data.md#a-mixture) has one).",
           "",
           f"- [Top level (`{PRIMARY}`)](#{_anchor(f'Top level ({PRIMARY})')})"]
    for g, options in all_groups.items():
        out.append(f"- [`{g}`](#{_anchor(g)}): " + ", ".join(f"`{o}`" for o in _ordered(options, chosen.get(g))))

    out += ["", f"## Top level ({PRIMARY})", ""]
    if primary.description:
        out += [_md(primary.description), ""]
    out += ["The groups and the option each takes unless you pick another (`null`: none):", "",
            "| group | default option |", "|---|---|"]
    out += [f"| `{g}` | `{o}` |" for g, o in chosen.items()]
    out += ["", *_table(primary.keys, ""), ""]

    for g, options in all_groups.items():
        out += [f"## {g}", ""]
        default = chosen.get(g)
        for name in _ordered(options, default):
            cfg = parse(options[name])
            title = f"### `{g}={name}`" + (" (default)" if name == default else "")
            out += [title, ""]
            if cfg.description:
                out += [_md(cfg.description), ""]
            prefix = f"{g.replace('/', '.')}."
            if cfg.package == "_global_":
                prefix = ""
                picks = [e.split(":", 1) for e in cfg.defaults if e.startswith("override ")]
                if picks:
                    out += ["Selects " + ", ".join(f"`{k.removeprefix('override /').strip()}={v.strip()}`"
                                                  for k, v in picks) + "; sets these keys anywhere in the config:",
                            ""]
            parents = [e for e in cfg.defaults if e != "_self_" and ":" not in e]
            if parents:
                out += ["Builds on " + ", ".join(f"`{g}={p}`" for p in parents) + ": its keys, with these values.",
                        ""]
            keys = _inherited(options[name].parent, cfg) if parents else cfg.keys
            out += [*_table(keys, prefix), "" ] if keys else ["No keys.", ""]
    return "\n".join(out).rstrip() + "\n"


def _ordered(options: dict, default) -> list[str]:
    return ([default] if default in options else []) + sorted(o for o in options if o != default)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write docs/configuration.md from configs/.")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if docs/configuration.md differs from what would be written")
    parser.add_argument("--uncommented", action="store_true",
                        help="write nothing; list the keys that have no comment in their YAML file")
    args = parser.parse_args(argv)
    if args.uncommented:
        for path in [CONFIGS / PRIMARY, *sorted(CONFIGS.glob("*/**/*.yaml"))]:
            bare = [k.path for k in parse(path).keys if not k.comment]
            if bare:
                print(f"{path.relative_to(ROOT)}: {', '.join(bare)}")
        return 0
    text = render()
    if args.check:
        if not OUTPUT.is_file() or OUTPUT.read_text() != text:
            print(f"{OUTPUT.relative_to(ROOT)} is out of date with configs/: run python scripts/config_reference.py",
                  file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
