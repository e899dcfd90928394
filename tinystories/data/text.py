"""Raw TinyStories text: download it from the Hugging Face Hub, find it on disk, and read it as documents.

Formats read (detected per file):
- the official text format: a story, then a line `<|endoftext|>`;
- JSON (llama2.c's `TinyStories_all_data/*.json`: a list of objects with a `story` field, and with the official
  request, `instruction` and `summary`, that the `instruct` format renders in front of the story) and JSONL;
- plain text: documents separated by blank lines, or, when a file has no blank line at all, one paragraph
  per line, the whole file being one document.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from tinystories.core.atomic import ensure_writable_dir, write_text_atomic
from tinystories.core.errors import UserError

END_OF_TEXT = "<|endoftext|>"
TEXT_SUFFIXES = (".txt", ".text", ".json", ".jsonl")
HUB_REPO = "roneneldan/TinyStories"
HUB_FILES = {
    "v2": ("TinyStoriesV2-GPT4-train.txt", "TinyStoriesV2-GPT4-valid.txt"),
    "v1": ("TinyStories-train.txt", "TinyStories-valid.txt"),
    "instruct": ("TinyStories_all_data.tar.gz",),  # the JSON shards with each story's request (data/requests.py)
}
SHARDS_DIR = "TinyStories_all_data"  # where `--version instruct` unpacks the archive, under the raw directory
UNPACKED_RATIO = 4.5  # unpacked JSON bytes per byte of the archive, for the disk check
DEFAULT_DATA_DIR = "data"
_PEEK = 1 << 20


def is_validation_file(path: Path) -> bool:
    name = path.name.lower()
    return "valid" in name or "val." in name or "-val" in name or "_val" in name or "test" in name


def _source_hint(flag: str) -> str:
    """How to name the raw text, for the command the user ran (`--from` in `data`/`tokenizer`, `--data` in `train`)."""
    return f"pass {flag} FILE_OR_DIR" + (", set data.source in the config" if flag == "--data" else "")


def list_text_files(source: str | Path, flag: str = "--from") -> list[Path]:
    """The text files under `source` (a file or a directory, searched recursively), sorted by path.

    `flag` is the option that named `source` in the command the user ran; error messages point at it."""
    path = Path(source)
    if not path.exists():
        raise UserError(f"{path}: no such file or directory ({_source_hint(flag)}, or run `tinystories data fetch`)")
    if path.is_file():
        return [path]
    files = sorted(
        p for p in path.rglob("*")
        if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise UserError(f"{path}: no text files ({', '.join(TEXT_SUFFIXES)}) in this directory (check {flag})")
    return files


def resolve_source(source: str | Path | None, data_dir: str | Path = DEFAULT_DATA_DIR, flag: str = "--from") -> Path:
    """The raw-text location: `source` when given, else the directory `data fetch` filled.

    `flag` is the option that gives the source in the command the user ran; the error message names it."""
    if source is not None:
        return Path(source)
    fetched = Path(data_dir) / "raw"
    if fetched.is_dir() and any(fetched.iterdir()):
        return fetched
    raise UserError(
        f"no raw text found: {_source_hint(flag)}, "
        f"or run `tinystories data fetch` to download TinyStories into {fetched}"
    )


def _decode_error(path: Path, err: UnicodeDecodeError, offset: int = 0) -> UserError:
    return UserError(
        f"{path}: invalid UTF-8 at byte {offset + err.start} "
        "(convert the file to UTF-8, e.g. `iconv -f latin1 -t utf-8`)"
    )


def _detect_text_mode(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(_PEEK)
    if not head.strip():
        raise UserError(f"{path}: the file is empty (expected TinyStories text)")
    if b"\x00" in head:
        raise UserError(f"{path}: looks like a binary file, not text (expected .txt, .json or .jsonl)")
    if END_OF_TEXT.encode() in head:
        return "endoftext"
    if b"\n\n" in head.replace(b"\r\n", b"\n"):
        return "blank-lines"
    return "one-document"


# A story boundary: in the official format a line that is `<|endoftext|>` (surrounding blanks allowed); in plain
# text a blank line. Files are read in byte ranges that end just after a boundary, so a range holds whole stories.
_BOUNDARY = {
    "endoftext": re.compile(r"^[^\S\n]*" + re.escape(END_OF_TEXT) + r"[^\S\n]*$", re.M),
    "blank-lines": re.compile(r"\n\s*\n"),
}
_BOUNDARY_BYTES = {
    "endoftext": re.compile(rb"\n[ \t\r\f\v]*" + re.escape(END_OF_TEXT.encode()) + rb"[ \t\r\f\v]*(?:\n|$)"),
    "blank-lines": re.compile(rb"\n[ \t\r\f\v]*\n"),
    "jsonl": re.compile(rb"\n"),
}
UNIT_BYTES = 32 << 20  # text per unit of work (a cache shard): 32 MiB


def file_mode(path: Path) -> str:
    """How a file is read: "endoftext", "blank-lines", "one-document" (.txt), "json" or "jsonl"."""
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty (expected TinyStories text)")
    if suffix == ".json":
        return "json"
    if suffix == ".jsonl":
        return "jsonl"
    if suffix in (".txt", ".text", ""):
        return _detect_text_mode(path)
    raise UserError(f"{path}: unknown format '{suffix}' (expected .txt, .json or .jsonl)")


def file_units(path: Path, unit_bytes: int | None = None) -> list[tuple[int, int]]:
    """Byte ranges [start, end) covering the file, each ending at a story boundary, about unit_bytes long.

    Deterministic for a given file and unit size: the unit of work of the token cache (one shard per unit),
    so that an interrupted build can be resumed unit by unit. JSON and one-document files are one unit."""
    unit_bytes = unit_bytes or UNIT_BYTES
    size = path.stat().st_size
    pattern = _BOUNDARY_BYTES.get(file_mode(path))
    if pattern is None:
        return [(0, size)]
    ranges, start = [], 0
    with open(path, "rb") as f:
        while size - start > unit_bytes:
            pos, end = start + unit_bytes, None
            while end is None:
                base = max(pos - 64, start)
                f.seek(base)
                window = f.read(1 << 20)
                m = pattern.search(window)
                if m is not None:
                    end = base + m.end()
                elif base + len(window) >= size:
                    break
                else:
                    pos = base + len(window)
            if end is None or end >= size:
                break
            ranges.append((start, end))
            start = end
    ranges.append((start, size))
    return ranges


def _decode(path: Path, raw: bytes, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _decode_error(path, e, offset) from None


def unit_documents(path: Path, start: int = 0, end: int | None = None, mode: str | None = None,
                   fmt: str = "plain") -> list[str]:
    """The stories in bytes [start, end) of a file (a range from `file_units`), stripped, empty ones dropped.

    fmt "instruct": each story behind its request (data/requests.py), the shards' own or one derived from it."""
    records = unit_records(path, start, end, mode)
    if fmt == "plain":
        return [story for story, _ in records]
    from tinystories.data.requests import render, request_of

    return [story if is_line_per_story(story) else render(story, request_of(obj) if obj else None)
            for story, obj in records]


