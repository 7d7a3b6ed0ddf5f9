#!/usr/bin/env python3
"""Many satellites into one central hub, on loopback: what the central's broker and store-tsdb
spend, how late a measurement becomes queryable, and whether any is lost (issue 19).

For each N (default 10, 50, 200) a fresh central: Debian's Mosquitto with the central's settings
of the mosquitto role (persistence, max_queued_messages 10000, max_inflight_messages 1000),
Debian's VictoriaMetrics, and the real pihub-store-tsdb of this tree. Then N simulated
satellites, each one MQTT 3.1.1 session as a satellite's bridge makes it (client id
``bridge-<sat>``, persistent session, QoS 1), publishing for ``--duration`` seconds what the
bridge forwards from a satellite:

* ``pihub/host/<sat>/bridge/state`` ``1`` and each daemon's ``pihub/host/<sat>/<daemon>/status``
  ``online`` (retained) at connect;
* a heartbeat of each of its ``--daemons`` daemons every 30 s (first at a random phase) on
  ``pihub/host/<sat>/<daemon>/meta`` (retained, a daemon's real heartbeat's size);
* one measurement a second (``--rate``) on ``pihub/data/<sat>-<place>/<quantity>`` (four
  quantities in turn, the satellites' publishing spread over the second), ``ts`` = the time of
  publishing; before the window, one of each quantity, so that every series exists already (a
  series' first point waits for VictoriaMetrics to index it, a one-off when a satellite joins,
  which would otherwise be much of the p99 of a short run).

Measured over the publishing window: CPU of mosquitto, store-tsdb and VictoriaMetrics (each
process on its own; VictoriaMetrics' includes answering the delay queries below), their RSS at
the end and peak; the **delay publish -> queryable**: a poller asks VictoriaMetrics
(``/api/v1/export`` of the last 8 s) every 0.25 s and takes the first answer holding a point,
minus the point's ``ts`` (so it is an upper bound, at most a poll period plus a query late); and
**losses**: every point published against the distinct (series, ts) points stored in the end,
duplicates counted apart. The simulated satellites run in this process (asyncio, raw MQTT
packets), not counted as the central's.

    python3 bench/fleet_scale.py                    # N = 10, 50, 200, 60 s each
    python3 bench/fleet_scale.py -n 50 --duration 20
    python3 bench/fleet_scale.py --save             # also bench/results/fleet_scale.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import struct
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent / "store_throughput"))

from common import (
    REPO,
    VictoriaMetrics,
    count_pubacks,
    cpu_seconds,
    remaining_length,
    start_daemon,
    status_kb,
    stop_daemon,
)

from testkit.loopback import start_mosquitto

RESULT = REPO / "bench" / "results" / "fleet_scale.json"
DAEMONS = ("sensor-system", "sensor-onewire", "sensor-gpio", "display-bikes", "display-transport")
QUANTITIES = ("temperature", "humidity", "pressure", "cpu_temperature")
HEARTBEAT_S = 30.0
POLL_S = 0.25
WINDOW_S = 8.0
HOST_TAG = "central"


def mqtt_string(s: bytes) -> bytes:
    return struct.pack("!H", len(s)) + s


def publish_packet(topic: str, payload: bytes, mid: int, retain: bool) -> bytes:
    body = mqtt_string(topic.encode()) + struct.pack("!H", mid) + payload
    return bytes([0x32 | int(retain)]) + remaining_length(len(body)) + body  # QoS 1


def meta_payload(sat: str, daemon: str, pid: int, started: float) -> bytes:
    """About the size and shape of a daemon's real heartbeat."""
    return json.dumps({
        "event": "heartbeat", "daemon": daemon, "host": sat, "pid": pid, "version": "0.1.0",
        "ts": round(time.time(), 3), "uptime_s": round(time.monotonic() - started, 3),
        "interval_s": HEARTBEAT_S, "rss_kb": 24000 + pid % 1000,
        "counters": {"published": 120, "received": 3, "rejected": 0, "errors": 0,
                     "readings": 118, "read_errors": 0},
        "publishes": [f"pihub/data/{sat}-garden/temperature",
                      f"pihub/data/{sat}-garden/humidity", f"pihub/{daemon}/status",
                      f"pihub/{daemon}/meta"],
    }, separators=(",", ":")).encode()


