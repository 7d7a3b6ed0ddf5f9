"""Throughput, CPU and memory of pihub-store-rrd, through a real rrdcached (or directly).

Starts its own Mosquitto and rrdcached (journal on, writes held for an hour as on the Pi, so
that the run measures the daemon and not the flush) on loopback / in a scratch directory and
the daemon as a real process, then publishes N measurements (QoS 1, retained, over 50 series,
one minute apart per series) as fast as one publisher can, and reports:

* measurements/s from the first publish until rrdcached has received all N updates (its
  ``STATS`` ``UpdatesReceived``; with ``--direct``, until the daemon counts N stored);
* then that every series' last update (rrdcached ``FLUSHALL``, then ``rrdtool lastupdate``)
  is the last value published for it, and how long that flush took;
* the daemon's CPU seconds over the run and its peak RSS (VmHWM).

    python3 bench/store_throughput/rrd.py              # 50000 through rrdcached
    python3 bench/store_throughput/rrd.py --direct     # 50000 straight into the files
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from common import cpu_seconds, start_daemon, start_mosquitto, status_kb, stop_daemon, wait_until
from paho.mqtt.enums import CallbackAPIVersion

SERIES = 50
MAX_N = 1_000_000


class Cached:
    def __init__(self, work: Path, base: Path) -> None:
        self.sock = work / "rrdcached.sock"
        (work / "journal").mkdir()
        self.proc = subprocess.Popen(
            ["rrdcached", "-g", "-p", str(work / "rrdcached.pid"), "-l", f"unix:{self.sock}",
             "-b", str(base), "-B", "-j", str(work / "journal"), "-F", "-w", "3600",
             "-f", "7200", "-z", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self.sock.exists, 10, "rrdcached's socket")

    def command(self, line: str) -> list[str]:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.sock))
            f = s.makefile("rwb")
            f.write(line.encode() + b"\n")
            f.flush()
            status = f.readline().decode().strip()
            n = int(status.split()[0])
            return [status] + [f.readline().decode().strip() for _ in range(max(n, 0))]

    def received(self) -> int:
        for line in self.command("STATS")[1:]:
            key, _, value = line.partition(": ")
            if key == "UpdatesReceived":
                return int(value)
        return 0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


class Publisher:
    def __init__(self, port: int, root: str) -> None:
        self.meta: dict[str, Any] = {}
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id="bench-publisher")
        self.client.max_inflight_messages_set(0)  # as fast as one publisher can
        self.client.max_queued_messages_set(0)
        self.client.on_message = self._on_message
        connected = threading.Event()
        self.client.on_connect = lambda *a: connected.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert connected.wait(10), "bench publisher could not connect"
        self.client.subscribe(f"{root}/store-rrd/meta", 1)
        self.series = [(f"loc{k // 10}", f"q{k % 10}") for k in range(SERIES)]
        self.topics = [f"{root}/data/{loc}/{q}" for loc, q in self.series]

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.meta = json.loads(msg.payload)

    def counter(self, name: str) -> int:
        return int(self.meta.get("counters", {}).get(name, 0))

    @staticmethod
    def message(i: int, base: float) -> tuple[float, float]:
        """(ts, value) of message i: series i % SERIES, one minute after its previous one."""
        return base + (i // SERIES) * 60.0, (i % 1000) / 10

    def publish(self, i: int, base: float) -> mqtt.MQTTMessageInfo:
        ts, value = self.message(i, base)
        payload = f'{{"value":{value},"unit":"°C","ts":{ts}}}'
        return self.client.publish(self.topics[i % SERIES], payload, qos=1, retain=True)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def last_update(path: Path) -> tuple[float, float]:
    out = subprocess.run(["rrdtool", "lastupdate", str(path)], capture_output=True, text=True,
                         check=True).stdout
    stamp, _, value = out.strip().splitlines()[-1].partition(":")
    return float(stamp), float(value)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=50_000, help="measurements (default %(default)s)")
    ap.add_argument("--direct", action="store_true", help="no rrdcached: write the files")
    ap.add_argument("--broker-inflight", type=int, default=20,
                    help="Mosquitto's max_inflight_messages (default %(default)s, "
                         "Mosquitto's own default)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    n = min(args.n, MAX_N)
    n -= n % SERIES  # the same count in every series

    work = Path(tempfile.mkdtemp(prefix="bench-rrd-", dir="/tmp"))  # short socket path
    rrd_dir = work / "rrd"
    rrd_dir.mkdir()
    root = "bench"
    broker, port = start_mosquitto(work, args.broker_inflight)
    cached = None if args.direct else Cached(work, rrd_dir)
    config = {
        "mqtt": {"host": "127.0.0.1", "port": port, "reconnect_min": 0.2, "reconnect_max": 1},
        "topic_root": root, "heartbeat_interval": 1, "log_level": "info",
        "rrd_dir": str(rrd_dir),
        "rrdcached_socket": None if cached is None else f"unix:{cached.sock}",
    }
    daemon, log = start_daemon("store-rrd", config, work)
    pub = None
    report: dict[str, Any] | None = None
    try:
        pub = Publisher(port, root)
        rss_idle = status_kb(daemon.pid, "VmRSS")
        cpu0 = cpu_seconds(daemon.pid)
        base = time.time() - (n // SERIES + 10) * 60.0

        t0 = time.monotonic()
        last = None
        for i in range(n):
            last = pub.publish(i, base)
        assert last is not None
        last.wait_for_publish(300)
        t_published = time.monotonic() - t0
        if cached is not None:
            received0 = 0  # a fresh rrdcached
            wait_until(lambda: cached.received() - received0 >= n, 900,
                       f"{n} updates received by rrdcached", interval=0.05)
        else:
            # the heartbeat says so (within its 1 s interval)
            wait_until(lambda: pub.counter("stored") >= n, 900, f"{n} stored", interval=0.05)
        elapsed = time.monotonic() - t0
        cpu = cpu_seconds(daemon.pid) - cpu0
        peak = status_kb(daemon.pid, "VmHWM")

        t1 = time.monotonic()
        if cached is not None:
            cached.command("FLUSHALL")
            # FLUSHALL only queues the work: wait until nothing is left in rrdcached's queue
            wait_until(lambda: cached.command("QUEUE")[0].startswith("0 "), 600,
                       "rrdcached's queue to empty", interval=0.1)
        flush_s = time.monotonic() - t1
        wrong = []
        for k, (loc, q) in enumerate(pub.series):
            i_last = n - SERIES + k
            want = pub.message(i_last, base)
            got = last_update(rrd_dir / loc / f"{q}.rrd")
            if got[0] != int(want[0]) or abs(got[1] - want[1]) > 1e-9:
                wrong.append(f"{loc}/{q}: want {want}, got {got}")
        time.sleep(1.5)  # one more heartbeat, for the final counters
        report = {
            "mode": "direct" if cached is None else "rrdcached",
            "measurements": n, "series": SERIES,
            "publish_s": round(t_published, 2), "elapsed_s": round(elapsed, 2),
            "measurements_per_s": round(n / elapsed),
            "series_with_wrong_last_update": wrong,
            "rrdcached_flush_s": round(flush_s, 2) if cached is not None else None,
            "daemon_cpu_s": round(cpu, 2),
            "daemon_rss_idle_mb": round(rss_idle / 1024, 1),
            "daemon_peak_rss_mb": round(peak / 1024, 1),
            "broker_max_inflight_messages": args.broker_inflight,
            "daemon_counters": pub.meta.get("counters"),
        }
        print(json.dumps(report, indent=2))
    finally:
        if pub is not None:
            pub.close()
        stop_daemon(daemon, log)
        if cached is not None:
            cached.stop()
        broker.terminate()
        broker.wait(10)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work directory kept: {work}", file=sys.stderr)
    return 1 if report is None or report["series_with_wrong_last_update"] else 0


if __name__ == "__main__":
    sys.exit(main())
