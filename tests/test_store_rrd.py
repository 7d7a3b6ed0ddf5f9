"""pihub-store-rrd against a real Mosquitto, real rrdtool and a real rrdcached."""

from __future__ import annotations

import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonProcess, Observer, run_cli, wait_until, write_config

RRDTOOL = shutil.which("rrdtool") or "/usr/bin/rrdtool"


# --------------------------------------------------------------------------- helpers


class RrdCached:
    """A real rrdcached in the foreground, serving ``base`` only (-B), journal in a tmp dir."""

    def __init__(self, base: Path, workdir: Path) -> None:
        self.base = base
        self.workdir = workdir
        self.socket = workdir / "rrdcached.sock"
        self.address = f"unix:{self.socket}"
        self.log = workdir / "rrdcached.log"
        self.proc: subprocess.Popen[bytes] | None = None
        #: -F: flush every file when stopped; without it, what it holds stays in its journal
        self.flush_on_exit = True

    def start(self) -> None:
        journal = self.workdir / "journal"
        journal.mkdir(exist_ok=True)
        with open(self.log, "ab") as log:
            # -w 3600: nothing reaches the files unless flushed (proves the daemon's path)
            self.proc = subprocess.Popen(
                ["rrdcached", "-g", "-p", str(self.workdir / "rrdcached.pid"), "-l", self.address,
                 "-b", str(self.base), "-B",
                 "-j", str(journal), *(["-F"] if self.flush_on_exit else []),
                 "-w", "3600", "-f", "7200", "-z", "1"],
                stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._accepts, 10, f"rrdcached on {self.socket}")

    def _accepts(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"rrdcached exited: {self.log.read_text()[-2000:]}")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(self.socket))
                return True
        except OSError:
            return False

    def command(self, line: str) -> list[str]:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.socket))
            f = s.makefile("rwb")
            f.write(line.encode() + b"\n")
            f.flush()
            status = f.readline().decode().strip()
            n = int(status.split()[0])
            return [status] + [f.readline().decode().strip() for _ in range(max(n, 0))]

    def stats(self) -> dict[str, int]:
        lines = self.command("STATS")[1:]
        return {k: int(v) for k, v in (line.split(": ") for line in lines)}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def rrd_dir(tmp_path: Path) -> Path:
    """As the rrd role makes it: group-writable and setgid, so series keep the RRD group."""
    d = tmp_path / "rrd"
    d.mkdir()
    d.chmod(0o2775)
    return d


@pytest.fixture
def rrdcached(rrd_dir: Path) -> Iterator[RrdCached]:
    # a unix socket path must stay short (108 bytes): not under pytest's tmp_path
    workdir = Path(tempfile.mkdtemp(prefix="rrdc-", dir="/tmp"))
    cached = RrdCached(rrd_dir, workdir)
    cached.start()
    yield cached
    cached.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def rrd_info(path: Path) -> dict[str, str]:
    out = subprocess.run([RRDTOOL, "info", str(path)], capture_output=True, text=True,
                         check=True).stdout
    info = {}
    for line in out.splitlines():
        key, _, value = line.partition(" = ")
        info[key] = value.strip('"')
    return info


def last_update(path: Path, cached: RrdCached | None = None) -> tuple[float, float] | None:
    """(time, value) of the file's last update, after flushing rrdcached; None if none yet."""
    if not path.exists():
        return None
    if cached is not None:
        subprocess.run([RRDTOOL, "flushcached", "--daemon", cached.address, str(path)],
                       capture_output=True, check=True)
    out = subprocess.run([RRDTOOL, "lastupdate", str(path)], capture_output=True, text=True,
                         check=True).stdout
    stamp, _, value = out.strip().splitlines()[-1].partition(":")
    if value.strip() in ("U", ""):
        return None
    return float(stamp), float(value)


def counters(obs: Observer, root: str, pred: Callable[[dict[str, Any]], bool],
             what: str) -> dict[str, Any]:
    """The first heartbeat of store-rrd whose counters satisfy ``pred``; the failure names
    ``what`` was awaited."""
    def first() -> dict[str, Any] | None:
        return next((m.json() for m in obs.messages(f"{root}/store-rrd/meta")
                     if m.json()["event"] == "heartbeat" and pred(m.json()["counters"])), None)

    return wait_until(first, 20, f"a store-rrd heartbeat with {what}")  # type: ignore[no-any-return]


