"""What the page shows: the hub's retained state, kept in memory, bounded, and its changes.

The MQTT handler (paho's thread) calls :meth:`State.on_message`; the HTTP threads read
:meth:`State.snapshot` and listen for changes (:class:`Client`, one per open page). Every item
is a plain JSON-able dict keyed by ``(kind, key)``:

=============  ==========================  ==================================================
kind           key                         from
=============  ==========================  ==================================================
values         ``<location>/<quantity>``   ``<root>/data/<location>/<quantity>`` (checked)
daemons        ``<daemon>``                ``<root>/<daemon>/status``, ``/meta`` and the
                                           monitor's ``<root>/monitor/daemons/<daemon>``
daemons        ``<daemon>@<host>``         a satellite's: ``<root>/host/<host>/<daemon>/...``
                                           and ``<root>/monitor/host/<host>/<daemon>``
hosts          ``<host>``                  a satellite's ``<root>/host/<host>/bridge/state``
                                           and the monitor's ``<root>/monitor/hosts/<host>``
boards         ``<board>/<item>``          ``<root>/display/<board>/<item>`` (a JSON object)
rules          ``<rule>``                  ``<root>/monitor/rules/<rule>``
notifications  a sequence number           ``<root>/notify/<topic>`` (the last N, not keyed)
=============  ==========================  ==================================================

A change is one event ``{"kind", "key", "item"}`` (``item`` null when it is gone), encoded
once and offered to every client; a client keeps only the latest event per ``(kind, key)``
(:class:`Client`), so a slow page never makes the daemon hold a backlog.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pihub.bus import Message
from pihub.topics import (
    DAEMON_NAME,
    HOST,
    SEGMENT,
    Reject,
    Topics,
    clip_text,
    decode_json,
    decode_measurement,
    identity,
    measurement_fields,
    shown,
)

#: first-level topics that are not daemons
RESERVED = frozenset({"data", "display", "notify", "cmd", "sim", "monitor", HOST})
#: exact topics of one satellite daemon's ``publishes`` kept (to tell whose an output is)
MAX_PUBLISHES = 256
#: characters kept of a notification's title / message (the notifiers' limits)
MAX_TITLE, MAX_MESSAGE = 250, 1024
#: a daemon's metadata event, a monitor record, a board item: bytes accepted
MAX_RECORD_BYTES = 16384
#: gaps between a series' last values kept: its usual interval is the longest of them (an
#: input that changes now and then is republished every sensor-gpio ``interval``), known from
#: two gaps on
GAPS = 8

Event = tuple[str, str, bytes]  # kind, key, encoded event


def _encode(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True)
class Limits:
    series: int = 2000
    daemons: int = 256
    board_items: int = 500
    rules: int = 256
    notifications: int = 100


class Client:
    """One open page's queue: the latest event per (kind, key), in the order first queued.

    ``offer`` is called from the MQTT thread and never blocks; a page whose queue holds more
    than ``max_pending`` distinct items, or whose oldest queued event waits longer than
    ``max_lag`` seconds, is dropped (its stream is closed; the browser reconnects and gets a
    fresh snapshot).
    """

    def __init__(self, max_pending: int, max_lag: float, peer: str = "") -> None:
        self.max_pending = max_pending
        self.max_lag = max_lag
        self.peer = peer
        self._cond = threading.Condition()
        self._pending: collections.OrderedDict[tuple[str, str], bytes] = (
            collections.OrderedDict())
        self._oldest = 0.0
        self.dropped: str | None = None
        self.closed = False

    def offer(self, kind: str, key: str, data: bytes) -> bool:
        """Queue an event; False if this made the client fall behind (now dropped)."""
        with self._cond:
            if self.dropped or self.closed:
                return True
            now = time.monotonic()
            if not self._pending:
                self._oldest = now
            elif now - self._oldest > self.max_lag:
                self.dropped = f"fell behind by {now - self._oldest:.1f} s"
            self._pending[(kind, key)] = data
            if len(self._pending) > self.max_pending:
                self.dropped = f"more than {self.max_pending} changes queued"
            self._cond.notify()
            return self.dropped is None

    def take(self, timeout: float) -> list[bytes]:
        """Wait up to ``timeout`` for events and take them all (empty on timeout)."""
        with self._cond:
            if not self._pending and not self.dropped and not self.closed:
                self._cond.wait(timeout)
            out = list(self._pending.values())
            self._pending.clear()
            return out

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify()


class State:
    def __init__(self, topics: Topics, limits: Limits,
                 on_refused: Callable[[str, str, int], None] | None = None,
                 own_host: str = "", outputs_daemon: str = "sensor-gpio") -> None:
        self.topics = topics
        #: this hub's host (``host_name``) and the daemon whose outputs the page switches
        self.own_host = own_host
        self.outputs_daemon = outputs_daemon
        #: satellites' links: ``bridge`` (its state, ``1``/``0``) and the monitor's record
        self.hosts: dict[str, dict[str, Any]] = {}
        #: a satellite's ``outputs_daemon``'s exact data topics -> that satellite
        self._output_hosts: dict[str, str] = {}
        self.limits = limits
        self._on_refused = on_refused
        self._lock = threading.Lock()
        self.values: dict[str, dict[str, Any]] = {}
        self._gaps: dict[str, list[float]] = {}
        self.daemons: dict[str, dict[str, Any]] = {}
        self.boards: dict[str, dict[str, Any]] = {}
        self.rules: dict[str, dict[str, Any]] = {}
        self.notifications: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=limits.notifications)
        self.summary: dict[str, Any] | None = None
        self._notify_seq = 0
        self._clients: set[Client] = set()
        self.dropped = 0

    # ------------------------------------------------------------------ clients

    def attach(self, client: Client) -> bytes:
        """Register a page; returns the snapshot it starts from (taken under the same lock as
        the changes, so no change falls between the snapshot and the stream)."""
        with self._lock:
            self._clients.add(client)
            return _encode(self._snapshot_locked())

    def detach(self, client: Client) -> None:
        with self._lock:
            self._clients.discard(client)
        client.close()

    def clients(self) -> int:
        with self._lock:
            return len(self._clients)

    def close_all(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients), set()
        for client in clients:
            client.close()

    def _emit(self, kind: str, key: str, item: Any) -> None:
        """Called with the lock held."""
        data = _encode({"kind": kind, "key": key, "item": item})
        for client in list(self._clients):
            if not client.offer(kind, key, data):
                self.dropped += 1

    # ------------------------------------------------------------------ reading

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return self._snapshot_locked()

    def _snapshot_locked(self) -> dict[str, Any]:
        return {
            "ts": round(time.time(), 3),
            "values": dict(self.values),
            "daemons": dict(self.daemons),
            "hosts": self._hosts_locked(),
            "boards": dict(self.boards),
            "rules": dict(self.rules),
            "notifications": list(self.notifications),
        }

    def _hosts_locked(self) -> list[dict[str, Any]]:
        """The daemons grouped by host: this hub's first, then each satellite by name, with its
        link (``bridge``: ``1``/``0``/null; ``monitor``: the monitor's record of it or null)."""
        sites = sorted({d["host"] for d in self.daemons.values() if d["satellite"]}
                       | set(self.hosts))
        out = [{"host": self.own_host, "satellite": False, "bridge": None, "monitor": None,
                "daemons": sorted(k for k, d in self.daemons.items() if not d["satellite"])}]
        for site in sites:
            link = self.hosts.get(site, {})
            out.append({"host": site, "satellite": True, "bridge": link.get("bridge"),
                        "monitor": link.get("monitor"),
                        "daemons": sorted(k for k, d in self.daemons.items()
                                          if d["satellite"] and d["host"] == site)})
        return out

    def output_host(self, location: str, quantity: str) -> str | None:
        """The satellite whose ``outputs_daemon`` declares ``data/<location>/<quantity>`` (its
        meta's ``publishes``); None: this hub's (or nobody's)."""
        with self._lock:
            return self._output_hosts.get(self.topics.data(location, quantity))

    def count(self, kind: str) -> int:
        with self._lock:
            return len(getattr(self, kind))

    # ------------------------------------------------------------------ MQTT

    def on_message(self, msg: Message) -> None:
        """Route one message under the root; Reject (logged, counted) when it breaks the
        contract. Commands and simulated inputs are not shown and are ignored."""
        prefix = self.topics.root + "/"
        if not msg.topic.startswith(prefix):
            raise Reject(f"topic {shown(msg.topic)} is not under {prefix}")
        parts = msg.topic[len(prefix):].split("/")
        first = parts[0]
        if first in ("cmd", "sim"):
            return
        if first == HOST:
            self._on_host(msg, parts)
            return
        if first == "data":
            self._on_data(msg)
        elif first == "display":
            self._on_board(msg)
        elif first == "notify":
            self._on_notify(msg, parts)
        elif first == "monitor" and len(parts) > 1 and parts[1] in ("daemons", "rules",
                                                                     "summary", HOST, "hosts"):
            self._on_monitor(msg, parts)
        elif len(parts) == 2 and parts[1] in ("status", "meta") and DAEMON_NAME.match(first):
            self._on_daemon(msg, first, parts[1])
        else:
            raise Reject(f"topic {shown(msg.topic)} is none of data, display, notify, cmd, sim, "
                         "monitor, host or <daemon>/status|meta")

    def _on_host(self, msg: Message, parts: list[str]) -> None:
        """A satellite's mirror (contract §2, "Fleet"): ``host/<host>/<daemon>/status|meta``,
        ``host/<host>/bridge/state``; its commands (``host/<host>/cmd/...``) are not shown."""
        if len(parts) >= 3 and parts[2] == "cmd":
            return
        if len(parts) == 4 and SEGMENT.match(parts[1]):
            site = parts[1]
            if parts[2:] == ["bridge", "state"]:
                text = msg.text() if msg.payload else None
                if text not in ("0", "1", None):
                    raise Reject(f"payload on {msg.topic} must be 0 or 1, got {shown(text)}")
                self._update_host(site, msg.topic, bridge=text)
                return
            if parts[3] in ("status", "meta") and DAEMON_NAME.match(parts[2]) and (
                    parts[2] not in RESERVED):
                self._on_daemon(msg, parts[2], parts[3], site)
                return
        raise Reject(f"topic {shown(msg.topic)} is none of {self.topics.root}/host/<host>/"
                     "<daemon>/status|meta, /bridge/state or /cmd/...")

    def _update_host(self, site: str, topic: str, **fields: Any) -> None:
        with self._lock:
            if site not in self.hosts and len(self.hosts) >= self.limits.daemons:
                self._refuse("hosts", topic, self.limits.daemons)
                return
            item = self.hosts.setdefault(site, {"host": site, "bridge": None, "monitor": None})
            item.update(fields)
            self._emit("hosts", site, dict(item))

    def _on_data(self, msg: Message) -> None:
        location, quantity = self.topics.split(msg.topic, "data", 2)
        key = f"{location}/{quantity}"
        if not msg.payload:  # a retained value cleared
            self._remove("values", key)
            with self._lock:
                self._gaps.pop(key, None)
            return
        data = decode_measurement(msg.payload, msg.topic)
        value, unit, ts = measurement_fields(data, msg.topic)
        item: dict[str, Any] = {"location": location, "quantity": quantity, "value": value,
                                "unit": unit, "ts": ts, "interval_s": None}
        kind = data.get("kind")
        if isinstance(kind, str):
            item["kind"] = clip_text(kind, 32)
        with self._lock:
            old = self.values.get(key)
            if old is None and len(self.values) >= self.limits.series:
                self._refuse("values", msg.topic, self.limits.series)
                return
            gaps = self._gaps.pop(key, [])
            if old is not None and ts > old["ts"]:
                gaps = [*gaps[-(GAPS - 1):], ts - old["ts"]]
            if len(gaps) >= 2:
                item["interval_s"] = round(max(gaps), 3)
            self._gaps[key] = gaps
            self.values[key] = item
            if item.get("kind") == "output":
                site = self._output_hosts.get(msg.topic)
                item["host"], item["target"] = site, identity(quantity, site)
            self._emit("values", key, item)

    def _on_board(self, msg: Message) -> None:
        board, name = self.topics.split(msg.topic, "display", 2)
        key = f"{board}/{name}"
        if not msg.payload:
            self._remove("boards", key)
            return
        data = self._record(msg)
        item = {"board": board, "item": name, "data": data}
        self._put("boards", key, item, self.limits.board_items, msg.topic)

    def _on_notify(self, msg: Message, parts: list[str]) -> None:
        if len(parts) != 2 or not SEGMENT.match(parts[1]):
            raise Reject(f"topic {shown(msg.topic)} does not match "
                         f"{self.topics.root}/notify/<[a-z0-9_-]+>")
        if not msg.payload:
            return
        data = self._record(msg)
        message = data.get("message")
        if not isinstance(message, str) or not message:
            raise Reject(f"payload on {msg.topic}: 'message' must be a non-empty string, got "
                         f"{shown(message)}")
        title = data.get("title")
        priority = data.get("priority")
        ts = data.get("ts")
        item = {
            "topic": parts[1],
            "title": clip_text(title, MAX_TITLE) if isinstance(title, str) else None,
            "message": clip_text(message, MAX_MESSAGE),
            "priority": priority if type(priority) is int else None,
            "ts": ts if isinstance(ts, int | float) and not isinstance(ts, bool) and ts > 0
            else round(time.time(), 3),
            "seen": round(time.time(), 3),
        }
        for extra in ("daemon", "rule", "state"):
            if isinstance(data.get(extra), str):
                item[extra] = clip_text(data[extra], 64)
        with self._lock:
            self._notify_seq += 1
            item["seq"] = self._notify_seq
            self.notifications.append(item)
            self._emit("notifications", str(self._notify_seq), item)

    def _on_monitor(self, msg: Message, parts: list[str]) -> None:
        if parts[1] == "summary" and len(parts) == 2:
            if msg.payload:
                with self._lock:
                    self.summary = self._record(msg)
            return
        if parts[1] == HOST and len(parts) == 4 and SEGMENT.match(parts[2]) and (
                DAEMON_NAME.match(parts[3])):
            if msg.payload:  # a satellite's daemon's record
                record = self._record(msg)
                verdict = {k: record.get(k) for k in ("state", "since", "reason", "flapping")}
                self._update_daemon(parts[3], msg.topic, site=parts[2], monitor=verdict)
            return
        if parts[1] == "hosts" and len(parts) == 3 and SEGMENT.match(parts[2]):
            if msg.payload:  # a satellite's link as the monitor judges it
                record = self._record(msg)
                self._update_host(parts[2], msg.topic, monitor={
                    k: record.get(k) for k in ("state", "since")})
            return
        if len(parts) != 3 or not SEGMENT.match(parts[2]):
            raise Reject(f"topic {shown(msg.topic)} does not match "
                         f"{self.topics.root}/monitor/{parts[1]}/<[a-z0-9_-]+>")
        name = parts[2]
        if parts[1] == "rules":
            if not msg.payload:
                self._remove("rules", name)
                return
            self._put("rules", name, {"rule": name, **self._record(msg)}, self.limits.rules,
                      msg.topic)
            return
        if not msg.payload:
            return
        record = self._record(msg)
        verdict = {k: record.get(k) for k in ("state", "since", "reason", "flapping")}
        self._update_daemon(name, msg.topic, monitor=verdict)

    def _on_daemon(self, msg: Message, name: str, what: str, site: str | None = None) -> None:
        if not msg.payload:
            return
        if what == "status":
            status = msg.text()
            if status not in ("online", "offline"):
                raise Reject(f"payload on {msg.topic} must be online or offline, got "
                             f"{shown(status)}")
            self._update_daemon(name, msg.topic, site=site, status=status,
                                status_ts=round(time.time(), 3))
            return
        meta = self._record(msg)
        if site is not None and name == self.outputs_daemon:
            self._learn_outputs(site, meta.get("publishes"))
        counters = meta.get("counters")
        fields: dict[str, Any] = dict.fromkeys(("event", "host", "pid", "version", "ts",
                                                 "uptime_s", "interval_s", "rss_kb"))
        # the standard keys and a daemon's own scalar ones (a spool's size, clients, ...)
        for k, v in list(meta.items())[:48]:
            if isinstance(v, str):
                fields[str(k)[:64]] = clip_text(v, 64)
            elif v is None or isinstance(v, int | float):
                fields[str(k)[:64]] = v
        fields["counters"] = ({str(k)[:64]: v for k, v in list(counters.items())[:64]
                               if type(v) is int} if isinstance(counters, dict) else {})
        self._update_daemon(name, msg.topic, site=site, meta=fields)

    def _learn_outputs(self, site: str, publishes: Any) -> None:
        """A satellite's outputs daemon's declaration: which data topics are its (and so which
        outputs are switched through ``<root>/host/<site>/cmd/...``)."""
        if not isinstance(publishes, list):
            return
        prefix = self.topics.root + "/data/"
        mine = [t for t in publishes[:MAX_PUBLISHES]
                if isinstance(t, str) and t.startswith(prefix) and "+" not in t and "#" not in t]
        with self._lock:
            for topic in [t for t, h in self._output_hosts.items() if h == site]:
                del self._output_hosts[topic]
            for topic in mine:
                if len(self._output_hosts) < self.limits.series:
                    self._output_hosts[topic] = site
            for key, value in list(self.values.items()):
                if value.get("kind") == "output":
                    self._mark_output(key, value)

    def _mark_output(self, key: str, item: dict[str, Any]) -> None:
        """Set an output's ``host`` (its satellite, or null: this hub's) and ``target`` (what
        ``POST /api/outputs/<target>`` takes: ``<output>`` or ``<output>@<host>``); emit it if
        that changed. Called with the lock held."""
        site = self._output_hosts.get(f"{self.topics.root}/data/{key}")
        target = identity(item["quantity"], site)
        if item.get("target") != target:
            self.values[key] = item = {**item, "host": site, "target": target}
            self._emit("values", key, item)

    def _update_daemon(self, name: str, topic: str, site: str | None = None,
                       **fields: Any) -> None:
        key = identity(name, site)
        with self._lock:
            old = self.daemons.get(key)
            if old is None and len(self.daemons) >= self.limits.daemons:
                self._refuse("daemons", topic, self.limits.daemons)
                return
            item = dict(old) if old else {"daemon": key, "name": name,
                                          "host": site or self.own_host,
                                          "satellite": site is not None, "status": None,
                                          "status_ts": None, "meta": None, "monitor": None}
            item.update(fields)
            self.daemons[key] = item
            self._emit("daemons", key, item)

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _record(msg: Message) -> dict[str, Any]:
        if len(msg.payload) > MAX_RECORD_BYTES:
            raise Reject(f"payload on {msg.topic} is {len(msg.payload)} bytes, more than the "
                         f"{MAX_RECORD_BYTES} the web page keeps")
        data = decode_json(msg.payload, msg.topic)
        if not isinstance(data, dict):
            raise Reject(f"payload on {msg.topic} must be a JSON object, got "
                         f"{type(data).__name__}")
        return data

    def _put(self, kind: str, key: str, item: dict[str, Any], limit: int, topic: str) -> None:
        with self._lock:
            table: dict[str, dict[str, Any]] = getattr(self, kind)
            if key not in table and len(table) >= limit:
                self._refuse(kind, topic, limit)
                return
            table[key] = item
            self._emit(kind, key, item)

    def _remove(self, kind: str, key: str) -> None:
        with self._lock:
            table: dict[str, dict[str, Any]] = getattr(self, kind)
            if table.pop(key, None) is not None:
                self._emit(kind, key, None)

    def _refuse(self, kind: str, topic: str, limit: int) -> None:
        """A new item beyond its limit: the daemon counts and logs it (without flooding the
        log, :meth:`pihub.daemon.Daemon.refuse_new_series`); nothing is kept."""
        if self._on_refused is not None:
            self._on_refused(kind, topic, limit)
