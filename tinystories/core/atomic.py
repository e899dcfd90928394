"""Atomic writes: a reader (or a crash) sees the old file or directory or the complete new one, never half of one.

Every writer in the package goes through here. A file is written to a temporary name beside it, flushed to disk,
then renamed over the target (`os.replace`, atomic on POSIX and Windows); a directory is built under a temporary
name and swapped in the same way (the old one is moved aside first, then removed). A full disk while writing is
a UserError naming the path, with the temporary file or directory removed and the old one left as it was.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from tinystories.core.errors import UserError


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename inside it) to disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_name(path: str | os.PathLike, kind: str = "tmp") -> Path:
    """A hidden name beside `path` for its replacement under construction (one per process)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
LOW_SPACE = 1 << 20  # a write that fails with less free space than this failed for want of space


def is_disk_full(exc: BaseException, path: str | os.PathLike) -> bool:
    """Did writing near `path` fail for want of space? An OSError says so with its errno, safetensors in its message;
    when a library's error says only that a write failed (torch.save: "file write failed"), the free space decides."""
    if isinstance(exc, UserError):
        return False
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return True
    text = str(exc).lower()
    if "no space left" in text or "os error 28" in text or "storagefull" in text:
        return True
    if not isinstance(exc, (OSError, RuntimeError)) and "write" not in text:
        return False
    here = Path(path)
    while not here.exists() and here != here.parent:
        here = here.parent
    try:
        return shutil.disk_usage(here).free < LOW_SPACE
    except OSError:
        return False


KEPT = "nothing half-written was kept, an older copy is as it was"


@contextmanager
def disk_full_is_user_error(path: str | os.PathLike, what: str, kept: str = KEPT) -> Iterator[None]:
    """Inside the block, a write that fails for want of space is a one-line UserError naming `path` and `what`, and
    saying what was left (`kept`)."""
    try:
        yield
    except BaseException as e:
        if not is_disk_full(e, path):
            raise
        raise UserError(f"{path}: no space left on the device while writing the {what} ({kept}); free some space "
                        f"or write elsewhere, and rerun") from None


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; on a clean exit it replaces `path`, else it is removed."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        with disk_full_is_user_error(path, "file"), open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path, "wb") as f:
        f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    with atomic_file(path, "w", encoding=encoding) as f:
        f.write(text)


def copy_file_atomic(src: str | os.PathLike, dest: str | os.PathLike) -> Path:
    with atomic_file(dest, "wb") as f, open(src, "rb") as s:
        shutil.copyfileobj(s, f)
    return Path(dest)


def fsync_tree_files(path: Path) -> None:
    """fsync every file directly inside `path`, then the directory itself."""
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(path)


def swap_in_dir(tmp: Path, final: Path) -> None:
    """Move the finished directory `tmp` to `final`, replacing an old one only once the new one is complete."""
    if final.exists():
        old = temp_name(final, "old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(final.parent)


@contextmanager
def atomic_dir(path: str | os.PathLike, tmp: str | os.PathLike | None = None) -> Iterator[Path]:
    """Build a directory under a temporary name (`tmp`, else a hidden one beside `path`), yielded empty; on a clean
    exit its files are flushed and it replaces `path` (an old `path` is removed only after the swap); on an error
    (Ctrl-C included) it is removed and `path` is left as it was."""
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else temp_name(path)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with disk_full_is_user_error(path, "directory"):
            tmp.mkdir(parents=True)
            yield tmp
            fsync_tree_files(tmp)
        swap_in_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_symlink(link: Path, target: str) -> None:
    """Point the symlink `link` at `target` (a name relative to its directory) in one atomic rename."""
    tmp = temp_name(link)
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)


def ensure_writable_dir(path: str | Path, what: str, flag: str = "--out") -> Path:
    """Create `path` (and its parents) or say in one line why not: the one "mkdir or a clear error" check."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = "a file is in the way" if isinstance(e, FileExistsError) else e.strerror
        raise UserError(f"{path}: cannot create the {what} directory ({why}); pick another with {flag}") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"{path}: the {what} directory is not writable; pick another with {flag}")
    return path
