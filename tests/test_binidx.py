"""binidx files: the exact on-disk layout, round trips, atomic writes, and one-line errors for broken files."""

import pickle
import struct

import numpy as np
import pytest

from rwkv7_train.data.binidx import BinidxWriter, open_binidx
from rwkv7_train.errors import UserError


def write(prefix, docs, vocab_size=65536):
    with BinidxWriter(prefix, vocab_size=vocab_size) as w:
        for d in docs:
            w.add_document(np.asarray(d))
    return w


@pytest.fixture
def docs():
    rng = np.random.default_rng(0)
    return [rng.integers(1, 65536, size=n) for n in (5, 1, 17, 0, 300)]


def test_round_trip_gives_back_each_document_followed_by_token_0(tmp_path, docs):
    prefix = tmp_path / "corpus"
    w = write(prefix, docs)
    r = open_binidx(prefix)
    assert r.dtype == np.uint16
    assert r.n_documents == len(docs) == w.n_documents
    assert r.n_tokens == sum(len(d) + 1 for d in docs) == w.n_tokens
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(r.document(i), np.append(d, 0))
    np.testing.assert_array_equal(r.tokens, np.concatenate([np.append(d, 0) for d in docs]))


def test_files_follow_the_mmidx_layout_byte_for_byte(tmp_path, docs):
    prefix = tmp_path / "corpus"
    write(prefix, docs)
    raw = (tmp_path / "corpus.idx").read_bytes()
    # Parsed here from the FACTS spec, independently of the reader.
    magic, version, code, n, m = struct.unpack_from("<9sQBQQ", raw, 0)
    assert (magic, version, code, n, m) == (b"MMIDIDX\x00\x00", 1, 8, len(docs), len(docs) + 1)
    off = 34
    sizes = struct.unpack_from(f"<{n}i", raw, off)
    pointers = struct.unpack_from(f"<{n}q", raw, off + 4 * n)
    doc_idx = struct.unpack_from(f"<{m}q", raw, off + 12 * n)
    assert len(raw) == 34 + 12 * n + 8 * m
    assert list(sizes) == [len(d) + 1 for d in docs]
    assert list(pointers) == [2 * sum(sizes[:i]) for i in range(n)]
    assert list(doc_idx) == list(range(n + 1))
    expected_bin = b"".join(struct.pack(f"<{len(d) + 1}H", *d, 0) for d in docs)
    assert (tmp_path / "corpus.bin").read_bytes() == expected_bin


def test_vocab_above_65536_is_stored_as_int32(tmp_path):
    write(tmp_path / "big", [[70000, 1, 99999]], vocab_size=100000)
    assert struct.unpack_from("<B", (tmp_path / "big.idx").read_bytes(), 17)[0] == 4
    r = open_binidx(tmp_path / "big")
    assert r.dtype == np.int32
    assert r.tokens.tolist() == [70000, 1, 99999, 0]


def test_token_outside_the_vocab_is_refused_and_nothing_is_written(tmp_path):
    with pytest.raises(UserError, match="outside the vocab"):
        write(tmp_path / "c", [[1, 2], [70000]], vocab_size=65536)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_rewrite_leaves_the_previous_pair_untouched(tmp_path, docs):
    prefix = tmp_path / "corpus"
    write(prefix, docs)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(KeyboardInterrupt):
        with BinidxWriter(prefix) as w:
            w.add_document(np.array([7, 7, 7]))
            raise KeyboardInterrupt
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_reader_pickles_by_name_not_by_content(tmp_path, docs):
    write(tmp_path / "corpus", docs)
    r = open_binidx(tmp_path / "corpus")
    blob = pickle.dumps(r)
    assert len(blob) < 200
    np.testing.assert_array_equal(pickle.loads(blob).tokens, r.tokens)


def assert_one_line_error(prefix, *fragments):
    with pytest.raises(UserError) as e:
        open_binidx(prefix)
    msg = str(e.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg
    return msg


def test_truncated_bin_is_reported_with_both_sizes(tmp_path, docs):
    write(tmp_path / "corpus", docs)
    bin_file = tmp_path / "corpus.bin"
    data = bin_file.read_bytes()
    bin_file.write_bytes(data[:-2])
    assert_one_line_error(tmp_path / "corpus", str(bin_file), str(len(data) - 2), str(len(data)), "truncated")


def test_bad_magic_is_reported(tmp_path, docs):
    write(tmp_path / "corpus", docs)
    idx = tmp_path / "corpus.idx"
    idx.write_bytes(b"NOTANIDX!" + idx.read_bytes()[9:])
    assert_one_line_error(tmp_path / "corpus", str(idx), "magic")


def test_truncated_index_is_reported(tmp_path, docs):
    write(tmp_path / "corpus", docs)
    idx = tmp_path / "corpus.idx"
    idx.write_bytes(idx.read_bytes()[:-8])
    assert_one_line_error(tmp_path / "corpus", str(idx), "truncated")


def test_float_dtype_is_refused(tmp_path, docs):
    write(tmp_path / "corpus", docs)
    idx = tmp_path / "corpus.idx"
    raw = bytearray(idx.read_bytes())
    raw[17] = 6
    idx.write_bytes(bytes(raw))
    assert_one_line_error(tmp_path / "corpus", "float64")


@pytest.mark.parametrize("missing", ["corpus.bin", "corpus.idx"])
def test_missing_file_is_named(tmp_path, docs, missing):
    write(tmp_path / "corpus", docs)
    (tmp_path / missing).unlink()
    assert_one_line_error(tmp_path / "corpus", str(tmp_path / missing), "not found")
