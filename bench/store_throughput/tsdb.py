"""Throughput, CPU and memory of pihub-store-tsdb into a real VictoriaMetrics.

Starts its own Mosquitto and VictoriaMetrics on free loopback ports and the daemon as a real
process, then:

* default mode: publishes N measurements (QoS 1, retained, over 100 series) as fast as one
  publisher can and reports measurements/s from the first publish until all N are queryable in
  VictoriaMetrics, plus the daemon's CPU seconds and peak RSS (VmHWM);
* ``--compare R``: the same backlog drained by the daemon and by a bare paho + influxdb-client
  consumer (bare_consumer.py: the least a consumer that acknowledges after storing can spend),
  both running side by side on the same broker and DB, each given ``-n`` measurements in turn,
  R rounds, each consumer first in turn; reports each one's CPU microseconds per message and
  measurements/s (first publish until all queryable), the medians and the ratio to the bare
  consumer; ``--before-src DIR`` adds the daemon of another tree (an older commit's) as a third;
  ``--save`` writes them to bench/results/store_tsdb.json;
* ``--outage S``: publishes at ``--rate`` per second for ``--duration`` seconds, stops
  VictoriaMetrics for S seconds in the middle, and reports how many points were lost and how
  many were stored twice, each counted on its own over distinct (series, timestamp) points: a
  loss and a duplicate never cancel out.

    python3 bench/store_throughput/tsdb.py                 # 100000 as fast as possible
    python3 bench/store_throughput/tsdb.py --outage 60     # 1000/s, 60 s without the DB
    python3 bench/store_throughput/tsdb.py --compare 9 --save   # the daemon vs a bare consumer
    git archive ca9afe3 files/daemons/src | tar -x -C /tmp/before   # ... and vs an older commit:
    python3 bench/store_throughput/tsdb.py --compare 9 --before-src /tmp/before/files/daemons/src

Targets (issue 5): >= 20,000 measurements/s, peak RSS < 60 MB; zero loss across a 60 s DB
outage at 1,000 measurements/s. Issue 19: CPU per message within 1.15x of the bare consumer's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from common import (
    REPO,
    VictoriaMetrics,
    count_pubacks,
    cpu_seconds,
    remaining_length,
    start_daemon,
    start_mosquitto,
    status_kb,
    stop_daemon,
)
from paho.mqtt.enums import CallbackAPIVersion

SERIES = 100
MAX_N = 1_000_000
RESULT = REPO / "bench" / "results" / "store_tsdb.json"


class Publisher:
    """One MQTT 3.1.1 publisher on a raw socket: QoS 1, retained, as fast as the socket takes.

    Packets are encoded up front, so the measured rate is the daemon's, not a Python MQTT
    client's; a reader thread counts the broker's PUBACKs. Heartbeats of the daemon come in
    through a separate paho client.
    """

    def __init__(self, port: int, root: str) -> None:
        self.root = root
        self.meta: dict[str, Any] = {}
        self.topics = [f"{root}/data/loc{k // 10}/q{k % 10}".encode() for k in range(SERIES)]
        self.acked = 0
        self.sock = socket.create_connection(("127.0.0.1", port))
        client_id = b"bench-publisher"
        var = b"\x00\x04MQTT\x04\x02\x00\x3c"  # MQTT 3.1.1, clean session, keepalive 60 s
        body = var + struct.pack("!H", len(client_id)) + client_id
        self.sock.sendall(b"\x10" + remaining_length(len(body)) + body)
        connack = self.sock.recv(4)
        assert connack[:2] == b"\x20\x02" and connack[3] == 0, f"CONNACK {connack!r}"
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.last_ping = time.monotonic()
        self.watcher = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                   client_id="bench-watcher")
        self.watcher.on_message = self._on_meta
        self.watcher.on_connect = lambda c, *a: c.subscribe(f"{root}/store-tsdb/meta", 1)
        self.watcher.connect("127.0.0.1", port)
        self.watcher.loop_start()

    def _on_meta(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.meta = json.loads(msg.payload)

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            acked, buf = count_pubacks(buf + data)
            self.acked += acked

    @staticmethod
    def ts(i: int, base: float) -> float:
        # unique ms per series: message i of series i % SERIES is 1 ms after the previous one
        return round(base + (i // SERIES) * 0.001, 3)

    @staticmethod
    def point(i: int, base: float) -> tuple[str, str, int]:
        """The (location, metric, ts in ms) that message ``i`` becomes in VictoriaMetrics."""
        k = i % SERIES
        return f"loc{k // 10}", f"q{k % 10}_value", round(Publisher.ts(i, base) * 1000)

    def packet(self, i: int, base: float, topics: list[bytes] | None = None) -> bytes:
        ts = self.ts(i, base)
        payload = f'{{"value":{i % 1000 / 10},"unit":"°C","ts":{ts}}}'.encode()
        topic = (topics or self.topics)[i % SERIES]
        body = struct.pack("!H", len(topic)) + topic + struct.pack("!H", i % 65535 + 1) \
            + payload
        return b"\x33" + remaining_length(len(body)) + body  # PUBLISH, QoS 1, retain

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)
        if time.monotonic() - self.last_ping > 20:
            self.sock.sendall(b"\xc0\x00")  # PINGREQ
            self.last_ping = time.monotonic()

    def wait(self, what: Any, timeout: float, text: str) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {text}")
            self.send(b"")
            time.sleep(0.1)

    def close(self) -> None:
        self.sock.sendall(b"\xe0\x00")  # DISCONNECT
        self.sock.close()
        self.watcher.disconnect()
        self.watcher.loop_stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=100_000, help="measurements (default %(default)s)")
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--broker-inflight", type=int, default=1000,
                    help="Mosquitto's max_inflight_messages (default %(default)s)")
    ap.add_argument("--outage", type=float, default=0.0,
                    help="seconds without the DB under a steady stream (outage mode)")
    ap.add_argument("--rate", type=float, default=1000.0, help="outage mode: messages/s")
    ap.add_argument("--duration", type=float, default=0.0,
                    help="outage mode: seconds of publishing (default outage + 30)")
    ap.add_argument("--compare", type=int, default=0, metavar="ROUNDS",
                    help="the daemon against a bare paho + influxdb-client consumer, ROUNDS "
                    "rounds of -n measurements each")
    ap.add_argument("--before-src", metavar="DIR",
                    help="--compare: a third consumer, the daemon from the pihub package in DIR "
                    "(e.g. an older commit's files/daemons/src, from git archive)")
    ap.add_argument("--save", action="store_true",
                    help=f"--compare: write the figures to {RESULT.relative_to(REPO)}")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--profile", metavar="FILE",
                    help="record the daemon with py-spy (collapsed stacks) into FILE")
    args = ap.parse_args()
    n = min(args.n, MAX_N)

    work = Path(tempfile.mkdtemp(prefix="bench-store-tsdb-"))
    (work / "vm").mkdir()
    root = "bench"
    broker, port = start_mosquitto(work, args.broker_inflight)
    vm = VictoriaMetrics(work / "vm")
    vm.start()
    config = {
        "mqtt": {"host": "127.0.0.1", "port": port, "reconnect_min": 0.2, "reconnect_max": 1},
        "topic_root": root, "heartbeat_interval": 1, "url": vm.url,
        "log_level": os.environ.get("BENCH_LOG_LEVEL", "info"),  # debug: one line per write
        "spool_dir": str(work / "state"), "batch_size": args.batch_size,
        "retry_interval": 1, "retry_max": 2,
        # the write path's throughput, not the SD card's default (a batch a minute): a burst's
        # last partial batch goes out 0.1 s after it, as when these figures were first taken
        "flush_idle": 0.1, "flush_interval": 1.0,
    }
    if args.compare:
        config["host_tag"] = "store-tsdb"
        config["heartbeat_interval"] = 5
    daemon, log = start_daemon("store-tsdb", config, work)
    pub = bare = None
    before: tuple[subprocess.Popen[bytes], Any] | None = None
    try:
        if args.compare:
            bare = start_bare(port, vm.url, args.batch_size, work)
            if args.before_src:
                before = start_daemon("store-tsdb", {
                    **config, "topic_root": "before", "host_tag": "store-tsdb-before",
                    "spool_dir": str(work / "state-before"),
                    "mqtt": {**config["mqtt"], "client_id": "store-tsdb-before"},
                }, work, src=args.before_src, label="store-tsdb-before")
        pub = Publisher(port, root)
        rss_idle = status_kb(daemon.pid, "VmRSS")
        cpu0 = cpu_seconds(daemon.pid)
        base = time.time() - 7200
        spy = None
        if args.profile:
            spy = subprocess.Popen(["py-spy", "record", "-p", str(daemon.pid), "-r", "250",
                                    "-f", "raw", "-o", args.profile, "--threads"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)  # py-spy attaches
        if args.compare:
            assert bare is not None
            pids = {"store-tsdb": daemon.pid, "bare": bare.pid}
            if before is not None:
                pids["store-tsdb-before"] = before[0].pid
            report = compare_run(n, args.compare, pub, vm, pids)
            report["before_src"] = args.before_src
        else:
            report = throughput_run(n, pub, vm, base)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        report.update({
            "daemon_cpu_s": round(cpu_seconds(daemon.pid) - cpu0, 2),
            "daemon_rss_idle_mb": round(rss_idle / 1024, 1),
            "daemon_peak_rss_mb": round(status_kb(daemon.pid, "VmHWM") / 1024, 1),
            "batch_size": args.batch_size,
            "broker_max_inflight_messages": args.broker_inflight,
        })
        time.sleep(2.5)  # a heartbeat or two, for the final counters
        report["daemon_counters"] = pub.meta.get("counters")
        if args.compare:
            report["bare_peak_rss_mb"] = round(status_kb(bare.pid, "VmHWM") / 1024, 1)
        print(json.dumps(report, indent=2))
        if args.save and args.compare:
            RESULT.write_text(json.dumps(report, indent=2) + "\n")
            print(f"saved {RESULT.relative_to(REPO)}", file=sys.stderr)
    finally:
        if pub is not None:
            pub.close()
        if before is not None:
            stop_daemon(*before)
        if bare is not None:
            bare.terminate()  # it keeps nothing: SIGTERM's default ends it at once
            try:
                bare.wait(10)
            except subprocess.TimeoutExpired:
                bare.kill()
        stop_daemon(daemon, log)
        vm.stop()
        broker.terminate()
        broker.wait(10)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work directory kept: {work}", file=sys.stderr)
    return 0


def throughput_run(n: int, pub: Publisher, vm: VictoriaMetrics, base: float) -> dict[str, Any]:
    packets = [pub.packet(i, base) for i in range(n)]
    t0 = time.monotonic()
    for k in range(0, n, 500):
        pub.send(b"".join(packets[k:k + 500]))
    pub.wait(lambda: pub.acked >= n, 120, "every PUBACK")
    t_published = time.monotonic() - t0
    pub.wait(lambda: vm.count("q[0-9]_value") >= n, 600, f"{n} points in the DB")
    elapsed = time.monotonic() - t0
    stored = vm.count("q[0-9]_value")
    return {
        "mode": "throughput", "measurements": n, "stored": stored,
        "publish_s": round(t_published, 2), "elapsed_s": round(elapsed, 2),
        "measurements_per_s": round(n / elapsed),
    }


def start_bare(port: int, url: str, batch_size: int, work: Path) -> subprocess.Popen[bytes]:
    """bare_consumer.py on root "bare", host tag "bare", once it is subscribed."""
    log = open(work / "bare.log", "wb")  # noqa: SIM115 (open for the consumer's life)
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("bare_consumer.py")),
                             "--port", str(port), "--root", "bare", "--url", url,
                             "--host", "bare", "--batch-size", str(batch_size)],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while b"ready" not in (work / "bare.log").read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"bare consumer: {(work / 'bare.log').read_text()[-2000:]}")
        time.sleep(0.05)
    return proc


def vm_sum(vm: VictoriaMetrics, selector: str) -> int:
    """How many samples of the series ``selector`` holds from the last two days (a query; the
    benchmark's timestamps lie two hours back)."""
    urllib.request.urlopen(f"{vm.url}/internal/force_flush", timeout=10).close()
    query = urllib.parse.urlencode({"query": f"sum(count_over_time({selector}[2d]))"})
    with urllib.request.urlopen(f"{vm.url}/api/v1/query?{query}", timeout=60) as resp:
        result = json.loads(resp.read())["data"]["result"]
    return int(float(result[0]["value"][1])) if result else 0


def compare_run(n: int, rounds: int, pub: Publisher, vm: VictoriaMetrics,
                pids: dict[str, int]) -> dict[str, Any]:
    """Each round gives each consumer ``n`` measurements of its own (its topic root, and
    quantities named after the round: new series every round for each), each first in turn;
    measures its process's CPU and the time from the first publish until all are queryable."""
    roots = {"store-tsdb": pub.root, "bare": "bare", "store-tsdb-before": "before"}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in pids}
    base = time.time() - 7200
    for r in range(rounds):
        names = list(pids)
        order = names[r % len(names):] + names[:r % len(names)]  # each one first in turn
        for name in order:
            topics = [f"{roots[name]}/data/loc{k // 10}/r{r}q{k % 10}".encode()
                      for k in range(SERIES)]
            packets = [pub.packet(i, base, topics) for i in range(n)]
            selector = f'{{__name__=~"r{r}q[0-9]_value",host="{name}"}}'
            acked0 = pub.acked
            cpu0 = cpu_seconds(pids[name])
            t0 = time.monotonic()
            for k in range(0, n, 500):
                pub.send(b"".join(packets[k:k + 500]))
            pub.wait(lambda: pub.acked >= acked0 + n, 120, "every PUBACK")  # noqa: B023
            pub.wait(lambda: vm_sum(vm, selector) >= n, 600,  # noqa: B023
                     f"{n} points of {name} in the DB")
            elapsed = time.monotonic() - t0
            cpu = cpu_seconds(pids[name]) - cpu0
            runs[name].append({"cpu_us_per_msg": round(cpu / n * 1e6, 1),
                               "measurements_per_s": round(n / elapsed)})
            print(f"round {r + 1}/{rounds} {name}: {runs[name][-1]}", file=sys.stderr)
            time.sleep(1)  # let the DB settle between runs
    medians = {name: {key: round(statistics.median(run[key] for run in rs), 1)
                      for key in ("cpu_us_per_msg", "measurements_per_s")}
               for name, rs in runs.items()}
    daemons = [name for name in pids if name != "bare"]
    ratios = {name: [a["cpu_us_per_msg"] / b["cpu_us_per_msg"]
                     for a, b in zip(runs[name], runs["bare"], strict=True)]
              for name in daemons}
    return {
        "mode": "compare", "measurements_per_round": n, "rounds": rounds,
        "series_per_round": SERIES, "median": medians,
        # CPU per message against the bare consumer's
        "cpu_ratio_of_medians": {name: round(medians[name]["cpu_us_per_msg"]
                                             / medians["bare"]["cpu_us_per_msg"], 3)
                                 for name in daemons},
        "cpu_ratio_median_of_rounds": {name: round(statistics.median(ratios[name]), 3)
                                       for name in daemons},
        "rounds_detail": runs,
        "cpus": os.cpu_count(), "machine": os.uname().machine,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def outage_run(args: argparse.Namespace, pub: Publisher, vm: VictoriaMetrics,
               base: float) -> dict[str, Any]:
    duration = args.duration or args.outage + 30
    n = min(int(args.rate * duration), MAX_N)
    down_at, up_at = (duration - args.outage) / 2, (duration + args.outage) / 2
    t0 = time.monotonic()
    state = "up"
    max_spool = 0
    for i in range(n):
        due = t0 + i / args.rate
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        if state == "up" and now - t0 >= down_at:
            vm.stop()
            state = "down"
        elif state == "down" and now - t0 >= up_at:
            vm.start()
            state = "back"
        pub.send(pub.packet(i, base))
        max_spool = max(max_spool, pub.meta.get("spool_bytes", 0))
    if state == "down":
        vm.start()
    t_end = time.monotonic()
    try:
        pub.wait(lambda: vm.count("q[0-9]_value") >= n, 600, f"{n} points in the DB")
    except AssertionError as exc:  # points lost: count them below rather than stop here
        print(f"{exc}; counting what is there", file=sys.stderr)
    stored_at = time.monotonic()
    published = {Publisher.point(i, base) for i in range(n)}
    samples = stored_points(vm)
    distinct = set(samples)
    return {
        "mode": "outage", "rate_per_s": args.rate, "duration_s": duration,
        "outage_s": args.outage, "measurements": n, "stored_samples": len(samples),
        "stored_distinct_points": len(distinct),
        # each on its own: a point lost and another stored twice do not cancel out
        "lost": len(published - distinct),
        "duplicates": len(samples) - len(distinct),
        "unexpected": len(distinct - published),
        "max_spool_bytes_seen": max_spool,
        "all_stored_s_after_last_publish": round(stored_at - t_end, 1),
    }


def stored_points(vm: VictoriaMetrics) -> list[tuple[str, str, int]]:
    """Every sample of the benchmark's series as (location, metric, ts in ms), one per sample
    (VictoriaMetrics' export gives each series' timestamps; a duplicate appears twice)."""
    out = []
    for d in range(10):
        metric = f"q{d}_value"
        for (location, _host), rows in vm.export(metric).items():
            out += [(location, metric, ts) for ts, _value in rows]
    return out


if __name__ == "__main__":
    sys.exit(main())
