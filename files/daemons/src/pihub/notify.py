"""What every notifier shares: the request, its checks, the on-disk queue and the send loop.

A notifier (notify-pushover, notify-ntfy, notify-email) reads the notification requests of
docs/contract.md on ``<root>/notify/<topic>`` and hands them to one channel. Everything but the
channel is here, so that the three behave alike:

* :func:`parse_request` checks a request (contract section 2) and :class:`Request` is one, as
  queued;
* :class:`RequestQueue` keeps the accepted requests on disk, one file each
  (:func:`pihub.durable.atomic_write`), before their MQTT message is acknowledged, and removes
  a request only once the channel accepted it;
* :class:`NotifierConfig` declares the keys every notifier has (``topics``, ``default_priority``,
  ``timeout``, ``dedupe_window_s``, ``queue_dir``, ``max_queue``, ``backoff_*``,
  ``send_interval``);
* :class:`Notifier` is the daemon: it subscribes to ``<root>/notify/#`` (QoS 1, persistent
  session, manual acknowledgement), keeps the requests whose topic its ``topics`` filters match,
  drops repeats within ``dedupe_window_s``, queues, and sends from a timer in the main thread
  through the subclass's :meth:`Notifier.deliver`, which answers by returning (sent) or by
  raising :class:`TryLater` (backoff), :class:`HoldOff` (a quota: nothing is sent until a given
  time) or :class:`Refused` (dropped for good).

A channel module is then its config keys, :meth:`Notifier.deliver` and, if it holds a
connection, :meth:`Notifier.open_channel`/:meth:`Notifier.close_channel`.

Delivery is at least once and, but for one window, exactly once: a request leaves the disk only
after the channel accepted it. A request is sent twice only if the process dies (kill -9, power
cut) between the channel's acceptance and the removal of its file, or if the channel's answer
is lost on the way back (a timeout after the server acted).
"""

from __future__ import annotations

import abc
import contextlib
import email.utils
import json
import math
import re
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from paho.mqtt.client import topic_matches_sub

from .bus import Message
from .config import BaseConfig, ConfigError, setting
from .daemon import Daemon, state_directory
from .durable import StateError, atomic_write, fsync_directory, read_json
from .topics import SEGMENT, Reject, clip_text, shown

#: Limits on one request (characters): Pushover's, kept for every channel (contract section 6).
MAX_MESSAGE = 1024
MAX_TITLE = 250
#: requests remembered for dedupe_window_s (the oldest forgotten first beyond)
MAX_RECENT = 1000
#: Longest stretch the sender spends in one run before letting the heartbeat through.
SEND_BUDGET_S = 5.0
#: the highest priority of the contract's scale (-2..2): Pushover's "emergency"
EMERGENCY = 2

#: characters that end a line somewhere (str.splitlines' set): never inside a header
_LINE_BREAKS = re.compile(r"[\r\n\v\f\x1c\x1d\x1e\x85\u2028\u2029]+")


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Request:
    """One notification request, as queued.

    ``uid`` names the request for good (a resent e-mail keeps its Message-ID); a queue file of
    an earlier version has none, and gets one made of its ``seq`` and ``ts``.
    """

    seq: int
    topic: str
    message: str
    title: str | None
    priority: int
    ts: float
    uid: str = field(default="", compare=False)

    @property
    def key(self) -> tuple[str | None, str, int]:
        return (self.title, self.message, self.priority)

    @property
    def segment(self) -> str:
        """The ``<topic>`` of ``<root>/notify/<topic>`` (``monitor``)."""
        return self.topic.rsplit("/", 1)[-1]

    @property
    def ident(self) -> str:
        return self.uid or f"{self.seq}-{self.ts:.3f}"

    def record(self) -> dict[str, Any]:
        record = {"seq": self.seq, "topic": self.topic, "title": self.title,
                  "message": self.message, "priority": self.priority, "ts": self.ts}
        if self.uid:
            record["uid"] = self.uid
        return record

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> Request:
        return cls(seq=int(data["seq"]), topic=str(data["topic"]), message=str(data["message"]),
                   title=None if data.get("title") is None else str(data["title"]),
                   priority=int(data["priority"]), ts=float(data["ts"]),
                   uid=str(data.get("uid") or ""))

    def describe(self) -> str:
        text = self.title or self.message
        return f"#{self.seq} {text[:60]!r} (from {self.topic})"


