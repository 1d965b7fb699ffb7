"""The C jsonl scanner (rwkv7_data_prep._jsonl) against json.loads, the definition it must agree with.

Whenever the scanner answers, its texts must be exactly json.loads(line)[key].encode("utf-8") for every non-blank
line; lines it cannot vouch for must make it answer None (the block then takes the general path).
"""
import json
import random

import numpy as np
import pytest

from rwkv7_data_prep._jsonl import texts


def reference(block: bytes, key: str):
    """What parsing line by line gives, or None where the scanner must decline (not a flat object of strings with
    the key, or text that UTF-8 cannot hold)."""
    docs = []
    for line in block.split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(record, dict) or key not in record or not all(isinstance(v, str) for v in record.values()):
            return None
        try:
            docs.append(record[key].encode("utf-8"))
        except UnicodeEncodeError:   # a lone surrogate escape
            return None
    return docs


def scanned(block: bytes, key: str = "text"):
    result = texts(block, key)
    if result is None:
        return None
    data, offsets = result
    offsets = np.frombuffer(offsets, dtype=np.int64)
    return [data[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def random_text(rng: random.Random) -> str:
    pools = ["abc xyz", "\"\\/\b\f\n\r\t", "\x00\x01\x1f\x7f", "éß中文日本語", "\u2028\u2029\ufeff",
             "😀🚀𝄞", "\ud7ff\ue000\uffff", "{}[],:"]
    return "".join(rng.choice(rng.choice(pools)) for _ in range(rng.randrange(0, 30)))


def random_line(rng: random.Random, key: str = "text") -> bytes:
    fields = [(key, random_text(rng))]
    for i in range(rng.randrange(0, 3)):
        fields.insert(rng.randrange(len(fields) + 1), (f"f{i}é", random_text(rng)))
    ws = lambda: rng.choice(["", " ", "  ", "\t", "\r"])   # noqa: E731
    parts = [f"{ws()}{json.dumps(k, ensure_ascii=rng.random() < 0.5)}{ws()}:{ws()}"
             f"{json.dumps(v, ensure_ascii=rng.random() < 0.5)}{ws()}" for k, v in fields]
    return f"{ws()}{{{ws()}{','.join(parts)}}}{ws()}".encode("utf-8")


def test_agrees_with_json_loads_on_random_flat_objects():
    rng = random.Random(0)
    for _ in range(300):
        lines = [random_line(rng) if rng.random() < 0.85 else rng.choice([b"", b"  ", b"\r", b"\x0b\x0c"])
                 for _ in range(rng.randrange(1, 12))]
        block = b"\n".join(lines) + rng.choice([b"", b"\n"])
        expected = reference(block, "text")
        assert expected is not None
        assert scanned(block) == expected, block


def test_random_corruptions_are_declined_or_agree():
    rng = random.Random(1)
    declined = 0
    for _ in range(3000):
        line = bytearray(random_line(rng))
        for _ in range(rng.randrange(1, 3)):
            i = rng.randrange(len(line))
            line[i] = rng.choice([0x00, 0x0a, 0x22, 0x5c, 0x7b, 0x7d, 0x2c, 0x3a, 0x80, 0xc3, 0xed, 0xff,
                                  rng.randrange(256)])
        block = bytes(line)
        got, expected = scanned(block), reference(block, "text")
        declined += got is None
        assert got is None or got == expected, block
    assert declined > 1000   # corruptions mostly break the line; the scanner must notice


@pytest.mark.parametrize("line", [
    b'{"text": "\\ud800"}',                 # lone high surrogate: json.loads keeps it, UTF-8 cannot
    b'{"text": "\\udc00x"}',                # lone low surrogate
    b'{"text": "\\ud800\\u0041"}',          # high surrogate not followed by a low one
    b'{"text": "caf\xe9"}',                  # Latin-1 byte, not UTF-8
    b'{"text": "\xed\xa0\x80"}',             # a surrogate encoded in UTF-8
    b'{"text": "\xc0\xaf"}',                 # overlong
    b'{"text": "\xf4\x90\x80\x80"}',         # above U+10FFFF
    b'{"text": "a\tb"}',                     # raw control character in a string
    b'{"text": "\\x41"}',                    # not a JSON escape
    b'{"text": null}', b'{"text": 1}', b'{"text": ["a"]}', b'{"text": "a", "n": 2}',
    b'{"id": "a"}', b"{}", b'["text"]', b'"text"',
    b'{"text": "a"} x', b'{"text": "a"}{"text": "b"}', b'{"text": "a",}', b"{'text': 'a'}",
    b'\xef\xbb\xbf{"text": "a"}',            # byte-order mark
    b'{"text": "a', b'{"text" "a"}', b'{"text": "a"',
])
def test_declines_what_it_cannot_vouch_for(line):
    assert texts(line, "text") is None
    assert texts(b'{"text": "ok"}\n' + line + b"\n", "text") is None   # one bad line declines the whole block


def test_duplicate_key_keeps_the_last_value_like_a_dict():
    assert scanned(b'{"text": "first", "x": "y", "text": "second"}') == [b"second"]


def test_blank_lines_are_skipped_and_empty_texts_kept():
    assert scanned(b'\n{"text": ""}\n \t\r\n{"text": "a"}') == [b"", b"a"]
    assert scanned(b"") == [] and scanned(b"\n\n") == []


def test_keys_are_compared_decoded():
    assert scanned(b'{"\\u0074ext": "a"}') == [b"a"]
    assert scanned(b'{"te\\"xt": "a", "text": "b"}') == [b"b"]


def test_other_text_keys():
    assert scanned(b'{"content": "x", "text": "y"}', "content") == [b"x"]
    assert scanned('{"téxt": "z"}'.encode(), "téxt") == [b"z"]