def measurement(value: Any, ts: float, unit: str = "°C") -> dict[str, Any]:
    return {"value": value, "unit": unit, "ts": ts}


def error_lines(d: DaemonProcess) -> list[str]:
    return [line for line in d.output().splitlines() if " ERROR " in line or "Traceback" in line]


Mode = str
MODES = ["rrdcached", "direct"]


@pytest.fixture
def store(start_daemon: Callable[..., DaemonProcess], rrd_dir: Path, request: Any
          ) -> Callable[..., tuple[DaemonProcess, RrdCached | None]]:
    """``store(mode)`` → the daemon writing into rrd_dir, through rrdcached or directly."""

    def start(mode: Mode, **extra: Any) -> tuple[DaemonProcess, RrdCached | None]:
        cached = request.getfixturevalue("rrdcached") if mode == "rrdcached" else None
        cfg = {"rrd_dir": str(rrd_dir), "rrdcached_socket": cached.address if cached else None,
               **extra}
        d = start_daemon("store_rrd", cfg)
        d.wait_log("ready: connected and subscribed", timeout=20)
        return d, cached

    return start


# --------------------------------------------------------------------------- creation


def test_first_sight_creates_rrd_with_design_archives(store, observe, topic_root, rrd_dir):
    d, cached = store("rrdcached", rrd_heartbeat=240)
    obs = observe(f"{topic_root}/store-rrd/meta")
    ts = time.time()
    obs.publish(f"{topic_root}/data/kitchen/temperature", measurement(21.5, ts), retain=True)
    path = rrd_dir / "kitchen" / "temperature.rrd"
    wait_until(lambda: last_update(path, cached), 20, f"first update in {path}")

    info = rrd_info(path)
    assert info["step"] == "60"
    assert info["ds[value].type"] == "GAUGE"
    assert info["ds[value].minimal_heartbeat"] == "240"
    rras = sorted((info[f"rra[{i}].cf"], int(info[f"rra[{i}].pdp_per_row"]),
                   int(info[f"rra[{i}].rows"]))
                  for i in range(12))
    assert f"rra[{12}].cf" not in info
    expected = sorted((cf, steps, rows) for cf in ("AVERAGE", "MIN", "MAX")
                      for steps, rows in ((1, 2880), (5, 4032), (60, 9504), (1440, 3660)))
    assert rras == expected
    # rows x steps x 60 s: 2 days, 2 weeks, 13 months (396 days), 10 years (3660 days)
    assert [r * s * 60 // 86400 for _cf, s, r in expected[:4]] == [2, 14, 396, 3660]

    sidecar = (rrd_dir / "kitchen" / "temperature.json").read_text(encoding="utf-8")
    assert '"unit": "°C"' in sidecar
    assert f'"topic": "{topic_root}/data/kitchen/temperature"' in sidecar
    # rrdcached runs as another user of the RRD group: files group-writable, group inherited
    assert path.stat().st_mode & 0o7777 == 0o664
    assert path.parent.stat().st_mode & 0o7777 == 0o2775
    beat = counters(obs, topic_root, lambda c: c.get("created") == 1, "created counted")
    assert beat["series"] == 1
    assert d.stop() == 0


# --------------------------------------------------------------------------- updates


@pytest.mark.parametrize("mode", MODES)
def test_updates_land_in_the_rrd(mode, store, observe, topic_root, rrd_dir):
    d, cached = store(mode)
    obs = observe(f"{topic_root}/store-rrd/meta")
    t0 = time.time() - 600
    for i in range(5):
        obs.publish(f"{topic_root}/data/hall/humidity", measurement(40 + i, t0 + 60 * i, "%"))
    path = rrd_dir / "hall" / "humidity.rrd"
    last = wait_until(lambda: (lu := last_update(path, cached)) and lu[0] >= int(t0 + 240) and lu,
                      20, f"the 5th update in {path}")
    assert last == (pytest.approx(t0 + 240, abs=1), 44.0)
    counters(obs, topic_root, lambda c: c.get("stored") == 5, "5 stored")
    if cached is not None:
        # they went through rrdcached's socket, not into the file behind its back
        assert cached.stats()["UpdatesReceived"] >= 5
    assert error_lines(d) == []
    assert d.stop() == 0


def test_updates_wait_in_rrdcached_until_flushed(store, observe, topic_root, rrd_dir):
    _d, cached = store("rrdcached")
    obs = observe()
    t0 = time.time() - 300
    obs.publish(f"{topic_root}/data/attic/pressure", measurement(1013.2, t0, "hPa"))
    obs.publish(f"{topic_root}/data/attic/pressure", measurement(1013.4, t0 + 60, "hPa"))
    path = str(rrd_dir / "attic" / "pressure.rrd")
    assert cached is not None
    pending = wait_until(lambda: (p := cached.command(f"PENDING {path}"))[0][0] != "-" and
                         len(p) >= 3 and p, 20, "2 updates pending in rrdcached")
    assert pending[-1].endswith(":1013.4")


@pytest.mark.parametrize("mode", MODES)
def test_out_of_order_update_is_counted_stale_and_later_ones_land(mode, store, observe,
                                                                  topic_root, rrd_dir):
    d, cached = store(mode)
    obs = observe(f"{topic_root}/store-rrd/meta")
    topic = f"{topic_root}/data/garden/temperature"
    t0 = time.time() - 600
    obs.publish(topic, measurement(10.0, t0))
    obs.publish(topic, measurement(9.0, t0 - 120))     # older: refused by RRD
    obs.publish(topic, measurement(11.0, t0))          # the same time again: refused too
    obs.publish(topic, measurement(12.0, t0 + 60))
    beat = counters(obs, topic_root, lambda c: c.get("stored") == 2 and c.get("stale") == 2,
                    "2 stored and 2 stale")
    assert beat["counters"].get("write_errors", 0) == 0
    last = last_update(rrd_dir / "garden" / "temperature.rrd", cached)
    assert last == (pytest.approx(t0 + 60, abs=1), 12.0)
    assert error_lines(d) == []
    assert "stale:" in d.output()  # logged at debug level
    assert d.stop() == 0


def test_retained_value_delivered_again_after_restart_is_stale(store, observe, topic_root,
                                                               rrd_dir):
    d, cached = store("rrdcached")
    obs = observe(f"{topic_root}/store-rrd/meta")
    ts = time.time()
    obs.publish(f"{topic_root}/data/cellar/temperature", measurement(14.0, ts), retain=True)
    counters(obs, topic_root, lambda c: c.get("stored") == 1, "1 stored")
    assert d.stop() == 0
    d2 = store("rrdcached")[0]
    counters(obs, topic_root, lambda c: c.get("stale") == 1 and c.get("stored", 0) == 0,
             "the retained value counted stale by the new process")
    assert last_update(rrd_dir / "cellar" / "temperature.rrd", cached) == (
        pytest.approx(ts, abs=1), 14.0)
    assert error_lines(d2) == []
    assert d2.stop() == 0


# --------------------------------------------------------------------------- bad input


def test_bad_payloads_are_rejected_and_good_ones_still_land(store, observe, topic_root,
                                                            rrd_dir):
    d, cached = store("rrdcached")
    obs = observe(f"{topic_root}/store-rrd/meta")
    now = time.time()
    obs.publish(f"{topic_root}/data/lab/temperature", b"not json")
    obs.publish(f"{topic_root}/data/lab/temperature", measurement("warm", now))
    obs.publish(f"{topic_root}/data/lab/temperature", b'{"value": NaN, "unit": "C", "ts": 1}')
    obs.publish(f"{topic_root}/data/lab/temperature", {"value": 1, "unit": "°C"})
    obs.publish(f"{topic_root}/data/lab/deep/temperature", measurement(1, now))
    obs.publish(f"{topic_root}/data/Lab/temperature", measurement(1, now))
    obs.publish(f"{topic_root}/data/lab/temperature", measurement(20.25, now))
    counters(obs, topic_root, lambda c: c["rejected"] == 6 and c.get("stored") == 1,
             "6 rejected, 1 stored")
    assert last_update(rrd_dir / "lab" / "temperature.rrd", cached) == (
        pytest.approx(now, abs=1), 20.25)
    assert sorted(p.name for p in rrd_dir.rglob("*.rrd")) == ["temperature.rrd"]
    assert "Traceback" not in d.output()
    assert d.stop() == 0


# --------------------------------------------------------------------------- write failures


@pytest.mark.parametrize("mode", MODES)
def test_unwritable_series_is_logged_once_and_other_series_go_on(mode, store, observe,
                                                                 topic_root, rrd_dir):
    (rrd_dir / "blocked").write_text("a file where the series' directory should be\n")
    d, cached = store(mode)
    obs = observe(f"{topic_root}/store-rrd/meta")
    t0 = time.time() - 600
    for i in range(3):
        obs.publish(f"{topic_root}/data/blocked/temperature", measurement(i, t0 + 60 * i))
        obs.publish(f"{topic_root}/data/open/temperature", measurement(i, t0 + 60 * i))
    counters(obs, topic_root, lambda c: c.get("write_errors") == 3 and c.get("stored") == 3,
             "3 write errors and 3 stored")
    assert last_update(rrd_dir / "open" / "temperature.rrd", cached) == (
        pytest.approx(t0 + 120, abs=1), 2.0)
    errors = error_lines(d)
    assert len(errors) == 1, errors
    assert "cannot store blocked/temperature" in errors[0]
    assert str(rrd_dir / "blocked") in errors[0]

    # the way is clear again: the series is created and stored, and the log says so
    (rrd_dir / "blocked").unlink()
    obs.publish(f"{topic_root}/data/blocked/temperature", measurement(7, t0 + 300))
    d.wait_log("blocked/temperature is stored again", timeout=20)
    assert last_update(rrd_dir / "blocked" / "temperature.rrd", cached) == (
        pytest.approx(t0 + 300, abs=1), 7.0)
    assert d.stop() == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 700 kB tmpfs: room for one RRD (about 480 kB), not for two."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_fails_new_series_while_existing_ones_go_on(store, observe, topic_root,
                                                              small_disk, start_daemon):
    d = start_daemon("store_rrd", {"rrd_dir": str(small_disk)})
    d.wait_log("ready: connected and subscribed", timeout=20)
    obs = observe(f"{topic_root}/store-rrd/meta")
    t0 = time.time() - 600
    obs.publish(f"{topic_root}/data/one/temperature", measurement(1, t0))
    counters(obs, topic_root, lambda c: c.get("stored") == 1, "first series stored")
    obs.publish(f"{topic_root}/data/two/temperature", measurement(2, t0))
    obs.publish(f"{topic_root}/data/one/temperature", measurement(3, t0 + 60))
    counters(obs, topic_root, lambda c: c.get("write_errors") == 1 and c.get("stored") == 2,
             "the second series failed, the first one went on")
    assert last_update(small_disk / "one" / "temperature.rrd") == (
        pytest.approx(t0 + 60, abs=1), 3.0)
    assert not (small_disk / "two" / "temperature.rrd").exists()
    (error,) = error_lines(d)
    assert "cannot store two/temperature" in error and "kB free" in error
    assert d.stop() == 0


