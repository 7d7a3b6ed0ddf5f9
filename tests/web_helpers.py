"""Helpers of the pihub-web tests: start the daemon on a free port, and an HTTP client that keeps
its session cookie (the standard library's http.client, so a test sees every status and header)."""

from __future__ import annotations

import http.client
import json
import socket
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pihub.daemons.web.auth import hash_password

from testkit.loopback import free_port

#: cheap hashes for tests (the default costs 100000 rounds); the login is the same code
PASSWORD = "correct horse"
ADMIN_HASH = hash_password(PASSWORD, iterations=2000)
VIEWER_HASH = hash_password("just looking", iterations=2000)
KIOSK_TOKEN = "kiosk-token-0123456789abcdef"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


@dataclass
class WebClient:
    """One browser's worth of HTTP: a cookie jar of one session cookie, no redirects followed."""

    port: int
    cookie: str = ""
    csrf: str = ""
    source_address: str = "127.0.0.1"
    extra: dict[str, str] = field(default_factory=dict)

    def request(self, method: str, path: str, body: bytes | str | None = None,
                headers: dict[str, str] | None = None, timeout: float = 10) -> Answer:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout,
                                          source_address=(self.source_address, 0))
        hdrs = {**self.extra, **(headers or {})}
        if self.cookie:
            hdrs["Cookie"] = self.cookie
        try:
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            answer = Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()},
                            resp.read())
        finally:
            conn.close()
        set_cookie = answer.headers.get("set-cookie", "")
        if set_cookie.startswith("pihub_session="):
            value = set_cookie.split(";")[0]
            self.cookie = "" if value == "pihub_session=" else value
        return answer

    def get(self, path: str, **kw: Any) -> Answer:
        return self.request("GET", path, **kw)

    def post_form(self, path: str, fields: dict[str, str], **kw: Any) -> Answer:
        return self.request("POST", path, urllib.parse.urlencode(fields),
                            {"Content-Type": "application/x-www-form-urlencoded",
                             **kw.pop("headers", {})}, **kw)

    def post_json(self, path: str, obj: Any, csrf: bool = True) -> Answer:
        headers = {"Content-Type": "application/json"}
        if csrf:
            headers["X-CSRF-Token"] = self.csrf
        return self.request("POST", path, json.dumps(obj), headers)

    def login(self, user: str = "admin", password: str = PASSWORD) -> Answer:
        answer = self.post_form("/login", {"user": user, "password": password, "next": "/"})
        if answer.status == 303:
            self.csrf = self.get("/api/session").json()["csrf"]
        return answer


def web_config(**extra: Any) -> dict[str, Any]:
    """A pihub-web config on a free loopback port, with an admin and a read-only user."""
    return {"listen_address": "127.0.0.1", "port": free_port(),
            "users": {"admin": ADMIN_HASH, "viewer": VIEWER_HASH}, "viewers": ["viewer"],
            **extra}


def start_web(start_daemon: Callable[..., Any], **extra: Any) -> tuple[Any, WebClient]:
    """pihub-web running and serving (its READY logged); a client for it, not logged in."""
    cfg = web_config(**extra)
    proc = start_daemon("web", cfg)
    proc.wait_log("ready: connected and subscribed", 15)
    return proc, WebClient(cfg["port"])


def sse_open(port: int, cookie: str, rcvbuf: int | None = None) -> socket.socket:
    """A raw connection to /api/events (a test can read it slowly, or not at all)."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nCookie: {cookie}\r\n"
                 "Accept: text/event-stream\r\n\r\n".encode())
    return sock


class EventReader:
    """Reads an SSE stream from a socket: ``next_event()`` -> (event name, data as JSON)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        sock.settimeout(10)
        head = self._until(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1])

    def _until(self, sep: bytes) -> bytes:
        while sep not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("stream closed")
            self.buf += chunk
        out, self.buf = self.buf.split(sep, 1)
        return out

    def next_event(self) -> tuple[str, Any]:
        while True:
            block = self._until(b"\n\n").decode("utf-8")
            name, data = "message", []
            for line in block.split("\n"):
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    data.append(line[6:])
            if data:
                return name, json.loads("\n".join(data))
