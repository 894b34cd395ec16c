"""Creating sensitive files: never replacing one, private from the first byte, complete or
absent (torch-free: the nodes, the core and the `diffpriv` command all write this way)."""
from __future__ import annotations

import os
import secrets
import stat
import time
from pathlib import Path

PARTIAL_SUFFIX = ".partial"  # a file being written: hidden, never listed or loaded
STALE_PARTIAL_S = 600  # a partial file this old was left by a crash and is removed


def write_new_file(path: str | os.PathLike, data: bytes, mode: int = 0o600) -> Path:
    """Write ``data`` to a NEW file at ``path`` (FileExistsError if the name is taken, a
    link included). The bytes go to a hidden partial file created exclusively (``mode``
    from the first byte, links not followed), are synced to disk, then linked to the name,
    which fails instead of replacing; the folder is synced, so the file appears complete
    or not at all."""
    path = Path(path)
    remove_stale_partials(path.parent)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{PARTIAL_SUFFIX}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, mode)
    try:
        try:
            os.fchmod(fd, mode)  # exactly ``mode``, whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)  # unlike a rename, never replaces an existing name
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_folder(path.parent)
    return path


def replace_file(path: str | os.PathLike, data: bytes, mode: int = 0o600) -> Path:
    """Write ``data`` as the file at ``path``, replacing the one there (a file the command
    rewrites each run, like a contact sheet): ``mode`` from the first byte, and a link at
    the name is replaced itself, never followed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{PARTIAL_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def remove_stale_partials(folder: Path) -> None:
    """Remove the partial files a crash left in this folder (never a finished file)."""
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.name.startswith(".") and entry.name.endswith(PARTIAL_SUFFIX) and entry.is_file(follow_symlinks=False):
            if now - entry.stat(follow_symlinks=False).st_mtime > STALE_PARTIAL_S:
                Path(entry.path).unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_file_no_follow(path: str | os.PathLike) -> bool:
    """Remove the file (or link: the link itself, never what it points to) at ``path``;
    False when there is none. A folder is never removed."""
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            return False
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def remove_tree_no_follow(folder: str | os.PathLike) -> list[str]:
    """Remove ``folder`` and everything in it, never following a link (a link inside is
    removed as a link; ``folder`` itself being a link is an error). Returns the names of
    the files removed; nothing when there is no folder."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(folder, flags)
    except FileNotFoundError:
        return []
    except OSError as exc:  # ELOOP / ENOTDIR: a link or a file where the folder should be
        raise OSError(exc.errno, f"{os.fspath(folder)} is not a folder (a link?): left alone") from None
    try:
        removed = _empty_folder(fd, flags)
    finally:
        os.close(fd)
    os.rmdir(folder)
    return removed


def _empty_folder(fd: int, flags: int) -> list[str]:
    removed = []
    for entry in list(os.scandir(fd)):
        if entry.is_dir(follow_symlinks=False):
            sub = os.open(entry.name, flags, dir_fd=fd)
            try:
                removed += _empty_folder(sub, flags)
            finally:
                os.close(sub)
            os.rmdir(entry.name, dir_fd=fd)
        else:
            os.unlink(entry.name, dir_fd=fd)
            removed.append(entry.name)
    return removed
