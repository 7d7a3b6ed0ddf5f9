"""Durable state on disk: what a daemon writes survives a crash or a power cut whole, or not at all.

A Pi loses power far more often than a server, and an SD card reorders writes: a file written in
place, or renamed without an fsync, can come back empty or torn. Every state file of every daemon
goes through this module.

* :func:`atomic_write` (and :func:`atomic_write_json`): replace a whole file. The new content is
  written to a temporary file beside it and fsync'd, renamed over the old one, and the directory
  is fsync'd, so after a crash the file holds either the old content or the new, never a mix.
* :func:`read_json`: read such a file back; missing is ``None``, unreadable raises
  :class:`StateError` naming the file.
* :class:`RecordLog`: an append-only log of byte records in a directory, read back oldest first
  through a saved cursor (store-tsdb's spool of points). Guarantees:

  - an append that returned is on disk (one ``write`` and one ``fsync`` per batch, and the
    directory is fsync'd when a batch starts a new segment file);
  - a record is framed with a magic, its length and a CRC32 of length and payload, so a record
    torn by a power cut (partial header, short payload) or garbled later (bad checksum) is
    recognised. At open, a torn tail of the last segment is cut off; a damaged stretch anywhere
    else is skipped by finding the next valid frame. Both are reported (:class:`Damage`, the
    ``on_damage`` callback, :attr:`RecordLog.damaged_bytes`), never raised, and never cost a
    valid record before or after them;
  - the read cursor is saved with :func:`atomic_write` when records are committed, so a
    committed record is never read again; records read but not committed when the process
    dies are read again (at least once, never skipped);
  - the total is bounded: :meth:`RecordLog.append` refuses a batch that does not fit.

  On disk: ``<dir>/<seq>.rec`` segment files (12 digits, numbered upwards, a new one once the
  last reaches ``segment_bytes``), each a sequence of frames ``magic (4 bytes F5 50 48 52) |
  CRC32 of the next 4 + n bytes (u32 LE) | n (u32 LE) | n bytes of payload``, and
  ``<dir>/cursor.json`` ``{"segment": seq, "offset": bytes}``: where the next unread record
  starts. A segment the cursor has left is deleted. The magic's first byte never occurs in UTF-8
  text, so a search for the next frame never stops inside a text payload.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
    tmp.unlink(missing_ok=True)  # one left by a crash would keep its own mode
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
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


# --------------------------------------------------------------------------- the record log

MAGIC = b"\xf5PHR"
#: magic, CRC32 of (length + payload), payload length
HEADER = struct.Struct("<4sII")
LENGTH = struct.Struct("<I")
#: the longest record :meth:`RecordLog.append` takes; a header claiming more is damage
MAX_RECORD = 16 << 20


def frame(payload: bytes) -> bytes:
    """``payload`` as it is stored in a :class:`RecordLog` segment."""
    body = LENGTH.pack(len(payload)) + payload
    return MAGIC + LENGTH.pack(zlib.crc32(body)) + body


def _frame_at(buf: bytes, pos: int) -> tuple[int, str]:
    """The length of the valid frame at ``pos`` in ``buf`` (0 if none) and, if none, why."""
    left = len(buf) - pos
    if left < HEADER.size:
        return 0, f"partial record header ({left} of {HEADER.size} bytes)"
    magic, crc, n = HEADER.unpack_from(buf, pos)
    if magic != MAGIC:
        return 0, "no record header (garbled bytes)"
    if n > MAX_RECORD:
        return 0, f"record header with an impossible length ({n} bytes)"
    end = pos + HEADER.size + n
    if end > len(buf):
        return 0, f"record cut short ({left - HEADER.size} of {n} payload bytes)"
    if zlib.crc32(memoryview(buf)[pos + 8:end]) != crc:
        return 0, "record checksum mismatch (garbled record)"
    return end - pos, ""


def _next_frame(buf: bytes, pos: int) -> int:
    """Where the next valid frame at or after ``pos`` starts, or ``len(buf)``."""
    at = buf.find(MAGIC, pos)
    while at != -1:
        if _frame_at(buf, at)[0]:
            return at
        at = buf.find(MAGIC, at + 1)
    return len(buf)


@dataclass(frozen=True)
class Damage:
    """A stretch of a segment that holds no valid record: skipped (or, at the tail, cut off)."""

    path: Path
    offset: int
    length: int
    reason: str
    tail: bool = False

    def __str__(self) -> str:
        if not self.length:
            return f"{self.path}: {self.reason}"
        what = "cut off a torn tail of" if self.tail else "skipped"
        return (f"{self.path}: {what} {self.length} byte(s) at offset {self.offset}: "
                f"{self.reason}")


class RecordLog:
    """An append-only, bounded log of byte records, read back in order (see the module doc).

    One thread at a time: :meth:`append`, :meth:`read` and :meth:`commit` are not locked
    (:attr:`size` may be read from elsewhere). ``on_damage`` is called (from the constructor,
    :meth:`read`) once for each damaged stretch found.
    """

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int, *,
                 segment_bytes: int | None = None, mode: int = 0o640,
                 on_damage: Callable[[Damage], None] | None = None) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes or max(4096, min(4 << 20, max_bytes // 8))
        self.mode = mode
        self.on_damage = on_damage
        self.damaged = 0  # damaged stretches found
        self.damaged_bytes = 0
        self.cursor_file = self.dir / "cursor.json"
        self._reported: set[tuple[int, int]] = set()
        self._sizes: dict[int, int] = {}  # seq -> bytes of each segment on disk
        for path in self.dir.glob("*.rec"):
            if path.stem.isdigit():
                self._sizes[int(path.stem)] = path.stat().st_size
        self._segs = sorted(self._sizes)
        cursor = self._load_cursor()
        self._next_seq = max([0, *self._segs, cursor[0] if cursor else 0]) + 1
        self.read_seq, self.read_offset = (self._segs[0] if self._segs else 0), 0
        if cursor is not None:
            for seq in [s for s in self._segs if s < cursor[0]]:  # the cursor had passed them
                self._forget(seq)
            if self._segs and self._segs[0] == cursor[0]:
                self.read_seq, self.read_offset = cursor
            elif not self._segs:
                self.read_seq = cursor[0]
        self._read_ends: list[int] = []
        if self._segs:
            end = self._sizes[self.read_seq]
            if self.read_offset > end:
                self._damage(self.read_seq, end, self.read_offset - end,
                             f"cursor offset {self.read_offset} past the end")
                self.read_offset = end
            self._repair_tail()
        self.size = (sum(self._sizes.values()) - self.read_offset) if self._segs else 0

    # ------------------------------------------------------------------ opening

    def _load_cursor(self) -> tuple[int, int] | None:
        try:
            data = read_json(self.cursor_file)
            if data is None:
                return None
            seq, offset = data["segment"], data["offset"]
            if type(seq) is not int or type(offset) is not int or seq < 0 or offset < 0:
                raise ValueError(f"expected two numbers >= 0, got {data!r}")
            return seq, offset
        except (StateError, ValueError, KeyError, TypeError) as exc:
            self._report(Damage(self.cursor_file, 0, 0, f"cursor unreadable ({exc}); "
                                "reading again from the start of the oldest segment"))
            return None

    def _repair_tail(self) -> None:
        """Cut a record torn by a crash off the last segment; report damage before it."""
        seq = self._segs[-1]
        start = self.read_offset if seq == self.read_seq else 0
        with open(self._path(seq), "rb") as fh:
            fh.seek(start)
            buf = fh.read()
        pos = 0
        while pos < len(buf):
            n, why = _frame_at(buf, pos)
            if n:
                pos += n
                continue
            nxt = _next_frame(buf, pos + 1)
            if nxt == len(buf):
                self._cut(seq, start + pos, len(buf) - pos, why)
                return
            self._damage(seq, start + pos, nxt - pos, why)
            pos = nxt

    def _cut(self, seq: int, offset: int, length: int, why: str) -> None:
        path = self._path(seq)
        with open(path, "r+b") as fh:
            fh.truncate(offset)
            fh.flush()
            os.fsync(fh.fileno())
        self._sizes[seq] = offset
        self._report(Damage(path, offset, length, why, tail=True))

    # ------------------------------------------------------------------ damage

    def _damage(self, seq: int, offset: int, length: int, why: str) -> None:
        if (seq, offset) not in self._reported:
            self._reported.add((seq, offset))
            self._report(Damage(self._path(seq), offset, length, why))

    def _report(self, damage: Damage) -> None:
        self.damaged += 1
        self.damaged_bytes += damage.length
        if self.on_damage is not None:
            self.on_damage(damage)

    # ------------------------------------------------------------------ the log

    def _path(self, seq: int) -> Path:
        return self.dir / f"{seq:012d}.rec"

    def _forget(self, seq: int) -> None:
        self._path(seq).unlink(missing_ok=True)
        self._segs.remove(seq)
        del self._sizes[seq]

    @property
    def empty(self) -> bool:
        return self.size == 0

    def append(self, records: Sequence[bytes], *, force: bool = False) -> bool:
        """Append ``records`` durably (one write, one fsync); False if they do not fit.

        ``force`` appends past ``max_bytes`` (records already accepted elsewhere, e.g. taken
        over from an older format). On an ``OSError`` the segment is cut back to where it was,
        so nothing of the batch is kept, and the error is raised. A record longer than
        :data:`MAX_RECORD` is a ``ValueError``.
        """
        if any(len(r) > MAX_RECORD for r in records):
            raise ValueError(f"a record of the log in {self.dir} may hold {MAX_RECORD} bytes")
        data = b"".join([frame(r) for r in records])
        if not data:
            return True
        if not force and self.size + len(data) > self.max_bytes:
            return False
        new = not self._segs or self._sizes[self._segs[-1]] >= self.segment_bytes
        seq = self._next_seq if new else self._segs[-1]
        path = self._path(seq)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, self.mode)
        try:
            if new:
                self._next_seq += 1
                if not self._segs:
                    self.read_seq, self.read_offset = seq, 0
                self._segs.append(seq)
                self._sizes[seq] = 0
                fsync_directory(self.dir)  # the new name lasts as long as its records
            before = self._sizes[seq]
            try:
                write_all(fd, data)
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, before)
                raise
            finally:
                self._sizes[seq] = os.fstat(fd).st_size
        finally:
            os.close(fd)
        self.size += len(data)
        return True

    def read(self, max_records: int) -> list[bytes]:
        """The oldest records not committed yet: at most ``max_records``, from one segment.

        Reading does not consume; :meth:`commit` does. Damage on the way is skipped and
        reported.
        """
        self._read_ends = []
        while self._segs:
            records, ends, end = self._read_segment(self.read_seq, self.read_offset,
                                                    max_records)
            if records:
                self._read_ends = ends
                return records
            # nothing valid up to the end of this segment
            if self.read_seq != self._segs[-1]:
                self.size -= self._sizes[self.read_seq] - self.read_offset
                self._advance()
                continue
            if end > self.read_offset:  # damage at the very end (an append cut back badly)
                self.size -= end - self.read_offset
                self.read_offset = end
                self._save_cursor()
            return []
        return []

    def _read_segment(self, seq: int, offset: int, max_records: int
                      ) -> tuple[list[bytes], list[int], int]:
        records: list[bytes] = []
        ends: list[int] = []
        size = self._sizes[seq]
        pos = offset
        with open(self._path(seq), "rb") as fh:
            fh.seek(pos)
            while len(records) < max_records and pos < size:
                header = fh.read(HEADER.size)
                if len(header) == HEADER.size:
                    magic, crc, n = HEADER.unpack(header)
                    if magic == MAGIC and n <= MAX_RECORD and pos + HEADER.size + n <= size:
                        payload = fh.read(n)
                        if len(payload) == n and zlib.crc32(payload, zlib.crc32(header[8:])) \
                                == crc:
                            records.append(payload)
                            pos += HEADER.size + n
                            ends.append(pos)
                            continue
                # damaged from pos: find the next valid frame in the rest of the segment
                fh.seek(pos)
                rest = fh.read(size - pos)
                skip = _next_frame(rest, 1)
                self._damage(seq, pos, skip, _frame_at(rest, 0)[1])
                pos += skip
                fh.seek(pos)
        return records, ends, pos

    def commit(self, n: int) -> None:
        """Mark the first ``n`` records of the last :meth:`read` as done (cursor saved)."""
        if n <= 0:
            return
        end = self._read_ends[n - 1]
        del self._read_ends[:n]
        self.size -= end - self.read_offset
        self.read_offset = end
        if end < self._sizes[self.read_seq]:
            self._save_cursor()
        elif self.read_seq != self._segs[-1]:
            self._advance()
        else:  # everything read: the cursor stays at the end, the segment goes
            self._save_cursor()
            self._forget(self.read_seq)
            self.size = 0

    def _advance(self) -> None:
        done = self._segs[0]
        self.read_seq, self.read_offset = self._segs[1], 0
        self._save_cursor()
        self._forget(done)
        self._read_ends = []

    def _save_cursor(self) -> None:
        atomic_write_json(self.cursor_file, {"segment": self.read_seq,
                                             "offset": self.read_offset}, self.mode)
