"""systemd's watchdog sees the whole daemon, and the library's guard bounds what one message
costs: real daemon processes, a real Mosquitto, and a notify socket standing in for systemd.

systemd kills a ``WatchdogSec=W`` unit that sent no WATCHDOG=1 for W seconds (SIGABRT) and
``Restart=on-failure`` starts it again; here the test plays systemd on the notify socket (the
unit itself is Molecule's to run): "killed" shows as the pings stopping for longer than W while
the process, and its main loop, still runs.
"""

from __future__ import annotations

import itertools
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Broker, Observer, wait_until

WINDOW = 4.0  # WatchdogSec of these tests: pings every 2 s, a handler may run 2 s


class NotifySocket:
    """What systemd would hear on ``NOTIFY_SOCKET``: each datagram with when it came."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # the sender's pid
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.got: list[tuple[float, str, int]] = []
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._receive, daemon=True)
        self.thread.start()

    def _receive(self) -> None:
        while not self.done.is_set():
            try:
                data, ancillary, _flags, _addr = self.sock.recvmsg(
                    4096, socket.CMSG_SPACE(struct.calcsize("3i")))
            except TimeoutError:
                continue
            pid = next((struct.unpack("3i", cred[:12])[0] for level, kind, cred in ancillary
                        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), 0)
            with self.lock:
                self.got.append((time.monotonic(), data.decode(), pid))

    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path), "WATCHDOG_USEC": str(int(WINDOW * 1e6))}

    def pings(self, since: float = 0.0, pid: int | None = None) -> list[float]:
        with self.lock:
            return [at for at, text, sender in self.got if "WATCHDOG=1" in text
                    and at >= since and pid in (None, sender)]

    def texts(self, pid: int | None = None) -> list[str]:
        with self.lock:
            return [text for _at, text, sender in self.got if pid in (None, sender)]

    def silent_for(self, pid: int) -> float:
        """Seconds since ``pid``'s last WATCHDOG=1, as systemd's watchdog counts them."""
        with self.lock:
            times = [at for at, text, sender in self.got if sender == pid and (
                "WATCHDOG=1" in text or "READY=1" in text)]
        return time.monotonic() - times[-1]

    def wait_ready(self, pid: int) -> None:
        wait_until(lambda: any("READY=1" in t for t in self.texts(pid)), 15, f"READY=1 of {pid}")

    def close(self) -> None:
        self.done.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    n = NotifySocket(tmp_path / "notify.sock")
    yield n
    n.close()


def longest_gap(pings: list[float]) -> float:
    return max((b - a for a, b in itertools.pairwise(pings)), default=0.0)


def test_a_daemon_stuck_in_a_handler_is_killed_and_restarted_by_the_watchdog(
        start_daemon, observe, notify: NotifySocket, topic_root):
    d = start_daemon("pihub_probe", env=notify.env(), name="stuck")
    notify.wait_ready(d.pid)
    wait_until(lambda: len(notify.pings(pid=d.pid)) >= 2, 15, "WATCHDOG=1 while healthy")
    obs: Observer = observe()
    obs.publish(f"{topic_root}/probe/sleep", "60")
    d.wait_log("sleeping 60 s in the handler")
    # a whole WatchdogSec without WATCHDOG=1: systemd kills it ...
    wait_until(lambda: notify.silent_for(d.pid) > WINDOW, 20, "a WatchdogSec without a ping")
    # ... though the process and its main loop still run, saying why in the log and STATUS=
    assert d.proc.poll() is None
    d.wait_log("MQTT handling is stalled: the handler for ")
    assert any("STATUS=MQTT handling is stalled" in t for t in notify.texts(d.pid))
    assert d.output().count("MQTT handling is stalled") == 1  # once per stall
    d.kill()  # systemd's WatchdogSignal is SIGABRT; SIGKILL here leaves no core file
    # Restart=on-failure: the daemon started again is ready and healthy
    again = start_daemon("pihub_probe", env=notify.env(), name="restarted")
    notify.wait_ready(again.pid)
    wait_until(lambda: len(notify.pings(pid=again.pid)) >= 2, 15, "WATCHDOG=1 after restart")


def test_the_watchdog_is_fed_again_when_a_slow_handler_returns(
        start_daemon, observe, notify: NotifySocket, topic_root):
    d = start_daemon("pihub_probe", env=notify.env())
    notify.wait_ready(d.pid)
    obs: Observer = observe()
    obs.publish(f"{topic_root}/probe/sleep", "5")
    d.wait_log("MQTT handling is stalled", timeout=15)
    d.wait_log("MQTT handling is moving again", timeout=20)
    resumed = time.monotonic()
    wait_until(lambda: len(notify.pings(resumed, d.pid)) >= 2, 15, "WATCHDOG=1 again")
    assert "the handler for " in d.output() and " took 5." in d.output()


def test_an_idle_healthy_daemon_keeps_feeding_the_watchdog(start_daemon,
                                                           notify: NotifySocket):
    d = start_daemon("pihub_probe", {"heartbeat_interval": 30}, env=notify.env())
    notify.wait_ready(d.pid)
    since = time.monotonic()
    # nothing comes in: the network loop going round is progress enough
    wait_until(lambda: len(notify.pings(since)) >= 6, 30, "six pings of an idle daemon")
    gap = longest_gap(notify.pings(since))
    assert gap < WINDOW, f"systemd would have killed a healthy daemon ({gap:.1f} s silent)"
    assert "stalled" not in d.output()


def test_a_daemon_keeps_feeding_the_watchdog_while_the_broker_is_away(
        start_daemon, broker: Broker, notify: NotifySocket):
    # between two attempts the network thread sleeps 3 s, longer than a handler may run
    d = start_daemon("pihub_probe", {"mqtt": {"reconnect_min": 3, "reconnect_max": 3}},
                     env=notify.env())
    notify.wait_ready(d.pid)
    broker.stop()
    d.wait_log("lost the broker")
    since = time.monotonic()
    wait_until(lambda: len(notify.pings(since)) >= 6, 30, "six pings while the broker is away")
    gap = longest_gap([since, *notify.pings(since)])
    assert gap < WINDOW, f"systemd would have killed it for a broker outage ({gap:.1f} s)"
    assert "stalled" not in d.output()
    assert d.proc.poll() is None


def test_an_oversize_message_is_rejected_before_decoding_and_logged_short(
        start_daemon, observe, topic_root):
    obs = observe(f"{topic_root}/probe/#")
    d = start_daemon("pihub_probe", {"mqtt": {"max_message_bytes": 2048}})
    d.wait_log("ready: connected and subscribed")
    long_topic = f"{topic_root}/data/{'a' * 3000}/temp"
    big = b'{"value": 1, "unit": "C", "ts": 1, "pad": "' + b"x" * 5000 + b'"}'
    obs.publish(f"{topic_root}/data/lab/temp", big)
    obs.publish(long_topic, big)
    obs.publish(f"{topic_root}/data/lab/temp", {"value": 2, "unit": "C", "ts": time.time()})
    obs.wait_for(f"{topic_root}/probe/echo")
    beat = obs.wait_for(f"{topic_root}/probe/meta",
                        lambda m: m.json()["counters"]["rejected"] >= 2)[-1].json()
    assert beat["counters"]["rejected"] == 2 and beat["counters"]["errors"] == 0
    lines = [line for line in d.output().splitlines() if "over mqtt.max_message_bytes" in line]
    assert len(lines) == 2, d.output()[-3000:]
    assert all(f"{len(big)} bytes" in line and len(line) < 300 for line in lines), lines


def test_log_lines_quote_at_most_a_hundred_characters_of_bad_input(start_daemon, observe,
                                                                    topic_root):
    obs = observe(f"{topic_root}/probe/#")
    d = start_daemon("pihub_probe")
    d.wait_log("ready: connected and subscribed")
    obs.publish(f"{topic_root}/probe/sleep", "y" * 5000)  # the handler fails on it
    obs.publish(f"{topic_root}/data/{'b' * 5000}/temp", b"{}")  # rejected: the topic
    obs.publish(f"{topic_root}/data/lab/temp", b"z" * 5000)  # rejected: the payload
    beat = obs.wait_for(f"{topic_root}/probe/meta",
                        lambda m: m.json()["counters"]["errors"] >= 1
                        and m.json()["counters"]["rejected"] >= 2)[-1].json()
    assert beat["counters"]["errors"] == 1 and beat["counters"]["rejected"] == 2
    out = d.output()
    assert "handler for " in out and "ValueError" in out
    for char in "ybz":
        assert char * 50 in out  # quoted, ...
        assert not re.search(f"{char}{{101,}}", out), f"more than 100 {char!r} in a row"