def describe(batch: Sequence[Request]) -> str:
    """A request's description, or a batch's (``3 requests #4..#6``)."""
    if len(batch) == 1:
        return batch[0].describe()
    return f"{len(batch)} requests #{batch[0].seq}..#{batch[-1].seq}"


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


def one_line(text: str) -> str:
    """``text`` with every line break (CR, LF and the rest of Unicode's) made one space: what
    goes into a header (an e-mail's Subject, an HTTP header), where a line break would start a
    header of the sender's choosing."""
    return _LINE_BREAKS.sub(" ", text).strip()


def retry_after(headers: Any, now: float) -> float | None:
    """Seconds an answer's ``Retry-After`` header asks to wait (seconds or an HTTP date), or
    None when there is none or it cannot be read."""
    value = headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        with contextlib.suppress(TypeError, ValueError):
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - now)
    return None


# --------------------------------------------------------------------------- on-disk queue


class RequestQueue:
    """Requests waiting to be sent: one JSON file each, ``<queue_dir>/<seq>.json``.

    Thread-safe: the MQTT thread appends, the main thread reads the head and removes it.

    A file per request (:func:`pihub.durable.atomic_write`: whole or absent after a power cut),
    not a :class:`pihub.durable.RecordLog`: a few requests a day, each with its own fate (sent,
    dropped as refused or on overflow, kept for a retry), so removing one is an unlink (the
    directory fsync'd, so a sent request does not come back) with no compaction, an unreadable
    file costs that request only, and an operator can read or delete the queue with ``ls`` and
    ``cat``. The format is the one notify-pushover's earlier versions wrote (plus an optional
    ``uid``), so a queue left by them is sent.
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

    def remove(self, *items: Request) -> None:
        """Forget ``items`` and delete their files, with one directory fsync."""
        with self._lock:
            for item in items:
                if item in self._items:
                    self._items.remove(item)
        for item in items:
            self._unlink(item)
        self._sync()

    def items(self) -> list[Request]:
        with self._lock:
            return list(self._items)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


# --------------------------------------------------------------------------- channel answers


class TryLater(Exception):
    """The channel could not take the request now (network, timeout, 5xx, an odd answer): it
    stays at the head of the queue, tried again after a backoff (``retries``)."""


class HoldOff(Exception):
    """The channel asks to send nothing for a while (a quota, HTTP 429): the queue waits
    ``wait_s`` seconds (None: ``backoff_max``), said by ``source`` (``quota_waits``)."""

    def __init__(self, why: str, wait_s: float | None, source: str) -> None:
        super().__init__(why)
        self.wait_s = wait_s
        self.source = source


class Refused(Exception):
    """The channel refused the request for good (a 4xx, a 5xx SMTP reply): it is dropped,
    logged with the channel's words (``failed``, ``errors``)."""


# --------------------------------------------------------------------------- config


def _check_topics(topics: list[str]) -> None:
    for i, topic in enumerate(topics):
        if topic not in ("#", "+") and not SEGMENT.match(topic):
            raise ConfigError(f"topics[{i}]", "expected a notify topic segment "
                                              f"([a-z0-9_-]+), '+' or '#', got {topic!r}")
    if not topics:
        raise ConfigError("topics", "must list at least one filter (['#'] takes every request)")
    if len(set(topics)) != len(topics):
        raise ConfigError("topics", f"lists a filter twice: {topics}")
    if len(topics) > 1 and {"#", "+"} & set(topics):
        raise ConfigError("topics", f"'#' and '+' take every request; list them alone, got "
                                    f"{topics}")


