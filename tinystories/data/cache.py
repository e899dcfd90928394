"""The token cache: every story tokenized once into flat, memory-mappable uint16/uint32 shards.

Layout of a cache directory `<cache_root>/<fingerprint>/`:
    manifest.json              format version, fingerprint, tokenizer, sources, per-split token and byte counts,
                               the shards in use, and `part` (null for the whole text, else the units it covers);
                               the size and hashes of every file it lists, and a hash of itself (data/integrity.py)
    train-00000.bin ...        one shard per unit of work: <doc_start> story <doc_start> story ... (no padding)
    train-00000.docs.npy       int64 (n_docs, 2) of that shard: token offset of each story's doc_start, UTF-8 bytes
    unit-00000.json            written last for each unit: the unit is finished (what makes a build resumable)
    train.docs.npy             the shards' story index concatenated, offsets global across the shards in use
    val-00000.bin, val-00000.docs.npy, val.docs.npy

The text is cut into units of about 32 MiB that end at story boundaries (`text.file_units`); each unit is
tokenized by a worker process into its own shard, written under a temporary name and renamed, then marked
finished. An interrupted build keeps its finished units and a rerun does only the rest; manifest.json is
written (atomically) only when the requested units are all there, so an interrupted prepare never looks
complete. The fingerprint hashes the tokenizer file, the source files, the format version and the options, so
a tokenizer change can never silently reuse a stale cache and a repeated prepare with the same inputs is a hit.

A *part* of the cache (`train_tokens=N`: the first units of the train text holding at least N tokens, the whole
validation split) is what a short run needs; its manifest says so (`part`). It lives in the same directory as
the whole cache would: a later request for more tokens, or for all of them, builds only the missing units.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np

from tinystories.core.atomic import atomic_file, ensure_writable_dir
from tinystories.core.errors import UserError
from tinystories.data.integrity import (
    cache_files,
    check_cache,
    file_problem,
    file_record,
    manifest_checksum,
    read_manifest,
    sample_sha256,
)
from tinystories.data.text import file_mode, file_units, list_text_files, split_files, unit_documents
from tinystories.data.tokenizer import TextTokenizer

FORMAT_VERSION = 3
BATCH_DOCS = 2048
VAL_UNIT_BYTES = 4 << 20  # a validation file is cut in units of 4 MiB (~1M tokens)
PART_VAL_BYTES = 4 << 20  # a part of the cache holds the validation units that start within the first 4 MiB


def _file_signature(path: Path) -> dict:
    size = path.stat().st_size
    return {"path": str(path.resolve()), "size": size, "sample_sha256": sample_sha256(path, size)}


def fingerprint(tok: TextTokenizer, files: list[Path], val_fraction: float, max_stories: int | None,
                fmt: str = "plain") -> str:
    h = hashlib.sha256()
    h.update(f"format={FORMAT_VERSION};val_fraction={val_fraction};max_stories={max_stories}".encode())
    if fmt != "plain":  # the text format (data/requests.py); plain keeps the fingerprints caches already have
        h.update(f";text_format={fmt}".encode())
    h.update(tok.sha256.encode())
    for f in files:
        h.update(json.dumps(_file_signature(f), sort_keys=True).encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Unit:
    """A byte range of one source file, tokenized into one shard per split it feeds."""

    index: int  # shard number within its role
    role: str  # "train" (train file), "val" (validation file), "mixed" (train file, every k-th story held out)
    path: str
    start: int
    end: int
    mode: str
    fmt: str = "plain"  # the text format the stories are rendered in (data/requests.py)

    @property
    def name(self) -> str:
        return f"{'val' if self.role == 'val' else 'unit'}-{self.index:05d}"

    @property
    def size(self) -> int:
        return self.end - self.start


def plan_units(files: list[Path], holdout: bool, fmt: str = "plain") -> list[Unit]:
    """Every unit of work, validation files first (small, and a part of the cache always has all of them)."""
    train_files, val_files = split_files(files)
    units: list[Unit] = []
    for role, group in (("val", val_files if train_files else []),
                        ("mixed" if holdout else "train", train_files or val_files)):
        n = 0
        for f in group:
            mode = file_mode(f)
            # validation files in smaller units: a part of the cache takes only the first ones
            for start, end in file_units(f, VAL_UNIT_BYTES if role == "val" else None):
                units.append(Unit(n, role, str(f), start, end, mode, fmt))
                n += 1
    return units


_WORKER_TOKENIZERS: dict[str, TextTokenizer] = {}


def _init_worker(parent: int) -> None:
    import signal

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core does the parallelism
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's: it stops the workers
    try:  # Linux: a worker ends with the main process, even when that is killed
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the main process died before the line above: nothing will signal this one
        os._exit(1)


def _atomic_save(path: Path, write) -> None:
    with atomic_file(path, "wb") as f:
        write(f)


def build_unit(tok_path: str, cache_dir: str, unit: Unit, k: int, limit: int | None, dtype: str) -> dict:
    """Tokenize one unit into its shard(s) and mark it finished. Runs in a worker process."""
    from tinystories.data.tokenizer import load_tokenizer

    tok = _WORKER_TOKENIZERS.get(tok_path) or _WORKER_TOKENIZERS.setdefault(tok_path, load_tokenizer(tok_path))
    docs = unit_documents(Path(unit.path), unit.start, unit.end, unit.mode, unit.fmt)
    if limit is not None:
        docs = docs[:limit]
    by_split: dict[str, list[str]] = {"train": [], "val": []}
    for i, d in enumerate(docs):
        held = unit.role == "val" or (unit.role == "mixed" and k and i % k == k - 1)
        by_split["val" if held else "train"].append(d)
    out = Path(cache_dir)
    meta: dict = {"unit": unit.name, "source": [unit.path, unit.start, unit.end], "bytes_read": unit.size,
                  "documents_read": len(docs), "splits": {}}
    for split, split_docs in by_split.items():
        if not split_docs and not (unit.role == "val" and split == "val"):
            continue
        parts, offsets, nbytes, n = [], [], [], 0
        for b in range(0, len(split_docs), BATCH_DOCS):
            batch = split_docs[b: b + BATCH_DOCS]
            ids = tok.encode_batch(batch)
            lengths = np.fromiter((len(t) + 1 for t in ids), dtype=np.int64, count=len(ids))
            offsets.append(n + np.concatenate(([0], np.cumsum(lengths)[:-1])))
            nbytes.append(np.fromiter((len(d.encode("utf-8")) for d in batch), dtype=np.int64, count=len(batch)))
            flat = np.fromiter(chain.from_iterable(chain((tok.doc_start_id,), t) for t in ids), dtype=dtype,
                               count=int(lengths.sum()))
            parts.append(flat)
            n += len(flat)
        stem = f"{split}-{unit.index:05d}"
        stream = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
        index = (np.stack([np.concatenate(offsets), np.concatenate(nbytes)], axis=1) if offsets
                 else np.zeros((0, 2), dtype=np.int64))
        _atomic_save(out / f"{stem}.bin", stream.tofile)
        _atomic_save(out / f"{stem}.docs.npy", lambda f: np.save(f, index))
        meta["splits"][split] = {"file": f"{stem}.bin", "tokens": int(n), "bytes": int(index[:, 1].sum()),
                                 "documents": int(len(index)), "record": file_record(out / f"{stem}.bin"),
                                 "docs_record": file_record(out / f"{stem}.docs.npy")}
    _atomic_save(out / f"{unit.name}.json", lambda f: f.write(json.dumps(meta).encode()))
    return meta


def _read_meta(cache_dir: Path, unit: Unit) -> dict | None:
    f = cache_dir / f"{unit.name}.json"
    if not f.is_file():
        return None
    try:
        meta = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("source") != [unit.path, unit.start, unit.end]:  # another cut of the text: not this unit
        return None
    try:  # a unit whose files are missing or damaged is built again
        damaged = any(file_problem(cache_dir / s["file"], s["record"], full=False)
                      or file_problem(cache_dir / s["file"].replace(".bin", ".docs.npy"), s["docs_record"], full=False)
                      for s in meta["splits"].values())
    except (KeyError, TypeError):
        return None
    return None if damaged else meta


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


CACHE_DIR_FLAGS = "--cache-dir, --data-dir or data.data_dir"  # where a cache root is chosen, for errors


def prepare(
    tok: TextTokenizer,
    source: str | Path,
    cache_root: str | Path,
    val_fraction: float = 0.01,
    max_stories: int | None = None,
    progress=None,
    train_tokens: int | None = None,
    workers: int | None = None,
    fmt: str = "plain",
) -> tuple[Path, bool]:
    """Build (or find) the cache for (tokenizer, source). Returns (cache directory, was it a cache hit).

    `train_tokens`: build only a part, the first units holding at least this many train tokens (None: all).
    `progress(done_bytes, total_bytes)` is called as units finish. Finished units of an earlier, interrupted
    or smaller build are reused."""
    files = list_text_files(source)
    fp = fingerprint(tok, files, val_fraction, max_stories, fmt)
    cache_dir = Path(cache_root) / fp
    mf = cache_dir / "manifest.json"
    if mf.is_file():
        old = read_manifest(cache_dir, FORMAT_VERSION)  # a damaged manifest is an error, not a silent rebuild
        whole = all((cache_dir / name).is_file() for name, _ in cache_files(old))  # else: rebuild what was deleted
        if whole and (old.get("part") is None or (train_tokens is not None
                                                  and old["splits"]["train"]["tokens"] >= train_tokens)):
            return cache_dir, True
    ensure_writable_dir(cache_dir.parent, "cache", CACHE_DIR_FLAGS)
    cache_dir.mkdir(exist_ok=True)
    for stale in cache_dir.glob(".*.tmp-*"):  # half-written files of an interrupted build
        stale.unlink(missing_ok=True)
    dtype = "uint16" if tok.vocab_size <= 65536 else "uint32"
    train_files, val_files = split_files(files)
    holdout = not (val_files and train_files)
    k = max(2, round(1 / val_fraction)) if holdout and val_fraction > 0 else 0
    units = plan_units(files, holdout, fmt)
    metas = _build(tok, cache_dir, units, k, dtype, max_stories, train_tokens, workers or default_workers(),
                   progress)
    used = [u for u in units if u.name in metas]
    part = _part(units, used, train_tokens)
    splits = {split: _join_split(cache_dir, split, used, metas) for split in ("train", "val")}
    if splits["train"]["tokens"] == 0:
        raise UserError(f"{source}: no stories found to build the cache from")
    manifest = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fp + ("" if part is None else f"-part{part['units']}of{part['of']}"),
        "dtype": dtype,
        "tokenizer": tok.describe() | {"path": str(tok.path.resolve())},
        "sources": [_file_signature(f) | {"split": "val" if f in val_files and train_files else "train"}
                    for f in files],
        "val_fraction": val_fraction,
        "max_stories": max_stories,
        "text_format": fmt,
        "part": part,
        "splits": splits,
    }
    manifest["checksum"] = manifest_checksum(manifest)
    _atomic_save(mf, lambda f: f.write(json.dumps(manifest, indent=2).encode()))
    return cache_dir, False


def _part(units: list[Unit], used: list[Unit], train_tokens: int | None) -> dict | None:
    """The manifest's `part`: which units a part of the cache holds (None: all of them, the whole cache)."""
    if len(used) == len(units):
        return None
    return {"units": len([u for u in used if u.role != "val"]), "of": len([u for u in units if u.role != "val"]),
            "val_units": len([u for u in used if u.role == "val"]),
            "val_of": len([u for u in units if u.role == "val"]), "train_tokens_wanted": train_tokens}


