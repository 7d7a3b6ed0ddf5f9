"""A real VictoriaMetrics per test, an InfluxDB-like front that can refuse points, Debian's
vmagent in front of a VictoriaMetrics, and what the store-tsdb tests publish and wait for.

Used by tests/test_store_tsdb*.py (the benchmark has its own VictoriaMetrics, in bench/).
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import Observer

from testkit.loopback import LoopbackService, VictoriaMetrics, free_port, wait_until

__all__ = ["HOST", "InfluxFront", "VictoriaMetrics", "Vmagent", "counter", "heartbeat",
           "publish_series", "stored"]

HOST = socket.gethostname()


def heartbeat(obs: Observer, root: str, predicate: Callable[[dict[str, Any]], bool],
              timeout: float = 20) -> dict[str, Any]:
    """The first heartbeat of store-tsdb whose payload satisfies ``predicate``."""
    hits = obs.wait_for(f"{root}/store-tsdb/meta", lambda m: predicate(m.json()), timeout)
    return hits[0].json()  # type: ignore[no-any-return]


def counter(name: str, at_least: int) -> Callable[[dict[str, Any]], bool]:
    return lambda meta: meta["counters"].get(name, 0) >= at_least


def publish_series(obs: Observer, root: str, location: str, quantity: str, n: int,
                   start: float, retain: bool = False) -> list[tuple[int, float]]:
    """Publish ``n`` measurements one second apart; return the (ts_ms, value) expected back."""
    expected = []
    for i in range(n):
        ts = round(start + i, 3)
        value = round(20 + i * 0.25, 2)
        obs.publish(f"{root}/data/{location}/{quantity}",
                    {"value": value, "unit": "°C", "ts": ts}, retain=retain)
        expected.append((round(ts * 1000), value))
    return expected


def stored(vm: VictoriaMetrics, quantity: str, location: str, n: int,
           timeout: float = 20) -> list[tuple[int, float]]:
    """Wait until ``n`` samples of ``<quantity>_value{location}`` are in the DB; return them."""
    def enough() -> list[tuple[int, float]] | None:
        samples = vm.export(f"{quantity}_value").get((location, HOST), [])
        return samples if len(samples) >= n else None

    return wait_until(enough, timeout, f"{n} samples of {quantity}_value{{location={location}}}",
                      interval=0.2)  # type: ignore[no-any-return]


class Vmagent(LoopbackService):
    """Debian's vmagent on a free loopback port, forwarding to ``remote_url`` (Prometheus
    remote write) with its on-disk buffer in ``buffer_dir``; stop/start keep port and buffer."""

    name = "vmagent"

    def __init__(self, remote_url: str, buffer_dir: Path, log: Path) -> None:
        super().__init__(log)
        self.remote_url = remote_url
        self.buffer_dir = buffer_dir

    def flags(self) -> list[str]:
        return [f"-remoteWrite.url={self.remote_url}",
                f"-remoteWrite.tmpDataPath={self.buffer_dir}"]

    def metric(self, name: str) -> float:
        """The sum of one of vmagent's own metrics (/metrics) over its labels."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.split("{", 1)[0].split(" ", 1)[0] == name)


class InfluxFront:
    """An HTTP server in front of a DB that answers like InfluxDB 2 when a write is refused.

    ``refuse`` is a measurement name: a write holding a point of it gets InfluxDB's 422
    (field type conflict) and nothing of that write is stored; every other write is passed on.
    ``status`` (e.g. 503) makes every write fail with that status; ``delay`` holds each answer.
    """

    def __init__(self, backend_url: str, refuse: str | None = None) -> None:
        self.backend_url = backend_url
        self.refuse = refuse
        self.status: int | None = None
        self.delay = 0.0
        self.requests: list[tuple[int, int]] = []  # (points in the write, status answered)
        self.stored: list[bytes] = []  # the points the DB took, in the order it took them
        self.lock = threading.Lock()
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status, answer = front.handle(self.path, body, dict(self.headers))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def handle(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        if self.delay:
            time.sleep(self.delay)
        lines = [line for line in body.split(b"\n") if line]
        status = self.status
        answer = b""
        if status is not None:
            answer = json.dumps({"code": "unavailable", "message": "service unavailable"}
                                ).encode()
        elif self.refuse and any(line.split(b",", 1)[0] == self.refuse.encode()
                                 for line in lines):
            status = 422
            answer = json.dumps({
                "code": "unprocessable entity",
                "message": "failure writing points to database: partial write: field type "
                           f'conflict: input field "value" on measurement "{self.refuse}" is '
                           "type float, already exists as type integer dropped=1",
            }).encode()
        else:
            request = urllib.request.Request(self.backend_url + path, data=body, method="POST",
                                             headers={"Content-Type": "text/plain"})
            try:
                with urllib.request.urlopen(request, timeout=10) as resp:
                    status, answer = resp.status, resp.read()
            except urllib.error.HTTPError as exc:
                status, answer = exc.code, exc.read()
        with self.lock:
            self.requests.append((len(lines), status))
            if 200 <= status < 300:
                self.stored.extend(lines)
        return status, answer

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
