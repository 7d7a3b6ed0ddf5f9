#!/usr/bin/env python3
"""pihub-web's budgets (issue 15), measured; figures go to docs/web.md, never into tests.

* ``idle``: RSS and PSS of pihub-web idle with the MQTT connection and 200 retained series held
  (after one login and one page, as in use; median of ``--runs``);
* ``first-byte``: time to the first byte of the Overview page with 200 series (logged in, a new
  connection each time; median and p95 of 200 requests);
* ``weight``: every page's HTML and assets as a browser downloads them, gzip (what goes on
  the wire);
* ``dom``: MQTT publish -> value changed in the Overview's DOM in headless chromium, p50/p99 of
  1000 updates (a MutationObserver stamps the change with the wall clock the publisher uses);
* ``fanout``: 20 live pages (SSE clients reading the stream) while 100 MQTT messages/s change
  200 series for ``--seconds``: the daemon's CPU and RSS, each page's lag (arrival - the
  measurement's ``ts``, set at publish), drops.

    python3 bench/web/bench.py [idle first-byte weight dom fanout] [--python PY] [--runs 3]

``--python`` runs the daemon with another interpreter (``.cache/bench-venv/bin/python``: a venv
on Debian's python3, as deployed); the source tree is on its PYTHONPATH either way.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import platform
import re
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from stack import (
    Daemons,
    cpu_seconds,
    free_port,
    hash_password,
    login,
    mqtt_client,
    pss_kb,
    publish,
    start_mosquitto,
    status_kb,
    wait_until,
)

SERIES = 200


class Hub:
    """Mosquitto with 200 retained series, and pihub-web serving them."""

    def __init__(self, python: str, **web: Any) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="pihub-web-bench-"))
        self.broker, self.port = start_mosquitto(self.work)
        self.client = mqtt_client(self.port)
        now = time.time()
        for i in range(SERIES):
            publish(self.client, f"pihub/data/room{i // 10:02d}/q{i % 10}",
                    {"value": round(20 + i / 10, 2), "unit": "°C", "ts": round(now, 3)})
        self.daemons = Daemons(self.work, self.port)
        self.web_port = free_port()
        self.proc = self.daemons.start("web", {
            "listen_address": "127.0.0.1", "port": self.web_port, "heartbeat_interval": 30,
            "users": {"admin": hash_password("demo", iterations=2000)}, **web}, python=python)
        self.cookie = login(self.web_port)
        wait_until(lambda: len(self.get("/api/values")[1]["values"]) == SERIES, 20,
                   "200 series in pihub-web")

    def get(self, path: str, gz: bool = False) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.web_port, timeout=10)
        headers = {"Cookie": self.cookie, **({"Accept-Encoding": "gzip"} if gz else {})}
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        if path.startswith("/api/"):
            return resp.status, json.loads(body)
        return resp.status, body

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
        self.daemons.stop_all()
        self.broker.terminate()
        self.broker.wait(10)
        shutil.rmtree(self.work, ignore_errors=True)


def bench_idle(python: str, runs: int) -> dict[str, Any]:
    rss, pss, fresh = [], [], []
    for _ in range(runs):
        hub = Hub(python)
        try:
            fresh.append(status_kb(hub.proc.pid, "VmRSS"))
            hub.get("/")
            time.sleep(5)
            rss.append(status_kb(hub.proc.pid, "VmRSS"))
            pss.append(pss_kb(hub.proc.pid))
        finally:
            hub.close()
    return {"rss_mb": round(statistics.median(rss) / 1024, 1),
            "pss_mb": round(statistics.median(pss) / 1024, 1),
            "rss_before_any_page_mb": round(statistics.median(fresh) / 1024, 1),
            "runs": runs}


def bench_first_byte(python: str) -> dict[str, Any]:
    hub = Hub(python)
    times = []
    try:
        for _ in range(200):
            conn = http.client.HTTPConnection("127.0.0.1", hub.web_port, timeout=10)
            start = time.perf_counter()
            conn.request("GET", "/", headers={"Cookie": hub.cookie, "Accept-Encoding": "gzip"})
            resp = conn.getresponse()  # the status line and headers: the first bytes
            times.append(time.perf_counter() - start)
            resp.read()
            conn.close()
    finally:
        hub.close()
    times.sort()
    return {"median_ms": round(1000 * statistics.median(times), 1),
            "p95_ms": round(1000 * times[int(0.95 * len(times))], 1), "requests": len(times)}


def bench_weight(python: str) -> dict[str, Any]:
    hub = Hub(python)
    out: dict[str, Any] = {}
    try:
        for page in ("/", "/daemons", "/boards", "/history", "/alerts", "/outputs"):
            status, html = hub.get(page)
            assert status == 200, (page, status)
            total = len(gzip.compress(html, 6))
            raw = len(html)
            for url in re.findall(rb'(?:src|href)="(/static/[^"]+)"', html):
                _s, asset = hub.get(url.decode().replace("&amp;", "&"))
                total += len(gzip.compress(asset, 9))
                raw += len(asset)
            out[page] = {"gzip_kb": round(total / 1024, 1), "raw_kb": round(raw / 1024, 1)}
    finally:
        hub.close()
    return out


def bench_dom(python: str, updates: int = 1000) -> dict[str, Any]:
    from stack import browser_login, chromium

    hub = Hub(python)
    driver = chromium()
    try:
        browser_login(driver, hub.web_port, "/", "admin", "demo")
        wait_until(lambda: driver.execute_script("return window.pihub.snapshots > 0"), 10, "live")
        driver.execute_script("""
            window.seen = {};
            new MutationObserver(function () {
              var t = Date.now();
              var v = document.querySelector('tr[id="v:room00/q0"] .val');
              if (v && !(v.textContent in window.seen)) window.seen[v.textContent] = t;
            }).observe(document.getElementById('values'),
                       {subtree: true, childList: true, characterData: true});""")
        sent: dict[str, float] = {}
        for i in range(updates):
            value = 1000 + i
            sent[str(value)] = time.time()
            hub.client.publish("pihub/data/room00/q0", json.dumps(
                {"value": value, "unit": "°C", "ts": round(time.time(), 3)}), qos=0)
            time.sleep(0.02)
        last = str(1000 + updates - 1)
        wait_until(lambda: driver.execute_script(f"return '{last}' in window.seen"), 20, "last")
        seen = driver.execute_script("return window.seen")
        lat = sorted(seen[k] - 1000 * sent[k] for k in sent if k in seen)
        heap = driver.execute_cdp_cmd("Runtime.getHeapUsage", {})["usedSize"]
    finally:
        driver.quit()
        hub.close()
    return {"updates": updates, "seen": len(lat), "p50_ms": round(statistics.median(lat), 1),
            "p99_ms": round(lat[int(0.99 * len(lat)) - 1], 1), "max_ms": round(lat[-1], 1),
            "js_heap_mb": round(heap / 1e6, 2)}


class Reader(threading.Thread):
    """One live page: reads /api/events and records each change's lag."""

    def __init__(self, port: int, cookie: str) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.sendall(f"GET /api/events HTTP/1.1\r\nHost: x\r\nCookie: {cookie}\r\n\r\n"
                          .encode())
        self.lags: list[float] = []
        self.events = 0
        self.closed = False

    def run(self) -> None:
        buf = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                break
            if not chunk:
                self.closed = True
                break
            buf += chunk
            *blocks, buf = buf.split(b"\n\n")
            now = time.time()
            for block in blocks:
                if block.startswith(b"data: "):
                    item = json.loads(block[6:]).get("item") or {}
                    if "ts" in item:
                        self.events += 1
                        self.lags.append(now - item["ts"])


