"""WorldTokenizer gives exactly the ids of BlinkDL's reference TRIE_TOKENIZER (rwkv 0.8.32), and fails clearly."""

import hashlib
import pickle
import random
import re
import string
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

from rwkv7_train.errors import UserError
from rwkv7_train.tokenizer import BUNDLED_VOCAB, WorldTokenizer

SAMPLES = {
    "english": "The tokenizer keeps the longest piece that matches; it's greedy, isn't it? Python 3.11, 2024-05-01.",
    "chinese": "今天天气很好，我们去公园散步吧。机器学习模型需要大量的数据和计算。",
    "japanese": "東京は日本の首都です。カタカナとひらがなを混ぜて書きます。",
    "korean": "안녕하세요, 오늘 날씨가 정말 좋네요. 모델을 학습시켜 봅시다.",
    "arabic": "مرحبا بالعالم، كيف حالك اليوم؟ النموذج يتعلم من النصوص.",
    "russian": "Привет, мир! Сегодня хорошая погода, и мы идём гулять в парк.",
    "hindi": "नमस्ते, आप कैसे हैं? आज मौसम बहुत अच्छा है।",
    "emoji": "ok 👍 👍🏽 👩‍💻 👨‍👩‍👧‍👦 🏳️‍🌈 🇯🇵 ❤️ 🧑🏿‍🚀 done",  # skin tones, ZWJ sequences, flags
    "control": "\x00a\x00\x01\x02\t\x0b\x0c\r\n\x1b[31mred\x1b[0m\x7f\x85\u2028\u2029\ufeff\x00",
    "code": "def f(x):\n\tif x:\n\t\treturn [i * 2 for i in range(x)]\n    # four spaces\n        pass\n\n",
    "mixed": "GPU显存 64GB; モデル=RWKV-7 «Goose» — 한국어/العربية/русский 🙂\n",
}
RUNS = {
    "5000 spaces": " " * 5000,
    "3000 dashes": "-" * 3000,
    "2000 newlines": "\n" * 2000,
    "1000 hao": "好" * 1000,
    "spaces around the longest token": " " * 127 + "x" + " " * 128 + "x" + " " * 129 + "x" + " " * 257,
    "tabs then code": "\t" * 300 + "return 0\n",
}


@pytest.fixture(scope="module")
def tok():
    return WorldTokenizer()


@pytest.fixture(scope="module")
def ref():
    return TRIE_TOKENIZER(str(BUNDLED_VOCAB))


def random_text(rng: random.Random, length: int) -> str:
    """Characters from ranges the vocab covers with long tokens and from anywhere in Unicode, mixed."""
    ranges = [(0x20, 0x7E), (0x20, 0x7E), (0x00, 0xFF), (0x400, 0x4FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3),
              (0x3040, 0x30FF), (0x600, 0x6FF), (0x900, 0x97F), (0x1F300, 0x1FAFF), (0x0, 0x10FFFF)]
    chars = []
    while len(chars) < length:
        lo, hi = rng.choice(ranges)
        c = rng.randint(lo, hi)
        if not 0xD800 <= c <= 0xDFFF:  # lone surrogates cannot be UTF-8 encoded by either tokenizer
            chars.append(chr(c))
    return "".join(chars)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_matches_reference_on_each_script(tok, ref, name):
    assert tok.encode(SAMPLES[name]) == ref.encode(SAMPLES[name])


@pytest.mark.parametrize("name", sorted(RUNS))
def test_matches_reference_on_long_runs_of_one_character(tok, ref, name):
    assert tok.encode(RUNS[name]) == ref.encode(RUNS[name])


def test_matches_reference_on_whole_stdlib_modules(tok, ref):
    for module in (textwrap, string, pickle):
        text = Path(module.__file__).read_text(encoding="utf-8")
        assert tok.encode(text) == ref.encode(text), module.__name__


def test_matches_reference_on_seeded_random_strings(tok, ref):
    rng = random.Random(1234)
    for _ in range(300):
        text = random_text(rng, rng.randint(0, 300))
        assert tok.encode(text) == ref.encode(text), text


def test_matches_reference_on_concatenated_vocab_tokens(tok, ref):
    # Gluing real tokens together makes many places where a longer token almost matches and the walk must fall back.
    rng = random.Random(99)
    vocab = list(ref.idx2token.values())
    for _ in range(200):
        data = b"".join(rng.choices(vocab, k=rng.randint(1, 40)))
        assert tok.encode_bytes(data) == ref.encodeBytes(data)


def test_encode_bytes_matches_reference_on_invalid_utf8(tok, ref):
    rng = random.Random(7)
    cases = [b"\xff", b"\xfe\xff", b"\x80\x80abc", "好".encode()[:2], b"ab\xe4\xbd", b"\xc3(", b"\xed\xa0\x80"]
    cases += [rng.randbytes(rng.randint(1, 200)) for _ in range(100)]
    for data in cases:
        assert tok.encode_bytes(data) == ref.encodeBytes(data), data
        assert tok.decode_bytes(tok.encode_bytes(data)) == data


