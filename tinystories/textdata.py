"""Raw TinyStories text: download it from the Hugging Face Hub, find it on disk, and read it as documents.

Formats read (detected per file):
- the official text format: a story, then a line `<|endoftext|>`;
- JSON (llama2.c's `TinyStories_all_data/*.json`: a list of objects with a `story` field) and JSONL;
- plain text: documents separated by blank lines, or, when a file has no blank line at all, one paragraph
  per line, the whole file being one document.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from tinystories.errors import UserError

END_OF_TEXT = "<|endoftext|>"
TEXT_SUFFIXES = (".txt", ".text", ".json", ".jsonl")
HUB_REPO = "roneneldan/TinyStories"
HUB_FILES = {
    "v2": ("TinyStoriesV2-GPT4-train.txt", "TinyStoriesV2-GPT4-valid.txt"),
    "v1": ("TinyStories-train.txt", "TinyStories-valid.txt"),
}
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
        if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES and not any(part.startswith(".") for part in p.relative_to(path).parts)
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
        f"no raw text found: {_source_hint(flag)}, or run `tinystories data fetch` to download TinyStories into {fetched}"
    )


def _decode_error(path: Path, err: UnicodeDecodeError, offset: int = 0) -> UserError:
    return UserError(
        f"{path}: invalid UTF-8 at byte {offset + err.start} (convert the file to UTF-8, e.g. `iconv -f latin1 -t utf-8`)"
    )


def _read_text_lines(path: Path) -> Iterator[str]:
    offset = 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _decode_error(path, e, offset) from None
            offset += len(raw)


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


def _iter_text_documents(path: Path) -> Iterator[str]:
    mode = _detect_text_mode(path)
    if mode == "one-document":
        text = "".join(_read_text_lines(path)).strip()
        if text:
            yield text
        return
    buf: list[str] = []
    for line in _read_text_lines(path):
        boundary = line.strip() == END_OF_TEXT if mode == "endoftext" else not line.strip()
        if boundary:
            doc = "".join(buf).strip()
            if doc:
                yield doc
            buf = []
        else:
            buf.append(line)
    doc = "".join(buf).strip()
    if doc:
        yield doc


def _story_of(obj, path: Path, where: str) -> str:
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict):
        for key in ("story", "text"):
            if isinstance(obj.get(key), str):
                return obj[key]
    raise UserError(f"{path}: {where} has no 'story' (or 'text') string field")


def _iter_json_documents(path: Path) -> Iterator[str]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise _decode_error(path, e) from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of objects with a 'story' field")
    for i, obj in enumerate(data):
        story = _story_of(obj, path, f"item {i}").strip()
        if story:
            yield story


def _iter_jsonl_documents(path: Path) -> Iterator[str]:
    for lineno, line in enumerate(_read_text_lines(path), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
        story = _story_of(obj, path, f"line {lineno}").strip()
        if story:
            yield story


def iter_file_documents(path: Path) -> Iterator[str]:
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty (expected TinyStories text)")
    if suffix == ".json":
        yield from _iter_json_documents(path)
    elif suffix == ".jsonl":
        yield from _iter_jsonl_documents(path)
    elif suffix in (".txt", ".text", ""):
        yield from _iter_text_documents(path)
    else:
        raise UserError(f"{path}: unknown format '{suffix}' (expected .txt, .json or .jsonl)")


def iter_documents(files: list[Path], max_docs: int | None = None) -> Iterator[str]:
    """Every story of every file, in order, stripped of surrounding whitespace."""
    n = 0
    for path in files:
        for doc in iter_file_documents(path):
            yield doc
            n += 1
            if max_docs is not None and n >= max_docs:
                return


def split_files(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(train files, official validation files) by file name."""
    val = [f for f in files if is_validation_file(f)]
    return [f for f in files if f not in val], val


# ---------------------------------------------------------------------------------------------- download


def fetch(version: str = "v2", data_dir: str | Path = DEFAULT_DATA_DIR, source: str | None = None) -> Path:
    """Put raw TinyStories text in data_dir/raw: download from the Hub, or link local files with `source`."""
    raw_dir = Path(data_dir) / "raw"
    try:
        raw_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{raw_dir}: cannot create the data directory ({e.strerror})") from None
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
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # one message of ours instead of the library's retry log
    offline = (f"cannot reach the Hugging Face Hub ({constants.ENDPOINT}) to download {HUB_REPO}: work offline with "
               f"local files, e.g. `tinystories data fetch --from ../shared/data/tinystories`")
    if not all((raw_dir / n).is_file() for n in HUB_FILES[version]) and not _reachable(constants.ENDPOINT):
        raise UserError(offline)
    for name in HUB_FILES[version]:
        try:
            hf_hub_download(HUB_REPO, name, repo_type="dataset", local_dir=raw_dir)
        except (LocalEntryNotFoundError, OSError) as e:
            if isinstance(e, HfHubHTTPError):
                raise UserError(f"download of {HUB_REPO}/{name} failed ({str(e).splitlines()[0]})") from None
            if constants.HF_HUB_OFFLINE:
                raise UserError(f"HF_HUB_OFFLINE is set, so {HUB_REPO} cannot be downloaded: unset it, or use local "
                                f"files, e.g. `tinystories data fetch --from ../shared/data/tinystories`") from None
            raise UserError(offline) from None
        except HfHubHTTPError as e:
            raise UserError(f"download of {HUB_REPO}/{name} failed ({str(e).splitlines()[0]})") from None
    return raw_dir


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


def ensure_writable_dir(path: Path, what: str) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{path}: cannot create the {what} directory ({e.strerror}); pick another with --out") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"{path}: the {what} directory is not writable; pick another with --out")
    return path
