"""A real VictoriaMetrics per test, and an InfluxDB-like front that can refuse points.

Used by tests/test_store_tsdb.py (the benchmark has its own VictoriaMetrics, in bench/).
"""

from __future__ import annotations

import http.server
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from testkit.loopback import VictoriaMetrics, free_port

__all__ = ["InfluxFront", "VictoriaMetrics"]


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
