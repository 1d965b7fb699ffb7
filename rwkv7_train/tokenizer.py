"""The RWKV World tokenizer: greedy longest match over UTF-8 bytes against rwkv_vocab_v20230424.txt.

Gives exactly the ids of BlinkDL's reference `rwkv.rwkv_tokenizer.TRIE_TOKENIZER`; the matching runs in the C
extension `rwkv7_train._trie` (with the GIL released), decoding is a join of the tokens' bytes.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from rwkv7_train.errors import UserError

BUNDLED_VOCAB = Path(__file__).with_name("rwkv_vocab_v20230424.txt")
EOD_ID = 0  # end of document / padding; not a vocab entry, so it has no text
_FORMAT = "lines '<id> <python str or bytes literal> <byte length>', as in rwkv_vocab_v20230424.txt"


def read_vocab(path: str | Path) -> tuple[list[int], list[bytes], str]:
    """Parse a World-format vocab file into (ids, token bytes, sha256 of the file); UserError if it is not one."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(
            f"vocab file {path} not found; pass an existing RWKV World vocab file, or no path for the bundled one"
        ) from None
    except OSError as e:
        raise UserError(f"cannot read vocab file {path} ({e.strerror}); pass a readable RWKV World vocab") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"vocab file {path} is not UTF-8 text (byte offset {e.start}); expected {_FORMAT}") from None

    ids: list[int] = []
    tokens: list[bytes] = []
    seen_ids: set[int] = set()
    seen_tokens: set[bytes] = set()
    # Split on "\n" only: str.splitlines would also break inside tokens at characters such as U+2028.
    for line_no, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line:
            continue

        def bad(problem: str) -> UserError:
            return UserError(f"vocab file {path} line {line_no}: {problem}; expected {_FORMAT}")

        first, last = line.find(" "), line.rfind(" ")
        if first < 0 or first == last:
            raise bad("missing fields")
        try:
            token_id, length = int(line[:first]), int(line[last + 1 :])
        except ValueError:
            raise bad("id or byte length is not an integer") from None
        literal = line[first + 1 : last]
        token = _plain_str(literal)
        if token is None:
            try:
                token = ast.literal_eval(literal)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                raise bad("the token is not a Python string or bytes literal") from None
        if isinstance(token, str):
            token = token.encode("utf-8")
        if not isinstance(token, bytes) or not token:
            raise bad("the token is not a non-empty string or bytes literal")
        if len(token) != length:
            raise bad(f"the token has {len(token)} bytes but the line says {length}")
        if token_id <= EOD_ID or token_id >= 2**32:
            raise bad(f"id {token_id} is outside 1..2**32-1 (id {EOD_ID} is reserved for end of document)")
        if token_id in seen_ids:
            raise bad(f"id {token_id} appears twice")
        if token in seen_tokens:
            raise bad(f"token {token!r} appears twice")
        seen_ids.add(token_id)
        seen_tokens.add(token)
        ids.append(token_id)
        tokens.append(token)
    if not ids:
        raise UserError(f"vocab file {path} has no tokens; expected {_FORMAT}")
    return ids, tokens, hashlib.sha256(raw).hexdigest()


def _plain_str(literal: str) -> str | None:
    """The value of a quoted str literal with no backslash, no inner quote and no line break (99% of the World
    vocab): what ast.literal_eval gives, 10x faster, which halves the tokenizer's loading. None for any other."""
    quote, inner = literal[:1], literal[1:-1]
    if len(literal) < 2 or quote not in ("'", '"') or literal[-1] != quote:
        return None
    if quote in inner or "\\" in inner or "\r" in inner:
        return None
    return inner


def _build_trie(tokens: list[bytes], ids: list[int]):
    try:
        from rwkv7_train import _trie
    except ImportError:
        raise UserError(
            "the C extension rwkv7_train._trie is not built; reinstall the package (pip install -e .) with gcc present"
        ) from None
    return _trie.Trie(tokens, ids)