def fetch_rows(path: Path, start: int, end: int) -> dict[int, float | None]:
    """AVERAGE rows at 1 min of ``path`` from ``start`` to ``end``: {row time: value or None}."""
    out = subprocess.run([RRDTOOL, "fetch", str(path), "AVERAGE", "-r", "60", "-s", str(start),
                          "-e", str(end)], capture_output=True, text=True, check=True).stdout
    rows: dict[int, float | None] = {}
    for line in out.splitlines():
        stamp, sep, value = line.partition(":")
        if sep and stamp.strip().isdigit():
            v = float(value)
            rows[int(stamp)] = None if v != v else v
    return rows


def test_rrdcached_down_holds_updates_and_its_journal_survives(store, observe, topic_root,
                                                                rrd_dir):
    """rrdcached killed with updates in its journal, measurements meanwhile, rrdcached started
    again on that journal: every row is in the RRD (nothing written around rrdcached, whose
    replayed journal would then be older than the file and refused as a whole)."""
    d, cached = store("rrdcached", rrdcached_retry=0.5)
    assert cached is not None
    cached.stop()
    cached.flush_on_exit = False  # as the rrd role runs it: a restart keeps the updates journaled
    cached.start()
    obs = observe(f"{topic_root}/store-rrd/meta")
    topic = f"{topic_root}/data/porch/temperature"
    path = rrd_dir / "porch" / "temperature.rrd"
    t0 = int(time.time()) // 60 * 60 - 1200
    for i in range(5):
        obs.publish(topic, measurement(i, t0 + 60 * i))
    counters(obs, topic_root, lambda c: c.get("stored") == 5, "5 stored via rrdcached")
    pending = cached.command(f"PENDING {path}")
    assert len(pending) == 6 and pending[-1].endswith(":4.0"), pending  # held, journaled only
    cached.stop()  # SIGTERM without -F: the 5 updates are in its journal only (SIGKILL would
    # lose them in its journal's write buffer: rrdcached's own limit)
    assert sum(p.stat().st_size for p in (cached.workdir / "journal").iterdir()) > 0

    for i in range(5, 10):
        obs.publish(topic, measurement(i, t0 + 60 * i))
    beat = counters(obs, topic_root, lambda c: c.get("rrdcached_errors", 0) >= 1,
                    "rrdcached errors counted")
    beat = wait_until(
        lambda: next((m.json() for m in reversed(obs.messages(f"{topic_root}/store-rrd/meta"))
                      if m.json()["event"] == "heartbeat"
                      and m.json().get("rrdcached_backlog") == 5), None),
        20, "a heartbeat with 5 updates held")
    assert beat["rrdcached"] == "down"
    assert beat["counters"]["stored"] == 5  # the held ones are not stored yet
    d.wait_log("holding updates in memory")
    # nothing was written into the file around rrdcached
    assert subprocess.run([RRDTOOL, "lastupdate", str(path)], capture_output=True, text=True,
                          check=True).stdout.strip().splitlines()[-1].split(":")[0] == str(t0 - 1)

    cached.start()  # replays its journal, then gets the held updates from the timer, in order
    beat = counters(obs, topic_root, lambda c: c.get("stored") == 10, "10 stored")
    beat = wait_until(
        lambda: next((m.json() for m in reversed(obs.messages(f"{topic_root}/store-rrd/meta"))
                      if m.json()["event"] == "heartbeat" and m.json()["rrdcached"] == "up"
                      and m.json().get("rrdcached_backlog") == 0), None),
        20, "a heartbeat with rrdcached up and nothing held")
    assert beat["counters"]["rrdcached_dropped"] == 0
    assert beat["counters"]["stale"] == 0
    d.wait_log("answers again: 5 held update(s) sent in order")
    assert last_update(path, cached) == (pytest.approx(t0 + 540, abs=1), 9.0)
    rows = fetch_rows(path, t0, t0 + 540)
    # the row ending at t0 + 60 i holds the value published at that time
    assert [rows.get(t0 + 60 * i) for i in range(1, 10)] == [float(i) for i in range(1, 10)], \
        rows
    assert "rrdcached_errors" in beat["counters"]
    assert error_lines(d) == []
    assert d.stop() == 0


