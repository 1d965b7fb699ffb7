"""rwkv7-prep: text/jsonl -> binidx + manifest with the real World tokenizer; the CLI; the sample corpus."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rwkv7_data_prep.prep import prepare
from rwkv7_data_prep.sample import build_sample_corpus
from rwkv7_train.data.binidx import open_binidx
from rwkv7_train.errors import UserError

pytest.importorskip("rwkv7_train.tokenizer")


@pytest.fixture(scope="module")
def tok():
    from rwkv7_train.tokenizer import WorldTokenizer
    return WorldTokenizer()


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_jsonl_and_text_round_trip_through_the_tokenizer(tmp_path, tok):
    jsonl_docs = ["Hello, world.", "", "Ünïcödé 世界 🙂\nsecond line", "def f(x):\n    return x * 2\n"]
    (tmp_path / "a.jsonl").write_text(
        "\n".join(json.dumps({"id": i, "text": t}) for i, t in enumerate(jsonl_docs)) + "\n\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("A whole file is one document.\nEven with several lines.\n", encoding="utf-8")
    (tmp_path / "c.txt").write_bytes(b"caf\xe9 is latin-1, not UTF-8")
    inputs = [str(tmp_path / n) for n in ("a.jsonl", "b.txt", "c.txt")]

    manifest = prepare(inputs, str(tmp_path / "out" / "corpus"), tokenizer=tok)

    expected = [t for t in jsonl_docs if t] + [(tmp_path / "b.txt").read_text(encoding="utf-8")]
    r = open_binidx(tmp_path / "out" / "corpus")
    assert r.n_documents == len(expected)
    for i, text in enumerate(expected):
        doc = r.document(i)
        assert doc[-1] == 0
        assert tok.decode(doc[:-1].tolist()) == text
    assert manifest["documents"] == len(expected)
    assert manifest["tokens"] == r.n_tokens == sum(len(tok.encode(t)) + 1 for t in expected)
    assert manifest["skipped"] == {"empty": 1, "invalid_utf8": 1}
    assert manifest["tokenizer"] == tok.identity
    for kind in ("bin", "idx"):
        path = tmp_path / "out" / f"corpus.{kind}"
        assert manifest["files"][kind] == {"name": path.name, "bytes": path.stat().st_size, "sha256": sha256(path)}
    assert json.loads((tmp_path / "out" / "corpus.json").read_text()) == manifest


def test_jsonl_without_the_text_field_names_the_line_and_the_option(tmp_path, tok):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"content": "no text key"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"a\.jsonl line 2: no field 'text'.*--text-key"):
        prepare([str(tmp_path / "a.jsonl")], str(tmp_path / "corpus"), tokenizer=tok)
    assert not (tmp_path / "corpus.bin").exists() and not (tmp_path / "corpus.idx").exists()


def rwkv7_prep(*args):
    script = Path(sys.executable).with_name("rwkv7-prep")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "rwkv7_data_prep.cli"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=60)


def test_cli_help_describes_inputs_output_and_options():
    result = rwkv7_prep("--help")
    assert result.returncode == 0
    for word in ("INPUT", "--output", "--format", "--text-key", "binidx", "manifest"):
        assert word in result.stdout


def test_cli_error_is_one_line_with_exit_code_2(tmp_path):
    result = rwkv7_prep(str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith(f"rwkv7-prep: error: input not found: {tmp_path / 'missing.jsonl'}")


def test_cli_writes_the_files_and_prints_a_summary(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "one"}\n{"body": "two"}\n', encoding="utf-8")
    result = rwkv7_prep(str(tmp_path / "a.jsonl"), "--output", str(tmp_path / "c"), "--text-key", "body")
    assert result.returncode == 0, result.stderr
    assert "2 documents" in result.stdout and "c.bin, c.idx, c.json" in result.stdout
    assert open_binidx(tmp_path / "c").n_documents == 2


def test_sample_corpus_is_built_once_and_then_reused(tmp_path, tok):
    train, val = build_sample_corpus(str(tmp_path), tokenizer=tok)
    files = [Path(f"{prefix}.{ext}") for prefix in (train, val) for ext in ("bin", "idx", "json")]
    stamps = {f: f.stat().st_mtime_ns for f in files}
    tr, va = open_binidx(train), open_binidx(val)
    assert tr.n_documents >= 19 * va.n_documents > 0
    assert tr.n_tokens > 1_000_000  # a few MB of source

    assert build_sample_corpus(str(tmp_path), tokenizer=tok) == (train, val)
    assert {f: f.stat().st_mtime_ns for f in files} == stamps


def test_sample_corpus_with_a_missing_manifest_is_rebuilt(tmp_path, tok):
    train, val = build_sample_corpus(str(tmp_path), tokenizer=tok)
    # As if the build had stopped before writing the val manifest: it must not count as finished.
    os.unlink(f"{val}.json")
    before = Path(f"{train}.bin").stat().st_mtime_ns
    build_sample_corpus(str(tmp_path), tokenizer=tok)
    assert Path(f"{val}.json").exists()
    assert Path(f"{train}.bin").stat().st_mtime_ns != before