@dataclass(kw_only=True)
class NotifierConfig(BaseConfig):
    """The keys every notifier has; a channel adds its own (and may re-declare a default)."""

    topics: list[str] = setting(
        ["#"], "Which requests this notifier sends: filters on <topic_root>/notify/<topic>, "
               "each a topic segment (monitor), or '+'/'#' for every request. The monitor "
               "publishes on its notify_topic and each rule's.",
    )
    default_priority: int = setting(
        0, "Priority of a request that names none (-2 lowest .. 2 emergency).", min=-2, max=2
    )
    timeout: float = setting(10.0, "Seconds to wait for the channel's answer to one request.",
                             min=0.5, max=120)
    dedupe_window_s: float = setting(
        300.0, "Requests identical in title, message and priority to one accepted less than this "
               "many seconds before are sent once; 0 sends every one.",
        min=0, max=86400,
    )
    queue_dir: str | None = setting(
        None, "Directory of the on-disk queue; null means $STATE_DIRECTORY (set by systemd's "
              "StateDirectory=), else /var/lib/pihub-<daemon>.",
    )
    max_queue: int = setting(
        1000, "Requests kept while the channel is unreachable; the oldest go first when full.",
        min=1, max=1000000,
    )
    backoff_min: float = setting(
        5.0, "First wait, seconds, after a network error or a server error.", min=0.1, max=3600,
    )
    backoff_max: float = setting(
        300.0, "Longest wait, seconds, between two tries of a failing request.", min=1, max=86400
    )
    send_interval: float = setting(
        0.5, "Seconds between two looks at the queue for requests to send.", min=0.05, max=60
    )

    def check(self) -> None:
        _check_topics(self.topics)
        if self.backoff_max < self.backoff_min:
            raise ConfigError("backoff_max", f"must be >= backoff_min ({self.backoff_min:g})")


NC = TypeVar("NC", bound=NotifierConfig)

#: keys of NotifierConfig a SIGHUP applies at once
RELOADABLE = frozenset({"topics", "default_priority", "timeout", "dedupe_window_s", "max_queue",
                        "backoff_min", "backoff_max"})


# --------------------------------------------------------------------------- the daemon


