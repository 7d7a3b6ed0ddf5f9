"""What the storage benchmarks need: a Mosquitto and a VictoriaMetrics of their own, the daemon
as a process, its CPU and memory. Nothing here comes from tests/: a benchmark runs without them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns a truthy value; raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class VictoriaMetrics:
    """Debian's victoria-metrics on a free loopback port; stop/start keep port and data."""

    def __init__(self, workdir: Path) -> None:
        self.exe = shutil.which("victoria-metrics") or "/usr/bin/victoria-metrics"
        self.port = free_port()
        self.data = workdir / "data"
        self.log = workdir / "victoria-metrics.log"
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [self.exe, f"-httpListenAddr=127.0.0.1:{self.port}",
                 f"-storageDataPath={self.data}", "-retentionPeriod=100y",
                 "-search.latencyOffset=0", "-search.disableCache", "-loggerLevel=WARN"],
                stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._healthy, 20, f"victoria-metrics on port {self.port}")

    def _healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"victoria-metrics exited: {self.log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)
        self.proc = None

    def count(self, metric_regex: str) -> int:
        """How many samples the series matching ``metric_regex`` hold (one export call)."""
        urllib.request.urlopen(f"{self.url}/internal/force_flush", timeout=10).close()
        query = urllib.parse.urlencode({"match[]": f'{{__name__=~"{metric_regex}"}}'})
        n = 0
        with urllib.request.urlopen(f"{self.url}/api/v1/export?{query}", timeout=60) as resp:
            for line in resp:
                n += len(json.loads(line)["timestamps"])
        return n


def start_mosquitto(workdir: Path, inflight: int) -> tuple[subprocess.Popen[bytes], int]:
    """A broker on a free loopback port; ``inflight`` is its max_inflight_messages."""
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                    f"max_inflight_messages {inflight}\nmax_queued_messages 0\n")
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


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of a running process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def status_kb(pid: int, key: str) -> int:
    """A kB figure of /proc/<pid>/status, e.g. VmRSS or VmHWM (peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def start_daemon(name: str, config: dict[str, Any],
                 work: Path) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    """``pihub-<name>`` from this source tree with ``config``, once it logs that it is ready.

    Returns the process and its open log file, for :func:`stop_daemon`.
    """
    conf = work / f"{name}.yml"
    conf.write_text(yaml.safe_dump(config))
    log_path = work / f"{name}.log"
    env = {**os.environ, "PYTHONPATH": str(REPO / "files" / "daemons" / "src")}
    log = open(log_path, "wb")  # noqa: SIM115 (open for the daemon's life)
    proc = subprocess.Popen([sys.executable, "-m", "pihub.daemons." + name.replace("-", "_"),
                             "--config", str(conf)], stdout=log, stderr=subprocess.STDOUT,
                            env=env)
    try:
        wait_until(lambda: b"ready:" in log_path.read_bytes(), 30, "the daemon to be ready")
    except BaseException:
        stop_daemon(proc, log)
        raise
    return proc, log


def stop_daemon(proc: subprocess.Popen[bytes], log: IO[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    log.close()