class Satellite:
    """One bridge-like session: connects, announces, then publishes on schedule."""

    def __init__(self, index: int, n: int, daemons: int, rate: float) -> None:
        self.name = f"sat{index:03d}"
        self.index, self.n, self.rate = index, n, rate
        self.daemons = DAEMONS[:daemons]
        self.mid = 0
        self.sent = 0
        self.acked = 0
        self.published: list[tuple[str, str, int]] = []  # (metric, location, ts ms)
        self.warmup: list[tuple[str, str, int]] = []  # published before the window
        self.writer: asyncio.StreamWriter | None = None

    def next_mid(self) -> int:
        self.mid = self.mid % 65535 + 1
        return self.mid

    async def connect(self, port: int) -> None:
        reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        client_id = f"bridge-{self.name}".encode()
        var = b"\x00\x04MQTT\x04\x00\x00\x3c"  # 3.1.1, clean session 0 (persistent), 60 s
        body = var + mqtt_string(client_id)
        self.writer.write(b"\x10" + remaining_length(len(body)) + body)
        connack = await reader.readexactly(4)
        assert connack[:2] == b"\x20\x02" and connack[3] == 0, f"CONNACK {connack!r}"
        self.reader_task = asyncio.create_task(self._read(reader))
        root = f"pihub/host/{self.name}"
        self.send(f"{root}/bridge/state", b"1", retain=True)
        for daemon in self.daemons:
            self.send(f"{root}/{daemon}/status", b"online", retain=True)
        for quantity in QUANTITIES:  # every series exists before the window
            self.measurement(quantity, 20.0, self.warmup)

    def measurement(self, quantity: str, value: float,
                    into: list[tuple[str, str, int]]) -> None:
        ts = round(time.time(), 3)
        location = f"{self.name}-garden"
        payload = f'{{"value":{value:.2f},"unit":"x","ts":{ts}}}'
        self.send(f"pihub/data/{location}/{quantity}", payload.encode())
        into.append((f"{quantity}_value", location, round(ts * 1000)))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        buf = b""
        while True:
            data = await reader.read(65536)
            if not data:
                return
            acked, buf = count_pubacks(buf + data)
            self.acked += acked

    def send(self, topic: str, payload: bytes, retain: bool = False) -> None:
        assert self.writer is not None
        self.writer.write(publish_packet(topic, payload, self.next_mid(), retain))
        self.sent += 1

    async def run(self, t0: float, duration: float, rng: random.Random) -> None:
        """Measurements every 1/rate s from t0 + index/(n*rate), heartbeats every 30 s per
        daemon."""
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        events: list[tuple[float, int, str]] = []
        period = 1 / self.rate
        phase = self.index / self.n * period
        k = 0
        while phase + k * period < duration:
            events.append((phase + k * period, 0, QUANTITIES[k % len(QUANTITIES)]))
            k += 1
        for daemon in self.daemons:
            at = rng.uniform(0, HEARTBEAT_S)
            while at < duration:
                events.append((at, 1, daemon))
                at += HEARTBEAT_S
        events.sort()
        pid = 1000 + self.index
        for at, kind, what in events:
            delay = t0 + at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if kind == 0:
                self.measurement(what, rng.uniform(-5, 30), self.published)
            else:
                self.send(f"pihub/host/{self.name}/{what}/meta",
                          meta_payload(self.name, what, pid, started), retain=True)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.write(b"\xe0\x00")  # DISCONNECT
            await self.writer.drain()
            self.writer.close()
        self.reader_task.cancel()


