"""rwkv7-prep: corpus -> sharded, resumable sources with the real World tokenizer; the CLI; the sample corpus."""

import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rwkv7_data_prep.encode import Encoder
from rwkv7_data_prep.prep import prepare
from rwkv7_data_prep.readers import RawBatch
from rwkv7_data_prep.sample import VAL_EVERY, build_sample_corpus
from rwkv7_train.data.binidx import open_binidx
from rwkv7_train.data.manifest import read_manifest, sha256_file
from rwkv7_train.errors import UserError
from rwkv7_train.tokenizer import WorldTokenizer


@pytest.fixture(scope="module")
def tok():
    return WorldTokenizer()


def random_texts(n, seed, words=(5, 120)):
    """Seeded documents of random words in a few scripts (multi-byte UTF-8 included)."""
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz" * 4 + "éüñßжщλπ中文字日本語한국🙂"
    vocab = ["".join(rng.choices(alphabet, k=rng.randint(1, 8))) for _ in range(500)]
    return [" ".join(rng.choices(vocab, k=rng.randint(*words))) for _ in range(n)]


def write_jsonl(path, texts, key="text"):
    path.write_text("".join(json.dumps({key: t, "n": i}, ensure_ascii=False) + "\n" for i, t in enumerate(texts)),
                    encoding="utf-8")
    return str(path)


def stream(manifest):
    """All tokens of a source, shard after shard."""
    return np.concatenate([open_binidx(p).tokens for p in manifest.shard_prefixes()])


def expected_stream(tok, texts):
    # Independent of the prep code: each document tokenized alone, then its end-of-document 0.
    return np.array([t for text in texts for t in tok.encode(text) + [0]], dtype=np.uint16)


def shard_bytes(manifest):
    return [(Path(f"{p}.bin").read_bytes(), Path(f"{p}.idx").read_bytes()) for p in manifest.shard_prefixes()]


def test_text_jsonl_and_parquet_round_trip_and_bad_documents_are_counted(tmp_path, tok, caplog):
    caplog.set_level(logging.WARNING, logger="rwkv7_data_prep")
    good = random_texts(6, seed=1)
    (tmp_path / "a.jsonl").write_bytes(
        (json.dumps({"text": good[0]}) + "\n\n" + json.dumps({"text": ""}) + "\r\n"
         + json.dumps({"text": good[1], "meta": {"x": 1}}) + "\n").encode()
        + b'{"text": "caf\xe9"}\n'  # latin-1, not UTF-8
        + b'{"text": "lone \\ud800 surrogate"}\n'  # valid JSON, but not encodable as UTF-8
        + json.dumps({"text": good[2]}, ensure_ascii=False).encode() + b"\n")
    (tmp_path / "b.txt").write_text(good[3] + "\r\nsecond line\n", encoding="utf-8", newline="")
    (tmp_path / "c.txt").write_bytes(b"\xff\xfe not UTF-8")
    (tmp_path / "d.txt").write_bytes(b"")
    pq.write_table(pa.table({"text": [good[4], None, "", good[5]], "id": [1, 2, 3, 4]}), tmp_path / "e.parquet")
    inputs = [str(tmp_path / n) for n in ("a.jsonl", "b.txt", "c.txt", "d.txt", "e.parquet")]

    [m] = prepare(inputs, tmp_path / "src", shard_tokens=500, workers=1, tokenizer=tok)

    texts = [good[0], good[1], good[2], good[3] + "\r\nsecond line\n", good[4], good[5]]
    np.testing.assert_array_equal(stream(m), expected_stream(tok, texts))
    assert (m.documents, m.tokens) == (len(texts), len(expected_stream(tok, texts)))
    assert m.skipped == {"empty": 4, "invalid_utf8": 3}
    assert m.complete and m.tokenizer == tok.identity and m.vocab_size == 65536
    assert [i["path"] for i in m.inputs] == [str(Path(p).absolute()) for p in inputs]
    assert [i["format"] for i in m.inputs] == ["jsonl", "text", "text", "text", "parquet"]
    warned = [r.getMessage() for r in caplog.records]
    assert any("a.jsonl line 5: not valid UTF-8" in w for w in warned)
    assert any("a.jsonl line 6: not valid UTF-8" in w for w in warned)
    assert any("c.txt: not valid UTF-8 (at offset 0)" in w for w in warned)


