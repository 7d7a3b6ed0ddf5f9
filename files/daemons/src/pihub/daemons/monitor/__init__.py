"""pihub-monitor: watch every daemon's heartbeat and a few measurements; ask for notifications.

Reads (retained values included, so a fresh monitor sees the whole constellation at once):

* ``<root>/+/status`` (``online`` / ``offline``) and ``<root>/+/meta`` (metadata events) of
  every daemon but itself;
* ``<root>/data/#`` when threshold rules are configured;
* its own retained records under ``<root>/monitor/daemons/+`` and ``<root>/monitor/rules/+``,
  once at start, so that a restarted monitor does not repeat what it already said.

A daemon's state, evaluated every ``check_interval`` seconds in the main thread:

* ``stopped`` - its last metadata event is ``stopping`` (a clean stop);
* ``down``    - its status is ``offline`` without a ``stopping`` event (the Last Will: the
  connection was lost), or its last heartbeat is older than ``stale_factor`` (2.5) x its own
  ``interval_s``;
* ``up``      - otherwise, once a ``starting`` or ``heartbeat`` event has been seen. A live
  (not retained) heartbeat after an ``offline`` status brings the daemon up again;
* ``unknown`` - only a status, no metadata event yet.

Writes:

* ``<root>/notify/<notify_topic>`` (not retained) - a notification request (contract §2) on every
  state change, with extra keys ``daemon``, ``host``, ``state``, ``previous``, ``since``,
  ``reason``, ``flapping``; and on every threshold rule that fires or clears, with extra keys
  ``rule``, ``topic``, ``state`` (``firing`` / ``cleared``), ``value``, ``unit``, ``since``::

      {"title": "sensor-system DOWN on pi", "message": "pihub-sensor-system on pi is down
       since 2024-05-01 12:00:03: connection lost (Last Will offline).", "priority": 1,
       "ts": 1714557603.2, "daemon": "sensor-system", "host": "pi", "state": "down",
       "previous": "up", "since": 1714557603.2, "reason": "connection lost (Last Will
       offline)", "flapping": 0}

* ``<root>/monitor/daemons/<daemon>`` (retained) - one daemon's state, last heartbeat and
  counters; on every state change and every ``summary_interval``;
* ``<root>/monitor/rules/<rule>`` (retained) - one rule's per-series state;
* ``<root>/monitor/summary`` (retained) - every daemon's state in one object.

The first view of a daemon says nothing unless it is down (no "up" storm at start). A daemon
that changes state more than ``flap_max`` times within ``flap_window_s`` gets one summary
notification when the window closes, stating the final state, and one per window while it
keeps flapping.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from pihub.bus import Message
from pihub.config import BaseConfig, ConfigError, setting
from pihub.daemon import Daemon
from pihub.topics import SEGMENT, Measurement, Reject, parse_measurement

UP, DOWN, STOPPED, UNKNOWN = "up", "down", "stopped", "unknown"
STATES = (UP, DOWN, STOPPED, UNKNOWN)
OK, PENDING, FIRING = "ok", "pending", "firing"
EVENTS = ("starting", "heartbeat", "stopping")
#: a witnessed offline status counts once it is this old (seconds) and the monitor still
#: has its own connection; a broker that shuts down sends every Last Will just before
OFFLINE_CONFIRM_S = 1.0
#: first-level topics that are not daemons (``<root>/notify/status`` is a notify topic)
RESERVED = frozenset({"data", "display", "notify", "cmd"})

DEFAULT_FIRE = "{name}: {location}/{quantity} is {value:g} {unit} ({condition})"
DEFAULT_CLEAR = "{name}: {location}/{quantity} is back to {value:g} {unit}"
TOPIC_FILTER = r"^(#|([a-z0-9_-]+|\+)/(#|[a-z0-9_-]+|\+)|([a-z0-9_-]+|\+)/#)$"


def when_text(ts: float | None) -> str:
    """A UNIX time as local ``YYYY-mm-dd HH:MM:SS`` (what a person reads in a notification)."""
    if ts is None:
        return "an unknown time"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _ts(value: float | None) -> float | None:
    """A time for a payload: milliseconds are plenty."""
    return None if value is None else round(value, 3)


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


# --------------------------------------------------------------------------- config


@dataclass(kw_only=True)
class Rule:
    name: str = setting(
        help="Rule name, lower-case [a-z0-9_-]+, unique; record: <root>/monitor/rules/<name>.",
        example="cellar_humidity", pattern=SEGMENT.pattern,
    )
    topic: str = setting(
        help="Topic filter under <topic_root>/data/: <location>/<quantity>, + and # allowed "
             "(e.g. +/humidity). Each matching series is watched on its own.",
        example="cellar/humidity", pattern=TOPIC_FILTER,
    )
    above: float | None = setting(None, "Fire when the value is above this; null: no upper limit.")
    below: float | None = setting(None, "Fire when the value is below this; null: no lower limit.")
    hysteresis: float = setting(
        0.0, "A firing rule clears only once the value is this far back inside the limit.", min=0
    )
    for_s: float = setting(
        0.0, "Seconds the value must stay beyond the limit before the rule fires.", min=0
    )
    priority: int = setting(0, "Priority of the firing notification (-2..2).", min=-2, max=2)
    clear_priority: int | None = setting(
        None, "Priority of the clearing notification; null: the lower of priority and 0.",
        min=-2, max=2,
    )
    title: str = setting(
        "{name}", "Title template. Fields: name, topic, location, quantity, value, unit, "
        "threshold, condition, above, below, hysteresis, for_s, since, state."
    )
    message: str = setting(DEFAULT_FIRE, "Message template of the firing notification.")
    clear_message: str = setting(DEFAULT_CLEAR, "Message template of the clearing notification.")
    notify_topic: str | None = setting(
        None, "Notify topic segment for this rule; null: the monitor's notify_topic.",
        pattern=SEGMENT.pattern,
    )

    def check(self) -> None:
        if self.above is None and self.below is None:
            raise ConfigError("above", "a rule needs above, below or both")
        if self.above is not None and self.below is not None and (
                self.below + self.hysteresis > self.above - self.hysteresis):
            raise ConfigError(
                "below", f"below + hysteresis ({self.below:g} + {self.hysteresis:g}) must not "
                f"exceed above - hysteresis ({self.above:g} - {self.hysteresis:g})"
            )
        sample = self.fields("+/+", "location", "quantity", 1.0, "unit", 1.0, "above 1", 0.0,
                             FIRING)
        for key in ("title", "message", "clear_message"):
            template = getattr(self, key)
            try:
                template.format(**sample)
            except (KeyError, IndexError, ValueError, TypeError, AttributeError) as exc:
                known = ", ".join(sample)
                raise ConfigError(key, f"template {template!r} does not format: "
                                       f"{type(exc).__name__}: {exc} (fields: {known})") from None

    def beyond(self, value: float) -> str | None:
        """``"above"``/``"below"`` when ``value`` breaks a limit, else None."""
        if self.above is not None and value > self.above:
            return "above"
        if self.below is not None and value < self.below:
            return "below"
        return None

    def cleared(self, value: float) -> bool:
        """True when ``value`` is back inside the limits by at least the hysteresis."""
        return ((self.above is None or value <= self.above - self.hysteresis)
                and (self.below is None or value >= self.below + self.hysteresis))

    def fields(self, topic: str, location: str, quantity: str, value: float, unit: str,
               threshold: float | None, condition: str, since: float, state: str
               ) -> dict[str, Any]:
        return {"name": self.name, "topic": topic, "location": location, "quantity": quantity,
                "value": value, "unit": unit, "threshold": threshold, "condition": condition,
                "above": self.above, "below": self.below, "hysteresis": self.hysteresis,
                "for_s": self.for_s, "since": when_text(since), "state": state}


EXAMPLE_RULES = [
    {"name": "cellar_humidity", "topic": "cellar/humidity", "above": 70, "hysteresis": 3,
     "for_s": 600, "priority": 0},
    {"name": "freezer_warm", "topic": "+/freezer_temp", "above": -12, "below": -30,
     "hysteresis": 1, "for_s": 300, "priority": 1,
     "message": "{location}: freezer at {value:.1f} {unit} ({condition}) since {since}"},
]


@dataclass(kw_only=True)
class Config(BaseConfig):
    notify_topic: str = setting(
        "monitor", "Daemon notifications go to <topic_root>/notify/<notify_topic>.",
        pattern=SEGMENT.pattern,
    )
    stale_factor: float = setting(
        2.5, "A daemon is down when its last heartbeat is older than stale_factor x its own "
        "interval_s (docs/contract.md: 2.5).", min=1, max=100,
    )
    check_interval: float = setting(
        1.0, "Seconds between two checks of heartbeat deadlines, rule durations and flapping "
        "windows.", min=0.05, max=60,
    )
    startup_grace: float = setting(
        3.0, "Seconds after (re)connecting spent collecting retained values before judging.",
        min=0, max=300,
    )
    summary_interval: float = setting(
        60.0, "Seconds between two refreshes of the retained records under "
        "<topic_root>/monitor/ (they are also sent on every change).", min=1, max=86400,
    )
    flap_window_s: float = setting(
        300.0, "Flapping window, seconds: at most flap_max state changes of one daemon are "
        "notified in a window; the rest are summed up in one notification when it closes. "
        "0 turns this off.", min=0, max=86400,
    )
    flap_max: int = setting(
        2, "State changes notified at once in a flapping window (2 lets one outage's down and "
        "up through; while a daemon keeps flapping it is one summary per window).", min=1,
        max=100,
    )
    priority_down: int = setting(1, "Priority of a 'down' notification (-2..2).", min=-2, max=2)
    priority_up: int = setting(0, "Priority of an 'up again' notification after a down.",
                               min=-2, max=2)
    priority_stopped: int = setting(
        -1, "Priority of a 'stopped' notification (a clean stop), and of the 'up' after it.",
        min=-2, max=2,
    )
    rules: list[Rule] = setting(
        [], "Threshold rules on measurements. Keys of a rule: name, topic (filter under "
        "<topic_root>/data/), above, below, hysteresis, for_s, priority, clear_priority, title, "
        "message, clear_message, notify_topic; see docs/monitor.md.", example=EXAMPLE_RULES,
    )

    def check(self) -> None:
        seen: set[str] = set()
        for index, rule in enumerate(self.rules):
            if rule.name in seen:
                raise ConfigError(f"rules[{index}].name", f"duplicate rule name {rule.name!r}")
            seen.add(rule.name)


# --------------------------------------------------------------------------- state


@dataclass
class Watched:
    """What the monitor knows about one daemon."""

    name: str
    host: str = ""
    status: str | None = None
    offline: bool = False
    offline_at: float | None = None
    offline_retained: bool = False
    offline_connection: int = 0
    last_event: str | None = None
    event_at: float | None = None
    last_beat: float | None = None
    interval_s: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    state: str = UNKNOWN
    since: float | None = None
    reason: str = ""
    seen: bool = False
    restored: dict[str, Any] | None = None
    transitions: int = 0
    notifications: int = 0
    held: int = 0
    rejected: int = 0
    window_end: float | None = None
    window_sent: int = 0
    window_held: int = 0
    flapping: bool = False


@dataclass
class Series:
    """One rule's view of one data topic."""

    state: str = OK
    since: float = 0.0
    value: float | None = None
    unit: str = ""
    ts: float | None = None
    crossed: str | None = None


