"""Read and write binidx token files (Megatron MMIDIDX, the layout RWKV-LM trains from).

`<prefix>.bin` is the raw tokens, no header. `<prefix>.idx`, little-endian:

    magic b"MMIDIDX\\x00\\x00" (9 bytes) | version uint64 = 1 | dtype code uint8 | N uint64 | M uint64   (34 bytes)
    sizes int32[N] | pointers int64[N] (byte offsets into .bin) | doc_idx int64[M]

RWKV convention: one sequence per document, each ending in token 0, doc_idx = [0, 1, ..., N].
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import numpy as np

from rwkv7_train.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, N sequences, M = len(doc_idx)
assert HEADER.size == 34

# Megatron's dtype codes; 6 and 7 are floats, which no tokenizer writes.
DTYPE_BY_CODE = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float64),
    8: np.dtype(np.uint16),
}
CODE_BY_DTYPE = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
                 np.dtype(np.int64): 5, np.dtype(np.uint16): 8}
EOD = 0  # end-of-document token appended after every document


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 while every id fits in it (the World vocab, 65536), else int32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


def bin_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.bin")


def idx_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.idx")


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform lets a directory be opened.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BinidxWriter:
    """Streams documents into `<prefix>.bin` and writes `<prefix>.idx` on finish().

    Both files are built under temporary names and renamed into place only when complete (.bin first, then .idx),
    so an interrupted run never leaves a pair that looks valid. Use as a context manager to clean up on errors.
    """

    def __init__(self, prefix: str | os.PathLike, vocab_size: int = 65536):
        self.prefix = os.fspath(prefix)
        self.vocab_size = int(vocab_size)
        self.dtype = dtype_for_vocab(self.vocab_size)
        self.bin_path, self.idx_path = bin_path(prefix), idx_path(prefix)
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        # The pid keeps two processes building the same prefix from writing into one temporary file.
        suffix = f".tmp-{os.getpid()}"
        self._bin_tmp = self.bin_path.with_name(self.bin_path.name + suffix)
        self._idx_tmp = self.idx_path.with_name(self.idx_path.name + suffix)
        self._bin = open(self._bin_tmp, "wb")
        self._bin_sha = hashlib.sha256()
        self._sizes: list[int] = []
        self.n_tokens = 0
        self.sha256: dict[str, str] = {}  # filled by finish(): {"bin": hex, "idx": hex}
        self._done = False

    @property
    def n_documents(self) -> int:
        return len(self._sizes)

    def add_document(self, tokens: np.ndarray) -> None:
        """Append one document; token 0 is added after it (RWKV's end of document)."""
        if self._done:
            raise RuntimeError(f"BinidxWriter for {self.prefix} is already finished")
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or not (tokens.size == 0 or np.issubdtype(tokens.dtype, np.integer)):
            raise TypeError(f"add_document takes a 1-D integer array, got shape {tokens.shape} dtype {tokens.dtype}")
        if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise UserError(
                f"{self.bin_path}: token ids span {int(tokens.min())}..{int(tokens.max())}, outside the vocab 0.."
                f"{self.vocab_size - 1} this file is written for; pass the tokenizer's vocab_size to BinidxWriter"
            )
        doc = np.empty(tokens.size + 1, dtype=self.dtype.newbyteorder("<"))
        doc[:-1] = tokens
        doc[-1] = EOD
        data = doc.tobytes()
        self._bin.write(data)
        self._bin_sha.update(data)
        self._sizes.append(doc.size)
        self.n_tokens += doc.size

    def add_documents(self, tokens: np.ndarray, sizes: np.ndarray) -> None:
        """Append many documents at once (per-document calls cost more in Python than tokenizing a short one).
        tokens: the documents back to back, each already followed by its 0; sizes: their lengths, the 0 included.
        The ids must come from a tokenizer whose vocab fits this writer: unlike add_document, no range check."""
        if self._done:
            raise RuntimeError(f"BinidxWriter for {self.prefix} is already finished")
        data = memoryview(np.ascontiguousarray(tokens, dtype=self.dtype.newbyteorder("<")))
        self._bin.write(data)
        self._bin_sha.update(data)
        self._sizes.extend(np.asarray(sizes).tolist())
        self.n_tokens += int(np.asarray(tokens).size)

    def finish(self) -> None:
        """Write the index and move both files into place (atomically, .bin then .idx)."""
        if self._done:
            return
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()

        sizes = np.asarray(self._sizes, dtype="<i4")
        if sizes.size and int(sizes.max()) >= 2**31:
            raise UserError(f"{self.bin_path}: a document has over 2**31 tokens, more than binidx's int32 sizes hold")
        pointers = np.zeros(sizes.size, dtype="<i8")
        np.cumsum(sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.arange(sizes.size + 1, dtype="<i8")
        index = b"".join([
            HEADER.pack(MAGIC, VERSION, CODE_BY_DTYPE[self.dtype], sizes.size, doc_idx.size),
            sizes.tobytes(), pointers.tobytes(), doc_idx.tobytes(),
        ])
        with open(self._idx_tmp, "wb") as f:
            f.write(index)
            f.flush()
            os.fsync(f.fileno())

        os.replace(self._bin_tmp, self.bin_path)
        os.replace(self._idx_tmp, self.idx_path)
        _fsync_dir(self.idx_path.parent)
        self.sha256 = {"bin": self._bin_sha.hexdigest(), "idx": hashlib.sha256(index).hexdigest()}
        self._done = True

    def abort(self) -> None:
        """Drop the temporary files; the final names are left untouched."""
        if not self._bin.closed:
            self._bin.close()
        self._bin_tmp.unlink(missing_ok=True)
        self._idx_tmp.unlink(missing_ok=True)
        self._done = True

    def __enter__(self) -> "BinidxWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()


class BinidxReader:
    """A validated, memory-mapped binidx pair.

    tokens: every token of .bin as one flat array (RWKV-LM samples windows across document boundaries);
    sizes / pointers / doc_idx: the index arrays; document(i): the tokens of document i (with its trailing 0).
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = os.fspath(prefix)
        self.bin_path, self.idx_path = bin_path(prefix), idx_path(prefix)
        for path in (self.idx_path, self.bin_path):
            if not path.is_file():
                raise UserError(f"binidx file not found: {path}; write {self.prefix}.bin/.idx with rwkv7-prep")
        self._read_index()
        self._map_tokens()

    def _read_index(self) -> None:
        path = self.idx_path
        idx_bytes = path.stat().st_size
        if idx_bytes < HEADER.size:
            raise UserError(f"{path} is {idx_bytes} bytes, shorter than the 34-byte binidx header; re-run rwkv7-prep")
        with open(path, "rb") as f:
            magic, version, code, n, m = HEADER.unpack(f.read(HEADER.size))
        if magic != MAGIC:
            raise UserError(f"{path} is not a binidx index (magic {magic!r}, expected {MAGIC!r}); "
                            "pass the prefix of a .bin/.idx pair written by rwkv7-prep")
        if version != VERSION:
            raise UserError(f"{path} has binidx version {version}, only version {VERSION} is supported; "
                            "re-run rwkv7-prep")
        if code not in DTYPE_BY_CODE:
            raise UserError(f"{path} has unknown dtype code {code} (known: 1-8); re-run rwkv7-prep")
        if code in (6, 7):
            raise UserError(f"{path} declares float64 data (dtype code {code}), not token ids; re-run rwkv7-prep")
        expected = HEADER.size + n * 4 + n * 8 + m * 8
        if idx_bytes != expected:
            raise UserError(f"{path} is {idx_bytes} bytes but its header (N={n}, M={m}) implies {expected}; "
                            "the index is truncated or corrupt, re-run rwkv7-prep")
        self.dtype = DTYPE_BY_CODE[code].newbyteorder("<")
        raw = np.memmap(path, mode="r", dtype=np.uint8)
        self.sizes = np.frombuffer(raw, dtype="<i4", count=n, offset=HEADER.size)
        self.pointers = np.frombuffer(raw, dtype="<i8", count=n, offset=HEADER.size + 4 * n)
        self.doc_idx = np.frombuffer(raw, dtype="<i8", count=m, offset=HEADER.size + 12 * n)

        if n and int(self.sizes.min()) < 0:
            raise UserError(f"{path} has a negative document size; the index is corrupt, re-run rwkv7-prep")
        # Documents must lie back to back from byte 0: that is what lets the .bin be read as one token stream.
        item = self.dtype.itemsize
        if n and (self.pointers[0] != 0 or np.any(np.diff(self.pointers) != self.sizes[:-1].astype(np.int64) * item)):
            raise UserError(f"{path}: document pointers do not follow the sizes back to back; "
                            "the index is corrupt, re-run rwkv7-prep")
        self.n_tokens = int(self.sizes.sum(dtype=np.int64))

    def _map_tokens(self) -> None:
        path = self.bin_path
        item = self.dtype.itemsize
        actual, expected = path.stat().st_size, self.n_tokens * item
        if actual != expected:
            raise UserError(
                f"{path} is {actual} bytes but {self.idx_path} describes {self.n_tokens} tokens of "
                f"{self.dtype.name} = {expected} bytes; the .bin is truncated or belongs to another index, "
                "re-run rwkv7-prep"
            )
        # np.memmap cannot map an empty file.
        if self.n_tokens == 0:
            self.tokens = np.zeros(0, dtype=self.dtype)
        else:
            self.tokens = np.memmap(path, mode="r", dtype=self.dtype, shape=(self.n_tokens,))

    @property
    def n_documents(self) -> int:
        return int(self.sizes.size)

    # Pickle by name, not by content: DataLoader workers reopen the maps instead of receiving copies of the data.
    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"])

    def __len__(self) -> int:
        return self.n_documents

    def document(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start:start + int(self.sizes[i])]

    def __repr__(self) -> str:
        return f"BinidxReader({self.prefix!r}, {self.n_documents} documents, {self.n_tokens} tokens, {self.dtype.name})"


def open_binidx(prefix: str | os.PathLike) -> BinidxReader:
    """Open and validate `<prefix>.bin` / `<prefix>.idx`."""
    return BinidxReader(prefix)
