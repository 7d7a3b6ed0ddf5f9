"""pihub-store-rrd: every measurement of ``<root>/data/#`` into one round-robin database each.

Reads (QoS 1, persistent session)::

    <root>/data/<location>/<quantity>   {"value": 21.5, "unit": "°C", "ts": 1717000000.123}

Writes one RRD per series, ``<rrd_dir>/<location>/<quantity>.rrd``, created on first sight
(contract §4): one GAUGE data source ``value``, step 60 s, heartbeat ``rrd_heartbeat``,
AVERAGE, MIN and MAX archives of 2 days at 1 min, 2 weeks at 5 min, 13 months at 1 h and
10 years at 1 day. Beside it, ``<quantity>.json`` records the series' unit and topic
(``{"location", "quantity", "unit", "topic", "created"}``) for graphs and readers.

Updates go through rrdcached's socket (its text protocol, ``UPDATE <file> <ts>:<value>``) when
``rrdcached_socket`` is set, and straight into the file otherwise. With rrdcached they never go
around it: it holds up to an hour of updates in its cache and journal, and replays the journal
when it starts again; an update written into the file meanwhile would be newer than those, so
rrdcached's next flush of that file would be refused as a whole and all it held lost. While
rrdcached cannot be reached, updates wait in memory in arrival order (at most
``rrdcached_backlog``, the oldest dropped beyond: counted ``rrdcached_dropped``, logged once per
outage), its socket is tried again every ``rrdcached_retry`` seconds (on the next message or a
timer, so a quiet series is sent too), and once it answers the backlog is sent in order, then the
new update. Files are created with ``rrdtool create`` (never
through rrdcached, which only learns a file once it exists). Direct writes and creations use one
``rrdtool -`` process (rrdtool's pipe mode): no compiled Python binding. It is started when
needed and ended once unused for ``RRDTOOL_IDLE_S``: with rrdcached up it is needed only for a
new series, and an idle rrdtool would hold RAM for nothing (README: Measured).

An update that is not newer than the file's last one (a retained message delivered again, a
sensor whose clock went back) is counted as ``stale`` and logged at debug level. A file that cannot
be created or written (permissions, full disk) is logged once per series and counted as
``write_errors``; the other series go on.

At most ``max_series`` series (RRD files in ``rrd_dir``, those there at start included) are kept:
a message of a new series beyond them is rejected and counted (``rejected`` and
``series_refused``), logged once per heartbeat interval, and no file is created; the series
already there go on. A unit is at most ``pihub.topics.MAX_UNIT`` characters (contract §2), so
a sidecar stays small.

Publishes nothing of its own besides ``<root>/store-rrd/status`` and ``.../meta`` (counters
``stored``, ``created``, ``stale``, ``write_errors``, ``rrdcached_errors``, ``rrdcached_dropped``,
``series_refused``; ``series``, ``rrdcached`` state and ``rrdcached_backlog`` in the heartbeat).

``pihub-store-rrd --graph [SERIES...]`` renders PNG graphs (last day, week, month, year) of the
series (``location/quantity``; all of them by default) into ``--out``: the daemon's second
command, kept in :mod:`.graph`; see ``--graph --help``.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pihub.bus import Message
from pihub.config import BaseConfig, ConfigError, setting
from pihub.daemon import Daemon
from pihub.durable import atomic_write
from pihub.topics import Measurement

STEP = 60
DS_NAME = "value"
#: (rows, steps per row): 2 days at 1 min, 2 weeks at 5 min, 13 months at 1 h, 10 years at 1 day
ARCHIVES = ((2 * 1440, 1), (14 * 288, 5), (396 * 24, 60), (3660, 1440))
CONSOLIDATIONS = ("AVERAGE", "MIN", "MAX")
STALE_MARK = "illegal attempt to update using time"

SOCKET_PATTERN = r"^(unix:)?/\S+$"


@dataclass(kw_only=True)
class Config(BaseConfig):
    rrd_dir: str = setting(
        "/var/lib/pihub/rrd",
        "Directory of the RRD files, <rrd_dir>/<location>/<quantity>.rrd (absolute path, "
        "no spaces). rrdcached must serve it (its -b base directory).",
        pattern=r"^/\S*$",
    )
    rrdcached_socket: str | None = setting(
        None,
        "rrdcached's unix socket (unix:/path or /path); null writes the files directly.",
        example="unix:/run/rrdcached/rrdcached.sock",
        pattern=SOCKET_PATTERN,
    )
    rrdcached_timeout: float = setting(
        10.0, "Seconds to wait for rrdcached to answer before taking it for down (updates then "
        "wait in memory, see rrdcached_backlog).", min=0.1, max=300,
    )
    rrdcached_retry: float = setting(
        10.0,
        "Seconds between tries of rrdcached's socket while it is down; meanwhile updates wait "
        "in memory (never written around rrdcached, whose journal would then be refused).",
        min=0.1, max=3600,
    )
    rrdcached_backlog: int = setting(
        100000,
        "Most updates held in memory while rrdcached is down (about 120 bytes each), sent in "
        "order once it answers; beyond, the oldest are dropped, counted (rrdcached_dropped) "
        "and logged once per outage (they remain in the timeseries DB).",
        min=1, max=10_000_000,
    )
    rrd_heartbeat: int = setting(
        300,
        "RRD heartbeat of new files, seconds: a gap between two updates longer than this "
        "is stored as unknown.",
        min=STEP, max=86400,
    )
    rrdtool: str = setting("rrdtool", "The rrdtool program (a name on PATH or a path).")
    max_series: int = setting(
        1000, "Most series (RRD files of about 490 kB each) kept in rrd_dir; a message of a new "
        "series beyond them is rejected, counted (series_refused) and logged once per "
        "heartbeat interval.", min=1,
    )


class RrdError(Exception):
    """rrdtool or rrdcached refused a command; ``stale`` when the update was not newer."""

    @property
    def stale(self) -> bool:
        return STALE_MARK in str(self)


def socket_path(address: str) -> str:
    return address[5:] if address.startswith("unix:") else address


def rrd_number(x: float) -> str:
    """A number as rrdtool reads it: plain decimals, full precision."""
    return repr(float(x))


# --------------------------------------------------------------------------- rrdtool pipe


#: Seconds the ``rrdtool -`` process may stay unused before it is ended (started again when
#: needed); checked every half of it.
RRDTOOL_IDLE_S = 30.0


class RrdTool:
    """One ``rrdtool -`` process: a command per line, ``OK ...`` or ``ERROR: ...``."""

    def __init__(self, exe: str, timeout: float = 60.0) -> None:
        self.exe = exe
        self.timeout = timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._buf = b""
        self._lock = threading.Lock()
        self._used = 0.0

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _start(self) -> subprocess.Popen[bytes]:
        # RRDCACHED_ADDRESS would send create/update through rrdcached; this is the direct path
        env = {k: v for k, v in os.environ.items() if k != "RRDCACHED_ADDRESS"}
        env["LC_ALL"] = "C"
        self._buf = b""
        return subprocess.Popen([self.exe, "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, bufsize=0, env=env)

    def run(self, *args: str) -> None:
        """Run one command; raise RrdError with rrdtool's message when it fails."""
        for arg in args:
            if not arg or any(c.isspace() for c in arg):
                raise RrdError(f"rrdtool argument {arg!r} is empty or contains white space")
        line = (" ".join(args) + "\n").encode("utf-8")
        with self._lock:
            self._used = time.monotonic()
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
            proc = self._proc
            assert proc.stdin is not None
            try:
                proc.stdin.write(line)
                answer = self._answer(proc)
            except (OSError, RrdError) as exc:
                self._kill()
                raise RrdError(f"rrdtool pipe failed on {args[0]}: {exc}") from None
        if answer.startswith("ERROR:"):
            raise RrdError(answer[6:].strip())

    def _answer(self, proc: subprocess.Popen[bytes]) -> str:
        """Lines up to rrdtool's ``OK ...`` or ``ERROR: ...``: that line."""
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        deadline = time.monotonic() + self.timeout
        other: list[str] = []
        while True:
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    raise RrdError(f"no answer within {self.timeout:.0f} s")
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RrdError(f"rrdtool exited ({proc.wait(5)}): "
                                   f"{' '.join(other)[-300:]}")
                self._buf += chunk
            raw, _, self._buf = self._buf.partition(b"\n")
            text = raw.decode("utf-8", "replace")
            if text.startswith(("OK ", "ERROR:")) or text == "OK":
                return text
            other.append(text)

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def close_if_idle(self, idle_s: float) -> bool:
        """End the process when it has not been used for ``idle_s``; True when it was ended."""
        with self._lock:
            if not self.running or time.monotonic() - self._used < idle_s:
                return False
            self._close()
            return True

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            assert self._proc.stdin is not None
            try:
                self._proc.stdin.write(b"quit\n")
                self._proc.stdin.close()
                self._proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self._kill()
        self._proc = None