def test_backlog_beyond_its_limit_drops_the_oldest_counted_and_logged_once(store, observe,
                                                                           topic_root, rrd_dir):
    d, cached = store("rrdcached", rrdcached_retry=0.5, rrdcached_backlog=3)
    assert cached is not None
    obs = observe(f"{topic_root}/store-rrd/meta")
    topic = f"{topic_root}/data/shed/temperature"
    path = rrd_dir / "shed" / "temperature.rrd"
    cached.stop()
    t0 = int(time.time()) // 60 * 60 - 1200
    for i in range(6):
        obs.publish(topic, measurement(i, t0 + 60 * i))
    wait_until(
        lambda: any(m.json()["event"] == "heartbeat" and m.json().get("rrdcached_backlog") == 3
                    and m.json()["counters"].get("rrdcached_dropped") == 3
                    for m in obs.messages(f"{topic_root}/store-rrd/meta")),
        20, "3 held, 3 dropped")
    errors = error_lines(d)
    assert len(errors) == 1 and "rrdcached_backlog=3" in errors[0], errors  # once per outage

    cached.start()
    counters(obs, topic_root, lambda c: c.get("stored") == 3 and c.get("stale") == 0,
             "the 3 held ones stored")
    assert last_update(path, cached) == (pytest.approx(t0 + 300, abs=1), 5.0)
    rows = fetch_rows(path, t0, t0 + 300)
    assert [rows.get(t0 + 60 * i) for i in (4, 5)] == [4.0, 5.0], rows
    assert d.stop() == 0