def test_encode_bytes_accepts_bytearray_and_memoryview(tok):
    data = SAMPLES["mixed"].encode()
    assert tok.encode_bytes(bytearray(data)) == tok.encode_bytes(memoryview(data)) == tok.encode_bytes(data)


def test_decode_inverts_encode(tok):
    texts = list(SAMPLES.values()) + list(RUNS.values())
    rng = random.Random(5)
    texts += [random_text(rng, 200) for _ in range(50)]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text


def test_decode_bytes_matches_reference(tok, ref):
    ids = tok.encode(SAMPLES["emoji"] + SAMPLES["chinese"])
    assert tok.decode_bytes(ids) == ref.decodeBytes(ids)
    assert tok.decode_bytes(np.asarray(ids, dtype=np.uint16)) == ref.decodeBytes(ids)


def test_decode_raises_on_bytes_that_are_not_utf8(tok):
    ids = tok.encode_bytes(b"ok\xff")
    assert tok.decode_bytes(ids) == b"ok\xff"
    with pytest.raises(UnicodeDecodeError):
        tok.decode(ids)


@pytest.mark.parametrize("bad_id", [65530, 70000, -1])
def test_decode_rejects_ids_outside_the_vocab_naming_the_id(tok, bad_id):
    with pytest.raises(ValueError, match=str(bad_id)):
        tok.decode([100, bad_id, 200])


def test_decode_rejects_end_of_document_id(tok):
    with pytest.raises(ValueError, match="end-of-document"):
        tok.decode([100, tok.eod_id])


def test_empty_input_gives_no_ids(tok):
    assert tok.encode("") == []
    assert tok.encode_bytes(b"") == []
    assert tok.encode_batch([]) == []
    empty = tok.encode_to_numpy("")
    assert empty.dtype == np.uint16 and empty.shape == (0,)
    assert tok.decode([]) == ""


def test_encode_batch_equals_encode_one_by_one(tok):
    texts = list(SAMPLES.values()) + ["", "x"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_encode_to_numpy_is_uint16_equal_to_encode(tok):
    text = "".join(SAMPLES.values())
    arr = tok.encode_to_numpy(text)
    assert arr.dtype == np.uint16
    assert arr.tolist() == tok.encode(text)
    assert tok.encode_to_numpy(text.encode()).tolist() == tok.encode(text)


def packed(docs):
    """Documents back to back, with their n + 1 byte offsets (the layout encode_documents takes)."""
    return b"".join(docs), np.cumsum([0] + [len(d) for d in docs], dtype=np.int64)


def test_encode_documents_matches_reference_each_followed_by_eod(tok, ref):
    rng = random.Random(21)
    docs = [t.encode() for t in SAMPLES.values()] + [b"", rng.randbytes(50), "好".encode()[:2], b"", b"x"]
    docs += [random_text(rng, rng.randint(0, 400)).encode() for _ in range(100)]
    tokens, sizes = tok.encode_documents(*packed(docs))
    assert tokens.dtype == np.uint16 and sizes.dtype == np.int64
    expected = [ref.encodeBytes(d) + [tok.eod_id] for d in docs]
    assert sizes.tolist() == [len(e) for e in expected]  # an empty document is its 0 alone
    assert tokens.tolist() == [t for e in expected for t in e]


def test_encode_documents_equals_encode_to_numpy_per_document(tok):
    # A multi-byte character split across two documents is two documents' bytes, not one character.
    docs = ["中文字".encode()[:4], "中文字".encode()[4:], SAMPLES["emoji"].encode(), RUNS["5000 spaces"].encode()]
    tokens, sizes = tok.encode_documents(*packed(docs))
    pieces = np.split(tokens, np.cumsum(sizes)[:-1])
    for doc, piece in zip(docs, pieces):
        np.testing.assert_array_equal(piece[:-1], tok.encode_to_numpy(doc))
        assert piece[-1] == tok.eod_id


def test_encode_documents_reads_only_between_the_offsets(tok):
    data = b"skipped hello world skipped"
    tokens, sizes = tok.encode_documents(data, [8, 14, 19])
    assert tokens.tolist() == tok.encode("hello ") + [0] + tok.encode("world") + [0]
    assert sizes.tolist() == [len(tok.encode("hello ")) + 1, len(tok.encode("world")) + 1]
    tokens, sizes = tok.encode_documents(data, [5])  # no documents
    assert tokens.size == 0 and sizes.size == 0


@pytest.mark.parametrize("offsets, message", [
    ([0, 4, 2], "offsets decrease at document 1"),
    ([0, 100], r"outside the data's 5 bytes"),
    ([-1, 2], "outside"),
    ([], "at least one element"),
])
def test_encode_documents_rejects_bad_offsets(tok, offsets, message):
    with pytest.raises((ValueError, TypeError), match=message):
        tok.encode_documents(b"hello", offsets)


def test_encode_rejects_bytes_pointing_to_encode_bytes(tok):
    with pytest.raises(TypeError, match="encode_bytes"):
        tok.encode(b"abc")


def test_threads_sharing_one_tokenizer_agree_with_serial_encoding(tok):
    rng = random.Random(11)
    texts = [random_text(rng, 20_000) for _ in range(8)]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(tok.encode, texts)) == [tok.encode(t) for t in texts]