# --------------------------------------------------------------------------- rrdcached client


class RrdCached:
    """rrdcached's text protocol over its unix socket (one connection, reopened on demand).

    Every answer starts with a status: a negative number is an error (its text follows), a
    positive one counts the lines of text that follow.
    """

    def __init__(self, address: str, timeout: float) -> None:
        self.path = socket_path(address)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._file: Any = None

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        self._sock, self._file = sock, sock.makefile("rb")

    def command(self, line: str) -> list[str]:
        """Send one command; its answer's lines. OSError: the socket failed (closed then).

        A kept connection that rrdcached closed meanwhile (it restarted) is opened afresh once.
        """
        if self._sock is not None:
            try:
                return self._command(line)
            except ConnectionError:
                pass  # closed by now: once more on a new connection
        return self._command(line)

    def _command(self, line: str) -> list[str]:
        if self._sock is None:
            self._connect()
        assert self._sock is not None
        try:
            self._sock.sendall(line.encode("utf-8") + b"\n")
            status = self._readline()
            head, _, text = status.partition(" ")
            try:
                n = int(head)
            except ValueError:
                raise OSError(f"unexpected answer from rrdcached: {status!r}") from None
            lines = [self._readline() for _ in range(max(n, 0))]
        except OSError:
            self.close()
            raise
        if n < 0:
            raise RrdError(text)
        return lines

    def _readline(self) -> str:
        raw = self._file.readline()
        if not raw:
            raise ConnectionError("rrdcached closed the connection")
        return str(raw.decode("utf-8", "replace").rstrip("\n"))

    def update(self, path: str, ts: float, value: float) -> None:
        self.command(f"UPDATE {path} {rrd_number(ts)}:{rrd_number(value)}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = self._file = None


# --------------------------------------------------------------------------- the backlog


class Backlog:
    """Updates ``(file, ts, value)`` waiting for rrdcached, in arrival order; at most ``limit``,
    the oldest dropped beyond."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._q: deque[tuple[str, float, float]] = deque()

    def __len__(self) -> int:
        return len(self._q)

    def add(self, path: str, ts: float, value: float) -> int:
        """Append one update; how many of the oldest were dropped to make room (0 or more)."""
        self._q.append((path, ts, value))
        dropped = 0
        while len(self._q) > self.limit:
            self._q.popleft()
            dropped += 1
        return dropped

    def first(self) -> tuple[str, float, float]:
        return self._q[0]

    def pop_first(self) -> None:
        self._q.popleft()


# --------------------------------------------------------------------------- the daemon


@dataclass
class Series:
    path: Path
    unit: str


def series_paths(rrd_dir: str | Path, location: str, quantity: str) -> tuple[Path, Path]:
    base = Path(rrd_dir) / location
    return base / f"{quantity}.rrd", base / f"{quantity}.json"


def create_args(path: Path, start: int, heartbeat: int) -> list[str]:
    args = ["create", str(path), "--start", str(start), "--step", str(STEP), "--no-overwrite",
            f"DS:{DS_NAME}:GAUGE:{heartbeat}:U:U"]
    for rows, steps in ARCHIVES:
        args += [f"RRA:{cf}:0.5:{steps}:{rows}" for cf in CONSOLIDATIONS]
    return args


def write_sidecar(path: Path, info: dict[str, Any]) -> None:
    # whole after a crash; group-writable like the series, through the daemon's umask 002
    atomic_write(path, json.dumps(info, ensure_ascii=False, indent=1) + "\n", mode=0o664)


def read_sidecar(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class StoreRrd(Daemon[Config]):
    name = "store-rrd"
    config_class = Config
    description = ("Store every measurement of <root>/data/# in one RRD per series. "
                   "pihub-store-rrd --graph --help: render PNG graphs.")
    persistent_session = True

    def __init__(self, config: Config, config_path: str | None = None) -> None:
        super().__init__(config, config_path)
        exe = shutil.which(config.rrdtool)
        if exe is None:
            raise ConfigError("rrdtool", f"program {config.rrdtool!r} not found (install the "
                                         "Debian package rrdtool)")
        self.rrd_dir = Path(config.rrd_dir)
        self.rrdtool = RrdTool(exe)
        self.cached = (RrdCached(config.rrdcached_socket, config.rrdcached_timeout)
                       if config.rrdcached_socket else None)
        self._cached_down_until = 0.0
        #: updates waiting for rrdcached while it is down (never written around it)
        self._backlog = Backlog(config.rrdcached_backlog)
        #: rrdcached found down and not answering again yet: one warning, one drop error per outage
        self._outage = False
        self._dropped_logged = False
        self._series: dict[tuple[str, str], Series] = {}
        self._failing: set[tuple[str, str]] = set()
        #: the series with a file in rrd_dir (found at start, or created since)
        self._known: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def setup(self) -> None:
        # Series directories and files are shared with rrdcached (another user of the RRD group):
        # group-writable whatever the unit's UMask. Directories keep the group through rrd_dir's
        # setgid bit, which they inherit; setting it with chmod is refused under the unit's
        # RestrictSUIDSGID=yes.
        os.umask(0o002)
        try:
            self.rrd_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self.count("errors")
            self.log.error("rrd_dir %s cannot be made: %s; every series will fail until it can",
                           self.rrd_dir, exc)
        self._known = {(p.parent.name, p.stem) for p in self.rrd_dir.glob("*/*.rrd")}
        mode = f"through rrdcached at {self.config.rrdcached_socket}" if self.cached else \
            "directly (no rrdcached_socket)"
        self.log.info("storing into %s, %s; %d series there (max_series=%d)", self.rrd_dir,
                      mode, len(self._known), self.config.max_series)
        for counter in ("stored", "created", "stale", "write_errors", "rrdcached_errors",
                        "rrdcached_dropped", "series_refused"):
            self.count(counter, 0)  # every counter in every heartbeat, from the start
        self.subscribe_data(self.store)
        self.every(RRDTOOL_IDLE_S / 2, self._rrdtool_idle, first_in=RRDTOOL_IDLE_S / 2)
        if self.cached is not None:
            # a quiet series' backlog must reach rrdcached too once it is back
            self.every(self.config.rrdcached_retry, self._retry_backlog,
                       first_in=self.config.rrdcached_retry)

    def _retry_backlog(self) -> None:
        with self._lock:
            if len(self._backlog) and time.monotonic() >= self._cached_down_until:
                self._drain()

    def _rrdtool_idle(self) -> None:
        if self.rrdtool.close_if_idle(RRDTOOL_IDLE_S):
            self.log.debug("rrdtool unused for %.0f s: ended until needed", RRDTOOL_IDLE_S)

    def reload(self, new: Config, changed: set[str]) -> set[str]:
        return changed & {"max_series"}

    def shutdown(self) -> None:
        with self._lock:
            if len(self._backlog):
                self._drain()
            if len(self._backlog):
                self.log.error("stopping with %d update(s) rrdcached never took: lost for the "
                               "RRDs (they remain in the timeseries DB)", len(self._backlog))
            if self.cached is not None:
                self.cached.close()
            self.rrdtool.close()

    def heartbeat_extra(self) -> dict[str, Any]:
        with self._lock:
            n = len(self._known)
            backlog = len(self._backlog)
            state = "off" if self.cached is None else ("down" if self._outage else "up")
        extra: dict[str, Any] = {"series": n, "rrdcached": state}
        if self.cached is not None:
            extra["rrdcached_backlog"] = backlog
        return extra

    # ------------------------------------------------------------------ per message

    def store(self, m: Measurement, msg: Message) -> None:
        key = (m.location, m.quantity)
        with self._lock:
            if key not in self._known:
                if len(self._known) >= self.config.max_series and \
                        not series_paths(self.rrd_dir, *key)[0].exists():
                    self.refuse_new_series(msg.topic, self.config.max_series)
                    return
                self._known.add(key)
            try:
                series = self._series.get(key)
                if series is None or series.unit != m.unit:
                    series = self._open(m, msg.topic)
                if not self._update(series, m.ts, m.value):
                    return  # held for rrdcached: counted when it takes it
            except RrdError as exc:
                if exc.stale:
                    self.count("stale")
                    self.log.debug("stale: %s %s (ts %.3f): %s", msg.topic, m.value, m.ts, exc)
                    return
                self.count("write_errors")
                # look at the file afresh next time (deleted? made writable again?)
                self._series.pop(key, None)
                if key not in self._failing:
                    self._failing.add(key)
                    self.log.error("cannot store %s/%s from %s: %s", m.location, m.quantity,
                                   msg.topic, exc)
                else:
                    self.log.debug("still cannot store %s/%s: %s", m.location, m.quantity, exc)
                return
            self.count("stored")
            if key in self._failing:
                self._failing.discard(key)
                self.log.info("%s/%s is stored again", m.location, m.quantity)

    def _open(self, m: Measurement, topic: str) -> Series:
        """The series of ``m``, its file created if missing, its sidecar up to date."""
        path, sidecar = series_paths(self.rrd_dir, m.location, m.quantity)
        if not path.exists():
            self._create(path, int(m.ts) - 1)
            self.count("created")
            self.log.info("created %s for %s (%s)", path, topic, m.unit)
        info = read_sidecar(sidecar)
        if info.get("unit") != m.unit or info.get("topic") != topic:
            if info.get("unit") and info.get("unit") != m.unit:
                self.log.warning("%s: unit changed from %s to %s", topic, info["unit"], m.unit)
            new = {"location": m.location, "quantity": m.quantity, "unit": m.unit,
                   "topic": topic, "created": info.get("created", round(time.time(), 3))}
            try:
                write_sidecar(sidecar, new)
            except OSError as exc:
                raise RrdError(f"cannot write {sidecar}: {exc.strerror or exc}") from None
        series = Series(path, m.unit)
        self._series[(m.location, m.quantity)] = series
        return series

    def _create(self, path: Path, start: int) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RrdError(f"cannot make directory {path.parent}: {exc.strerror or exc}") \
                from None
        try:
            self.rrdtool.run(*create_args(path, start, self.config.rrd_heartbeat))
        except RrdError as exc:
            if "File exists" not in str(exc):  # made meanwhile by someone else: fine
                raise
        # rrdtool 1.7 reports OK when its temporary file could not be written (full disk)
        if not path.exists():
            free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
            raise RrdError(f"rrdtool create left no {path} ({free // 1024} kB free there)")
        try:
            os.chmod(path, 0o664)  # rrdcached writes it as another user of the RRD group
        except OSError as exc:
            self.log.warning("cannot make %s group-writable: %s", path, exc)

    def _update(self, series: Series, ts: float, value: float) -> bool:
        """Hand one update on; False when it waits in the backlog for rrdcached."""
        if self.cached is None:
            self.rrdtool.run("update", str(series.path), f"{rrd_number(ts)}:{rrd_number(value)}")
            return True
        if len(self._backlog) and time.monotonic() >= self._cached_down_until:
            self._drain()
        if not len(self._backlog) and time.monotonic() >= self._cached_down_until:
            try:
                self.cached.update(str(series.path), ts, value)
                return True
            except OSError as exc:
                self._down(exc)
        self._hold(str(series.path), ts, value)
        return False

    def _down(self, exc: OSError) -> None:
        """rrdcached failed: try it again after rrdcached_retry; warn once per outage."""
        assert self.cached is not None
        self.count("rrdcached_errors")
        self._cached_down_until = time.monotonic() + self.config.rrdcached_retry
        if not self._outage:
            self._outage = True
            self._dropped_logged = False
            self.log.warning("rrdcached at %s failed (%s); holding updates in memory (at most "
                             "%d) and trying it again every %g s", self.config.rrdcached_socket,
                             exc, self._backlog.limit, self.config.rrdcached_retry)
        else:
            self.log.debug("rrdcached still down (%s); %d update(s) held", exc,
                           len(self._backlog))

    def _hold(self, path: str, ts: float, value: float) -> None:
        dropped = self._backlog.add(path, ts, value)
        if dropped:
            self.count("rrdcached_dropped", dropped)
            if not self._dropped_logged:
                self._dropped_logged = True
                self.log.error("rrdcached down and rrdcached_backlog=%d updates held: dropping "
                               "the oldest for the RRDs (they remain in the timeseries DB); "
                               "counted in rrdcached_dropped, logged once per outage",
                               self._backlog.limit)

    def _drain(self) -> None:
        """Send the backlog to rrdcached in order, until it is empty or rrdcached fails (under
        _lock; a failure marks it down again)."""
        assert self.cached is not None
        sent = 0
        while len(self._backlog):
            path, ts, value = self._backlog.first()
            try:
                self.cached.update(path, ts, value)
            except OSError as exc:
                self._down(exc)
                return
            except RrdError as exc:
                self.count("stale" if exc.stale else "write_errors")
                self.log.debug("held update %s %.3f:%s refused by rrdcached: %s", path, ts,
                               value, exc)
            else:
                self.count("stored")
            self._backlog.pop_first()
            sent += 1
        self._cached_down_until = 0.0
        if self._outage:
            self._outage = False
            self.log.info("rrdcached at %s answers again: %d held update(s) sent in order",
                          self.config.rrdcached_socket, sent)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "--graph" in args:
        from . import graph  # argparse and the drawing only for this command

        return graph.main(args)
    return StoreRrd.main(args)


if __name__ == "__main__":
    sys.exit(main())
