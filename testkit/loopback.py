"""Real services on loopback, shared by the tests (tests/conftest.py) and the benchmarks (bench/).

Neither imports the other: both import this. What is here starts and waits for real programs
(Debian's victoria-metrics) on free loopback ports; nothing is mocked.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any


class WaitTimeout(AssertionError):
    """What :func:`wait_until` raises: an AssertionError, so a test that waited fails."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
               interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns a truthy value (returned); raise after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(interval)


def start_mosquitto(workdir: Path, *conf_lines: str) -> tuple[subprocess.Popen[bytes], int]:
    """Debian's mosquitto on a free loopback port, anonymous, with ``conf_lines`` added to its
    config (written in ``workdir``); returned once it accepts connections."""
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text("\n".join([f"listener {port} 127.0.0.1", "allow_anonymous true",
                               *conf_lines]) + "\n")
    proc = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c",
                             str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def accepts() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    wait_until(accepts, 10, "mosquitto")
    return proc, port


class LoopbackService:
    """A VictoriaMetrics binary (``exe``) on a free loopback port, logging to ``log``, healthy when
    its ``/health`` answers; stop/start keep the port. Subclasses give their own flags."""

    name = "victoria-metrics"

    def __init__(self, log: Path) -> None:
        self.exe = shutil.which(self.name) or f"/usr/bin/{self.name}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def flags(self) -> list[str]:
        """The flags besides the listen address."""
        return []

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [self.exe, f"-httpListenAddr=127.0.0.1:{self.port}", *self.flags(),
                 "-loggerLevel=WARN"],
                stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._healthy, 20, f"{self.name} on port {self.port}", interval=0.05)

    def _healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM: it writes what it holds in memory to disk, then exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)
        self.proc = None


class VictoriaMetrics(LoopbackService):
    """Debian's victoria-metrics on a free loopback port; stop/start keep port and data."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir / "victoria-metrics.log")
        self.workdir = workdir
        self.data = workdir / "data"

    def flags(self) -> list[str]:
        return [f"-storageDataPath={self.data}", "-retentionPeriod=100y",
                "-search.latencyOffset=0", "-search.disableCache"]

    def export(self, metric: str) -> dict[tuple[str, str], list[tuple[int, float]]]:
        """Every stored sample of ``metric``: {(location, host): [(ts_ms, value), ...]}."""
        urllib.request.urlopen(f"{self.url}/internal/force_flush", timeout=10).close()
        query = urllib.parse.urlencode({"match[]": f'{{__name__="{metric}"}}'})
        with urllib.request.urlopen(f"{self.url}/api/v1/export?{query}", timeout=30) as resp:
            text = resp.read().decode()
        out: dict[tuple[str, str], list[tuple[int, float]]] = {}
        for line in text.splitlines():
            row = json.loads(line)
            key = (row["metric"].get("location", ""), row["metric"].get("host", ""))
            out.setdefault(key, []).extend(zip(row["timestamps"], row["values"], strict=True))
        for samples in out.values():
            samples.sort()
        return out

    def count(self, metric_regex: str) -> int:
        """How many samples the series matching ``metric_regex`` hold (one export call)."""
        urllib.request.urlopen(f"{self.url}/internal/force_flush", timeout=10).close()
        query = urllib.parse.urlencode({"match[]": f'{{__name__=~"{metric_regex}"}}'})
        n = 0
        with urllib.request.urlopen(f"{self.url}/api/v1/export?{query}", timeout=60) as resp:
            for line in resp:
                n += len(json.loads(line)["timestamps"])
        return n