class DelayPoller(threading.Thread):
    """Polls VictoriaMetrics for the points of the last WINDOW_S seconds; the first poll that
    answers with a point marks it queryable (the time its answer came)."""

    def __init__(self, vm: VictoriaMetrics) -> None:
        super().__init__(daemon=True)
        self.vm = vm
        self.first_seen: dict[tuple[str, str, int], float] = {}
        self.stop = threading.Event()
        self.polls = 0

    def run(self) -> None:
        while not self.stop.wait(POLL_S):
            start = int((time.time() - WINDOW_S) * 1000)
            query = urllib.parse.urlencode({"match[]": f'{{host="{HOST_TAG}"}}',
                                            "start": f"{start / 1000:.3f}"})
            try:
                with urllib.request.urlopen(f"{self.vm.url}/api/v1/export?{query}",
                                            timeout=10) as resp:
                    body = resp.read()
            except OSError:
                continue
            now = time.time()
            self.polls += 1
            for line in body.splitlines():
                row = json.loads(line)
                key = (row["metric"]["__name__"], row["metric"].get("location", ""))
                for ts in row["timestamps"]:
                    self.first_seen.setdefault((*key, ts), now)


def all_points(vm: VictoriaMetrics) -> list[tuple[str, str, int]]:
    """Every stored sample of the central's series, one per sample (duplicates twice)."""
    urllib.request.urlopen(f"{vm.url}/internal/force_flush", timeout=10).close()
    query = urllib.parse.urlencode({"match[]": f'{{host="{HOST_TAG}"}}', "start": "0"})
    out = []
    with urllib.request.urlopen(f"{vm.url}/api/v1/export?{query}", timeout=60) as resp:
        for line in resp:
            row = json.loads(line)
            key = (row["metric"]["__name__"], row["metric"].get("location", ""))
            out += [(*key, ts) for ts in row["timestamps"]]
    return out


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(p / 100 * len(values)) - 1))]


def proc_figures(pid: int) -> dict[str, float]:
    return {"rss_mb": round(status_kb(pid, "VmRSS") / 1024, 1),
            "peak_rss_mb": round(status_kb(pid, "VmHWM") / 1024, 1)}


async def drive(sats: list[Satellite], port: int, duration: float,
                pids: dict[str, int]) -> dict[str, Any]:
    for k in range(0, len(sats), 20):  # connect in groups, as bridges coming up
        await asyncio.gather(*(s.connect(port) for s in sats[k:k + 20]))
    await asyncio.sleep(8)  # settle: announcements and first points stored and indexed
    loop = asyncio.get_running_loop()
    rng = random.Random(19)
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    t0 = loop.time() + 0.5
    wall0 = time.monotonic()
    await asyncio.gather(*(s.run(t0, duration, rng) for s in sats))
    window = time.monotonic() - wall0
    cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
    deadline = loop.time() + 30
    while sum(s.acked for s in sats) < sum(s.sent for s in sats) and loop.time() < deadline:
        await asyncio.sleep(0.1)
    return {"window_s": window, "cpu_s": cpu}


