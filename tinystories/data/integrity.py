"""Content hashes of a token cache's files, and the checks that use them.

Every file a cache is read from (each shard, each split's story index) is recorded in its manifest.json with its
size, its SHA-256 and a sample hash (the SHA-256 of its first and last MiB: the whole file up to 2 MiB), and a
unit's record (unit-NNNNN.json) does the same for the files of that unit. The manifest holds a hash of its own
content (`checksum`), which covers the tokenizer's SHA-256 it records too.

Opening a cache checks the manifest's hash and each file's size and sample hash: at most 2 MiB read per file, so a
truncated, extended or swapped file and damage near either end are caught at once; `tinystories data verify`
reads every byte. A problem is a one-line UserError naming the file and what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tinystories.core.errors import UserError

SAMPLE_BYTES = 1 << 20  # the sample hash reads this much from each end of a file
MANIFEST = "manifest.json"
REBUILD = "delete it and rerun `tinystories data prepare` with the same --tokenizer and --from (only what is missing " \
          "is rebuilt)"


def sample_sha256(path: Path, size: int | None = None) -> str:
    """SHA-256 of the first and last SAMPLE_BYTES of a file (all of it when it holds at most twice that)."""
    size = path.stat().st_size if size is None else size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(SAMPLE_BYTES))
        if size > 2 * SAMPLE_BYTES:
            f.seek(-SAMPLE_BYTES, os.SEEK_END)
            h.update(f.read())
        elif size > SAMPLE_BYTES:
            h.update(f.read())
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def file_record(path: Path) -> dict:
    """What the manifest records of a file the cache wrote: size, sample hash, full hash."""
    size = path.stat().st_size
    return {"size": size, "sample_sha256": sample_sha256(path, size), "sha256": sha256_file(path)}


def file_problem(path: Path, rec: dict, full: bool) -> str | None:
    """What is wrong with `path` against its record `rec` (size and sample hash; every byte when `full`), or None."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    if size != rec["size"]:
        return f"{size:,} bytes, {rec['size']:,} when written (truncated or overwritten)"
    if sample_sha256(path, size) != rec["sample_sha256"] or (full and sha256_file(path) != rec["sha256"]):
        return "checksum mismatch: the file changed after it was written (a corrupt copy or disk)"
    return None


def manifest_checksum(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_manifest(cache_dir: Path, version: int) -> dict:
    """The manifest of `cache_dir` (format `version`), checked against its own hash. A UserError when unreadable,
    torn, edited or of another format."""
    mf = Path(cache_dir) / MANIFEST
    try:
        manifest = json.loads(mf.read_bytes())
        ok = isinstance(manifest, dict) and manifest.get("checksum") == manifest_checksum(manifest)
    except (OSError, ValueError):
        raise UserError(f"{mf}: truncated or corrupt (not valid JSON); {REBUILD}") from None
    if isinstance(manifest, dict) and manifest.get("format_version") != version:
        raise UserError(f"{cache_dir}: cache format {manifest.get('format_version')} is not {version}; "
                        "rebuild it with `tinystories data prepare`")
    if not ok:
        raise UserError(f"{mf}: checksum mismatch: the manifest changed after it was written; {REBUILD}")
    return manifest


def cache_files(manifest: dict) -> list[tuple[str, dict]]:
    """(file name, record) of every file the cache is read from: the shards and the story index of each split."""
    out = []
    for split in manifest["splits"].values():
        out += [(s["file"], s["record"]) for s in split["shards"]]
        out.append((split["docs"], split["docs_record"]))
    return out


def cache_problems(cache_dir: Path, manifest: dict, full: bool) -> list[str]:
    """One line per damaged file of the cache: "PATH: what is wrong"."""
    out = []
    for name, rec in cache_files(manifest):
        problem = file_problem(Path(cache_dir) / name, rec, full)
        if problem:
            out.append(f"{Path(cache_dir) / name}: {problem}")
    return out


def check_cache(cache_dir: Path, manifest: dict) -> None:
    """The cheap check made when a cache is opened: a UserError for the first damaged file."""
    problems = cache_problems(cache_dir, manifest, full=False)
    if problems:
        raise UserError(f"{problems[0]}; {REBUILD}")


def tokenizer_problem(manifest: dict) -> str | None:
    """Whether the tokenizer the cache was built with is still the file it was (the tokens belong to it)."""
    path = Path(manifest["tokenizer"]["path"])
    if not path.is_file():
        return f"{path}: the tokenizer this cache was built with is gone (the cache is still usable with a copy of it)"
    if sha256_file(path) != manifest["tokenizer"]["sha256"]:
        return (f"{path}: changed since this cache was built with it (sha256 differs): restore it, or build a "
                f"cache for the new one with `tinystories data prepare --tokenizer {path}`")
    return None