def bench_fanout(python: str, seconds: float, clients: int = 20,
                 rate: float = 100) -> dict[str, Any]:
    hub = Hub(python)
    try:
        readers = [Reader(hub.web_port, hub.cookie) for _ in range(clients)]
        for r in readers:
            r.start()
        wait_until(lambda: hub.get("/api/daemons")[1]["daemons"], 10, "")
        time.sleep(1)
        cpu0, t0 = cpu_seconds(hub.proc.pid), time.monotonic()
        i = 0
        next_at = time.monotonic()
        while time.monotonic() - t0 < seconds:
            hub.client.publish(f"pihub/data/room{(i % SERIES) // 10:02d}/q{i % 10}", json.dumps(
                {"value": i, "unit": "°C", "ts": round(time.time(), 3)}), qos=0)
            i += 1
            next_at += 1 / rate
            time.sleep(max(0.0, next_at - time.monotonic()))
        time.sleep(2)
        wall = time.monotonic() - t0
        cpu = cpu_seconds(hub.proc.pid) - cpu0
        rss = status_kb(hub.proc.pid, "VmRSS")
        hwm = status_kb(hub.proc.pid, "VmHWM")
        lags = sorted(lag for r in readers for lag in r.lags)
        counters = hub.get("/api/daemons")[1]["daemons"]["web"]["meta"]["counters"]
        closed = sum(r.closed for r in readers)  # streams the daemon ended (a drop)
        for r in readers:
            r.sock.close()
    finally:
        hub.close()
    return {"clients": clients, "rate_per_s": rate, "published": i,
            "events_per_client_min": min(r.events for r in readers),
            "cpu_percent": round(100 * cpu / wall, 1), "rss_mb": round(rss / 1024, 1),
            "peak_rss_mb": round(hwm / 1024, 1), "lag_p50_ms": round(1000 * lags[len(lags) // 2],
                                                                   1),
            "lag_p99_ms": round(1000 * lags[int(0.99 * len(lags))], 1),
            "lag_max_ms": round(1000 * lags[-1], 1),
            "dropped": counters.get("sse_dropped"), "closed_by_daemon": closed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", nargs="*", default=["idle", "first-byte", "weight", "dom",
                                                     "fanout"])
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=30)
    args = parser.parse_args()
    print(f"# {platform.machine()}, {len(__import__('os').sched_getaffinity(0))} CPUs, "
          f"python {args.python}", flush=True)
    for which in args.which:
        if which == "idle":
            result = bench_idle(args.python, args.runs)
        elif which == "first-byte":
            result = bench_first_byte(args.python)
        elif which == "weight":
            result = bench_weight(args.python)
        elif which == "dom":
            result = bench_dom(args.python)
        elif which == "fanout":
            result = bench_fanout(args.python, args.seconds)
        else:
            parser.error(f"unknown benchmark {which!r}")
        print(which, json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
