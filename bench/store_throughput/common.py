"""What the storage benchmarks need: a Mosquitto and a VictoriaMetrics of their own, the daemon
as a process, its CPU and memory. Nothing here comes from tests/ (a benchmark runs without
them); what tests and benchmarks share is in testkit/.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # for testkit, shared with the tests

from testkit import loopback  # noqa: E402
from testkit.loopback import VictoriaMetrics, free_port, wait_until  # noqa: E402

__all__ = ["VictoriaMetrics", "free_port", "wait_until"]

CLK_TCK = os.sysconf("SC_CLK_TCK")


def start_mosquitto(workdir: Path, inflight: int) -> tuple[subprocess.Popen[bytes], int]:
    """A broker on a free loopback port; ``inflight`` is its max_inflight_messages."""
    return loopback.start_mosquitto(workdir, f"max_inflight_messages {inflight}",
                                    "max_queued_messages 0")


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


def start_daemon(name: str, config: dict[str, Any], work: Path, *, src: str | None = None,
                 label: str | None = None) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    """``pihub-<name>`` from this source tree (or the pihub package in ``src``) with
    ``config``, once it logs that it is ready; its files in ``work`` are named ``label``.

    Returns the process and its open log file, for :func:`stop_daemon`.
    """
    conf = work / f"{label or name}.yml"
    conf.write_text(yaml.safe_dump(config))
    log_path = work / f"{label or name}.log"
    # BENCH_PIHUB_SRC: another tree's pihub package (an older commit's, to compare with)
    src = src or os.environ.get("BENCH_PIHUB_SRC") or str(REPO / "files" / "daemons" / "src")
    env = {**os.environ, "PYTHONPATH": src}
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


def remaining_length(n: int) -> bytes:
    """MQTT's variable-length "remaining length" of a packet of ``n`` more bytes (the benches'
    raw publishers pre-encode their packets)."""
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def count_pubacks(buf: bytes) -> tuple[int, bytes]:
    """The PUBACKs among the whole packets at the start of ``buf`` (a raw publisher reads only
    PUBACKs and PINGRESPs: a 2-byte header and a short body), and what is left of ``buf``."""
    acked = 0
    while len(buf) >= 2:
        size = 2 + buf[1]
        if len(buf) < size:
            break
        if buf[0] == 0x40:
            acked += 1
        buf = buf[size:]
    return acked, buf
