"""A fake Pushover message API for the pihub-notify-pushover tests.

It runs on pytest-httpserver on 127.0.0.1, checks every POST the way Pushover does (with the
checks of the Molecule stand-in receiver, molecule/standin-fixtures/notify-pushover/) and answers
in Pushover's formats. A test may script the next answers (a 500, a 429 with its headers, a 400)
with :meth:`FakePushover.answer_next`; unscripted requests get Pushover's normal answer.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import secrets
import socket
import string
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

REPO = Path(__file__).resolve().parent.parent
RECEIVER = REPO / "molecule" / "standin-fixtures" / "notify-pushover" / "pushover_receiver.py"


def load_receiver() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pushover_receiver", RECEIVER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


receiver = load_receiver()


def pushover_key() -> str:
    """A random key shaped like Pushover's tokens and user keys (30 letters and digits)."""
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(30))


@dataclass
class Post:
    fields: dict[str, str]
    at: float  # time.time() when it arrived
    status: int


class FakePushover:
    def __init__(self) -> None:
        self.token = pushover_key()
        self.user = pushover_key()
        self.server = HTTPServer("127.0.0.1", 0, threaded=True)
        self.server.expect_request("/1/messages.json", method="POST").respond_with_handler(
            self._handle)
        self._lock = threading.Lock()
        self._script: collections.deque[tuple[int, dict[str, Any], dict[str, str]]] = (
            collections.deque())
        self.posts: list[Post] = []
        self._placeholder: socket.socket | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def start(self) -> None:
        if self._placeholder is not None:
            self._placeholder.close()
            self._placeholder = None
        self.server.start()

    def stop(self) -> None:
        """Go down: connections are refused, and the port stays ours until :meth:`start`.

        The port is held by a bound socket that does not listen, so that no other server of
        a test running beside this one is given it meanwhile.
        """
        if self.server.is_running():
            self.server.stop()
            holder = socket.socket()
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            holder.bind(("127.0.0.1", self.server.port))
            self._placeholder = holder

    def close(self) -> None:
        self.stop()
        if self._placeholder is not None:
            self._placeholder.close()
            self._placeholder = None

    def answer_next(self, status: int, body: dict[str, Any],
                    headers: dict[str, str] | None = None) -> None:
        """Answer the next unscripted POST with this status, JSON body and headers."""
        with self._lock:
            self._script.append((status, body, headers or {}))

    def error_answer(self, status: int, **errors: str) -> None:
        """Script a Pushover error answer: ``{"<field>": "invalid", "errors": [...], ...}``."""
        body: dict[str, Any] = dict.fromkeys(errors, "invalid")
        body.update({"errors": list(errors.values()), "status": 0,
                     "request": str(uuid.uuid4())})
        self.answer_next(status, body)

    def accepted(self) -> list[Post]:
        with self._lock:
            return [p for p in self.posts if p.status == 200]

    def all_posts(self) -> list[Post]:
        with self._lock:
            return list(self.posts)

    def _handle(self, request: Request) -> Response:
        fields = request.form.to_dict()
        with self._lock:
            scripted = self._script.popleft() if self._script else None
        if scripted is not None:
            status, body, headers = scripted
        else:
            errors = receiver.check(fields, self.token, self.user)
            if errors:
                status, headers = 400, {}
                body = {f: "invalid" for f, _ in errors}
                body.update({"errors": [e for _, e in errors], "status": 0,
                             "request": str(uuid.uuid4())})
            else:
                status, body = 200, {"status": 1, "request": str(uuid.uuid4())}
                headers = {"X-Limit-App-Limit": "10000", "X-Limit-App-Remaining": "9876",
                           "X-Limit-App-Reset": str(receiver.next_month_epoch(time.time()))}
        with self._lock:
            self.posts.append(Post(fields, time.time(), status))
        return Response(json.dumps(body), status=status, headers=headers,
                        content_type="application/json; charset=utf-8")