def test_jsonl_that_arrow_would_read_differently_is_read_as_json_loads_does(tmp_path, tok, caplog):
    # Each line is valid for Arrow's JSON reader, but json.loads reads it otherwise; blocks holding one must agree
    # with json.loads, and the blocks around them (parsed by Arrow) must be unaffected.
    caplog.set_level(logging.WARNING, logger="rwkv7_data_prep")
    texts = random_texts(3000, seed=12, words=(60, 120))  # > 2 MB: several blocks
    lines = [json.dumps({"text": t}, ensure_ascii=False).encode() for t in texts]
    lines[1500] = b'{"text": "kept", "other": "\xff"}'  # bad bytes outside the text: json.loads skips the line
    lines[1501] = b'{"text": "first", "text": "second"}'  # json.loads keeps the last
    lines[1502] = b"\xef\xbb\xbf" + lines[1502]  # a byte-order mark at the start of a line: json.loads reads on
    lines[1503] = b'{"text": null}'  # an empty document
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")

    [m] = prepare([str(tmp_path / "a.jsonl")], tmp_path / "src", workers=1, tokenizer=tok)

    kept = texts[:1500] + ["second", texts[1502]] + texts[1504:]
    np.testing.assert_array_equal(stream(m), expected_stream(tok, kept))
    assert m.skipped == {"empty": 1, "invalid_utf8": 1}
    assert [r.getMessage() for r in caplog.records if "not valid UTF-8" in r.getMessage()] == [
        f"{tmp_path / 'a.jsonl'} line 1501: not valid UTF-8 (at offset 27); document skipped"]


@pytest.mark.parametrize("line", [b'{"text": "a"}{"text": "b"}', b'{"text": "a"} {"text": "b"}',
                                  b'{"text": "a"}\r{"text": "b"}'])
def test_two_objects_on_one_jsonl_line_are_an_error_naming_the_line(tmp_path, tok, line):
    # Arrow's reader would take them as two rows (a lone CR ends a row for it); json.loads refuses the line.
    texts = random_texts(2000, seed=13, words=(60, 120))
    lines = [json.dumps({"text": t}).encode() for t in texts]
    lines[1200] = line
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n\n  \n")  # blank lines: fewer rows than lines
    with pytest.raises(UserError, match=r"a\.jsonl line 1201: not valid JSON \(Extra data\)"):
        prepare([str(tmp_path / "a.jsonl")], tmp_path / "src", workers=1, tokenizer=tok)


def test_parquet_text_and_bytes_columns_with_nulls_and_bad_bytes(tmp_path, tok, caplog):
    caplog.set_level(logging.WARNING, logger="rwkv7_data_prep")
    good = random_texts(5, seed=14)
    pq.write_table(pa.table({"text": pa.array([good[0].encode(), None, b"caf\xe9", b"", good[1].encode()],
                                              pa.binary())}), tmp_path / "bytes.parquet")
    pq.write_table(pa.table({"text": pa.array([good[2], None, good[3], good[2]]).dictionary_encode()}),
                   tmp_path / "dict.parquet")
    pq.write_table(pa.table({"text": pa.array([None, good[4], None], pa.large_string())}), tmp_path / "large.parquet")
    names = ["bytes.parquet", "dict.parquet", "large.parquet"]

    [m] = prepare([str(tmp_path / n) for n in names], tmp_path / "src", workers=1, tokenizer=tok)

    np.testing.assert_array_equal(stream(m), expected_stream(tok, [good[0], good[1], good[2], good[3], good[2],
                                                                   good[4]]))
    assert m.skipped == {"empty": 5, "invalid_utf8": 1}
    assert any(f"{tmp_path / 'bytes.parquet'} row 2: not valid UTF-8 (at offset 3)" in r.getMessage()
               for r in caplog.records)