def _join_split(cache_dir: Path, split: str, used: list[Unit], metas: dict[str, dict]) -> dict:
    """A split's shards in use, in order, and their story index joined into SPLIT.docs.npy (offsets made global)."""
    shards, docs, tokens, nbytes, ndocs = [], [], 0, 0, 0
    for u in used:
        s = metas[u.name]["splits"].get(split)
        if not s:
            continue
        if s["tokens"]:
            shards.append({"file": s["file"], "tokens": s["tokens"], "record": s["record"]})
            docs.append(np.load(cache_dir / f"{split}-{u.index:05d}.docs.npy") + np.array([tokens, 0]))
        tokens += s["tokens"]
        nbytes += s["bytes"]
        ndocs += s["documents"]
    index = np.concatenate(docs) if docs else np.zeros((0, 2), dtype=np.int64)
    _atomic_save(cache_dir / f"{split}.docs.npy", lambda f: np.save(f, index))
    return {"tokens": tokens, "bytes": nbytes, "documents": ndocs, "shards": shards, "docs": f"{split}.docs.npy",
            "docs_record": file_record(cache_dir / f"{split}.docs.npy")}


class _Taken:
    """The finished units taken so far, in order: their metadata, the train tokens and stories they hold (to stop
    when there are enough), and the progress of the text tokenized now (units reused from disk are not counted)."""

    def __init__(self, total: int, train_tokens: int | None, max_stories: int | None, progress):
        self.metas: dict[str, dict] = {}
        self.total, self.done_bytes, self.progress = total, 0, progress
        self.have_train, self.train_tokens, self.left = 0, train_tokens, max_stories

    def enough(self) -> bool:
        return ((self.train_tokens is not None and self.have_train >= self.train_tokens)
                or (self.left is not None and self.left <= 0))

    def take(self, u: Unit, meta: dict, reused: bool) -> None:
        self.metas[u.name] = meta
        self.have_train += meta["splits"].get("train", {}).get("tokens", 0)
        if u.role != "val" and self.left is not None:
            self.left -= meta["documents_read"]
        if reused:
            self.total -= u.size
            return
        self.done_bytes += u.size
        if self.progress:
            self.progress(self.done_bytes, max(self.total, self.done_bytes))