def test_backlog_keeps_arrival_order_and_drops_the_oldest_beyond_its_limit():
    from pihub.daemons.store_rrd import Backlog

    backlog = Backlog(3)
    assert [backlog.add("a.rrd", t, t * 10) for t in (1.0, 2.0, 3.0)] == [0, 0, 0]
    assert backlog.add("b.rrd", 4.0, 40.0) == 1  # the oldest goes
    assert backlog.add("a.rrd", 5.0, 50.0) == 1
    assert len(backlog) == 3
    seen = []
    while len(backlog):
        seen.append(backlog.first())
        backlog.pop_first()
    assert seen == [("a.rrd", 3.0, 30.0), ("b.rrd", 4.0, 40.0), ("a.rrd", 5.0, 50.0)]


# --------------------------------------------------------------------------- graphs


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_graph_renders_a_png_per_period_with_the_unit(store, observe, topic_root, rrd_dir,
                                                      tmp_path):
    d, cached = store("rrdcached")
    obs = observe(f"{topic_root}/store-rrd/meta")
    now = time.time()
    n = 180
    for i in range(n):  # three hours of a daily wave, one a minute
        t = now - 60 * (n - i)
        obs.publish(f"{topic_root}/data/living/temperature",
                    measurement(round(20 + 3 * ((i % 60) / 60), 2), t))
    obs.publish(f"{topic_root}/data/living/humidity", measurement(55, now, "%"))
    counters(obs, topic_root, lambda c: c.get("stored") == n + 1, f"{n + 1} stored")
    assert cached is not None
    config = write_config(tmp_path / "graph.yml", {"rrd_dir": str(rrd_dir),
                                                   "rrdcached_socket": cached.address})
    out = tmp_path / "graphs"
    done = run_cli("store_rrd", "--graph", "--config", str(config), "--out", str(out))
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"living-{q}-{p}.png" for q in ("humidity", "temperature")
                           for p in ("day", "week", "month", "year"))
    for name in names:
        width, height = png_size(out / name)
        assert width > 800 and height > 240, (name, width, height)
    assert d.stop() == 0