def run_one(n: int, args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"bench-fleet-{n}-"))
    (work / "vm").mkdir()
    broker, port = start_mosquitto(work, "persistence true",
                                   f"persistence_location {work}/",
                                   "autosave_interval 300", "max_queued_messages 10000",
                                   "max_inflight_messages 1000", "set_tcp_nodelay true")
    vm = VictoriaMetrics(work / "vm")
    vm.start()
    config = {
        "mqtt": {"host": "127.0.0.1", "port": port, "reconnect_min": 0.2, "reconnect_max": 1},
        "topic_root": "pihub", "url": vm.url, "host_tag": HOST_TAG,
        "spool_dir": str(work / "state"), "log_level": "info",
        # the delay of a central that writes within a second (the default, once a minute for
        # an SD card, would put every point a minute late, past the poller's 8 s window)
        "flush_idle": 0.1, "flush_interval": 1.0,
    }
    daemon, log = start_daemon("store-tsdb", config, work)
    poller = DelayPoller(vm)
    pids = {"mosquitto": broker.pid, "store-tsdb": daemon.pid,
            "victoria-metrics": vm.proc.pid if vm.proc else 0, "satellites (bench)": os.getpid()}
    sats = [Satellite(i, n, args.daemons, args.rate) for i in range(n)]
    try:
        poller.start()
        driven = asyncio.run(drive(sats, port, args.duration, pids))
        published = [p for s in sats for p in s.published]
        expected = set(published) | {p for s in sats for p in s.warmup}
        # wait until every point is queryable (or 30 s), then stop polling
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not expected <= poller.first_seen.keys():
            time.sleep(0.25)
        poller.stop.set()
        poller.join(15)
        samples = all_points(vm)
        distinct = set(samples)
        delays = [poller.first_seen[p] - p[2] / 1000 for p in published
                  if p in poller.first_seen]
        window = driven["window_s"]
        msgs = sum(s.sent for s in sats)
        data_msgs = len(published)  # in the window
        cpu = driven["cpu_s"]
        procs = {name: {"cpu_s": round(cpu[name], 2),
                        "cpu_pct_of_one_core": round(cpu[name] / window * 100, 2),
                        **(proc_figures(pid) if name != "satellites (bench)" else {})}
                 for name, pid in pids.items()}
        procs["store-tsdb"]["cpu_us_per_measurement"] = round(
            cpu["store-tsdb"] / data_msgs * 1e6, 1)
        procs["mosquitto"]["cpu_us_per_message"] = round(cpu["mosquitto"] / msgs * 1e6, 1)
        return {
            "satellites": n, "daemons_per_satellite": args.daemons,
            "measurements_per_s_per_satellite": args.rate,
            "duration_s": round(window, 1),
            "messages_published": msgs, "measurements_published": data_msgs,
            "messages_per_s": round(msgs / window, 1),
            "measurements_per_s": round(data_msgs / window, 1),
            "pubacks_missing": sum(s.sent - s.acked for s in sats),
            "points_published_incl_warmup": len(expected),
            "stored_samples": len(samples), "stored_distinct_points": len(distinct),
            "lost": len(expected - distinct), "duplicates": len(samples) - len(distinct),
            "unexpected": len(distinct - expected),
            "delay_s": {"p50": round(percentile(delays, 50), 3),
                        "p99": round(percentile(delays, 99), 3),
                        "max": round(max(delays, default=float("nan")), 3),
                        "points": len(delays), "not_seen_within_window": data_msgs - len(delays)},
            "delay_polls": poller.polls,
            "central": procs,
        }
    finally:
        poller.stop.set()
        stop_daemon(daemon, log)
        vm.stop()
        broker.terminate()
        broker.wait(10)
        if args.keep:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, action="append",
                    help="satellites (repeatable; default 10, 50, 200)")
    ap.add_argument("--duration", type=float, default=60.0,
                    help="seconds of publishing per N (default %(default)s)")
    ap.add_argument("--rate", type=float, default=1.0,
                    help="measurements per second per satellite (default %(default)s)")
    ap.add_argument("--extra", action="append", default=[], metavar="N:RATE",
                    help="one more run of N satellites at RATE measurements/s each, after the "
                    "others (e.g. 200:5, for the cost per message at a higher rate)")
    ap.add_argument("--daemons", type=int, default=3, choices=range(1, len(DAEMONS) + 1),
                    help="daemons per satellite, a heartbeat each (default %(default)s)")
    ap.add_argument("--save", action="store_true", help=f"write {RESULT.relative_to(REPO)}")
    ap.add_argument("--keep", action="store_true", help="keep the work directories")
    args = ap.parse_args()
    runs = []
    plan = [(n, args.rate) for n in args.n or [10, 50, 200]]
    plan += [(int(n), float(rate)) for n, rate in (e.split(":") for e in args.extra)]
    for n, rate in plan:
        run = run_one(n, argparse.Namespace(**{**vars(args), "rate": rate}))
        print(json.dumps(run, indent=2), file=sys.stderr)
        runs.append(run)
    report = {
        "method": {
            "delay": f"publish (the measurement's ts) until a poll of VictoriaMetrics' export "
                     f"(every {POLL_S} s, last {WINDOW_S:g} s) first returns the point: an upper "
                     "bound by up to a poll period plus a query",
            "losses": "points published vs distinct (series, ts) points stored; duplicates "
                      "apart",
            "cpu": "each central process's user+system CPU over the publishing window",
            "transport": "loopback, no TLS (a real central's bridge listener adds TLS)",
        },
        "cpus": os.cpu_count(), "machine": os.uname().machine,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "runs": runs,
    }
    print(json.dumps(report, indent=2))
    if args.save:
        RESULT.write_text(json.dumps(report, indent=2) + "\n")
        print(f"saved {RESULT.relative_to(REPO)}", file=sys.stderr)
    return 0 if all(r["lost"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
