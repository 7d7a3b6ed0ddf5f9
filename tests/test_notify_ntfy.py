"""pihub-notify-ntfy against a real Mosquitto and a stand-in for ntfy's publish API on 127.0.0.1.

The stand-in checks each request the way an ntfy server reads it (docs.ntfy.sh/publish): POST to
``/<topic>``, the message as the UTF-8 body, ``Title`` (an RFC 2047 encoded word when it is not
ASCII), ``Priority`` 1..5, ``Tags`` comma-separated, ``Click``, ``Authorization: Bearer``, and
answers in ntfy's formats (200 with the message JSON, ``{"code": 40101, "http": 401, "error":
...}`` errors).
"""

from __future__ import annotations

import base64
import collections
import functools
import json
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonProcess, run_cli, wait_until
from notify_helpers import counters_reach as _counters_reach
from notify_helpers import request
from pihub.daemons.notify_ntfy import PRIORITY, rfc2047
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

MODULE = "notify_ntfy"
# waits for notify-ntfy's heartbeat counters
counters_reach = functools.partial(_counters_reach, daemon="notify-ntfy")
TOPIC = "pihub-alerts-test"
_ENCODED_WORD = re.compile(r"^=\?utf-8\?b\?([A-Za-z0-9+/=]+)\?=$", re.I)


@dataclass
class Publish:
    topic: str
    message: str
    title: str | None
    priority: int
    tags: list[str]
    click: str | None
    auth: str | None
    at: float
    status: int
    accepted: bool  # 200 with ntfy's message JSON


def decode_header(value: str) -> str:
    found = _ENCODED_WORD.match(value)
    return base64.b64decode(found[1]).decode("utf-8") if found else value


