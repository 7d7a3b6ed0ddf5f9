"""pihub.durable: atomic state files and the record log, through crashes and damage.

The crash tests fork a child that writes in a loop and tells the parent on a pipe about each
write only once the call returned (an acknowledgement), and kill it with SIGKILL at random
points. SIGKILL tears a multi-page ``write`` in the middle as a power cut would tear its tail;
torn or garbled bytes that only a power cut or a bad card leave are made by hand.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pihub import durable
from pihub.durable import (
    HEADER,
    MAGIC,
    Damage,
    RecordLog,
    StateError,
    atomic_write,
    atomic_write_json,
    frame,
    fsync_directory,
    read_json,
)

SEED = 20240613
SEGMENT = 8192  # small segments: the crash test crosses many segment boundaries
LIMIT = 256 * 1024


def killed_child(body: Callable[[Callable[[str], None]], None],
                 stop_after: int) -> list[str]:
    """Fork a child running ``body(report)``, SIGKILL it after ``stop_after`` reports.

    Returns every line the child reported before it died (the pipe keeps what was written).
    """
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report() is one write() each, so a line is whole or absent
        os.close(rfd)
        code = 0
        try:
            body(lambda line: durable.write_all(wfd, line.encode() + b"\n"))
        except BaseException as exc:
            durable.write_all(wfd, f"E {type(exc).__name__}: {exc}\n".encode())
            code = 3
        finally:
            os._exit(code)
    os.close(wfd)
    lines: list[str] = []
    buf = b""
    with os.fdopen(rfd, "rb") as pipe:
        killed = False
        while True:
            chunk = pipe.read1(65536)
            if not chunk:
                break
            buf += chunk
            *done, buf = buf.split(b"\n")
            lines += [line.decode() for line in done]
            if not killed and len(lines) >= stop_after:
                os.kill(pid, signal.SIGKILL)
                killed = True
    _, status = os.waitpid(pid, 0)
    errors = [line for line in lines if line.startswith("E ")]
    assert not errors, errors
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    return lines


# --------------------------------------------------------------------------- atomic_write


def test_atomic_write_leaves_old_or_new_content_when_killed_at_random_points(tmp_path):
    rng = random.Random(SEED)
    path = tmp_path / "state.json"

    def content(i: int) -> bytes:
        return str(i).encode() * (200_000 + i)  # about 1 MB: a write SIGKILL can tear

    atomic_write(path, content(0))
    done = 0
    kills = 0
    for _ in range(40):
        start = done + 1

        def writer(report: Callable[[str], None], start: int = start) -> None:
            for i in range(start, start + 100000):
                atomic_write(path, content(i))
                report(str(i))

        lines = killed_child(writer, rng.randint(1, 10))
        kills += 1
        acked = int(lines[-1]) if lines else done
        found = path.read_bytes()
        # the last acknowledged content, or the one in flight when the kill came
        assert found in (content(acked), content(acked + 1)), found[:40]
        done = acked + 1 if found == content(acked + 1) else acked
    assert kills == 40


def test_atomic_write_replaces_a_file_with_the_given_mode_and_a_stale_temporary(tmp_path):
    path = tmp_path / "secret"
    path.write_text("old")
    path.chmod(0o644)
    (tmp_path / ".secret.tmp").write_text("left by a crash")
    atomic_write(path, "new", mode=0o600)
    assert path.read_text() == "new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret"]


def test_atomic_write_fsyncs_the_file_and_then_its_directory(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        mode = os.fstat(fd).st_mode
        synced.append("dir" if stat.S_ISDIR(mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(durable.os, "fsync", fsync)
    atomic_write(tmp_path / "a", b"x")
    assert synced == ["file", "dir"]


def test_fsync_directory_of_a_missing_directory_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        fsync_directory(tmp_path / "missing")


def test_atomic_write_json_reads_back_with_read_json(tmp_path):
    value = {"b": [1, 2.5], "a": "°C"}
    atomic_write_json(tmp_path / "v.json", value)
    assert read_json(tmp_path / "v.json") == value
    assert (tmp_path / "v.json").read_text(encoding="utf-8") == '{"a":"°C","b":[1,2.5]}\n'


def test_read_json_of_a_missing_file_is_none(tmp_path):
    assert read_json(tmp_path / "nothing.json") is None


@pytest.mark.parametrize("content, why", [
    (b'{"a": 1', "not JSON"),
    (b"\xff\xfe{}", "cannot read"),
    (None, "cannot read"),  # a directory where the file should be
])
def test_read_json_names_the_file_that_cannot_be_read(tmp_path, content, why):
    path = tmp_path / "state.json"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(StateError) as err:
        read_json(path)
    assert str(err.value).startswith(f"{path}: {why}")


# --------------------------------------------------------------------------- record log


def payload(seq: int) -> bytes:
    """Record ``seq``: its number, then a length that varies, every fifth holding the magic."""
    body = b"%d:" % seq + (b"%d," % seq) * (seq % 97)
    return body + MAGIC + frame(b"not a record") if seq % 5 == 0 else body


def seq_of(record: bytes) -> int:
    return int(record.split(b":", 1)[0])


class Opened:
    """A RecordLog opened on a directory, with the damage it reported."""

    def __init__(self, directory: Path, **kw: Any) -> None:
        self.damage: list[Damage] = []
        self.log = RecordLog(directory, kw.pop("max_bytes", LIMIT),
                             segment_bytes=kw.pop("segment_bytes", SEGMENT),
                             on_damage=self.damage.append, **kw)

    def drain(self, batch: int = 1000) -> list[bytes]:
        out: list[bytes] = []
        while records := self.log.read(batch):
            out += records
            self.log.commit(len(records))
        return out


def writer_loop(directory: Path, seed: int, next_seq: int, head: int
                ) -> Callable[[Callable[[str], None]], None]:
    """A child that appends batches and reads and commits some, like store-tsdb's writer.

    Reports ``P n`` before appending up to record n, ``A n`` once that append returned, ``F n``
    when it was refused as full, ``R n`` before committing up to n and ``C n`` once that commit
    returned. It checks that it reads records in order, starting at ``head``.
    """

    def body(report: Callable[[str], None]) -> None:
        rng = random.Random(seed)
        log = RecordLog(directory, LIMIT, segment_bytes=SEGMENT)
        nxt, expect = next_seq, head
        while True:
            if rng.random() < 0.55:
                k = rng.randint(1, 60)
                report(f"P {nxt + k - 1}")
                if log.append([payload(s) for s in range(nxt, nxt + k)]):
                    nxt += k
                    report(f"A {nxt - 1}")
                else:
                    report(f"F {nxt + k - 1}")
            else:
                records = log.read(rng.randint(1, 120))
                seqs = [seq_of(r) for r in records]
                if seqs != list(range(expect, expect + len(seqs))):
                    raise AssertionError(f"read {seqs[:5]}..., expected from {expect}")
                if any(r != payload(s) for r, s in zip(records, seqs, strict=True)):
                    raise AssertionError("a record read back differs from what was appended")
                m = rng.randint(0, len(records))
                if m:
                    report(f"R {seqs[m - 1]}")
                    log.commit(m)
                    report(f"C {seqs[m - 1]}")
                    expect = seqs[m - 1] + 1

    return body


@pytest.fixture
def crash_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "log"


def test_record_log_keeps_every_acknowledged_record_in_order_across_random_kills(
        crash_dir, tmp_path):
    """Many SIGKILLs: acked records all there, in order; committed ones never read again."""
    rng = random.Random(SEED)
    started = time.monotonic()
    next_seq = head = 1  # the next record to append, the first one not committed
    acked = committed = 0
    iterations = kills_in_append = torn = checked = 0
    while iterations < 300 and time.monotonic() - started < 60:
        iterations += 1
        lines = killed_child(writer_loop(crash_dir, rng.randrange(1 << 30), next_seq, head),
                             rng.randint(1, 400))
        in_flight_append = in_flight_commit = None
        for line in lines:
            kind, n = line.split()
            value = int(n)
            if kind == "P":
                in_flight_append = value
            elif kind in "AF":
                in_flight_append = None
                acked = value if kind == "A" else acked
            elif kind == "R":
                in_flight_commit = value
            else:
                in_flight_commit, committed = None, value
        kills_in_append += in_flight_append is not None
        # open a copy, as the next run would open the directory, and read everything
        copy = tmp_path / f"check-{iterations}"
        shutil.copytree(crash_dir, copy)
        opened = Opened(copy)
        records = opened.drain()
        seqs = [seq_of(r) for r in records]
        checked += len(seqs)
        assert all(r == payload(s) for r, s in zip(records, seqs, strict=True))
        if seqs:
            assert seqs == list(range(seqs[0], seqs[-1] + 1)), "out of order or a gap"
            # nothing committed comes back; at most the commit cut short by the kill does
            assert committed < seqs[0] <= (in_flight_commit or committed) + 1
            assert seqs[-1] >= acked, f"acknowledged record {acked} lost"
            assert seqs[-1] <= (in_flight_append or acked)
        else:
            assert acked <= (in_flight_commit or committed)
        # SIGKILL can tear only the batch being written: damage is a torn tail, then
        assert all(d.tail for d in opened.damage), opened.damage
        if opened.damage:
            assert in_flight_append is not None
            torn += 1
        shutil.rmtree(copy)
        head = seqs[0] if seqs else acked + 1
        next_seq = seqs[-1] + 1 if seqs else acked + 1
        acked = max(acked, next_seq - 1)
        committed = head - 1
    elapsed = time.monotonic() - started
    print(f"\n{iterations} kills in {elapsed:.1f} s ({kills_in_append} during an append, "
          f"{torn} left a torn tail), {checked} records read back and checked")
    assert iterations >= 50 and kills_in_append > 0 and acked > 1000


def filled(directory: Path, n: int, **kw: Any) -> Opened:
    opened = Opened(directory, **kw)
    for seq in range(1, n + 1):
        assert opened.log.append([payload(seq)])
    return opened


def offsets(path: Path) -> list[int]:
    """Where each frame of a segment starts."""
    data = path.read_bytes()
    out, pos = [], 0
    while pos < len(data):
        out.append(pos)
        pos += HEADER.size + HEADER.unpack_from(data, pos)[2]
    return out


@pytest.mark.parametrize("keep", [0, 5, HEADER.size, HEADER.size + 3])
def test_a_torn_last_record_is_cut_off_counted_and_the_records_before_it_kept(tmp_path, keep):
    filled(tmp_path, 6)
    segment = tmp_path / "000000000001.rec"
    data = segment.read_bytes()
    torn = frame(payload(7))[:keep] if keep else b"\0" * 4096  # 0: a tail of zeros
    segment.write_bytes(data + torn)
    opened = Opened(tmp_path)
    assert [d.tail for d in opened.damage] == [True]
    assert opened.log.damaged_bytes == len(torn)
    assert segment.read_bytes() == data  # cut back to the last whole record
    assert opened.log.append([payload(7)])
    assert [seq_of(r) for r in opened.drain()] == [1, 2, 3, 4, 5, 6, 7]
    assert Opened(tmp_path).damage == []


def test_a_garbled_last_record_is_dropped_and_counted(tmp_path):
    filled(tmp_path, 6)
    segment = tmp_path / "000000000001.rec"
    data = bytearray(segment.read_bytes())
    data[-1] ^= 0x40
    segment.write_bytes(bytes(data))
    opened = Opened(tmp_path)
    assert len(opened.damage) == 1 and "checksum" in opened.damage[0].reason
    assert [seq_of(r) for r in opened.drain()] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("where", ["payload", "magic", "length"])
def test_a_garbled_record_in_the_middle_is_skipped_once_and_the_rest_read(tmp_path, where):
    filled(tmp_path, 40, segment_bytes=2048)
    first = tmp_path / "000000000001.rec"  # a finished segment, not the last
    assert (tmp_path / "000000000002.rec").exists()
    at, after = offsets(first)[2:4]
    data = bytearray(first.read_bytes())
    data[at + {"payload": HEADER.size + 1, "magic": 0, "length": 9}[where]] ^= 0x01
    first.write_bytes(bytes(data))
    opened = Opened(tmp_path, segment_bytes=2048)
    assert opened.damage == []  # a finished segment is checked as it is read
    first_read = opened.log.read(2)
    opened.log.read(10)  # read again over the damage, without committing: reported once
    assert [seq_of(r) for r in first_read] == [1, 2]
    seqs = [seq_of(r) for r in opened.drain(batch=7)]
    assert seqs == [1, 2, *range(4, 41)]
    assert len(opened.damage) == 1
    assert opened.damage[0].offset == at and not opened.damage[0].tail
    assert opened.damage[0].length == after - at


def test_garbage_in_the_middle_of_the_last_segment_is_reported_at_open_and_skipped(tmp_path):
    filled(tmp_path, 4)
    segment = tmp_path / "000000000001.rec"
    data = segment.read_bytes()
    at = offsets(segment)[2]
    segment.write_bytes(data[:at] + b"garbage" + data[at:])
    opened = Opened(tmp_path)
    assert [(d.offset, d.length, d.tail) for d in opened.damage] == [(at, 7, False)]
    assert [seq_of(r) for r in opened.drain()] == [1, 2, 3, 4]
    assert len(opened.damage) == 1


def test_committed_records_are_not_read_again_and_uncommitted_ones_are(tmp_path):
    opened = filled(tmp_path, 30, segment_bytes=1024)
    assert [seq_of(r) for r in opened.log.read(12)] == list(range(1, 13))
    opened.log.commit(10)
    opened.log.read(5)  # read, not committed: a crash now
    again = Opened(tmp_path, segment_bytes=1024)
    assert [seq_of(r) for r in again.drain()] == list(range(11, 31))
    assert again.log.empty and again.log.size == 0
    assert [p.name for p in tmp_path.iterdir()] == ["cursor.json"]
    again.log.append([payload(31)])  # numbering goes on after the cursor's segment
    assert [seq_of(r) for r in Opened(tmp_path, segment_bytes=1024).drain()] == [31]


def test_segments_the_cursor_has_passed_are_deleted(tmp_path):
    opened = filled(tmp_path, 60, segment_bytes=1024)
    segments = sorted(tmp_path.glob("*.rec"))
    assert len(segments) > 3
    opened.log.commit(len(opened.log.read(1000)))  # all of the first segment
    opened.log.read(1)
    assert not segments[0].exists() and segments[1].exists()


def test_an_unreadable_cursor_is_counted_and_the_log_read_from_the_start(tmp_path):
    opened = filled(tmp_path, 5)
    opened.log.read(2)
    opened.log.commit(2)
    (tmp_path / "cursor.json").write_text("{torn")
    again = Opened(tmp_path)
    assert len(again.damage) == 1
    assert str(again.damage[0]).startswith(f"{tmp_path / 'cursor.json'}: cursor unreadable (")
    assert [seq_of(r) for r in again.drain()] == [1, 2, 3, 4, 5]  # at least once


def test_append_refuses_a_batch_that_does_not_fit_and_writes_nothing(tmp_path):
    limit = 4096
    opened = Opened(tmp_path, max_bytes=limit)
    record = b"x" * 1000
    while opened.log.append([record]):
        pass
    assert limit - len(frame(record)) < opened.log.size <= limit
    on_disk = sum(p.stat().st_size for p in tmp_path.glob("*.rec"))
    assert not opened.log.append([b"y"] * 100)
    assert sum(p.stat().st_size for p in tmp_path.glob("*.rec")) == on_disk
    assert opened.log.append([b"z"] * 100, force=True)  # taken over from elsewhere
    opened.log.commit(len(opened.log.read(3)))
    assert opened.log.size < limit


def test_a_failed_append_leaves_nothing_of_its_batch(tmp_path, monkeypatch):
    opened = filled(tmp_path, 3)
    segment = tmp_path / "000000000001.rec"
    before = segment.read_bytes()

    def short_write(fd: int, data: bytes) -> None:
        os.write(fd, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(durable, "write_all", short_write)
    with pytest.raises(OSError):
        opened.log.append([payload(4), payload(5)])
    assert segment.read_bytes() == before
    monkeypatch.undo()
    assert opened.log.append([payload(4)])
    assert [seq_of(r) for r in Opened(tmp_path).drain()] == [1, 2, 3, 4]


def test_cursor_file_is_json_with_segment_and_offset(tmp_path):
    opened = filled(tmp_path, 3)
    opened.log.read(1)
    opened.log.commit(1)
    cursor = json.loads((tmp_path / "cursor.json").read_text())
    assert cursor == {"segment": 1, "offset": len(frame(payload(1)))}


def test_append_refuses_a_record_longer_than_a_reader_would_accept(tmp_path):
    opened = Opened(tmp_path, max_bytes=64 << 20)
    with pytest.raises(ValueError):
        opened.log.append([b"ok", b"x" * (durable.MAX_RECORD + 1)])
    assert opened.log.empty and not list(tmp_path.glob("*.rec"))