def test_parquet_column_that_is_not_text_is_an_error_naming_the_row(tmp_path, tok):
    pq.write_table(pa.table({"text": pa.array([None, 7, 8])}), tmp_path / "a.parquet")
    with pytest.raises(UserError, match=r"a\.parquet row 1: column 'text' holds int, not text; set --text-key"):
        prepare([str(tmp_path / "a.parquet")], tmp_path / "src", workers=1, tokenizer=tok)


def test_manifest_lists_consecutive_shards_with_their_checksums(tmp_path, tok):
    texts = random_texts(60, seed=2)
    [m] = prepare([write_jsonl(tmp_path / "a.jsonl", texts)], tmp_path / "src", shard_tokens=700, workers=1,
                  tokenizer=tok)
    assert read_manifest(tmp_path / "src") == m
    assert len(m.shards) > 3
    first = 0
    for s, prefix in zip(m.shards, m.shard_prefixes()):
        r = open_binidx(prefix)
        assert (s.first_document, s.documents, s.tokens) == (first, r.n_documents, r.n_tokens)
        assert (s.sha256_bin, s.sha256_idx) == (sha256_file(f"{prefix}.bin"), sha256_file(f"{prefix}.idx"))
        assert (s.bytes_bin, s.bytes_idx) == (os.path.getsize(f"{prefix}.bin"), os.path.getsize(f"{prefix}.idx"))
        first += s.documents
    # A shard ends with the document that brings it to shard_tokens, so only the last one may be short.
    for s, prefix in zip(m.shards, m.shard_prefixes()):
        last_doc = open_binidx(prefix).sizes[-1]
        assert s.tokens - last_doc < 700
        assert s.tokens >= 700 or s is m.shards[-1]


def test_output_does_not_depend_on_the_number_of_workers(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", random_texts(300, seed=3))
    one = prepare([path], tmp_path / "one", name="x", shard_tokens=5000, workers=1, tokenizer=tok)[0]
    two = prepare([path], tmp_path / "two", name="x", shard_tokens=5000, workers=2, tokenizer=tok)[0]
    assert one.to_json() == two.to_json()
    assert shard_bytes(one) == shard_bytes(two)


def test_val_every_holds_out_every_kth_document_into_dir_val(tmp_path, tok):
    texts = random_texts(50, seed=4)
    train, val = prepare([write_jsonl(tmp_path / "a.jsonl", texts)], tmp_path / "web", val_every=7,
                         shard_tokens=1000, workers=1, tokenizer=tok)
    assert val.source_dir == tmp_path / "web_val" and val.name == "web_val"
    np.testing.assert_array_equal(stream(val), expected_stream(tok, texts[6::7]))
    np.testing.assert_array_equal(stream(train), expected_stream(tok, [t for i, t in enumerate(texts) if i % 7 != 6]))


def test_rerun_of_a_complete_source_does_nothing(tmp_path, tok, caplog):
    path = write_jsonl(tmp_path / "a.jsonl", random_texts(40, seed=5))
    prepare([path], tmp_path / "src", shard_tokens=800, workers=1, tokenizer=tok)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "src").iterdir()}
    caplog.set_level(logging.INFO, logger="rwkv7_data_prep")
    prepare([path], tmp_path / "src", shard_tokens=800, workers=1, tokenizer=tok)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "src").iterdir()} == stamps
    assert any("is complete" in r.getMessage() and "nothing to do" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("damage", ["truncate", "flip_a_byte", "delete_idx"])
def test_a_damaged_shard_is_rebuilt_by_a_rerun(tmp_path, tok, damage):
    path = write_jsonl(tmp_path / "a.jsonl", random_texts(40, seed=6))
    [m] = prepare([path], tmp_path / "src", shard_tokens=800, workers=1, tokenizer=tok)
    good = shard_bytes(m)
    bin1, idx1 = Path(f"{m.shard_prefixes()[1]}.bin"), Path(f"{m.shard_prefixes()[1]}.idx")
    if damage == "truncate":
        bin1.write_bytes(bin1.read_bytes()[:-2])
    elif damage == "flip_a_byte":
        data = bytearray(bin1.read_bytes())
        data[3] ^= 1
        bin1.write_bytes(bytes(data))
    else:
        idx1.unlink()
    first_stamp = Path(f"{m.shard_prefixes()[0]}.bin").stat().st_mtime_ns

    [again] = prepare([path], tmp_path / "src", shard_tokens=800, workers=1, tokenizer=tok)
    assert again.to_json() == m.to_json()
    assert shard_bytes(again) == good
    assert Path(f"{m.shard_prefixes()[0]}.bin").stat().st_mtime_ns == first_stamp  # the good one was kept


def test_rerun_with_other_inputs_or_options_is_refused(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", random_texts(20, seed=7))
    prepare([path], tmp_path / "src", shard_tokens=800, workers=1, tokenizer=tok)
    manifest = tmp_path / "src" / "manifest.json"
    with pytest.raises(UserError, match=rf"{re.escape(str(manifest))} was written with other options .*"
                                        rf"remove {re.escape(str(tmp_path / 'src'))} to start over"):
        prepare([path], tmp_path / "src", shard_tokens=900, workers=1, tokenizer=tok)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "one more"}) + "\n")
    with pytest.raises(UserError, match=rf"{re.escape(str(manifest))} was written with other inputs \(1 of them, "
                                        r"now 1; the first that differs, number 1: .*'bytes': \d+"):
        prepare([path], tmp_path / "src", shard_tokens=800, workers=1, tokenizer=tok)