def test_graph_is_drawn_from_the_file_when_rrdcached_is_unreachable(rrd_dir, tmp_path):
    rrd = rrd_dir / "cellar" / "humidity.rrd"
    rrd.parent.mkdir()
    now = int(time.time())
    subprocess.run([RRDTOOL, "create", str(rrd), "--start", str(now - 7200), "--step", "60",
                    "DS:value:GAUGE:300:U:U", "RRA:AVERAGE:0.5:1:2880", "RRA:MIN:0.5:1:2880",
                    "RRA:MAX:0.5:1:2880"], check=True)
    subprocess.run([RRDTOOL, "update", str(rrd),
                    *(f"{t}:{60 + t % 7}" for t in range(now - 7140, now, 60))], check=True)
    config = write_config(tmp_path / "graph.yml", {
        "rrd_dir": str(rrd_dir), "rrdcached_socket": f"unix:{tmp_path}/no-rrdcached.sock"})
    out = tmp_path / "g"
    done = run_cli("store_rrd", "--graph", "cellar/humidity", "--period", "day",
                   "--config", str(config), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "cellar/humidity: via rrdcached failed" in done.stderr
    assert "drawing from the file" in done.stderr
    assert done.stdout.split() == [str(out / "cellar-humidity-day.png")]
    width, height = png_size(out / "cellar-humidity-day.png")
    assert width > 800 and height > 240


def test_graph_of_unknown_series_fails_and_names_it(rrd_dir, tmp_path):
    config = write_config(tmp_path / "graph.yml", {"rrd_dir": str(rrd_dir)})
    done = run_cli("store_rrd", "--graph", "nowhere/nothing", "--config", str(config),
                   "--out", str(tmp_path / "g"))
    assert done.returncode == 1
    assert "nowhere/nothing" in done.stderr and "nothing.rrd" in done.stderr


# --------------------------------------------------------------------------- config




def test_relative_rrd_dir_is_a_config_error(tmp_path):
    path = write_config(tmp_path / "bad.yml", {"rrd_dir": "var/rrd"})
    done = run_cli("store_rrd", "--check-config", str(path))
    assert done.returncode == 78
    assert "rrd_dir" in done.stderr


def test_missing_rrdtool_program_stops_with_config_error(start_daemon, rrd_dir):
    d = start_daemon("store_rrd", {"rrd_dir": str(rrd_dir), "rrdtool": "no-such-rrdtool"})
    assert d.proc.wait(20) == 78
    assert "rrdtool: program 'no-such-rrdtool' not found" in d.output()


# --------------------------------------------------------------------------- limits


def test_new_series_beyond_max_series_are_refused_counted_and_logged_once(store, observe,
                                                                          topic_root, rrd_dir):
    (rrd_dir / "old").mkdir()
    subprocess.run([RRDTOOL, "create", str(rrd_dir / "old" / "temperature.rrd"), "--step", "60",
                    "DS:value:GAUGE:300:U:U", "RRA:AVERAGE:0.5:1:10"], check=True)
    d, _ = store("direct", max_series=3, heartbeat_interval=60)
    obs = observe(f"{topic_root}/store-rrd/meta")
    now = time.time()
    for i in range(10):
        obs.publish(f"{topic_root}/data/room{i}/temperature", measurement(20 + i, now))
    obs.publish(f"{topic_root}/data/old/temperature", measurement(1.5, now))
    obs.publish(f"{topic_root}/data/room0/temperature", measurement(21.5, now + 60))
    obs.publish(f"{topic_root}/data/room0/temperature", b"end-of-test")  # in order, last
    d.wait_log("end-of-test", timeout=20)
    d.signal(signal.SIGTERM)  # the stopping event carries the final counters
    final = obs.wait_for(f"{topic_root}/store-rrd/meta",
                         lambda m: m.json()["event"] == "stopping", timeout=20)[0].json()
    c = final["counters"]
    assert (c["stored"], c["created"], c["series_refused"], c["rejected"]) == (4, 2, 8, 9)
    assert final["series"] == 3
    assert sorted(str(p.relative_to(rrd_dir)) for p in rrd_dir.rglob("*.rrd")) == [
        "old/temperature.rrd", "room0/temperature.rrd", "room1/temperature.rrd"]
    refused = [line for line in d.output().splitlines() if "message(s) of new series" in line]
    assert len(refused) == 1 and "max_series=3" in refused[0]


def test_a_unit_too_long_for_the_sidecar_is_rejected_and_creates_nothing(store, observe,
                                                                        topic_root, rrd_dir):
    d, _ = store("direct")
    obs = observe(f"{topic_root}/store-rrd/meta")
    now = time.time()
    obs.publish(f"{topic_root}/data/lab/temperature", measurement(1, now, unit="u" * 100_000))
    obs.publish(f"{topic_root}/data/lab/humidity", measurement(50, now, unit="%"))
    counters(obs, topic_root, lambda c: c["rejected"] == 1 and c.get("stored") == 1,
             "1 rejected, 1 stored")
    assert sorted(p.name for p in rrd_dir.rglob("*")) == ["humidity.json", "humidity.rrd", "lab"]
    assert max(len(line) for line in d.output().splitlines()) < 600


def test_the_rrdtool_process_ends_once_unused_and_starts_again_when_needed(tmp_path):
    from pihub.daemons.store_rrd import RrdTool, create_args

    tool = RrdTool(RRDTOOL)
    path = tmp_path / "a.rrd"
    tool.run(*create_args(path, 1_700_000_000, 300))
    assert tool.running
    assert not tool.close_if_idle(3600)  # used just now: kept
    assert tool.running
    assert tool.close_if_idle(0)
    assert not tool.running
    tool.run("update", str(path), "1700000060:1")  # needed again: started again
    assert tool.running
    assert path.exists()
    tool.close()
    assert not tool.running
