#!/usr/bin/env python3
"""A stand-in for ntfy's publish API, for the Molecule stand-in (pihub-notify-ntfy's outside world).

Serves ``POST /<topic>`` on 127.0.0.1 the way ntfy takes it (the message as the body; ``Title``,
``Priority``, ``Tags``, ``Click``, ``Authorization: Bearer <token>`` as headers), appends each
request as one JSON line to ``--out`` (``received``, ``accepted``, ``topic``, the headers and the
body, the title decoded from RFC 2047 as ntfy does), and answers in ntfy's formats:

* ``200`` with the message JSON (``{"id", "time", "event": "message", "topic", ...}``);
* ``401 {"code": 40101, "http": 401, "error": "unauthorized"}`` when ``--token`` is set and the
  request's bearer token is not it;
* ``400 {"code": 40010, ...}`` for a topic that is not ``[A-Za-z0-9_-]{1,64}``, a priority
  outside 1..5 or an empty body; ``404`` for any other method or path.

Stdlib only: ``python3 ntfy_receiver.py --port 8084 --out /var/lib/x/requests.jsonl``.
"""

from __future__ import annotations

import argparse
import contextlib
import email.header
import json
import os
import re
import secrets
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOPIC = re.compile(r"^/([A-Za-z0-9_-]{1,64})$")
PRIORITIES = {"1", "2", "3", "4", "5", "min", "low", "default", "high", "max", "urgent"}
HEADERS = ("Title", "Priority", "Tags", "Click", "Authorization", "Content-Type")


def decoded(value: str) -> str:
    """A header as ntfy reads it: RFC 2047 encoded words decoded."""
    return str(email.header.make_header(email.header.decode_header(value)))


class Receiver(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], out: str, token: str | None) -> None:
        super().__init__(address, Handler)
        self.out = out
        self.token = token
        self.lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    server: Receiver
    server_version = "ntfy-receiver/1"

    def _answer(self, code: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, code: int, error: str) -> None:
        self._answer(code, {"code": code * 100 + 1 if code == 401 else code * 100 + 10,
                            "http": code, "error": error})

    def do_POST(self) -> None:
        match = TOPIC.match(self.path.split("?")[0])
        if not match:
            self._error(404, "page not found")
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8", "replace")
        headers = {name: self.headers[name] for name in HEADERS if name in self.headers}
        title = decoded(headers["Title"]) if "Title" in headers else None
        wanted = f"Bearer {self.server.token}" if self.server.token else None
        if wanted is not None and headers.get("Authorization") != wanted:
            problem = (401, "unauthorized")
        elif headers.get("Priority", "3") not in PRIORITIES:
            problem = (400, "invalid request: priority invalid")
        elif not body:
            problem = (400, "invalid request: message empty")
        else:
            problem = None
        with self.server.lock, open(self.server.out, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"received": time.time(), "accepted": problem is None,
                                 "topic": match.group(1), "title": title, "headers": headers,
                                 "body": body}, ensure_ascii=False) + "\n")
        if problem is not None:
            self._error(*problem)
            return
        message = {"id": secrets.token_urlsafe(9)[:12], "time": int(time.time()),
                   "expires": int(time.time()) + 43200, "event": "message",
                   "topic": match.group(1), "message": body}
        if title is not None:
            message["title"] = title
        self._answer(200, message)

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"{self.address_string()} {format % args}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8084)
    parser.add_argument("--out", default=os.path.join(os.environ.get("STATE_DIRECTORY", "."),
                                                      "requests.jsonl"),
                        help="JSON-lines file of the requests received")
    parser.add_argument("--token", help="accept only this bearer token")
    args = parser.parse_args(argv)
    server = Receiver((args.bind, args.port), args.out, args.token)
    print(f"ntfy receiver on http://{args.bind}:{server.server_address[1]}, "
          f"recording to {args.out}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