class WorldTokenizer:
    """Greedy longest-match byte tokenizer over an RWKV World vocab (the bundled one unless a path is given)."""

    eod_id = EOD_ID

    def __init__(self, vocab_path: str | Path | None = None):
        path = Path(vocab_path) if vocab_path is not None else BUNDLED_VOCAB
        ids, tokens, sha256 = read_vocab(path)
        self.vocab_path = path
        self.identity = f"{path.name} sha256:{sha256}"  # for manifests: which vocab made these ids
        max_id = max(ids)
        # The model's embedding rows: the largest id plus one, rounded up to a multiple of 64 (65536 for World).
        self.vocab_size = (max_id + 1 + 63) // 64 * 64
        self._ids, self._tokens = ids, tokens
        self._token_bytes = dict(zip(ids, tokens))
        self._trie = _build_trie(tokens, ids)

    def __repr__(self) -> str:
        return f"WorldTokenizer({self.identity}, vocab_size={self.vocab_size})"

    # Pickled as the vocab file's path and identity, not its 65k tokens (1.3 MB): a process spawning workers then does
    # not wait while each one starts up and drains that from the pipe. The copy re-reads the file (the C trie cannot
    # be pickled anyway, it is rebuilt either way) and checks that it is still the same.
    def __reduce__(self):
        return _unpickle, (str(self.vocab_path.absolute()), self.identity)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode takes str, not {type(text).__name__}; use encode_bytes for bytes")
        return self._trie.encode(text.encode("utf-8"))

    def encode_bytes(self, data: bytes | bytearray | memoryview) -> list[int]:
        """Token ids of raw bytes, which need not be valid UTF-8 (the World vocab has a token for every byte)."""
        return self._trie.encode(data)

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def encode_to_numpy(self, text_or_bytes: str | bytes | bytearray | memoryview) -> np.ndarray:
        """Token ids as a native-endian uint16 array, never passing through a Python list (for data prep)."""
        data = text_or_bytes.encode("utf-8") if isinstance(text_or_bytes, str) else text_or_bytes
        return np.frombuffer(self._trie.encode_u16(data), dtype=np.uint16)

    def encode_documents(self, data: bytes | bytearray | memoryview, offsets) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize many documents in one call, with no Python object per document (for data prep).

        data holds the documents' bytes back to back (they need not be valid UTF-8); offsets, n + 1 non-decreasing
        byte positions in data, bound them: document i is data[offsets[i]:offsets[i + 1]] (Arrow's layout of a string
        column). Returns (tokens, sizes): every document's ids followed by EOD_ID, back to back, as uint16; and int64
        sizes[i], the number of those belonging to document i (its EOD_ID included; so 1 for an empty document).
        That is the binidx layout, one sequence per document.
        """
        tokens, sizes = self._trie.encode_documents(data, np.ascontiguousarray(offsets, dtype=np.int64))
        return np.frombuffer(tokens, dtype=np.uint16), np.frombuffer(sizes, dtype=np.int64)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()  # plain ints hash faster than numpy scalars
        try:
            return b"".join(map(self._token_bytes.__getitem__, ids))
        except KeyError as e:
            bad = e.args[0]
            if bad == EOD_ID:
                raise ValueError(
                    f"token id {bad} is the end-of-document marker and has no text; split the ids at it before decoding"
                ) from None
            raise ValueError(f"token id {bad} is not in the vocab {self.vocab_path.name}") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids; raises UnicodeDecodeError if their bytes are not valid UTF-8 (use decode_bytes then)."""
        return self.decode_bytes(ids).decode("utf-8")


def _unpickle(vocab_path: str, identity: str) -> WorldTokenizer:
    tokenizer = WorldTokenizer(vocab_path)
    if tokenizer.identity != identity:
        raise UserError(f"vocab file {vocab_path} changed while in use (was {identity}, now {tokenizer.identity}); "
                        "restore it, or start over with the new one")
    return tokenizer