def test_written_files_get_the_permissions_of_a_plain_open(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", random_texts(5, seed=1))
    old = os.umask(0o022)
    try:
        [m] = prepare([path], tmp_path / "src", workers=1, tokenizer=tok)
    finally:
        os.umask(old)
    assert (tmp_path / "src" / "manifest.json").stat().st_mode & 0o777 == 0o644   # readable by the cluster
    assert Path(f"{m.shard_prefixes()[0]}.bin").stat().st_mode & 0o777 == 0o644


def rwkv7_prep(*args, **kw):
    script = Path(sys.executable).with_name("rwkv7-prep")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "rwkv7_data_prep.cli"]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=120, **kw)


def proc_stat(pid):
    """(state, parent pid) of a process from /proc, or None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def children(pid):
    return [int(p.name) for p in Path("/proc").glob("[0-9]*") if (proc_stat(p.name) or ("", 0))[1] == pid]


def running(pid):
    stat = proc_stat(pid)
    return stat is not None and stat[0] != "Z"  # a zombie has exited; only its reaping is left


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="watches processes through /proc")
def test_killed_run_resumes_without_losing_or_duplicating_documents(tmp_path, tok):
    texts = random_texts(2500, seed=8, words=(20, 160))
    path = write_jsonl(tmp_path / "a.jsonl", texts)
    options = ["--name", "web", "--shard-tokens", "6000", "--val-every", "7"]
    script = Path(sys.executable).with_name("rwkv7-prep")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "rwkv7_data_prep.cli"]
    proc = subprocess.Popen(cmd + [path, "--output", str(tmp_path / "killed"), "--workers", "2", *options],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = tmp_path / "killed" / "manifest.json"
    deadline = time.monotonic() + 60
    while not (manifest.exists() and json.loads(manifest.read_text())["shards"]):
        assert proc.poll() is None and time.monotonic() < deadline, "rwkv7-prep ended before its first shard"
        time.sleep(0.005)
    workers = children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = read_manifest(tmp_path / "killed", allow_incomplete=True)
    assert not killed.complete and 0 < len(killed.shards)
    kept = {p: Path(f"{p}.bin").stat().st_mtime_ns for p in killed.shard_prefixes()}
    # The orphaned workers notice and exit by themselves.
    deadline = time.monotonic() + 10
    while any(running(p) for p in workers):
        assert time.monotonic() < deadline, f"worker processes {workers} outlived the killed rwkv7-prep"
        time.sleep(0.1)

    resumed = rwkv7_prep(path, "--output", tmp_path / "killed", "--workers", "2", *options)
    assert resumed.returncode == 0, resumed.stderr
    train, val = (read_manifest(tmp_path / d) for d in ("killed", "killed_val"))
    assert not list((tmp_path / "killed").glob("*.tmp-*"))
    assert {p: Path(f"{p}.bin").stat().st_mtime_ns for p in kept} == kept  # resumed, not started over
    # Byte for byte what an uninterrupted run writes, which is every document once, in order.
    ref_train, ref_val = prepare([path], tmp_path / "ref", name="web", shard_tokens=6000, val_every=7, workers=1,
                                 tokenizer=tok)
    for got, ref in ((train, ref_train), (val, ref_val)):
        assert got.to_json() == ref.to_json()
        assert shard_bytes(got) == shard_bytes(ref)
    assert train.documents + val.documents == len(texts)
    np.testing.assert_array_equal(stream(val), expected_stream(tok, texts[6::7]))


@pytest.mark.parametrize("workers", [1, 2])
def test_encoder_only_counts_the_documents_a_resume_skips(tok, workers):
    texts = random_texts(40, seed=11)
    lines = [json.dumps({"text": t}).encode() for t in texts]
    batches = [RawBatch("jsonl", b"\n".join(lines[i:i + 4]) + b"\n", 0, "a.jsonl", i + 1) for i in range(0, 40, 4)]
    with Encoder(tok, "text", workers) as encoder:
        results = [enc for _, enc in encoder.map(batches, skip_documents=10)]
    assert [enc.documents for enc in results] == [4] * 10
    assert [enc.tokens is None for enc in results] == [True, True] + [False] * 8  # batch 3 holds document 10
    np.testing.assert_array_equal(np.concatenate([enc.tokens for enc in results[2:]]),
                                  expected_stream(tok, texts[8:]))


@pytest.mark.parametrize("files, message", [
    ({}, r"input not found: .*missing\.jsonl"),
    ({"empty.jsonl": b""}, r"input .*empty\.jsonl is empty; remove it"),
    ({"blank.jsonl": b"\n  \n" + b'{"text": "\xff"}\n'}, r"blank\.jsonl holds no non-empty, valid UTF-8 document"),
    ({"bad.jsonl": b'{"text": "ok"}\n{"text": \n'}, r"bad\.jsonl line 2: not valid JSON"),
    ({"key.jsonl": b'{"text": "ok"}\n{"body": "x"}\n'}, r"key\.jsonl line 2: no field 'text'; set --text-key"),
    ({"num.jsonl": b'{"text": 5}\n'}, r"num\.jsonl line 1: field 'text' is int, not a string"),
    ({"a.txt": b"", "b.txt": b"\xff"}, r"no documents in .*a\.txt, .*b\.txt \(1 empty, 1 not valid UTF-8\)"),
    ({"dir": None}, r"input .*dir is a directory; pass its files"),
])
def test_bad_input_stops_with_an_error_naming_it(tmp_path, tok, files, message):
    paths = []
    for name, data in files.items():
        if data is None:
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    with pytest.raises(UserError, match=message):
        prepare(paths or [str(tmp_path / "missing.jsonl")], tmp_path / "src", workers=1, tokenizer=tok)
    assert not (tmp_path / "src" / "manifest.json").exists()


def test_parquet_without_the_text_column_names_the_columns(tmp_path, tok):
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(UserError, match=r"a\.parquet has no column 'text' \(columns: content\); set --text-key"):
        prepare([str(tmp_path / "a.parquet")], tmp_path / "src", workers=1, tokenizer=tok)


def test_val_every_that_holds_out_nothing_is_an_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", random_texts(5, seed=9))
    with pytest.raises(UserError, match=r"--val-every 10 holds out none of the 5 documents"):
        prepare([path], tmp_path / "src", val_every=10, workers=1, tokenizer=tok)


def test_dataset_directory_is_read_through_datasets(tmp_path, tok):
    texts = random_texts(30, seed=10)
    (tmp_path / "ds").mkdir()
    pq.write_table(pa.table({"body": texts[:20]}), tmp_path / "ds" / "train-00000.parquet")
    pq.write_table(pa.table({"body": texts[20:]}), tmp_path / "ds" / "train-00001.parquet")
    [m] = prepare([], tmp_path / "src", dataset=str(tmp_path / "ds"), text_key="body", workers=1, tokenizer=tok)
    np.testing.assert_array_equal(stream(m), expected_stream(tok, texts))
    assert m.inputs == [{"dataset": str(tmp_path / "ds"), "config": None, "split": "train"}]
    with pytest.raises(UserError, match=r"cannot open dataset .*ds \(split test\).*--split"):
        prepare([], tmp_path / "other", dataset=str(tmp_path / "ds"), split="test", workers=1, tokenizer=tok)


def test_cli_help_is_fast_and_describes_the_options():
    result = rwkv7_prep("--help")
    assert result.returncode == 0
    for word in ("INPUT", "--output", "--format", "--text-key", "--shard-tokens", "--workers", "--val-every",
                 "--dataset", "binidx", "manifest.json", "resumes"):
        assert word in result.stdout
    # No heavy imports before the arguments are parsed.
    probe = ("import sys\nfrom rwkv7_data_prep import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n"
             "    pass\nprint(sorted(m for m in ('torch', 'lightning', 'datasets', 'pyarrow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_cli_error_is_one_line_with_exit_code_2(tmp_path):
    result = rwkv7_prep(tmp_path / "missing.jsonl", "--output", tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith(f"rwkv7-prep: error: input not found: {tmp_path / 'missing.jsonl'}")


def test_cli_writes_the_source_and_prints_a_summary(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "one"}\n{"body": "two"}\n{"body": ""}\n', encoding="utf-8")
    result = rwkv7_prep(tmp_path / "a.jsonl", "--output", tmp_path / "c", "--text-key", "body", "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert f"{tmp_path / 'c'}: 2 documents, 4 tokens in 1 shards (skipped 1 empty, 0 invalid UTF-8)" in result.stdout
    assert read_manifest(tmp_path / "c").documents == 2


@pytest.fixture(scope="module")
def sample(tmp_path_factory, tok):
    out = tmp_path_factory.mktemp("sample")
    return out, build_sample_corpus(str(out), tokenizer=tok)


def test_sample_corpus_is_two_single_shard_sources(sample):
    out, (train, val) = sample
    assert (train, val) == (str(out / "stdlib" / "shard-00000"), str(out / "stdlib_val" / "shard-00000"))
    tr, va = open_binidx(train), open_binidx(val)
    assert va.n_documents == (tr.n_documents + va.n_documents) // VAL_EVERY > 0
    assert tr.n_tokens > 1_000_000  # a few MB of source
    assert len(read_manifest(out / "stdlib").shards) == 1


def test_sample_corpus_is_reused_and_an_interrupted_one_is_finished(sample, tok):
    out, (train, val) = sample
    files = [Path(f"{p}.{ext}") for p in (train, val) for ext in ("bin", "idx")] + [out / "stdlib" / "manifest.json"]
    stamps = {f: f.stat().st_mtime_ns for f in files}
    val_bytes = Path(f"{val}.bin").read_bytes()
    assert build_sample_corpus(str(out), tokenizer=tok) == (train, val)
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    # As if the build had stopped before the val source's manifest: val is rebuilt, train kept.
    os.unlink(out / "stdlib_val" / "manifest.json")
    assert build_sample_corpus(str(out), tokenizer=tok) == (train, val)
    assert Path(f"{val}.bin").read_bytes() == val_bytes
    assert Path(f"{train}.bin").stat().st_mtime_ns == stamps[Path(f"{train}.bin")]