def _build(tok, cache_dir: Path, units: list[Unit], k: int, dtype: str, max_stories: int | None,
           train_tokens: int | None, workers: int, progress) -> dict[str, dict]:
    """Finished-unit metadata for the units in use: reused from disk or built, in order, `workers` at a time."""
    if train_tokens is not None:  # a part: the first validation units only
        val_units = [u for u in units if u.role == "val"]
        late = {u.name for i, u in enumerate(val_units) if sum(v.size for v in val_units[:i]) >= PART_VAL_BYTES}
        units = [u for u in units if u.name not in late]
    total = sum(u.size for u in units)
    if train_tokens is not None:  # a first guess of the bytes needed (4 bytes/token), refined as units finish
        total = min(total, sum(u.size for u in units if u.role == "val") + train_tokens * 4)
    taken = _Taken(total, train_tokens, max_stories, progress)
    tok_path = str(tok.path.resolve())
    if workers <= 1 or max_stories is not None or len(units) == 1:
        _build_here(tok_path, cache_dir, units, k, dtype, taken)
    else:
        _build_in_workers(tok_path, cache_dir, units, k, dtype, workers, taken)
    return taken.metas


def _build_here(tok_path: str, cache_dir: Path, units: list[Unit], k: int, dtype: str, taken: _Taken) -> None:
    """One unit after another in this process (one worker, or --max-stories: a unit may be cut short)."""
    for u in units:
        if u.role != "val" and taken.enough():
            break
        meta = _read_meta(cache_dir, u)
        left = taken.left
        reused = meta is not None and not (u.role != "val" and left is not None and meta["documents_read"] > left)
        if not reused:
            meta = build_unit(tok_path, str(cache_dir), u, k, left if u.role != "val" else None, dtype)
        taken.take(u, meta, reused)


