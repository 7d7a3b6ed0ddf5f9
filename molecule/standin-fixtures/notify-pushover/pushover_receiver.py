#!/usr/bin/env python3
"""A stand-in for Pushover's message API, for the Molecule stand-in and pihub's tests.

Serves ``POST /1/messages.json`` (form-encoded, as Pushover takes it) on 127.0.0.1, checks the
fields the way Pushover does, appends each request's form fields as one JSON line to ``--out``,
and answers in Pushover's formats:

* ``200 {"status": 1, "request": "<uuid>"}`` (plus ``"receipt"`` for emergency priority 2),
  with ``X-Limit-App-Limit/-Remaining/-Reset`` headers;
* ``400 {"<field>": "invalid", "errors": [...], "status": 0, "request": "<uuid>"}`` when a field
  is missing or wrong (token, user, message, priority, retry/expire of priority 2);
* ``404`` with ``status 0`` for any other path.

Stdlib only: ``python3 pushover_receiver.py --port 8083 --out /var/lib/x/requests.jsonl``.
"""

from __future__ import annotations

import argparse
import calendar
import contextlib
import json
import os
import secrets
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

MONTHLY_LIMIT = 10000


def next_month_epoch(now: float) -> int:
    t = time.gmtime(now)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return calendar.timegm((year, month, 1, 0, 0, 0, 0, 0, 0))


def check(fields: dict[str, str], token: str | None, user: str | None) -> list[tuple[str, str]]:
    """What Pushover would object to, as (field, error text) pairs."""
    errors = []
    if not fields.get("token") or (token is not None and fields["token"] != token):
        errors.append(("token", "application token is invalid"))
    if not fields.get("user") or (user is not None and fields["user"] != user):
        errors.append(("user", "user identifier is not a valid user, group, or subscribed user "
                               "key"))
    if not fields.get("message"):
        errors.append(("message", "message cannot be blank"))
    elif len(fields["message"]) > 1024:
        errors.append(("message", "message is too long (max 1024 characters)"))
    if len(fields.get("title", "")) > 250:
        errors.append(("title", "title is too long (max 250 characters)"))
    priority = fields.get("priority", "0")
    if priority not in ("-2", "-1", "0", "1", "2"):
        errors.append(("priority", "priority is invalid"))
    if priority == "2":
        retry, expire = fields.get("retry", ""), fields.get("expire", "")
        if not retry.isdigit() or int(retry) < 30:
            errors.append(("retry", "retry must be supplied with priority=2 and be at least 30"))
        if not expire.isdigit() or int(expire) > 10800:
            errors.append(("expire", "expire must be supplied with priority=2 and be at most "
                                     "10800"))
    return errors


class Receiver(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], out: str, token: str | None,
                 user: str | None) -> None:
        super().__init__(address, Handler)
        self.out = out
        self.token = token
        self.user = user
        self.sent = 0
        self.lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    server: Receiver
    server_version = "pushover-receiver/1"

    def _answer(self, code: int, body: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        request_id = str(uuid.uuid4())
        if self.path.split("?")[0] != "/1/messages.json":
            self._answer(404, {"errors": ["resource not found"], "status": 0,
                               "request": request_id})
            return
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length).decode("utf-8", "replace")
        fields = {k: v[-1] for k, v in parse_qs(raw, keep_blank_values=True).items()}
        errors = check(fields, self.server.token, self.server.user)
        with self.server.lock:
            with open(self.server.out, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"received": time.time(), "accepted": not errors,
                                     "fields": fields}, ensure_ascii=False) + "\n")
            if not errors:
                self.server.sent += 1
            sent = self.server.sent
        if errors:
            body: dict = {f: "invalid" for f, _ in errors}
            body.update({"errors": [e for _, e in errors], "status": 0, "request": request_id})
            self._answer(400, body)
            return
        body = {"status": 1, "request": request_id}
        if fields.get("priority") == "2":
            body["receipt"] = secrets.token_hex(15)
        self._answer(200, body, {
            "X-Limit-App-Limit": str(MONTHLY_LIMIT),
            "X-Limit-App-Remaining": str(max(0, MONTHLY_LIMIT - sent)),
            "X-Limit-App-Reset": str(next_month_epoch(time.time())),
        })

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"{self.address_string()} {format % args}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8083)
    parser.add_argument("--out", default=os.path.join(os.environ.get("STATE_DIRECTORY", "."),
                                                      "requests.jsonl"),
                        help="JSON-lines file of the requests received")
    parser.add_argument("--token", help="accept only this application token")
    parser.add_argument("--user", help="accept only this user key")
    args = parser.parse_args(argv)
    server = Receiver((args.bind, args.port), args.out, args.token, args.user)
    print(f"pushover receiver on http://{args.bind}:{server.server_address[1]}, "
          f"recording to {args.out}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
