"""A prepared source's manifest: reading it, verifying its shards, and refusing a vocabulary that does not match."""

import json
import re
import shutil

import pytest

from rwkv7_data_prep.prep import prepare
from rwkv7_train.data.binidx import open_binidx
from rwkv7_train.data.manifest import (
    check_vocab, is_source_dir, read_manifest, shard_name, verify_shard, write_manifest,
)
from rwkv7_train.errors import UserError
from rwkv7_train.tokenizer import WorldTokenizer


@pytest.fixture(scope="module")
def tok():
    return WorldTokenizer()


@pytest.fixture(scope="module")
def built(tmp_path_factory, tok):
    """A real source of three or more shards, written by rwkv7-prep; tests work on copies of it."""
    root = tmp_path_factory.mktemp("built")
    lines = [json.dumps({"text": f"document {i}: " + "words and more words " * (i % 17 + 1)}) for i in range(60)]
    (root / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    prepare([str(root / "a.jsonl")], root / "src", shard_tokens=400, workers=1, tokenizer=tok)
    return root / "src"


@pytest.fixture
def src(built, tmp_path):
    shutil.copytree(built, tmp_path / "src")
    return tmp_path / "src"


def edit(src, change):
    path = src / "manifest.json"
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))
    return path


def test_shard_prefixes_are_absolute_and_open_as_binidx(src, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    m = read_manifest("src")  # a relative directory still gives absolute prefixes
    prefixes = m.shard_prefixes()
    assert len(prefixes) >= 3
    assert prefixes == [str(src / shard_name(i)) for i in range(len(m.shards))]
    readers = [open_binidx(p) for p in prefixes]
    assert sum(r.n_documents for r in readers) == m.documents == 60
    assert sum(r.n_tokens for r in readers) == m.tokens


def test_write_then_read_gives_the_same_manifest(src):
    m = read_manifest(src)
    m.name = "renamed"
    write_manifest(m)
    assert read_manifest(src) == m
    assert not [p for p in src.iterdir() if p.name.endswith(".tmp")]


def test_is_source_dir(src, tmp_path):
    assert is_source_dir(src)
    assert not is_source_dir(tmp_path)
    assert not is_source_dir(src / "shard-00000")


def test_verify_passes_on_the_files_as_written(src):
    m = read_manifest(src)
    for i in range(len(m.shards)):
        verify_shard(m, i)


def test_truncated_shard_fails_the_size_check_naming_the_file_and_the_fix(src):
    m = read_manifest(src)
    path = src / "shard-00001.bin"
    path.write_bytes(path.read_bytes()[:-2])
    expected = (f"{path} is {m.shards[1].bytes_bin - 2} bytes, {src / 'manifest.json'} says {m.shards[1].bytes_bin}: "
                f"truncated or replaced; re-run rwkv7-prep on {src} (same inputs and options) to rebuild it")
    with pytest.raises(UserError, match=re.escape(expected)):
        verify_shard(m, 1, full=False)


def test_corrupt_shard_of_the_right_size_fails_only_the_full_check(src):
    m = read_manifest(src)
    path = src / "shard-00002.idx"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    verify_shard(m, 2, full=False)
    with pytest.raises(UserError, match=re.escape(f"{path} fails its sha256 checksum from {src / 'manifest.json'}")):
        verify_shard(m, 2)


def test_missing_shard_file_is_named(src):
    (src / "shard-00000.idx").unlink()
    with pytest.raises(UserError, match=re.escape(f"{src / 'shard-00000.idx'} is missing")):
        verify_shard(read_manifest(src), 0, full=False)


def test_vocab_or_tokenizer_other_than_the_models_is_refused(src, tok):
    m = read_manifest(src)
    check_vocab(m, 65536, tok.identity)
    with pytest.raises(UserError, match=re.escape(
            f"{src / 'manifest.json'}: the source was tokenized for vocab_size 65536 ({tok.identity}) but the model "
            "has vocab_size 50304; set model.vocab_size=65536 or re-run rwkv7-prep with the model's tokenizer")):
        check_vocab(m, 50304)
    with pytest.raises(UserError, match=re.escape(
            f"{src / 'manifest.json'}: the source was tokenized with {tok.identity} but the model uses other.txt")):
        check_vocab(m, 65536, "other.txt")


def test_incomplete_source_is_refused_unless_allowed(src):
    edit(src, lambda raw: raw.update(complete=False))
    with pytest.raises(UserError, match=r"manifest\.json: the source is incomplete .*re-run the same rwkv7-prep"):
        read_manifest(src)
    assert not read_manifest(src, allow_incomplete=True).complete


def test_missing_manifest_says_what_a_source_is(tmp_path):
    with pytest.raises(UserError, match=r"manifest\.json not found; a prepared source is a directory written by"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("change, message", [
    (lambda raw: raw.clear(), r"is not an rwkv7-source manifest"),
    (lambda raw: raw.update(version=2), r"has manifest version 2, this rwkv7-train reads version 1"),
    (lambda raw: raw.pop("tokenizer"), r"lacks or mistypes a field \('tokenizer'\)"),
    (lambda raw: raw["shards"][0].update(documents="many"), r"lacks or mistypes a field"),
    (lambda raw: raw["shards"][1].update(prefix="../elsewhere"), r"shard prefix '\.\./elsewhere' is not a plain"),
    (lambda raw: raw["shards"][1].update(first_document=0), r"shard shard-00001 does not continue the document"),
    (lambda raw: raw.update(tokens=raw["tokens"] + 1), r"totals \(60 documents, \d+ tokens\) differ from the sum"),
])
def test_malformed_manifest_is_refused_with_the_fix(src, change, message):
    path = edit(src, change)
    with pytest.raises(UserError, match=rf"{re.escape(str(path))}.*{message}.*re-run rwkv7-prep with --output"):
        read_manifest(src)


def test_unreadable_manifest_is_refused(src):
    (src / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match=r"manifest\.json is not readable JSON"):
        read_manifest(src)
