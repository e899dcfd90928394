"""The token cache: every story tokenized once into flat, memory-mappable uint16/uint32 shards.

Layout of a cache directory `<cache_root>/<fingerprint>/`:
    manifest.json          format version, fingerprint, tokenizer, sources, per-split token and byte counts
    train-00000.bin ...    the packed token stream: <doc_start> story <doc_start> story ... (no padding)
    train.docs.npy         int64 (n_docs, 2): token offset of each story's doc_start token, UTF-8 bytes of the story
    val-00000.bin, val.docs.npy

The fingerprint hashes the tokenizer file, the source files and the format version, so a tokenizer change
can never silently reuse a stale cache and a repeated prepare with the same inputs is a cache hit. A cache is
built in a temporary directory and renamed into place: an interrupted prepare never looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinystories.errors import UserError
from tinystories.textdata import iter_documents, list_text_files, split_files
from tinystories.tokenizer import TextTokenizer

FORMAT_VERSION = 1
SHARD_TOKENS = 1 << 28  # 512 MiB of uint16 per shard
BATCH_DOCS = 2048


def _file_signature(path: Path) -> dict:
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if st.st_size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())
    return {"path": str(path.resolve()), "size": st.st_size, "sample_sha256": h.hexdigest()}


def fingerprint(tok: TextTokenizer, files: list[Path], val_fraction: float, max_stories: int | None) -> str:
    h = hashlib.sha256()
    h.update(f"format={FORMAT_VERSION};val_fraction={val_fraction};max_stories={max_stories}".encode())
    h.update(tok.sha256.encode())
    for f in files:
        h.update(json.dumps(_file_signature(f), sort_keys=True).encode())
    return h.hexdigest()[:16]


class _SplitWriter:
    def __init__(self, directory: Path, split: str, dtype):
        self.dir, self.split, self.dtype = directory, split, dtype
        self.shards: list[dict] = []
        self.docs: list[np.ndarray] = []
        self.tokens = 0
        self.bytes = 0
        self._f = None
        self._in_shard = 0

    def _open_shard(self):
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._f = open(self.dir / name, "wb")
        self.shards.append({"file": name, "tokens": 0})
        self._in_shard = 0

    def add(self, token_lists: list[list[int]], byte_counts: list[int], doc_start: int) -> None:
        lengths = np.fromiter((len(t) + 1 for t in token_lists), dtype=np.int64, count=len(token_lists))
        flat = np.empty(int(lengths.sum()), dtype=self.dtype)
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        flat[starts] = doc_start
        for s, ids in zip(starts, token_lists):
            flat[s + 1 : s + 1 + len(ids)] = ids
        if self._f is None or self._in_shard + len(flat) > SHARD_TOKENS:
            if self._f is not None:
                self._f.close()
            self._open_shard()
        # offsets are global positions in the concatenation of shards
        self.docs.append(np.stack([starts + self.tokens, np.asarray(byte_counts, dtype=np.int64)], axis=1))
        flat.tofile(self._f)
        self._in_shard += len(flat)
        self.shards[-1]["tokens"] += len(flat)
        self.tokens += len(flat)
        self.bytes += int(sum(byte_counts))

    def close(self) -> dict:
        if self._f is not None:
            self._f.close()
        docs = np.concatenate(self.docs) if self.docs else np.zeros((0, 2), dtype=np.int64)
        np.save(self.dir / f"{self.split}.docs.npy", docs)
        return {"tokens": self.tokens, "bytes": self.bytes, "documents": int(len(docs)), "shards": self.shards}


def _write_batches(writer: _SplitWriter, tok: TextTokenizer, docs, progress=None) -> None:
    batch: list[str] = []

    def flush():
        ids = tok.encode_batch(batch)
        writer.add(ids, [len(d.encode("utf-8")) for d in batch], tok.doc_start_id)
        if progress:
            progress(writer.split, writer.tokens, sum(len(b) for b in batch))
        batch.clear()

    for doc in docs:
        batch.append(doc)
        if len(batch) >= BATCH_DOCS:
            flush()
    if batch:
        flush()


def prepare(
    tok: TextTokenizer,
    source: str | Path,
    cache_root: str | Path,
    val_fraction: float = 0.01,
    max_stories: int | None = None,
    progress=None,
) -> tuple[Path, bool]:
    """Build (or find) the cache for (tokenizer, source). Returns (cache directory, was it a cache hit)."""
    files = list_text_files(source)
    fp = fingerprint(tok, files, val_fraction, max_stories)
    cache_root = Path(cache_root)
    final = cache_root / fp
    if (final / "manifest.json").is_file():
        return final, True
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{cache_root}: cannot create the cache directory ({e.strerror})") from None
    tmp = cache_root / f".tmp-{fp}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
        train_files, val_files = split_files(files)
        train_w, val_w = _SplitWriter(tmp, "train", dtype), _SplitWriter(tmp, "val", dtype)
        if val_files and train_files:
            _write_batches(train_w, tok, iter_documents(train_files, max_stories), progress)
            _write_batches(val_w, tok, iter_documents(val_files), progress)
        else:  # deterministic held-out fraction: every k-th story
            k = max(2, round(1 / val_fraction)) if val_fraction > 0 else 0
            train_docs, val_docs = [], []
            for i, doc in enumerate(iter_documents(train_files or val_files, max_stories)):
                (val_docs if k and i % k == k - 1 else train_docs).append(doc)
                if len(train_docs) >= BATCH_DOCS:
                    _write_batches(train_w, tok, train_docs, progress)
                    train_docs = []
                if len(val_docs) >= BATCH_DOCS:
                    _write_batches(val_w, tok, val_docs, progress)
                    val_docs = []
            _write_batches(train_w, tok, train_docs, progress)
            _write_batches(val_w, tok, val_docs, progress)
        splits = {"train": train_w.close(), "val": val_w.close()}
        if splits["train"]["tokens"] == 0:
            raise UserError(f"{source}: no stories found to build the cache from")
        manifest = {
            "format_version": FORMAT_VERSION,
            "fingerprint": fp,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "dtype": np.dtype(dtype).name,
            "tokenizer": tok.describe() | {"path": str(tok.path.resolve())},
            "sources": [_file_signature(f) | {"split": "val" if f in val_files and train_files else "train"} for f in files],
            "val_fraction": val_fraction,
            "max_stories": max_stories,
            "splits": splits,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, False


@dataclass
class Split:
    """A split of the cache, memory-mapped."""

    shards: list[np.memmap]
    docs: np.ndarray  # (n_docs, 2): token offset, bytes
    tokens: int
    bytes: int

    def stream(self) -> np.ndarray:
        """The whole split as one array (concatenates shards when there are several)."""
        return self.shards[0] if len(self.shards) == 1 else np.concatenate(self.shards)


@dataclass
class TokenCache:
    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path) -> "TokenCache":
        path = Path(path)
        mf = path / "manifest.json"
        if not mf.is_file():
            raise UserError(f"{path}: not a token cache (no manifest.json); build one with `tinystories data prepare`")
        manifest = json.loads(mf.read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{path}: cache format {manifest.get('format_version')} is not {FORMAT_VERSION}; rebuild it with `tinystories data prepare`")
        return cls(path, manifest)

    def split(self, name: str) -> Split:
        info = self.manifest["splits"][name]
        dtype = np.dtype(self.manifest["dtype"])
        shards = [np.memmap(self.path / s["file"], dtype=dtype, mode="r") for s in info["shards"] if s["tokens"]]
        return Split(shards, np.load(self.path / f"{name}.docs.npy"), info["tokens"], info["bytes"])

    @property
    def tokenizer_sha256(self) -> str:
        return self.manifest["tokenizer"]["sha256"]

    def check_tokenizer(self, tok: TextTokenizer) -> None:
        if tok.sha256 != self.tokenizer_sha256:
            raise UserError(
                f"{self.path}: this cache was built with tokenizer {self.manifest['tokenizer']['path']}, not {tok.path}; "
                f"run `tinystories data prepare --tokenizer {tok.path}` to build a matching cache"
            )