def test_pickled_tokenizer_encodes_the_same(tok):
    copy = pickle.loads(pickle.dumps(tok))
    text = SAMPLES["mixed"] + SAMPLES["code"]
    assert copy.encode(text) == tok.encode(text)
    assert copy.identity == tok.identity


def test_pickle_is_small_and_refuses_a_changed_vocab_file(small_vocab, tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_bytes(small_vocab.read_bytes())
    data = pickle.dumps(WorldTokenizer(path))
    assert len(data) < 1000  # the path and the file's sha256, not the tokens
    assert pickle.loads(data).encode(SAMPLES["english"]) == WorldTokenizer(path).encode(SAMPLES["english"])
    path.write_bytes(small_vocab.read_bytes() + b"99999 'zzzq' 4\n")
    with pytest.raises(UserError, match=rf"vocab file {re.escape(str(path))} changed while in use"):
        pickle.loads(data)


def test_vocab_size_is_next_multiple_of_64_above_largest_id(tok, ref):
    largest = max(ref.idx2token)
    assert tok.vocab_size % 64 == 0
    assert tok.vocab_size - 64 <= largest < tok.vocab_size
    assert tok.vocab_size == 65536


def test_identity_names_the_file_and_its_sha256(tok):
    assert BUNDLED_VOCAB.name in tok.identity
    assert hashlib.sha256(BUNDLED_VOCAB.read_bytes()).hexdigest() in tok.identity


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    """A vocab in the World format: every single byte plus every 40th World token, renumbered 1..N."""
    lines = BUNDLED_VOCAB.read_text(encoding="utf-8").split("\n")
    kept = [line for i, line in enumerate(lines) if line and (i < 256 or i % 40 == 0)]
    path = tmp_path_factory.mktemp("vocab") / "small_vocab.txt"
    path.write_text("".join(f"{n} {line[line.index(' ') + 1:]}\n" for n, line in enumerate(kept, start=1)),
                    encoding="utf-8")
    return path


def test_other_vocab_file_matches_reference(small_vocab):
    tok, ref = WorldTokenizer(small_vocab), TRIE_TOKENIZER(str(small_vocab))
    text = "".join(SAMPLES.values()) + RUNS["tabs then code"]
    assert tok.encode(text) == ref.encode(text)
    largest = max(ref.idx2token)
    assert tok.vocab_size % 64 == 0 and tok.vocab_size - 64 <= largest < tok.vocab_size
    assert tok.identity.startswith("small_vocab.txt ")


def test_byte_without_any_token_is_reported_with_its_offset(tmp_path):
    path = tmp_path / "ab.txt"
    path.write_text("1 'a' 1\n2 'b' 1\n3 'ab' 2\n", encoding="utf-8")
    tok = WorldTokenizer(path)
    assert tok.encode("abba") == [3, 2, 1]
    with pytest.raises(ValueError, match="offset 2"):
        tok.encode("abc")
    with pytest.raises(ValueError, match="document 1: byte 0x63 at offset 6"):
        tok.encode_documents(b"abbaabc", [0, 2, 7])


def test_missing_vocab_file_raises_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        WorldTokenizer(tmp_path / "no_such_vocab.txt")


def test_vocab_path_that_is_a_directory_raises_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot read"):
        WorldTokenizer(tmp_path)


@pytest.mark.parametrize(
    "content, problem",
    [
        ("1 'a' 1\nx 'b' 1\n", "line 2: id or byte length is not an integer"),
        ("1 'a' 2\n", "line 1: the token has 1 bytes but the line says 2"),
        ("1 'a 1\n", "line 1: the token is not a Python string or bytes literal"),
        ("1 __import__('os') 1\n", "line 1: the token is not a Python string or bytes literal"),
        ("1 12 2\n", "line 1: the token is not a non-empty string"),
        ("1 'a' 1\n1 'b' 1\n", "line 2: id 1 appears twice"),
        ("1 'a' 1\n2 'a' 1\n", "line 2: token b'a' appears twice"),
        ("0 'a' 1\n", "line 1: id 0 is outside"),
        ("1\n", "line 1: missing fields"),
        ("", "has no tokens"),
    ],
)
def test_malformed_vocab_raises_user_error_naming_file_and_line(tmp_path, content, problem):
    path = tmp_path / "bad_vocab.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as info:
        WorldTokenizer(path)
    assert str(path) in str(info.value)
    assert problem in str(info.value)


def test_vocab_that_is_not_utf8_raises_user_error(tmp_path):
    path = tmp_path / "latin1_vocab.txt"
    path.write_bytes("1 'é' 2\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        WorldTokenizer(path)
