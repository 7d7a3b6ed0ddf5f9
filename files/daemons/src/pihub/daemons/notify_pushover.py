"""pihub-notify-pushover: send the hub's notification requests to Pushover.

Reads ``<root>/notify/<topic>`` (QoS 1, persistent session, not retained), the notification
request of docs/contract.md::

    {"title": "pihub: store-rrd is down", "message": "no heartbeat from pi4 since 10:42:07",
     "priority": 1, "ts": 1718000000.0}

``message`` is required (a non-empty string); ``title`` (a string), ``priority`` (an integer
-2..2, Pushover's scale; default ``default_priority``) and ``ts`` (UNIX seconds, shown by Pushover
as the message's time) may be left out; other keys are ignored. A request that breaks this is
rejected (logged, counted ``rejected``). A retained message is rejected too: it would be sent
again at every restart.

Every accepted request is written to an on-disk queue (:class:`RequestQueue`, one file per
request under ``queue_dir``, written with :func:`pihub.durable.atomic_write`) before its MQTT
message is acknowledged, and a timer in the main thread POSTs the queue, oldest first, to
``<base_url>/1/messages.json`` (form fields token, user, message, title, priority, timestamp;
retry and expire for emergency priority 2):

* HTTP 200 with ``{"status": 1, ...}``: sent, removed from the queue (``sent``);
* network error, timeout, 5xx or an unexpected answer: kept, tried again after an exponential
  backoff between ``backoff_min`` and ``backoff_max`` seconds (``retries``);
* 429 (over quota): kept, and nothing is sent until the time Pushover gives (``Retry-After``,
  else the ``X-Limit-App-Reset`` epoch, else ``backoff_max``) (``quota_waits``);
* any other 4xx: logged with Pushover's ``errors`` text and dropped (``failed``, ``errors``).

Requests identical in title, message and priority to one accepted less than
``dedupe_window_s`` seconds earlier are acknowledged and not sent (``deduped``). When the queue
holds ``max_queue`` requests the oldest is dropped (``overflow``). Publishes nothing besides the
status and meta topics every daemon has; the heartbeat adds ``queued`` and ``quota_remaining``.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import math
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from pihub import __version__
from pihub.bus import Message, read_secret
from pihub.config import BaseConfig, ConfigError, setting
from pihub.daemon import Daemon, state_directory
from pihub.durable import StateError, atomic_write, fsync_directory, read_json
from pihub.topics import Reject, clip_text, shown

#: Pushover's limits on one message (characters), see its API documentation.
MAX_MESSAGE = 1024
MAX_TITLE = 250
#: requests remembered for dedupe_window_s (the oldest forgotten first beyond)
MAX_RECENT = 1000
#: Emergency priority: Pushover requires retry >= 30 s and expire <= 10800 s.
EMERGENCY = 2
MIN_RETRY = 30
MAX_EXPIRE = 10800
#: Longest stretch the sender spends in one run before letting the heartbeat through.
SEND_BUDGET_S = 5.0
DEFAULT_QUEUE_DIR = "/var/lib/pihub-notify-pushover"  # what state_directory() falls back to


@dataclass(kw_only=True)
class Config(BaseConfig):
    base_url: str = setting(
        "https://api.pushover.net",
        "Pushover API base URL; messages are POSTed to <base_url>/1/messages.json.",
        pattern=r"^https?://[^\s/]+(/[^\s]*)?$",
    )
    token_file: str = setting(
        help="File holding the Pushover application API token (first line), readable by this "
             "daemon only.",
        example="/etc/pihub/secrets/pushover-token",
    )
    user_key_file: str = setting(
        help="File holding the Pushover user (or group) key (first line), readable by this "
             "daemon only.",
        example="/etc/pihub/secrets/pushover-user",
    )
    default_priority: int = setting(
        0, "Priority of a request that names none (-2 lowest .. 2 emergency).", min=-2, max=2
    )
    emergency_retry: int = setting(
        60, "Emergency priority (2): seconds between Pushover's repeats until acknowledged.",
        min=MIN_RETRY, max=MAX_EXPIRE,
    )
    emergency_expire: int = setting(
        3600, "Emergency priority (2): seconds after which Pushover stops repeating.",
        min=MIN_RETRY, max=MAX_EXPIRE,
    )
    timeout: float = setting(10.0, "Seconds to wait for Pushover's answer to one request.",
                             min=0.5, max=120)
    dedupe_window_s: float = setting(
        300.0, "Requests identical in title, message and priority to one accepted less than this "
               "many seconds before are sent once; 0 sends every one.",
        min=0, max=86400,
    )
    queue_dir: str | None = setting(
        None, "Directory of the on-disk queue; null means $STATE_DIRECTORY (set by systemd's "
              f"StateDirectory=), else {DEFAULT_QUEUE_DIR}.",
    )
    max_queue: int = setting(
        1000, "Requests kept while Pushover is unreachable; the oldest go first when full.",
        min=1, max=1000000,
    )
    backoff_min: float = setting(
        5.0, "First wait, seconds, after a network error or 5xx (Pushover asks for >= 5).",
        min=0.1, max=3600,
    )
    backoff_max: float = setting(
        300.0, "Longest wait, seconds, between two tries of a failing request.", min=1, max=86400
    )
    send_interval: float = setting(
        0.5, "Seconds between two looks at the queue for requests to send.", min=0.05, max=60
    )

    def check(self) -> None:
        if self.backoff_max < self.backoff_min:
            raise ConfigError("backoff_max", f"must be >= backoff_min ({self.backoff_min:g})")
        if self.emergency_expire < self.emergency_retry:
            raise ConfigError("emergency_expire",
                              f"must be >= emergency_retry ({self.emergency_retry})")


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Request:
    """One notification request, as queued."""

    seq: int
    topic: str
    message: str
    title: str | None
    priority: int
    ts: float

    @property
    def key(self) -> tuple[str | None, str, int]:
        return (self.title, self.message, self.priority)

    def record(self) -> dict[str, Any]:
        return {"seq": self.seq, "topic": self.topic, "title": self.title,
                "message": self.message, "priority": self.priority, "ts": self.ts}

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> Request:
        return cls(seq=int(data["seq"]), topic=str(data["topic"]), message=str(data["message"]),
                   title=None if data.get("title") is None else str(data["title"]),
                   priority=int(data["priority"]), ts=float(data["ts"]))

    def describe(self) -> str:
        text = self.title or self.message
        return f"#{self.seq} {text[:60]!r} (from {self.topic})"


def parse_request(topic: str, data: Any, default_priority: int, now: float
                  ) -> tuple[str, str | None, int, float]:
    """Check a notification request; return (message, title, priority, ts) or raise Reject."""
    if not isinstance(data, dict):
        raise Reject(f"payload on {topic} must be a JSON object, got {type(data).__name__}")
    message = data.get("message")
    if not isinstance(message, str) or not message.strip():
        raise Reject(f"payload on {topic}: 'message' must be a non-empty string, got "
                     f"{shown(message)}")
    title = data.get("title")
    if title is not None and not isinstance(title, str):
        raise Reject(f"payload on {topic}: 'title' must be a string, got {shown(title)}")
    priority = data.get("priority", default_priority)
    if isinstance(priority, float) and priority.is_integer():
        priority = int(priority)
    if isinstance(priority, bool) or not isinstance(priority, int) or not -2 <= priority <= 2:
        raise Reject(f"payload on {topic}: 'priority' must be an integer -2..2, got "
                     f"{shown(priority)}")
    ts = data.get("ts", now)
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts) or ts <= 0:
        raise Reject(f"payload on {topic}: 'ts' must be UNIX seconds (a number > 0), got "
                     f"{shown(ts)}")
    return message, (title or None), priority, float(ts)


# --------------------------------------------------------------------------- on-disk queue


class RequestQueue:
    """Requests waiting to be sent: one JSON file each, ``<queue_dir>/<seq>.json``.

    Thread-safe: the MQTT thread appends, the main thread reads the head and removes it.

    A file per request (:func:`pihub.durable.atomic_write`: whole or absent after a power cut),
    not a :class:`pihub.durable.RecordLog`: a few requests a day, each with its own fate (sent,
    dropped as refused or on overflow, kept for a retry), so removing one is an unlink (the
    directory fsync'd, so a sent request does not come back) with no compaction, an unreadable
    file costs that request only, and an operator can read or delete the queue with ``ls`` and
    ``cat``. The format is the one earlier versions wrote, so a queue left by them is sent.
    """

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._lock = threading.Lock()
        self._items: list[Request] = []
        self._seq = 0

    def load(self) -> list[tuple[Path, str]]:
        """Read what a previous run left; return the files that could not be read, and why."""
        bad: list[tuple[Path, str]] = []
        items = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                items.append(Request.from_record(read_json(path)))
            except StateError as exc:
                bad.append((path, str(exc).removeprefix(f"{path}: ")))
            except (ValueError, KeyError, TypeError) as exc:
                bad.append((path, f"{type(exc).__name__}: {exc}"))
        for path in self.dir.glob(".*.tmp"):  # a write cut short by a crash: never acked
            with contextlib.suppress(OSError):
                path.unlink()
        items.sort(key=lambda r: r.seq)
        with self._lock:
            self._items = items
            self._seq = max((r.seq for r in items), default=0)
        return bad

    def next_seq(self) -> int:
        with self._lock:
            self._seq += 1
            return self._seq

    def put(self, item: Request, max_items: int) -> tuple[list[Request], OSError | None]:
        """Append ``item`` (durably); return the requests dropped to make room, and any error.

        On a disk error the request is still kept in memory, so a running daemon sends it.
        """
        error: OSError | None = None
        try:
            atomic_write(self._path(item), json.dumps(item.record(), ensure_ascii=False), 0o600)
        except OSError as exc:
            error = exc
        with self._lock:
            self._items.append(item)
            dropped = self._items[: max(0, len(self._items) - max_items)]
            del self._items[: len(dropped)]
        if dropped:
            for old in dropped:
                self._unlink(old)
            self._sync()
        return dropped, error

    def _path(self, item: Request) -> Path:
        return self.dir / f"{item.seq:012d}.json"

    def _unlink(self, item: Request) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(item).unlink()

    def _sync(self) -> None:
        """Make removals durable: a request sent must not come back after a power cut."""
        with contextlib.suppress(OSError):
            fsync_directory(self.dir)

    def head(self) -> Request | None:
        with self._lock:
            return self._items[0] if self._items else None

    def remove(self, item: Request) -> None:
        with self._lock:
            if item in self._items:
                self._items.remove(item)
        self._unlink(item)
        self._sync()

    def items(self) -> list[Request]:
        with self._lock:
            return list(self._items)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


# --------------------------------------------------------------------------- Pushover answers


def pushover_errors(response: requests.Response) -> str:
    """Pushover's own words from an error answer: its ``errors`` list, else the raw body."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("errors"), list) and body["errors"]:
        return "; ".join(str(e) for e in body["errors"])
    text = response.text.strip().replace("\n", " ")
    return text[:200] or "(empty body)"


def wait_from_headers(headers: Any, now: float) -> tuple[float | None, str]:
    """Seconds to wait that a 429 answer asks for, and which header said so."""
    retry_after = headers.get("Retry-After")
    if retry_after:
        try:
            return max(0.0, float(retry_after)), f"Retry-After: {retry_after}"
        except ValueError:
            with contextlib.suppress(TypeError, ValueError):
                when = email.utils.parsedate_to_datetime(retry_after).timestamp()
                return max(0.0, when - now), f"Retry-After: {retry_after}"
    reset = headers.get("X-Limit-App-Reset")
    if reset:
        with contextlib.suppress(ValueError):
            return max(0.0, float(reset) - now), f"X-Limit-App-Reset: {reset}"
    return None, "no Retry-After or X-Limit-App-Reset header"


# --------------------------------------------------------------------------- the daemon


class PushoverNotifier(Daemon[Config]):
    name = "notify-pushover"
    config_class = Config
    description = "Send the notification requests on <root>/notify/# to Pushover."
    persistent_session = True
    manual_ack = True

    def __init__(self, config: Config, config_path: str | None = None) -> None:
        super().__init__(config, config_path)
        self._token, self._user = self._read_secrets(config)
        self.queue_dir = state_directory(self.name, config.queue_dir)
        try:
            self.queue_dir.mkdir(parents=True, exist_ok=True)
            probe = self.queue_dir / ".write-test.tmp"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ConfigError("queue_dir", f"{self.queue_dir} is not a writable directory: "
                                           f"{exc.strerror or exc}") from exc
        self.queue = RequestQueue(self.queue_dir)
        self._lock = threading.Lock()  # guards _recent (MQTT thread) and the config on reload
        self._recent: dict[tuple[str | None, str, int], float] = {}
        # sender state: main thread only
        self._hold_until = 0.0
        self._failures = 0
        self._quota_remaining: int | None = None
        self._session: requests.Session | None = None

    @staticmethod
    def _read_secrets(config: Config) -> tuple[str, str]:
        token = read_secret(config.token_file, "token_file").strip()
        user = read_secret(config.user_key_file, "user_key_file").strip()
        if not token:
            raise ConfigError("token_file", f"{config.token_file} is empty; expected the "
                                            "Pushover application token on its first line")
        if not user:
            raise ConfigError("user_key_file", f"{config.user_key_file} is empty; expected "
                                               "the Pushover user key on its first line")
        return token, user

    @property
    def url(self) -> str:
        return self.config.base_url.rstrip("/") + "/1/messages.json"

    # ------------------------------------------------------------------ lifecycle

    def setup(self) -> None:
        for path, why in self.queue.load():
            self.count("errors")
            self.log.error("queue file %s is unreadable (%s); moved aside as %s.bad",
                           path, why, path.name)
            with contextlib.suppress(OSError):
                path.rename(path.with_name(path.name + ".bad"))
        pending = self.queue.items()
        now = time.monotonic()
        for item in pending:  # a restart does not re-open the dedupe window
            self._recent.setdefault(item.key, now)
        if pending:
            self.log.info("%d request(s) left from the last run in %s; sending them first",
                          len(pending), self.queue_dir)
        if self.config.timeout > self.config.heartbeat_interval:
            self.log.warning("timeout (%g s) is longer than heartbeat_interval (%g s): a hung "
                             "Pushover request delays heartbeats and the systemd watchdog",
                             self.config.timeout, self.config.heartbeat_interval)
        self._session = requests.Session()
        self._session.headers["User-Agent"] = f"pihub-notify-pushover/{__version__}"
        self.subscribe(self.topics.sub("notify", "#"), self.on_request, qos=1)
        self.every(self.config.send_interval, self.send_pending, name="send")

    def shutdown(self) -> None:
        left = len(self.queue)
        if left:
            self.log.info("%d request(s) not sent yet stay queued in %s", left, self.queue_dir)
        if self._session is not None:
            self._session.close()

    def heartbeat_extra(self) -> dict[str, Any]:
        return {"queued": len(self.queue), "quota_remaining": self._quota_remaining}

    def reload(self, new: Config, changed: set[str]) -> set[str]:
        applied = changed & {"base_url", "default_priority", "emergency_retry",
                             "emergency_expire", "timeout", "dedupe_window_s", "max_queue",
                             "backoff_min", "backoff_max"}
        if changed & {"token_file", "user_key_file"}:
            try:
                secrets = self._read_secrets(new)
            except ConfigError as exc:
                self.count("errors")
                self.log.error("SIGHUP: %s; keeping the running token and user key", exc)
            else:
                with self._lock:
                    self._token, self._user = secrets
                applied |= changed & {"token_file", "user_key_file"}
        return applied

    # ------------------------------------------------------------------ MQTT thread

    def on_request(self, msg: Message) -> None:
        self.topics.split(msg.topic, "notify", 1)
        if msg.retain:
            raise Reject(f"retained message on {msg.topic}: notification requests must not be "
                         "retained (it would be sent again at every restart)")
        config = self.config
        message, title, priority, ts = parse_request(msg.topic, msg.json(),
                                                     config.default_priority, time.time())
        if len(message) > MAX_MESSAGE or (title and len(title) > MAX_TITLE):
            self.count("truncated")
            self.log.warning("request on %s is longer than Pushover takes (message %d/%d, "
                             "title %d/%d characters); shortened", msg.topic, len(message),
                             MAX_MESSAGE, len(title or ""), MAX_TITLE)
            message, title = clip_text(message, MAX_MESSAGE), title and clip_text(title, MAX_TITLE)
        key = (title, message, priority)
        now = time.monotonic()
        with self._lock:
            window = config.dedupe_window_s
            for k in [k for k, t in self._recent.items() if now - t >= window]:
                del self._recent[k]
            if window > 0 and key in self._recent:
                self.count("deduped")
                self.log.info("request on %s repeats one of %.0f s ago; not sent again",
                              msg.topic, now - self._recent[key])
                msg.ack()
                return
            if window > 0:
                if len(self._recent) >= MAX_RECENT:
                    del self._recent[next(iter(self._recent))]
                self._recent[key] = now
        item = Request(self.queue.next_seq(), msg.topic, message, title, priority, ts)
        dropped, error = self.queue.put(item, config.max_queue)
        if error is not None:
            self.count("errors")
            self.log.error("cannot write %s to the queue in %s (%s); kept in memory only",
                           item.describe(), self.queue_dir, error.strerror or error)
        for old in dropped:
            self.count("overflow")
            self.log.warning("queue full (max_queue=%d): dropped the oldest request %s",
                             config.max_queue, old.describe())
        self.log.debug("queued %s", item.describe())
        msg.ack()

    # ------------------------------------------------------------------ main thread

    def send_pending(self) -> None:
        started = time.monotonic()
        while not self.stopping.is_set():
            now = time.monotonic()
            if now < self._hold_until or now - started > SEND_BUDGET_S:
                return
            item = self.queue.head()
            if item is None:
                return
            self._send(item)

    def form(self, item: Request) -> dict[str, str]:
        with self._lock:
            token, user = self._token, self._user
        fields = {"token": token, "user": user, "message": item.message,
                  "priority": str(item.priority), "timestamp": str(int(item.ts))}
        if item.title:
            fields["title"] = item.title
        if item.priority == EMERGENCY:
            fields["retry"] = str(self.config.emergency_retry)
            fields["expire"] = str(self.config.emergency_expire)
        return fields

    def _send(self, item: Request) -> None:
        assert self._session is not None
        url = self.url
        try:
            response = self._session.post(url, data=self.form(item), timeout=self.config.timeout)
        except requests.RequestException as exc:
            self._retry_later(item, f"POST {url} failed: {type(exc).__name__}: {exc}")
            return
        remaining = response.headers.get("X-Limit-App-Remaining")
        if remaining is not None:
            with contextlib.suppress(ValueError):
                self._quota_remaining = int(remaining)
        status = response.status_code
        if status == 200:
            try:
                body = response.json()
            except ValueError:
                body = None
            if isinstance(body, dict) and body.get("status") == 1:
                self.queue.remove(item)
                self._failures = 0
                self.count("sent")
                self.log.info("sent %s, priority %d (Pushover request %s)", item.describe(),
                              item.priority, body.get("request", "?"))
                return
            self._retry_later(item, f"POST {url}: HTTP 200 without status 1, body "
                                    f"{response.text[:120]!r}")
        elif status == 429:
            wait, source = wait_from_headers(response.headers, time.time())
            if wait is None:
                wait = self.config.backoff_max
            self._hold_until = time.monotonic() + wait
            self.count("quota_waits")
            self.log.warning("Pushover says over quota (HTTP 429: %s); holding %d queued "
                             "request(s) for %.0f s (%s)", pushover_errors(response),
                             len(self.queue), wait, source)
        elif 400 <= status < 500:
            self.queue.remove(item)
            self._failures = 0
            self.count("failed")
            self.count("errors")
            self.log.error("Pushover refused %s with HTTP %d: %s; dropped (check token_file, "
                           "user_key_file and the request)", item.describe(), status,
                           pushover_errors(response))
        else:
            self._retry_later(item, f"POST {url}: HTTP {status}: {pushover_errors(response)}")

    def _retry_later(self, item: Request, why: str) -> None:
        self._failures += 1
        cfg = self.config
        delay = min(cfg.backoff_max, cfg.backoff_min * 2 ** min(self._failures - 1, 30))
        self._hold_until = time.monotonic() + delay
        self.count("retries")
        self.log.warning("%s; %s stays queued, try %d again in %.1f s", why, item.describe(),
                         self._failures + 1, delay)


main = PushoverNotifier.main

if __name__ == "__main__":
    sys.exit(main())