def _build_in_workers(tok_path: str, cache_dir: Path, units: list[Unit], k: int, dtype: str, workers: int,
                      taken: _Taken) -> None:
    """Units built by `workers` processes, taken in order; the workers stop as soon as there is enough."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                               initargs=(os.getpid(),))
    futures: dict[str, object] = {}
    queue = list(units)
    try:
        for u in units:
            if u.role != "val" and taken.enough():
                break
            # keep `workers` units in flight ahead of the one taken next
            while queue and len(futures) < workers + 1:
                q = queue.pop(0)
                meta = _read_meta(cache_dir, q)
                futures[q.name] = meta if meta is not None else pool.submit(
                    build_unit, tok_path, str(cache_dir), q, k, None, dtype)
            f = futures.pop(u.name)
            taken.take(u, f if isinstance(f, dict) else f.result(), isinstance(f, dict))
    finally:
        # done, enough, Ctrl-C or an error: stop the workers now; a unit they were on is left as temporary
        # files, removed by the next build (finished units stay)
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for p in processes:
            if p.is_alive():
                p.terminate()
        for p in processes:
            p.join()


@dataclass
class Split:
    """A split of the cache, memory-mapped."""

    shards: list[np.memmap]
    docs: np.ndarray  # (n_docs, 2): token offset, bytes
    tokens: int
    bytes: int

    def stream(self) -> "np.ndarray | ShardStream":
        """The whole split as one token sequence: the memory map itself for one shard, else a view over the
        shards that reads only the slices asked for (a split of 470M tokens is never loaded whole)."""
        return self.shards[0] if len(self.shards) == 1 else ShardStream(self.shards)


class ShardStream:
    """Shards seen as one sequence: len(), s[i] and s[a:b] (a contiguous slice, read from the shards it spans)."""

    def __init__(self, shards: list[np.ndarray]):
        self.shards = shards
        self.starts = np.concatenate(([0], np.cumsum([len(s) for s in shards])))
        self.dtype = shards[0].dtype if shards else np.dtype(np.uint16)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, key):
        if isinstance(key, slice):
            a, b, step = key.indices(len(self))
            if step != 1:
                return self[a:b][::step]
            if b <= a:
                return np.zeros(0, dtype=self.dtype)
            first = int(np.searchsorted(self.starts, a, side="right")) - 1
            last = int(np.searchsorted(self.starts, b, side="left")) - 1
            parts = [np.asarray(self.shards[i][max(a - self.starts[i], 0): b - self.starts[i]])
                     for i in range(first, last + 1)]
            return parts[0] if len(parts) == 1 else np.concatenate(parts)
        i = int(key) + (len(self) if int(key) < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(key)
        j = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.shards[j][i - self.starts[j]]

    def __array__(self, dtype=None, copy=None):
        whole = np.concatenate(self.shards) if self.shards else np.zeros(0, dtype=self.dtype)
        return whole if dtype is None else whole.astype(dtype)


@dataclass
class TokenCache:
    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path) -> "TokenCache":
        """Open the cache at `path`, checking its manifest and the size and sample hash of every file it lists."""
        path = Path(path)
        if not (path / "manifest.json").is_file():
            raise UserError(f"{path}: not a token cache (no manifest.json); build one with `tinystories data prepare`")
        manifest = read_manifest(path, FORMAT_VERSION)
        check_cache(path, manifest)
        return cls(path, manifest)

    def split(self, name: str) -> Split:
        info = self.manifest["splits"][name]
        dtype = np.dtype(self.manifest["dtype"])
        shards = [np.memmap(self.path / s["file"], dtype=dtype, mode="r") for s in info["shards"] if s["tokens"]]
        docs = np.load(self.path / info["docs"], mmap_mode="r")  # 2.7M stories: 43 MB, read on demand
        return Split(shards, docs, info["tokens"], info["bytes"])

    @property
    def tokenizer_sha256(self) -> str:
        return self.manifest["tokenizer"]["sha256"]

    def check_tokenizer(self, tok: TextTokenizer) -> None:
        if tok.sha256 != self.tokenizer_sha256:
            raise UserError(
                f"{self.path}: this cache was built with tokenizer {self.manifest['tokenizer']['path']}, "
                f"not {tok.path}; "
                f"run `tinystories data prepare --tokenizer {tok.path}` to build a matching cache"
            )