def unit_records(path: Path, start: int = 0, end: int | None = None,
                 mode: str | None = None) -> list[tuple[str, dict | None]]:
    """(story, its JSON object or None for text) for each story in bytes [start, end) of a file."""
    mode = mode or file_mode(path)
    if mode == "json":
        return list(_iter_json_documents(path))
    with open(path, "rb") as f:
        f.seek(start)
        raw = f.read((end if end is not None else path.stat().st_size) - start)
    text = _decode(path, raw, start)
    if mode == "jsonl":
        return list(_jsonl_documents(path, text, start))
    if mode == "one-document":
        text = text.strip()
        return [(text, None)] if text else []
    return [(d, None) for d in (p.strip() for p in _BOUNDARY[mode].split(text)) if d]


def _story_of(obj, path: Path, where: str) -> str:
    if isinstance(obj, dict):
        obj = next((obj[key] for key in ("story", "text") if isinstance(obj.get(key), str)), None)
    if not isinstance(obj, str):
        raise UserError(f"{path}: {where} has no 'story' (or 'text') string field")
    bad = _SURROGATE.search(obj)
    if bad:  # a \ud800-style escape for half of a surrogate pair: no character, and no UTF-8 for it
        raise UserError(f"{path}: {where} holds a lone surrogate (\\u{ord(bad.group()):04x}), which is not a "
                        "character: fix the escape in the file")
    return obj


_SURROGATE = re.compile("[\ud800-\udfff]")


def _json_loads(text: str, path: Path, where: str | None = None):
    """json.loads of a file (or of its line `where`), with its errors, nesting deeper than the parser recurses
    included, as a one-line UserError."""
    head = f"{path}: {where} is" if where else f"{path}:"
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{head} not valid JSON ({e.msg}{'' if where else f' at line {e.lineno}'})") from None
    except RecursionError:
        raise UserError(f"{head} JSON nested too deeply to read (expected stories)") from None


def _iter_json_documents(path: Path) -> Iterator[tuple[str, dict | None]]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise _decode_error(path, e) from None
    data = _json_loads(text, path)
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of objects with a 'story' field")
    for i, obj in enumerate(data):
        story = _story_of(obj, path, f"item {i}").strip()
        if story:
            yield story, obj if isinstance(obj, dict) else None