class FakeNtfy:
    """ntfy's publish endpoint: checks the request format, answers like ntfy, records it."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.server = HTTPServer("127.0.0.1", 0, threaded=True)
        self.server.expect_request(re.compile(r"/.*")).respond_with_handler(self._handle)
        self._lock = threading.Lock()
        self._script: collections.deque[tuple[int, dict[str, Any], dict[str, str]]] = (
            collections.deque())
        self.publishes: list[Publish] = []
        self.problems: list[str] = []
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
        """Refuse connections, keeping the port (a bound socket that does not listen)."""
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

    def answer_next(self, status: int, body: dict[str, Any],
                    headers: dict[str, str] | None = None) -> None:
        with self._lock:
            self._script.append((status, body, headers or {}))

    def accepted(self) -> list[Publish]:
        with self._lock:
            return [p for p in self.publishes if p.accepted]

    def all(self) -> list[Publish]:
        with self._lock:
            return list(self.publishes)

    def _check(self, request: Request) -> tuple[int, str | None]:
        """What ntfy would say of this request: (status, error) or (200, None)."""
        if request.method not in ("POST", "PUT"):
            return 405, "method not allowed"
        if not re.fullmatch(r"/[-_A-Za-z0-9]{1,64}", request.path):
            return 404, "page not found"
        if self.token is not None and request.headers.get("Authorization") != (
                f"Bearer {self.token}"):
            return 401, "unauthorized"
        prio = request.headers.get("Priority", "3")
        if prio not in {"1", "2", "3", "4", "5"}:
            return 400, "invalid priority"
        try:
            request.get_data().decode("utf-8")
        except UnicodeDecodeError:
            return 400, "message body is not UTF-8"
        for name in request.headers.keys():  # noqa: SIM118 (werkzeug's Headers)
            if name.lower() in ("x-title", "t", "ti", "x-priority", "prio", "p", "x-tags",
                                "tag", "ta"):
                self.problems.append(f"alias header {name} (pihub sends the plain names)")
        return 200, None

    def _handle(self, request: Request) -> Response:
        status, error = self._check(request)
        with self._lock:
            scripted = self._script.popleft() if self._script and status == 200 else None
        headers: dict[str, str] = {}
        if scripted is not None:
            status, body, headers = scripted
        elif error is not None:
            body = {"code": status * 100 + 1, "http": status, "error": error,
                    "link": "https://ntfy.sh/docs/publish/"}
        else:
            body = {"id": secrets.token_hex(6), "time": int(time.time()),
                    "expires": int(time.time()) + 43200, "event": "message",
                    "topic": request.path[1:], "message": request.get_data(as_text=True)}
        tags = request.headers.get("Tags")
        title = request.headers.get("Title")
        publish = Publish(topic=request.path[1:],
                          message=request.get_data().decode(errors="replace"),
                          title=None if title is None else decode_header(title),
                          priority=int(request.headers.get("Priority", "3"))
                          if request.headers.get("Priority", "3").isdigit() else 0,
                          tags=tags.split(",") if tags else [],
                          click=request.headers.get("Click"),
                          auth=request.headers.get("Authorization"), at=time.time(),
                          status=status, accepted=status == 200 and "id" in body)
        with self._lock:
            self.publishes.append(publish)
        return Response(json.dumps(body), status=status, headers=headers,
                        content_type="application/json")


@pytest.fixture
def ntfy() -> Iterator[FakeNtfy]:
    fake = FakeNtfy()
    fake.start()
    yield fake
    fake.close()


@pytest.fixture
def ntfy_config(tmp_path: Path, ntfy: FakeNtfy) -> dict[str, Any]:
    return {"base_url": ntfy.base_url, "topic": TOPIC, "queue_dir": str(tmp_path / "queue"),
            "backoff_min": 0.2, "backoff_max": 1.0, "send_interval": 0.1, "timeout": 5.0}


@pytest.fixture
def start_notifier(start_daemon: Callable[..., DaemonProcess], ntfy_config: dict[str, Any]
                   ) -> Callable[..., DaemonProcess]:
    def start(**overrides: Any) -> DaemonProcess:
        d = start_daemon(MODULE, {**ntfy_config, **overrides})
        d.wait_log("ready: connected and subscribed", timeout=20)
        return d

    return start




def messages(ntfy: FakeNtfy) -> list[str]:
    return [p.message for p in ntfy.accepted()]


def queued(tmp_path: Path) -> int:
    return len(list((tmp_path / "queue").glob("*.json")))


# --------------------------------------------------------------------------- the request


def test_request_is_published_with_ntfys_headers(start_notifier, observe, topic_root, ntfy,
                                                 tmp_path):
    obs = observe(f"{topic_root}/notify-ntfy/#")
    token = tmp_path / "ntfy-token"
    token.write_text("tk_AgQdq7mVBoFD37zQVN29RhuMzNIz2\n")
    ntfy.token = "tk_AgQdq7mVBoFD37zQVN29RhuMzNIz2"
    d = start_notifier(token_file=str(token), tags=["pihub", "warning"],
                       click="http://pi4.local:8080/alerts")
    obs.publish(f"{topic_root}/notify/monitor",
                request("store-rrd on pi4 is down since 10:42 — ünïcödé ✓",
                        title="pihub: store-rrd DOWN ⚠", priority=1, daemon="store-rrd"))
    wait_until(ntfy.accepted, 20, "a publish accepted by the ntfy stand-in")
    (p,) = ntfy.accepted()
    assert (p.topic, p.message, p.title, p.priority, p.tags, p.click, p.auth) == (
        TOPIC, "store-rrd on pi4 is down since 10:42 — ünïcödé ✓", "pihub: store-rrd DOWN ⚠",
        4, ["pihub", "warning", "monitor"], "http://pi4.local:8080/alerts",
        "Bearer tk_AgQdq7mVBoFD37zQVN29RhuMzNIz2")
    assert ntfy.problems == []
    counters = counters_reach(obs, topic_root, sent=1)
    assert counters["errors"] == 0 and counters.get("retries", 0) == 0
    assert "sent #1 'pihub: store-rrd DOWN ⚠'" in d.output() and "(ntfy message " in d.output()
    assert d.stop() == 0


def test_priorities_map_onto_ntfys_one_to_five(start_notifier, observe, topic_root, ntfy):
    obs = observe()
    start_notifier(dedupe_window_s=0)
    for prio in (-2, -1, 0, 1, 2):
        obs.publish(f"{topic_root}/notify/monitor", request(f"p{prio}", priority=prio))
    wait_until(lambda: len(ntfy.accepted()) == 5, 20, "five publishes accepted")
    assert [(p.message, p.priority) for p in ntfy.accepted()] == [
        ("p-2", 1), ("p-1", 2), ("p0", 3), ("p1", 4), ("p2", 5)]
    assert PRIORITY == {-2: 1, -1: 2, 0: 3, 1: 4, 2: 5}


def test_request_without_title_sends_no_title_and_no_auth(start_notifier, observe, topic_root,
                                                          ntfy):
    obs = observe()
    start_notifier(default_priority=-1)
    obs.publish(f"{topic_root}/notify/rules", {"message": "door open"})
    wait_until(ntfy.accepted, 20, "the publish accepted")
    (p,) = ntfy.accepted()
    assert (p.title, p.priority, p.tags, p.click, p.auth) == (None, 2, ["pihub", "rules"],
                                                              None, None)


def test_line_breaks_in_a_title_cannot_add_headers(start_notifier, observe, topic_root, ntfy):
    obs = observe()
    start_notifier()
    obs.publish(f"{topic_root}/notify/monitor",
                request("m", title="down\r\nAuthorization: Bearer stolen\nX-Evil: 1"))
    wait_until(ntfy.accepted, 20, "the publish accepted")
    (p,) = ntfy.accepted()
    assert p.title == "down Authorization: Bearer stolen X-Evil: 1" and p.auth is None


def test_rfc2047_leaves_ascii_alone():
    assert rfc2047("plain title") == "plain title"
    assert decode_header(rfc2047("Küche 23 °C")) == "Küche 23 °C"


# --------------------------------------------------------------------------- failures


def test_server_errors_are_retried_until_ntfy_accepts(start_notifier, observe, topic_root,
                                                      ntfy):
    obs = observe(f"{topic_root}/notify-ntfy/#")
    ntfy.answer_next(500, {"code": 50001, "http": 500, "error": "internal server error"})
    ntfy.answer_next(502, {"error": "bad gateway"})
    d = start_notifier()
    obs.publish(f"{topic_root}/notify/monitor", request("retried"))
    wait_until(ntfy.accepted, 20, "the publish accepted after two server errors")
    assert [p.status for p in ntfy.all()] == [500, 502, 200]
    counters_reach(obs, topic_root, sent=1, retries=2)
    assert "HTTP 500: internal server error (code 50001)" in d.output()


def test_rate_limit_holds_sending_for_retry_after(start_notifier, observe, topic_root, ntfy):
    obs = observe(f"{topic_root}/notify-ntfy/#")
    ntfy.answer_next(429, {"code": 42901, "http": 429,
                           "error": "limit reached: too many requests"}, {"Retry-After": "2"})
    d = start_notifier()  # backoff 0.2..1 s: only Retry-After makes it wait 2 s
    obs.publish(f"{topic_root}/notify/monitor", request("after the limit"))
    wait_until(ntfy.accepted, 30, "the publish accepted after Retry-After")
    first, second = ntfy.all()
    assert first.status == 429 and second.at - first.at >= 1.9
    counters_reach(obs, topic_root, quota_waits=1, sent=1)
    assert "limit reached: too many requests" in d.output()


def test_wrong_token_is_a_permanent_failure_and_the_queue_goes_on(start_notifier, observe,
                                                                  topic_root, ntfy, tmp_path):
    obs = observe(f"{topic_root}/notify-ntfy/#")
    ntfy.token = "tk_right"
    token = tmp_path / "token"
    token.write_text("tk_wrong\n")
    d = start_notifier(token_file=str(token))
    obs.publish(f"{topic_root}/notify/monitor", request("refused"))
    d.wait_log("unauthorized", timeout=20)
    counters_reach(obs, topic_root, failed=1, errors=1)
    assert [p.status for p in ntfy.all()] == [401]  # a 4xx is not retried
    assert "HTTP 401: unauthorized (code 40101) (check token_file and topic)" in d.output()
    wait_until(lambda: queued(tmp_path) == 0, 10, "the refused request dropped from the queue")


def test_unexpected_200_from_a_captive_portal_is_retried(start_notifier, observe, topic_root,
                                                        ntfy):
    obs = observe(f"{topic_root}/notify-ntfy/#")
    ntfy.answer_next(200, {"portal": "please log in"})
    start_notifier()
    obs.publish(f"{topic_root}/notify/monitor", request("through the portal"))
    wait_until(ntfy.accepted, 20, "the publish accepted")
    assert [(p.status, p.accepted) for p in ntfy.all()] == [(200, False), (200, True)]
    counters_reach(obs, topic_root, sent=1, retries=1)


# --------------------------------------------------------------------------- exactly once


def test_killed_with_requests_queued_and_ntfy_down_each_is_delivered_once(
        start_notifier, observe, topic_root, ntfy, tmp_path):
    ntfy.stop()
    obs = observe()
    d = start_notifier()
    for i in range(3):
        obs.publish(f"{topic_root}/notify/monitor", request(f"queued {i}"))
    wait_until(lambda: queued(tmp_path) == 3, 20, "three requests in the on-disk queue")
    d.wait_log("Connection refused", timeout=20)
    d.kill()  # SIGKILL: no shutdown, nothing flushed
    ntfy.start()
    d2 = start_notifier()
    wait_until(lambda: len(ntfy.accepted()) == 3, 20, "the three queued requests sent")
    wait_until(lambda: queued(tmp_path) == 0, 10, "an empty queue")
    obs.publish(f"{topic_root}/notify/monitor", request("after the restart"))
    wait_until(lambda: len(ntfy.accepted()) == 4, 20, "the next request sent")
    assert messages(ntfy) == ["queued 0", "queued 1", "queued 2", "after the restart"]
    assert "3 request(s) left from the last run" in d2.output()


def test_full_queue_drops_the_oldest_and_counts_them(start_notifier, observe, topic_root, ntfy,
                                                     tmp_path):
    ntfy.stop()
    obs = observe(f"{topic_root}/notify-ntfy/#")
    d = start_notifier(max_queue=2)
    for i in range(4):
        obs.publish(f"{topic_root}/notify/monitor", request(f"request {i}"))
    d.wait_log("dropped the oldest request #2", timeout=20)
    ntfy.start()
    wait_until(lambda: len(ntfy.accepted()) == 2, 20, "the two kept requests sent")
    assert messages(ntfy) == ["request 2", "request 3"]
    counters_reach(obs, topic_root, overflow=2, sent=2)


# --------------------------------------------------------------------------- routing


def test_topics_decide_which_requests_this_channel_sends(start_notifier, observe, topic_root,
                                                        ntfy):
    obs = observe(f"{topic_root}/notify-ntfy/#")
    start_notifier(topics=["urgent", "rules"])
    obs.publish(f"{topic_root}/notify/monitor", request("for another channel"))
    obs.publish(f"{topic_root}/notify/monitor", b"not even JSON")  # not ours: no reject
    obs.publish(f"{topic_root}/notify/urgent", request("urgent one"))
    obs.publish(f"{topic_root}/notify/rules", request("a rule"))
    wait_until(lambda: len(ntfy.accepted()) == 2, 20, "the two routed requests sent")
    assert messages(ntfy) == ["urgent one", "a rule"]
    counters = counters_reach(obs, topic_root, sent=2, not_routed=2)
    assert counters["rejected"] == 0


def test_malformed_and_retained_requests_are_rejected(start_notifier, observe, topic_root,
                                                      ntfy):
    obs = observe(f"{topic_root}/notify-ntfy/#")
    obs.publish(f"{topic_root}/notify/stale", request("stale"), retain=True)
    d = start_notifier()
    obs.publish(f"{topic_root}/notify/monitor", {"message": "m", "priority": 3})
    obs.publish(f"{topic_root}/notify/monitor", request("well formed"))
    wait_until(ntfy.accepted, 20, "the well-formed request sent")
    counters_reach(obs, topic_root, rejected=2, sent=1)
    assert messages(ntfy) == ["well formed"]
    assert "must not be retained" in d.output()
    obs.publish(f"{topic_root}/notify/stale", b"", retain=True)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(("config", "key"), [
    ({"topic": "has space"}, "topic"),
    ({"base_url": "ntfy.sh"}, "base_url"),
    ({"tags": ["a,b"]}, "tags[0]"),
    ({"topics": ["#", "monitor"]}, "topics"),
    ({"topics": ["Monitor"]}, "topics[0]"),
    ({"click": "javascript:alert(1)"}, "click"),
])
def test_check_config_names_the_wrong_key(tmp_path, config, key):
    path = tmp_path / "bad.yml"
    path.write_text(json.dumps({"topic": "pihub", **config}))
    checked = run_cli(MODULE, "--check-config", str(path))
    assert checked.returncode == 78, checked.stderr
    assert f": {key}: " in checked.stderr


def test_empty_token_file_stops_the_daemon_with_ex_config(start_daemon, ntfy_config, tmp_path):
    empty = tmp_path / "token"
    empty.write_text("\n")
    d = start_daemon(MODULE, {**ntfy_config, "token_file": str(empty)})
    wait_until(lambda: d.proc.poll() is not None, 20, "the daemon to exit")
    assert d.proc.returncode == 78
    assert "token_file: " in d.output() and "is empty" in d.output()


def test_publishes_nothing_outside_its_subtree(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text(json.dumps({"topic": "pihub"}))
    acl = run_cli(MODULE, "--print-acl", str(path))
    assert json.loads(acl.stdout) == {"topic_root": "pihub", "write": []}
