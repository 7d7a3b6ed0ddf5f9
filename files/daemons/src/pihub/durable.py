"""Durable state on disk: what a daemon writes survives a crash or a power cut whole, or not at all.

A Pi loses power far more often than a server, and an SD card reorders writes: a file written in
place, or renamed without an fsync, can come back empty or torn. Every state file of every daemon
goes through this module.

* :func:`atomic_write` (and :func:`atomic_write_json`): replace a whole file. The new content is
  written to a temporary file beside it and fsync'd, renamed over the old one, and the directory
  is fsync'd, so after a crash the file holds either the old content or the new, never a mix.
* :func:`read_json`: read such a file back; missing is ``None``, unreadable raises
  :class:`StateError` naming the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class StateError(Exception):
    """A state file that exists but cannot be read back; the message names the file."""


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Make the names in ``directory`` (a rename, a new or removed file) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte of ``data`` is written."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def atomic_write(path: str | os.PathLike[str], data: bytes | str, mode: int = 0o640) -> None:
    """Replace ``path`` with ``data``: whole after a crash, old or new, never torn or empty.

    The temporary file ``.<name>.tmp`` beside it is left only by a crash between write and
    rename; the next write replaces it. ``mode`` applies to the new file (the umask still counts).
    """
    target = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = target.with_name(f".{target.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        write_all(fd, raw)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)
    fsync_directory(target.parent)


def atomic_write_json(path: str | os.PathLike[str], value: Any, mode: int = 0o640) -> None:
    """:func:`atomic_write` of ``value`` as compact UTF-8 JSON and a newline."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    atomic_write(path, text + "\n", mode)


def read_json(path: str | os.PathLike[str]) -> Any:
    """The JSON value in ``path``, or ``None`` if there is no such file.

    Raises :class:`StateError` (naming the file and the problem) when it exists but cannot be
    read or is not JSON; the caller decides whether that is fatal and counts it.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise StateError(f"{path}: cannot read: {exc}") from exc
    try:
        return json.loads(text)
    except ValueError as exc:
        raise StateError(f"{path}: not JSON ({exc})") from exc