class Notifier(Daemon[NC], abc.ABC):
    """A daemon that sends the notification requests to one channel (module docstring)."""

    #: the channel's name in log lines ("Pushover", "ntfy", "SMTP")
    channel: ClassVar[str] = ""
    persistent_session = True
    manual_ack = True

    def __init__(self, config: NC, config_path: str | None = None) -> None:
        super().__init__(config, config_path)
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
        self._lock = threading.Lock()  # guards _recent (MQTT thread) and secrets on reload
        self._recent: dict[tuple[str | None, str, int], float] = {}
        # sender state: main thread only
        self._hold_until = 0.0
        self._failures = 0

    # ------------------------------------------------------------------ for channels

    def open_channel(self) -> None:
        """Make what :meth:`deliver` needs (an HTTP session); called once in ``setup``."""

    def close_channel(self) -> None:
        """Release it; called once at stop."""

    @abc.abstractmethod
    def deliver(self, batch: list[Request]) -> str:
        """Hand ``batch`` (oldest first; one request unless :meth:`next_batch` says otherwise)
        to the channel. Return what the channel said (its id for it) once it **accepted** the
        batch; raise :class:`TryLater`, :class:`HoldOff` or :class:`Refused` otherwise."""

    def next_batch(self, now: float) -> list[Request]:
        """What to send next (``now``: monotonic seconds): the head of the queue. A channel
        that sends digests returns more, or nothing while its window is open."""
        head = self.queue.head()
        return [] if head is None else [head]

    def sent(self, batch: list[Request]) -> None:
        """Called after ``batch`` was accepted and removed from the queue."""

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
                             "%s request delays heartbeats and the systemd watchdog",
                             self.config.timeout, self.config.heartbeat_interval, self.channel)
        self.open_channel()
        self.subscribe(self.topics.sub("notify", "#"), self.on_request, qos=1)
        self.every(self.config.send_interval, self.send_pending, name="send")

    def shutdown(self) -> None:
        left = len(self.queue)
        if left:
            self.log.info("%d request(s) not sent yet stay queued in %s", left, self.queue_dir)
        self.close_channel()

    def heartbeat_extra(self) -> dict[str, Any]:
        return {"queued": len(self.queue)}

    def reload(self, new: NC, changed: set[str]) -> set[str]:
        """The shared keys; a channel adds its own to what this returns."""
        return changed & RELOADABLE

    # ------------------------------------------------------------------ MQTT thread

    def routed(self, topic: str) -> bool:
        """Whether ``topic`` (``<root>/notify/...``) is one of this notifier's ``topics``."""
        relative = topic[len(self.topics.sub("notify", "")):]
        return any(topic_matches_sub(f, relative) for f in self.config.topics)

    def on_request(self, msg: Message) -> None:
        if not self.routed(msg.topic):
            # another channel's request (topics); subscribed to notify/# all the same, so that
            # a changed `topics` leaves no stale subscription in the persistent session
            self.count("not_routed")
            self.log.debug("request on %s is not for this notifier (topics: %s)", msg.topic,
                           self.config.topics)
            msg.ack()
            return
        self.topics.split(msg.topic, "notify", 1)
        if msg.retain:
            raise Reject(f"retained message on {msg.topic}: notification requests must not be "
                         "retained (it would be sent again at every restart)")
        config = self.config
        message, title, priority, ts = parse_request(msg.topic, msg.json(),
                                                     config.default_priority, time.time())
        if len(message) > MAX_MESSAGE or (title and len(title) > MAX_TITLE):
            self.count("truncated")
            self.log.warning("request on %s is longer than a notification may be (message "
                             "%d/%d, title %d/%d characters); shortened", msg.topic,
                             len(message), MAX_MESSAGE, len(title or ""), MAX_TITLE)
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
        item = Request(self.queue.next_seq(), msg.topic, message, title, priority, ts,
                       uid=uuid.uuid4().hex)
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
            batch = self.next_batch(now)
            if not batch:
                return
            self._send(batch)

    def _send(self, batch: list[Request]) -> None:
        try:
            said = self.deliver(batch)
        except TryLater as exc:
            self._retry_later(batch, str(exc))
        except HoldOff as exc:
            wait = self.config.backoff_max if exc.wait_s is None else exc.wait_s
            self._hold_until = time.monotonic() + wait
            self.count("quota_waits")
            self.log.warning("%s; holding %d queued request(s) for %.0f s (%s)", exc,
                             len(self.queue), wait, exc.source)
        except Refused as exc:
            self.queue.remove(*batch)
            self._failures = 0
            self.count("failed", len(batch))
            self.count("errors")
            self.log.error("%s refused %s with %s; dropped", self.channel, describe(batch), exc)
        else:
            self.queue.remove(*batch)
            self._failures = 0
            self.count("sent", len(batch))
            self.log.info("sent %s, priority %d (%s)", describe(batch),
                          max(r.priority for r in batch), said)
            self.sent(batch)

    def _retry_later(self, batch: list[Request], why: str) -> None:
        self._failures += 1
        cfg = self.config
        delay = min(cfg.backoff_max, cfg.backoff_min * 2 ** min(self._failures - 1, 30))
        self._hold_until = time.monotonic() + delay
        self.count("retries")
        self.log.warning("%s; %s stays queued, try %d again in %.1f s", why, describe(batch),
                         self._failures + 1, delay)