Note = tuple[str, dict[str, Any]]  # (topic, notification request)


def evaluate(w: Watched, now: float, factor: float, listening_since: float = 0.0,
             connection: int = 0) -> tuple[str, float | None, str] | None:
    """State, since when, and why - from the facts gathered about one daemon.

    None means "not yet decided": a heartbeat deadline only runs while the monitor listens, so
    after the monitor's own start or reconnection every daemon gets its full deadline to be
    heard from (a Pi that boots, or a broker that restarts, does not make the whole
    constellation "down" for a moment). Meanwhile the daemon keeps its previous state.

    The same holds for an ``offline`` status the monitor did not witness on its current
    connection (retained, or received just before the monitor lost the broker itself: a
    stopping Mosquitto sends every client's Last Will first). A witnessed one counts once it
    is ``OFFLINE_CONFIRM_S`` old and the monitor is still connected.
    """
    if w.last_event == "stopping":
        return STOPPED, w.event_at, "stopped cleanly"
    deadline = factor * w.interval_s if w.interval_s else 0.0
    if w.offline:
        if not w.offline_retained and w.offline_connection == connection:
            if w.offline_at is not None and now - w.offline_at < OFFLINE_CONFIRM_S:
                return None
        elif now - listening_since <= deadline:
            return None  # offline while the monitor was not listening: give it time to return
        return DOWN, w.offline_at or w.last_beat or now, "connection lost (Last Will offline)"
    if w.last_beat is None or w.interval_s is None:
        return UNKNOWN, None, "no metadata event yet"
    if now - w.last_beat > deadline and now - listening_since <= deadline:
        return None
    if now - w.last_beat > deadline:
        return DOWN, w.last_beat, (f"no heartbeat for {now - w.last_beat:.0f} s (expected "
                                   f"every {w.interval_s:g} s)")
    return UP, w.last_beat, "heartbeat"