def _jsonl_documents(path: Path, text: str, offset: int) -> Iterator[tuple[str, dict | None]]:
    for i, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"line {i}" if offset == 0 else f"line {i} after byte {offset}"
        obj = _json_loads(line, path, where)
        story = _story_of(obj, path, where).strip()
        if story:
            yield story, obj if isinstance(obj, dict) else None


def iter_file_documents(path: Path) -> Iterator[str]:
    mode = file_mode(path)
    for start, end in file_units(path):
        yield from unit_documents(path, start, end, mode)


def iter_documents(files: list[Path], max_docs: int | None = None) -> Iterator[str]:
    """Every story of every file, in order, stripped of surrounding whitespace."""
    n = 0
    for path in files:
        for doc in iter_file_documents(path):
            yield doc
            n += 1
            if max_docs is not None and n >= max_docs:
                return


LINE_PER_STORY_CHARS = 20_000  # a "document" longer than this with several lines is a one-paragraph-per-line file


def is_line_per_story(doc: str) -> bool:
    """Whether a document is really a file of one paragraph per line (no blank lines, no story markers), read as
    one huge document: its lines are then the stories."""
    return len(doc) > LINE_PER_STORY_CHARS and "\n" in doc


def split_files(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(train files, official validation files) by file name."""
    val = [f for f in files if is_validation_file(f)]
    return [f for f in files if f not in val], val


# ---------------------------------------------------------------------------------------------- download


def fetch(version: str = "v2", data_dir: str | Path = DEFAULT_DATA_DIR, source: str | None = None, log=print) -> Path:
    """Put raw TinyStories text in data_dir/raw: download from the Hub, or link local files with `source`."""
    raw_dir = ensure_writable_dir(Path(data_dir) / "raw", "data", "--data-dir")
    if source is not None:
        files = list_text_files(source)
        for f in files:  # validate before touching the data directory
            next(iter_file_documents(f), None)
        for f in files:
            dest = raw_dir / f.name
            if dest.exists() or dest.is_symlink():
                dest.unlink()
            dest.symlink_to(f.resolve())
        return raw_dir
    if version not in HUB_FILES:
        raise UserError(f"--version {version!r}: expected one of {', '.join(HUB_FILES)}")
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # one message of ours instead of the library's retry log
    offline = (f"cannot reach the Hugging Face Hub ({constants.ENDPOINT}) to download {HUB_REPO}: work offline with "
               f"local files, e.g. `tinystories data fetch --from ../shared/data/tinystories`")
    missing = [n for n in HUB_FILES[version] if not (raw_dir / n).is_file()]
    if not missing or (version == "instruct" and (raw_dir / SHARDS_DIR / ".complete").is_file()):
        return _unpack_shards(raw_dir, log) if version == "instruct" else raw_dir
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"HF_HUB_OFFLINE is set, so {HUB_REPO} cannot be downloaded: unset it, or use local "
                        f"files, e.g. `tinystories data fetch --from ../shared/data/tinystories`")
    if not _reachable(constants.ENDPOINT):
        raise UserError(offline)
    try:
        metas = {name: _hub_metadata(name) for name in missing}
        left = {name: max((m.size or 0) - _part_size(raw_dir, name, m.etag), 0) for name, m in metas.items()}
        need, free = sum(left.values()) + _unpacked_bytes(version, metas), shutil.disk_usage(raw_dir).free
        if need + DISK_MARGIN > free:
            raise UserError(f"{raw_dir}: downloading {', '.join(missing)} needs {(need + DISK_MARGIN) / 1e9:.2f} GB "
                            f"of free disk ({need / 1e9:.2f} GB of files + {DISK_MARGIN / 1e9:.1f} GB margin), "
                            f"{free / 1e9:.2f} GB free: free some space or pass --data-dir on another disk")
        for name in missing:
            have = (metas[name].size or 0) - left[name]
            log(f"downloading {HUB_REPO}/{name}: {(metas[name].size or 0) / 1e6:,.1f} MB"
                + (f" (resuming at {have / 1e6:,.1f} MB)" if have else "") + f" -> {raw_dir / name}")
            _download(metas[name], raw_dir, name)
        if version == "instruct":
            _unpack_shards(raw_dir, log)
    except HfHubHTTPError as e:
        raise UserError(f"download of {HUB_REPO} failed ({str(e).splitlines()[0]})") from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise UserError(f"{raw_dir}: the disk filled up during the download; free some space and rerun "
                            f"`tinystories data fetch` (it resumes), or pass --data-dir on another disk") from None
        raise UserError(f"{offline} ({type(e).__name__})") from None
    except Exception as e:  # the HTTP client's connection errors (not OSError subclasses)
        if type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore"):
            raise UserError(f"{offline}; what was downloaded is kept and a rerun resumes it "
                            f"({type(e).__name__})") from None
        raise
    return raw_dir


DISK_MARGIN = 100_000_000  # free space kept beyond the download itself


def _unpacked_bytes(version: str, metas: dict) -> int:
    """Disk the instruct archive takes once unpacked next to itself (0 for the text versions)."""
    return int(sum(m.size or 0 for m in metas.values()) * UNPACKED_RATIO) if version == "instruct" else 0


def _unpack_shards(raw_dir: Path, log=print) -> Path:
    """Unpack the instruct archive's JSON shards into raw_dir/TinyStories_all_data, shard by shard (each written
    atomically; shards already there are kept, so an interrupted unpacking resumes). The archive then goes."""
    import tarfile

    from tinystories.core.atomic import atomic_file

    archive = raw_dir / HUB_FILES["instruct"][0]
    dest = raw_dir / SHARDS_DIR
    if not archive.is_file() or (dest / ".complete").is_file():
        return raw_dir
    dest.mkdir(exist_ok=True)
    log(f"unpacking {archive.name} -> {dest}")
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                name = Path(member.name).name
                if not member.isfile() or not name.endswith(".json"):
                    continue
                if (dest / name).is_file() and (dest / name).stat().st_size == member.size:
                    continue
                with tar.extractfile(member) as src, atomic_file(dest / name, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 22)
    except (tarfile.TarError, EOFError) as e:
        raise UserError(f"{archive}: not a readable archive ({e}); delete it and run "
                        f"`tinystories data fetch --version instruct` again") from None
    write_text_atomic(dest / ".complete", "unpacked\n")
    archive.unlink()
    return raw_dir


def _hub_metadata(name: str):
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    return get_hf_file_metadata(hf_hub_url(HUB_REPO, name, repo_type="dataset"))


def _part_paths(raw_dir: Path, name: str) -> tuple[Path, Path]:
    return raw_dir / f".{name}.part", raw_dir / f".{name}.part.json"


def _part_size(raw_dir: Path, name: str, etag: str | None) -> int:
    """Bytes of `name` already downloaded by an earlier, interrupted fetch of the same version (etag)."""
    part, info = _part_paths(raw_dir, name)
    try:
        same = json.loads(info.read_text()).get("etag") == etag
    except (OSError, json.JSONDecodeError):
        same = False
    if not same or not part.is_file():
        part.unlink(missing_ok=True)
        return 0
    return part.stat().st_size


def _download(meta, raw_dir: Path, name: str) -> None:
    """Download into .NAME.part, resuming where an earlier run stopped (HTTP Range), then check and rename.

    huggingface_hub's http_get does the ranged GET, its retries on a dropped connection and the progress bar
    (MB/s, ETA); hf_hub_download itself restarts from zero after an interrupted process, hence this."""
    import hashlib
    from urllib.parse import urlparse

    from huggingface_hub import constants
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    part, info = _part_paths(raw_dir, name)
    have = _part_size(raw_dir, name, meta.etag)
    write_text_atomic(info, json.dumps({"etag": meta.etag, "size": meta.size}))
    headers = build_hf_headers()
    if urlparse(meta.location).hostname != urlparse(constants.ENDPOINT).hostname:
        headers.pop("authorization", None)  # a signed CDN address: no token
    if not meta.size or have < meta.size:
        with open(part, "ab") as f:
            http_get(meta.location, f, resume_size=have, headers=headers, expected_size=meta.size,
                     displayed_filename=name)
    size = part.stat().st_size
    etag = (meta.etag or "").strip('"')
    if meta.size is not None and size != meta.size:
        part.unlink()
        raise UserError(f"{name}: downloaded {size:,} bytes, expected {meta.size:,}; "
                        f"run `tinystories data fetch` again")
    if re.fullmatch(r"[0-9a-f]{64}", etag):  # an LFS file: its ETag is the file's sha256
        h = hashlib.sha256()
        with open(part, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        if h.hexdigest() != etag:
            part.unlink()
            raise UserError(f"{name}: checksum mismatch (sha256 {h.hexdigest()[:12]}, expected {etag[:12]}); the "
                            f"partial download was removed: run `tinystories data fetch` again")
    os.replace(part, raw_dir / name)
    info.unlink(missing_ok=True)


def _reachable(url: str, timeout: float = 5.0) -> bool:
    """Can a TCP connection be opened to the endpoint's host? (a fast offline check before the download)"""
    import socket
    from urllib.parse import urlparse

    u = urlparse(url)
    try:
        with socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout=timeout):
            return True
    except OSError:
        return False