def parse_meta(topic: str, name: str, data: Any) -> dict[str, Any]:
    """Check a metadata event against docs/contract.md; raise Reject saying what is wrong."""
    if not isinstance(data, dict):
        raise Reject(f"meta on {topic} must be a JSON object, got {type(data).__name__}")
    if data.get("event") not in EVENTS:
        raise Reject(f"meta on {topic}: 'event' must be one of {', '.join(EVENTS)}, "
                     f"got {data.get('event')!r}")
    if data.get("daemon") != name:
        raise Reject(f"meta on {topic}: 'daemon' must be {name!r} (the topic's), "
                     f"got {data.get('daemon')!r}")
    if not isinstance(data.get("host"), str):
        raise Reject(f"meta on {topic}: 'host' must be a string, got {data.get('host')!r}")
    for key in ("ts", "interval_s"):
        value = data.get(key)
        if not _number(value) or value <= 0:  # type: ignore[operator]
            raise Reject(f"meta on {topic}: {key!r} must be a number > 0, got {value!r}")
    counters = data.get("counters", {})
    if not isinstance(counters, dict):
        raise Reject(f"meta on {topic}: 'counters' must be an object, got {counters!r}")
    return data


# --------------------------------------------------------------------------- the daemon


class Monitor(Daemon[Config]):
    name = "monitor"
    config_class = Config
    description = "Watch every pihub daemon's heartbeat and threshold rules; request notifications."

    def setup(self) -> None:
        self._lock = threading.Lock()
        self._daemons: dict[str, Watched] = {}
        self._rejected_unknown: dict[str, int] = {}
        self._series: dict[tuple[str, str], Series] = {}
        self._latest: dict[str, tuple[Measurement, float]] = {}
        self._restored_rules: dict[str, dict[str, Any]] = {}
        self._rule_counts: dict[str, dict[str, int]] = {}
        self._rules_dirty: set[str] = set()
        self._settled = False
        self._settle_until: float | None = None
        self._listening_since = 0.0
        self._connection_seen = 0
        self._data_subscribed = False
        self.subscribe(self.topics.sub("monitor", "daemons", "+"), self.on_own_daemon_record)
        self.subscribe(self.topics.sub("monitor", "rules", "+"), self.on_own_rule_record)
        self.subscribe(self.topics.sub("+", "status"), self.on_status)
        self.subscribe(self.topics.sub("+", "meta"), self.on_meta)
        self._subscribe_data_if_needed()
        self.every(self.config.check_interval, self.check)
        self.every(self.config.summary_interval, self.publish_records,
                   first_in=self.config.summary_interval)

    def _subscribe_data_if_needed(self) -> None:
        if self.config.rules and not self._data_subscribed:
            self._data_subscribed = True
            self.subscribe(self.topics.sub("data", "#"), self.on_data)

    def reload(self, new: Config, changed: set[str]) -> set[str]:
        live = {"notify_topic", "stale_factor", "flap_window_s", "flap_max", "priority_down",
                "priority_up", "priority_stopped", "rules"}
        applied = changed & live
        with self._lock:
            if "rules" in applied:
                old = {r.name: r for r in self.config.rules}
                keep = {r.name for r in new.rules if old.get(r.name) == r}
                self._series = {k: v for k, v in self._series.items() if k[0] in keep}
            # the base class replaces self.config after this returns; rules must be consistent
            # for the handlers in between, so swap them here under the lock
            self.config.rules = new.rules
            for key in applied - {"rules"}:
                setattr(self.config, key, getattr(new, key))
        self._subscribe_data_if_needed()
        return applied

    # ------------------------------------------------------------------ MQTT handlers (paho)

    def _daemon_of(self, topic: str, kind: str) -> str | None:
        prefix = self.topics.root + "/"
        name = topic[len(prefix):-len(kind) - 1] if topic.startswith(prefix) else ""
        if name == self.name or name in RESERVED:
            return None  # the monitor cannot report on itself; notify/status is no daemon
        if not SEGMENT.match(name):
            raise Reject(f"topic {topic!r}: daemon name must be lower-case [a-z0-9_-]+")
        return name

    def _reject(self, name: str, exc: Reject) -> None:
        with self._lock:
            w = self._daemons.get(name)
            if w is not None:
                w.rejected += 1
            else:
                self._rejected_unknown[name] = self._rejected_unknown.get(name, 0) + 1
        raise exc

    def on_status(self, msg: Message) -> None:
        name = self._daemon_of(msg.topic, "status")
        if name is None:
            return
        try:
            text = msg.text() if msg.payload else ""
            if text not in ("online", "offline", ""):
                raise Reject(f"status on {msg.topic} must be online or offline, got {text[:40]!r}")
        except Reject as exc:
            self._reject(name, exc)
            return
        now = time.time()
        with self._lock:
            w = self._watched(name)
            w.status = text or None
            if text == "offline":
                if not w.offline:
                    w.offline = True
                    w.offline_at = None if msg.retain else now
                    w.offline_retained = msg.retain
                    w.offline_connection = self.bus.connections
            else:
                w.offline = False
                w.offline_at = None

    def on_meta(self, msg: Message) -> None:
        name = self._daemon_of(msg.topic, "meta")
        if name is None:
            return
        if not msg.payload:
            self._forget(name)
            return
        try:
            data = parse_meta(msg.topic, name, msg.json())
        except Reject as exc:
            self._reject(name, exc)
            return
        now = time.time()
        # a retained event is as old as it says; a live one is now (no clock-skew surprises)
        when = min(float(data["ts"]), now) if msg.retain else now
        with self._lock:
            w = self._watched(name)
            w.host = data["host"]
            w.interval_s = float(data["interval_s"])
            w.meta = data
            w.last_event = data["event"]
            w.event_at = when
            if data["event"] != "stopping":
                w.last_beat = max(w.last_beat or 0.0, when)
                if not msg.retain:
                    w.offline = False  # a live sign of life outweighs an older offline status
                    w.offline_at = None

    def _watched(self, name: str) -> Watched:
        w = self._daemons.get(name)
        if w is None:
            w = self._daemons[name] = Watched(name)
            w.rejected = self._rejected_unknown.pop(name, 0)
        return w

    def _forget(self, name: str) -> None:
        """An emptied retained meta: the daemon is gone for good (decommissioned)."""
        with self._lock:
            gone = self._daemons.pop(name, None)
        if gone is not None:
            self.log.info("forgetting %s: its retained meta was cleared", name)
            self.bus.publish(self.topics.sub("monitor", "daemons", name), b"", retain=True)
            self._publish_summary()

    def on_own_daemon_record(self, msg: Message) -> None:
        """A previous monitor's record: what was last said about a daemon (start-up only)."""
        if self._settled or not msg.payload:
            return
        data = msg.json()
        if not isinstance(data, dict) or data.get("state") not in STATES:
            raise Reject(f"record on {msg.topic}: expected an object with a 'state' of "
                         f"{', '.join(STATES)}, got {msg.payload[:80]!r}")
        name = msg.topic.rsplit("/", 1)[1]
        with self._lock:
            self._watched(name).restored = data

    def on_own_rule_record(self, msg: Message) -> None:
        if self._settled or not msg.payload:
            return
        data = msg.json()
        if not isinstance(data, dict) or not isinstance(data.get("series"), dict):
            raise Reject(f"record on {msg.topic}: expected an object with 'series', "
                         f"got {msg.payload[:80]!r}")
        with self._lock:
            self._restored_rules[msg.topic.rsplit("/", 1)[1]] = data

    def on_data(self, msg: Message) -> None:
        m = parse_measurement(self.topics, msg.topic, msg.payload)
        now = time.time()
        notes: list[Note] = []
        with self._lock:
            matching = [r for r in self.config.rules
                        if mqtt.topic_matches_sub(r.topic, f"{m.location}/{m.quantity}")]
            if not matching:
                return
            self._latest[msg.topic] = (m, now)
            if self._settled:
                for rule in matching:
                    notes += self._judge_series(rule, msg.topic, m, now)
        self._send(notes)  # the rule's record follows with the next check

    # ------------------------------------------------------------------ the check (main thread)

    def check(self) -> None:
        now = time.time()
        if not self.bus.connected:
            return  # no news is not bad news while the monitor itself is cut off
        if self.bus.connections != self._connection_seen:
            self._connection_seen = self.bus.connections
            self._settle_until = now + self.config.startup_grace
            self._listening_since = now
        if self._settle_until is not None and now < self._settle_until:
            return
        notes: list[Note] = []
        changed: list[str] = []
        with self._lock:
            if not self._settled:
                self._settled = True
                notes += self._settle_rules(now)
            notes += self._close_windows(now)
            changed += [n[1]["daemon"] for n in notes if "daemon" in n[1]]
            for w in self._daemons.values():
                before = (w.seen, w.state, w.transitions, w.window_held)
                notes += self._judge_daemon(w, now)
                if (w.seen, w.state, w.transitions, w.window_held) != before:
                    changed.append(w.name)
            notes += self._rule_timers(now)
        self._send(notes)
        for name in dict.fromkeys(changed):
            self._publish_daemon_record(name)
        if self._publish_rule_records() or changed:
            self._publish_summary()

    def _judge_daemon(self, w: Watched, now: float) -> list[Note]:
        verdict = evaluate(w, now, self.config.stale_factor, self._listening_since,
                           self._connection_seen)
        if verdict is None:
            return []
        state, since, reason = verdict
        if not w.seen:
            w.seen = True
            prev = w.restored or {}
            w.restored = None
            if prev.get("state") in (UP, DOWN, STOPPED):
                # what a previous monitor last said is the baseline
                w.state, w.reason = prev["state"], str(prev.get("reason", ""))
                w.since = prev["since"] if _number(prev.get("since")) else since
                for key in ("transitions", "notifications", "held"):
                    if isinstance(prev.get(key), int):
                        setattr(w, key, prev[key])
            else:
                w.state, w.since, w.reason = state, since, reason
                if state == DOWN:  # a first view that is down is news; up or stopped is not
                    w.transitions += 1
                    return self._gate(w, UNKNOWN, now)
                return []
        if state == w.state:
            return []
        previous = w.state
        w.state, w.since, w.reason = state, since, reason
        if state == UNKNOWN:
            return []
        w.transitions += 1
        self.count("transitions")
        self.log.info("%s on %s: %s -> %s (%s)", w.name, w.host, previous, state, reason)
        return self._gate(w, previous, now)

    def _gate(self, w: Watched, previous: str, now: float) -> list[Note]:
        """Let a transition through, or hold it for the flapping window's summary."""
        window = self.config.flap_window_s
        if window > 0 and w.window_end is not None and now < w.window_end:
            budget = 0 if w.flapping else self.config.flap_max
            if w.window_sent >= budget:
                w.window_held += 1
                w.held += 1
                self.count("held")
                return []
            w.window_sent += 1
        elif window > 0:
            w.window_end, w.window_sent, w.window_held, w.flapping = now + window, 1, 0, False
        return [self._daemon_note(w, previous)]

    def _close_windows(self, now: float) -> list[Note]:
        notes: list[Note] = []
        for w in self._daemons.values():
            if w.window_end is None or now < w.window_end:
                continue
            if w.window_held:
                self.log.warning("%s is flapping: %d more state change(s) in %g s; now %s",
                                 w.name, w.window_held, self.config.flap_window_s, w.state)
                notes.append(self._daemon_note(w, None, held=w.window_held))
                w.window_end = now + self.config.flap_window_s
                w.window_sent, w.window_held, w.flapping = 1, 0, True
            else:
                w.window_end, w.window_sent, w.flapping = None, 0, False
        return notes

    def _daemon_note(self, w: Watched, previous: str | None, *, held: int = 0) -> Note:
        cfg = self.config
        host = w.host or "an unknown host"
        who = f"pihub-{w.name} on {host}"
        since = when_text(w.since)
        if held:
            title = f"{w.name} FLAPPING on {host}, now {w.state.upper()}"
            message = (f"{who} changed state {held} more time(s) within {cfg.flap_window_s:g} s; "
                       f"now {w.state} since {since}")
            message += f": {w.reason}." if w.state == DOWN else "."
        elif w.state == DOWN:
            title = f"{w.name} DOWN on {host}"
            message = f"{who} is down since {since}: {w.reason}."
        elif w.state == STOPPED:
            title = f"{w.name} stopped on {host}"
            message = f"{who} was stopped cleanly at {since}."
        else:
            title = f"{w.name} UP on {host}"
            message = f"{who} is up again since {since} (was {previous})."
        if w.state == DOWN:
            priority = cfg.priority_down
        elif w.state == STOPPED or previous == STOPPED:
            priority = cfg.priority_stopped
        else:
            priority = cfg.priority_up
        w.notifications += 1
        return self.topics.notify(cfg.notify_topic), {
            "title": title, "message": message, "priority": priority,
            "ts": round(time.time(), 3), "daemon": w.name, "host": w.host, "state": w.state,
            "previous": previous, "since": _ts(w.since), "reason": w.reason, "flapping": held,
        }

    # ------------------------------------------------------------------ threshold rules

    def _settle_rules(self, now: float) -> list[Note]:
        """Start-up: take a previous monitor's firing series, then judge the retained values."""
        rules = {r.name: r for r in self.config.rules}
        for name, record in self._restored_rules.items():
            if name not in rules:
                continue
            for topic, s in record["series"].items():
                if isinstance(s, dict) and s.get("state") == FIRING and _number(s.get("since")):
                    self._series[(name, topic)] = Series(FIRING, float(s["since"]),
                                                         crossed=s.get("crossed"))
            counts = record.get("counts")
            if isinstance(counts, dict):
                self._rule_counts[name] = {k: v for k, v in counts.items() if isinstance(v, int)}
        self._restored_rules.clear()
        notes: list[Note] = []
        for topic, (m, _at) in self._latest.items():
            for rule in self.config.rules:
                if mqtt.topic_matches_sub(rule.topic, f"{m.location}/{m.quantity}"):
                    notes += self._judge_series(rule, topic, m, now)
        for name in rules:
            self._rules_dirty.add(name)
        return notes

    def _judge_series(self, rule: Rule, topic: str, m: Measurement, now: float) -> list[Note]:
        key = (rule.name, topic)
        s = self._series.get(key)
        if s is None:
            s = self._series[key] = Series(OK, now)
        s.value, s.unit, s.ts = m.value, m.unit, m.ts
        before = s.state
        crossed = rule.beyond(m.value)
        notes: list[Note] = []
        if s.state == FIRING:
            if rule.cleared(m.value):
                s.state, s.since = OK, now
                notes.append(self._rule_note(rule, topic, m, s, cleared=True))
        elif crossed is None:
            s.state, s.since, s.crossed = OK, now, None
        else:
            if s.state == OK:
                s.state, s.since = PENDING, now
            s.crossed = crossed
            if now - s.since >= rule.for_s:
                s.state, s.since = FIRING, now
                notes.append(self._rule_note(rule, topic, m, s, cleared=False))
        if s.state != before:
            self._rules_dirty.add(rule.name)
        return notes

    def _rule_timers(self, now: float) -> list[Note]:
        notes: list[Note] = []
        rules = {r.name: r for r in self.config.rules}
        for (name, topic), s in self._series.items():
            rule = rules.get(name)
            if rule is None or s.state != PENDING or now - s.since < rule.for_s:
                continue
            latest = self._latest.get(topic)
            if latest is None:
                continue
            s.state, s.since = FIRING, now
            self._rules_dirty.add(name)
            notes.append(self._rule_note(rule, topic, latest[0], s, cleared=False))
        return notes

    def _rule_note(self, rule: Rule, topic: str, m: Measurement, s: Series, *,
                   cleared: bool) -> Note:
        crossed = s.crossed or ("above" if rule.above is not None else "below")
        threshold = rule.above if crossed == "above" else rule.below
        condition = f"{crossed} {threshold:g}" if threshold is not None else crossed
        state = "cleared" if cleared else FIRING
        fields = rule.fields(topic, m.location, m.quantity, m.value, m.unit, threshold,
                             condition, s.since, state)
        try:
            title = rule.title.format(**fields)
            message = (rule.clear_message if cleared else rule.message).format(**fields)
        except (KeyError, IndexError, ValueError, TypeError, AttributeError) as exc:
            self.count("errors")
            self.log.error("rule %s: template failed (%s); sending a plain message", rule.name,
                           exc)
            title = rule.name
            message = f"{rule.name}: {topic} is {m.value:g} {m.unit} ({condition}), {state}"
        if cleared:
            priority = rule.clear_priority if rule.clear_priority is not None else min(
                rule.priority, 0)
        else:
            priority = rule.priority
        counts = self._rule_counts.setdefault(rule.name, {"fired": 0, "cleared": 0})
        counts["cleared" if cleared else "fired"] += 1
        self.count("rules_cleared" if cleared else "rules_fired")
        self.log.info("rule %s %s on %s: value %g %s", rule.name, state, topic, m.value, m.unit)
        target = self.topics.notify(rule.notify_topic or self.config.notify_topic)
        return target, {
            "title": title, "message": message, "priority": priority,
            "ts": round(time.time(), 3), "rule": rule.name, "topic": topic, "state": state,
            "value": m.value, "unit": m.unit, "since": _ts(s.since),
        }

    # ------------------------------------------------------------------ publishing

    def _send(self, notes: list[Note]) -> None:
        for topic, payload in notes:
            self.publish_json(topic, payload, retain=False)
            self.count("notifications")

    def _daemon_record(self, w: Watched) -> dict[str, Any]:
        meta = w.meta
        return {
            "daemon": w.name, "host": w.host, "state": w.state, "since": _ts(w.since),
            "reason": w.reason, "status": w.status, "last_event": w.last_event,
            "last_heartbeat": _ts(w.last_beat), "interval_s": w.interval_s,
            "deadline_s": (self.config.stale_factor * w.interval_s) if w.interval_s else None,
            "pid": meta.get("pid"), "version": meta.get("version"),
            "uptime_s": meta.get("uptime_s"), "rss_kb": meta.get("rss_kb"),
            "counters": meta.get("counters", {}), "transitions": w.transitions,
            "notifications": w.notifications, "held": w.held, "rejected": w.rejected,
            "flapping": w.flapping, "ts": round(time.time(), 3),
        }

    def _publish_daemon_record(self, name: str) -> None:
        with self._lock:
            w = self._daemons.get(name)
            record = self._daemon_record(w) if w is not None and w.seen else None
        if record is not None:
            self.publish_json(self.topics.sub("monitor", "daemons", name), record)

    def summary(self) -> dict[str, Any]:
        with self._lock:
            seen = [w for w in self._daemons.values() if w.seen]
            firing: dict[str, list[str]] = {}
            for (name, topic), s in sorted(self._series.items()):
                if s.state == FIRING:
                    firing.setdefault(name, []).append(topic)
            return {
                "ts": round(time.time(), 3),
                "counts": {state: sum(1 for w in seen if w.state == state) for state in STATES},
                "daemons": {w.name: {"state": w.state, "since": _ts(w.since), "host": w.host,
                                     "last_heartbeat": _ts(w.last_beat), "reason": w.reason}
                            for w in sorted(seen, key=lambda w: w.name)},
                "rules_firing": firing,
            }

    def _publish_summary(self) -> None:
        if self._settled:
            self.publish_json(self.topics.sub("monitor", "summary"), self.summary())

    def _publish_rule_records(self, every_rule: bool = False) -> int:
        with self._lock:
            names = {r.name for r in self.config.rules} if every_rule else set(self._rules_dirty)
            self._rules_dirty.clear()
            records = {}
            for name in names:
                series = {topic: {"state": s.state, "since": _ts(s.since), "value": s.value,
                                  "unit": s.unit, "ts": s.ts, "crossed": s.crossed}
                          for (rule, topic), s in sorted(self._series.items()) if rule == name}
                records[name] = {
                    "rule": name, "ts": round(time.time(), 3),
                    "firing": sum(1 for s in series.values() if s["state"] == FIRING),
                    "counts": dict(self._rule_counts.get(name, {"fired": 0, "cleared": 0})),
                    "series": series,
                }
        for name, record in records.items():
            self.publish_json(self.topics.sub("monitor", "rules", name), record)
        return len(records)

    def publish_records(self) -> None:
        """The periodic refresh of every retained record under <root>/monitor/."""
        if not self._settled:
            return
        with self._lock:
            names = [w.name for w in self._daemons.values() if w.seen]
        for name in names:
            self._publish_daemon_record(name)
        self._publish_rule_records(every_rule=True)
        self._publish_summary()

    def heartbeat_extra(self) -> dict[str, Any]:
        with self._lock:
            counts = {state: sum(1 for w in self._daemons.values() if w.seen and w.state == state)
                      for state in STATES}
            firing = sum(1 for s in self._series.values() if s.state == FIRING)
        return {"daemons": counts, "rules_firing": firing}


main = Monitor.main

if __name__ == "__main__":
    sys.exit(main())
