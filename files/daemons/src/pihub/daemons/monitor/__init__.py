"""pihub-monitor: watch every daemon's heartbeat and a few measurements; ask for notifications.

Reads (retained values included, so a fresh monitor sees the whole constellation at once):

* ``<root>/+/status`` (``online`` / ``offline``) and ``<root>/+/meta`` (metadata events) of
  every daemon but itself, and the same of the satellites' daemons as their bridges mirror them
  (``<root>/host/+/+/status``, ``<root>/host/+/+/meta``; contract §2, "Fleet"), with each
  satellite's bridge state ``<root>/host/+/bridge/state``;
* ``<root>/data/#`` when threshold rules are configured;
* its own retained records under ``<root>/monitor/daemons/+``, ``<root>/monitor/host/+/+``,
  ``<root>/monitor/hosts/+`` and ``<root>/monitor/rules/+``, once at start,
  so that a restarted monitor does not repeat what it already said.

Writes a notification request on ``<root>/notify/<notify_topic>`` (not retained) on every
state change of a daemon or of a satellite's link and every rule that fires or clears, and its
retained records ``<root>/monitor/daemons/<daemon>`` (a satellite's daemon:
``<root>/monitor/host/<host>/<daemon>``), ``<root>/monitor/hosts/<host>`` (a satellite's link),
``<root>/monitor/rules/<rule>`` and ``<root>/monitor/summary`` (docs/monitor.md has the
payloads).

This module is the config and the MQTT glue: handlers (paho's thread) record facts under a
lock, ``check`` (the main thread, every ``check_interval``) asks for judgements and publishes
them. The judging is in plain parts that take the clock as an argument:

* :mod:`.liveness` - a daemon's state (up/down/stopped/unknown) and the flapping windows;
* :mod:`.rules` - threshold rules, one state per rule and series;
* :mod:`.wording` - titles, messages and priorities of the notification requests;
* :mod:`.persistence` - the retained records, written and read back at start.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from pihub.bus import Message
from pihub.config import ConfigError, HostsConfig, setting
from pihub.daemon import Daemon
from pihub.topics import (
    HOST,
    SEGMENT,
    Reject,
    identity,
    parse_measurement,
    shown,
    split_identity,
)

from . import persistence
from .liveness import (
    CHANGE,
    HOST_EVENT,
    MAX_META_BYTES,
    SUMMARY,
    Event,
    Liveness,
    parse_meta,
    parse_status,
)
from .rules import FIRING, Alarm, Rules
from .wording import TEMPLATE_ERRORS, daemon_request, host_request, rule_fields, rule_request

DEFAULT_FIRE = "{name}: {location}/{quantity} is {value:g} {unit} ({condition})"
DEFAULT_CLEAR = "{name}: {location}/{quantity} is back to {value:g} {unit}"
TOPIC_FILTER = r"^(#|([a-z0-9_-]+|\+)/(#|[a-z0-9_-]+|\+)|([a-z0-9_-]+|\+)/#)$"


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
        sample = rule_fields(self, "+/+", "location", "quantity", 1.0, "unit", 1.0, "above 1",
                             0.0, FIRING)
        for key in ("title", "message", "clear_message"):
            template = getattr(self, key)
            try:
                template.format(**sample)
            except TEMPLATE_ERRORS as exc:
                known = ", ".join(sample)
                raise ConfigError(key, f"template {template!r} does not format: "
                                       f"{type(exc).__name__}: {exc} (fields: {known})") from None


EXAMPLE_RULES = [
    {"name": "cellar_humidity", "topic": "cellar/humidity", "above": 70, "hysteresis": 3,
     "for_s": 600, "priority": 0},
    {"name": "freezer_warm", "topic": "+/freezer_temp", "above": -12, "below": -30,
     "hysteresis": 1, "for_s": 300, "priority": 1,
     "message": "{location}: freezer at {value:.1f} {unit} ({condition}) since {since}"},
]


@dataclass(kw_only=True)
class Config(HostsConfig):
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


# --------------------------------------------------------------------------- the daemon


class Monitor(Daemon[Config]):
    name = "monitor"
    config_class = Config
    description = "Watch every pihub daemon's heartbeat and threshold rules; request notifications."

    @classmethod
    def published_topics(cls, config: Config) -> list[str]:
        # its records (<root>/monitor/...) are its own subtree; requests go to notify topics
        topics = [config.notify_topic] + [rule.notify_topic for rule in config.rules
                                          if rule.notify_topic]
        return [f"notify/{topic}" for topic in topics]

    def setup(self) -> None:
        self._lock = threading.Lock()
        self.liveness = Liveness()
        self._tune()
        self.rules = Rules(self.config.rules)
        self._settled = False
        self._settle_until: float | None = None
        self._connection_seen = 0
        self._data_subscribed = False
        self.subscribe(self.topics.sub("monitor", "daemons", "+"), self.on_own_daemon_record)
        self.subscribe(self.topics.sub("monitor", "rules", "+"), self.on_own_rule_record)
        self.subscribe(self.topics.sub("monitor", HOST, "+", "+"), self.on_own_daemon_record)
        self.subscribe(self.topics.sub("monitor", "hosts", "+"), self.on_own_host_record)
        self.subscribe(self.topics.sub("+", "status"), self.on_status)
        self.subscribe(self.topics.sub("+", "meta"), self.on_meta)
        self.subscribe(self.topics.sub(HOST, "+", "+", "status"), self.on_status)
        self.subscribe(self.topics.sub(HOST, "+", "+", "meta"), self.on_meta)
        self.subscribe(self.topics.sub(HOST, "+", "bridge", "state"), self.on_bridge)
        self._subscribe_data_if_needed()
        self.every(self.config.check_interval, self.check)
        self.every(self.config.summary_interval, self.publish_records,
                   first_in=self.config.summary_interval)

    def _tune(self) -> None:
        cfg = self.config
        self.liveness.stale_factor = cfg.stale_factor
        self.liveness.flap_window_s = cfg.flap_window_s
        self.liveness.flap_max = cfg.flap_max

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
                self.rules.configure(new.rules)
            # the base class replaces self.config after this returns; the handlers in between
            # must see the new values, so set them here under the lock
            for key in applied:
                setattr(self.config, key, getattr(new, key))
            self._tune()
        self._subscribe_data_if_needed()
        return applied

    # ------------------------------------------------------------------ MQTT handlers (paho)

    def _daemon_of(self, topic: str, kind: str) -> str | None:
        """The identity of the daemon a status or meta topic is about (``<daemon>``, or
        ``<daemon>@<host>`` for a satellite's mirror); None for none to watch."""
        found = self.topics.daemon_topic(topic)
        if found is None or found[2] != kind:
            return None  # notify/status is no daemon
        host, daemon, _ = found
        if host is None and daemon == self.name:
            return None  # the monitor cannot report on itself
        return identity(daemon, host)

    def record_topic(self, name: str) -> str:
        """``<root>/monitor/daemons/<daemon>``, or ``<root>/monitor/host/<host>/<daemon>`` for a
        satellite's daemon."""
        daemon, host = split_identity(name)
        if host is None:
            return self.topics.sub("monitor", "daemons", daemon)
        return self.topics.sub("monitor", HOST, host, daemon)

    def on_bridge(self, msg: Message) -> None:
        host = self.topics.bridge_host(msg.topic)
        if host is None:
            raise Reject(f"topic {shown(msg.topic)}: the host must be lower-case [a-z0-9_-]+")
        if not msg.payload:
            return  # a cleared retained state: nothing known
        text = msg.text()
        if text not in ("0", "1"):
            raise Reject(f"bridge state on {msg.topic} must be 0 or 1, got {shown(text)}")
        with self._lock:
            self.liveness.saw_bridge(host, text == "1", time.time())

    def on_own_host_record(self, msg: Message) -> None:
        if self._settled or not msg.payload:
            return
        data = msg.json()
        host = msg.topic.rsplit("/", 1)[1]
        if isinstance(data, dict) and data.get("state") in ("reachable", "unreachable") and (
                SEGMENT.match(host)):
            with self._lock:
                self.liveness.restore_link(host, data["state"])

    def _reject(self, name: str, exc: Reject) -> None:
        with self._lock:
            self.liveness.reject(name)
        raise exc  # the bus logs it and counts it as rejected

    def on_status(self, msg: Message) -> None:
        name = self._daemon_of(msg.topic, "status")
        if name is None:
            return
        try:
            text = parse_status(msg.topic, msg.text() if msg.payload else "")
        except Reject as exc:
            self._reject(name, exc)
            return
        with self._lock:
            self.liveness.saw_status(name, text, msg.retain, time.time(), self.bus.connections)

    def on_meta(self, msg: Message) -> None:
        name = self._daemon_of(msg.topic, "meta")
        if name is None:
            return
        if not msg.payload:
            self._forget(name)
            return
        try:
            if len(msg.payload) > MAX_META_BYTES:
                raise Reject(f"meta on {msg.topic}: at most {MAX_META_BYTES} bytes, got "
                             f"{len(msg.payload)}")
            data = parse_meta(msg.topic, split_identity(name)[0], msg.json())
        except Reject as exc:
            self._reject(name, exc)
            return
        with self._lock:
            self.liveness.saw_meta(name, data, msg.retain, time.time())

    def _forget(self, name: str) -> None:
        """An emptied retained meta: the daemon is gone for good (decommissioned)."""
        with self._lock:
            gone = self.liveness.forget(name)
        if gone:
            self.log.info("forgetting %s: its retained meta was cleared", name)
            self.bus.publish(self.record_topic(name), b"", retain=True)
            self._publish_summary()

    def on_own_daemon_record(self, msg: Message) -> None:
        """A previous monitor's record: what was last said about a daemon (start-up only)."""
        if self._settled or not msg.payload:
            return
        baseline = persistence.daemon_baseline(msg.topic, msg.json())
        parts = msg.topic.split("/")
        host = parts[-2] if parts[-3] == HOST else None
        if not SEGMENT.match(parts[-1]) or (host is not None and not SEGMENT.match(host)):
            raise Reject(f"record on {shown(msg.topic)}: not a daemon's")
        with self._lock:
            self.liveness.restore(identity(parts[-1], host), baseline)

    def on_own_rule_record(self, msg: Message) -> None:
        if self._settled or not msg.payload:
            return
        restored = persistence.rule_restored(msg.topic, msg.json())
        with self._lock:
            self.rules.restore(msg.topic.rsplit("/", 1)[1], restored)

    def on_data(self, msg: Message) -> None:
        m = parse_measurement(self.topics, msg.topic, msg.payload)
        now = time.time()
        with self._lock:
            alarms = self.rules.measure(msg.topic, m, now)
        self._send_alarms(alarms, now)  # the rule's record follows with the next check

    # ------------------------------------------------------------------ the check (main thread)

    def check(self) -> None:
        now = time.time()
        if not self.bus.connected:
            return  # no news is not bad news while the monitor itself is cut off
        if self.bus.connections != self._connection_seen:
            self._connection_seen = self.bus.connections
            self._settle_until = now + self.config.startup_grace
            with self._lock:
                self.liveness.listen(now, self._connection_seen)
        if self._settle_until is not None and now < self._settle_until:
            return
        with self._lock:
            settled = [] if self._settled else self.rules.settle(now)
            self._settled = True
            found = self.liveness.check(now)
            due = self.rules.tick(now)
        self._send_alarms(settled, now)
        self._send_events(found.events, now)
        self._send_alarms(due, now)
        for name in found.changed:
            self._publish_daemon_record(name)
        for host in found.hosts:
            self._publish_host_record(host)
        if self._publish_rule_records(now) or found.changed or found.hosts:
            self._publish_summary()

    # ------------------------------------------------------------------ publishing

    def _send_events(self, events: list[Event], now: float) -> None:
        for event in events:
            if event.kind == HOST_EVENT:
                self.log.warning("host %s: %s -> %s (%s)", event.host, event.previous,
                                 event.state, event.reason)
                self.publish_json(self.topics.notify(self.config.notify_topic),
                                  host_request(event, self.config, now), retain=False)
                self.count("notifications")
                continue
            if event.kind == CHANGE:
                self.count("transitions")
                self.log.info("%s on %s: %s -> %s (%s)", event.daemon, event.host,
                              event.previous, event.state, event.reason)
            elif event.kind == SUMMARY:
                self.log.warning("%s is flapping: %d more state change(s) in %g s; now %s",
                                 event.daemon, event.flapping, self.config.flap_window_s,
                                 event.state)
            if not event.notify:
                if not event.muted:
                    self.count("held")
                continue
            self.publish_json(self.topics.notify(self.config.notify_topic),
                              daemon_request(event, self.config, now), retain=False)
            self.count("notifications")

    def _send_alarms(self, alarms: list[Alarm], now: float) -> None:
        for alarm in alarms:
            self._send_alarm(alarm, now)

    def _send_alarm(self, alarm: Alarm, now: float) -> None:
        rule, m = alarm.rule, alarm.measurement
        request, problem = rule_request(alarm, now)
        if problem is not None:
            self.count("errors")
            self.log.error("rule %s: template failed (%s); sending a plain message", rule.name,
                           problem)
        self.count("rules_cleared" if alarm.cleared else "rules_fired")
        self.log.info("rule %s %s on %s: value %g %s", rule.name, request["state"],
                      alarm.topic, m.value, m.unit)
        target = self.topics.notify(rule.notify_topic or self.config.notify_topic)
        self.publish_json(target, request, retain=False)
        self.count("notifications")

    def _publish_daemon_record(self, name: str) -> None:
        with self._lock:
            w = self.liveness.daemons.get(name)
            record = (persistence.daemon_record(w, self.config.stale_factor, time.time())
                      if w is not None and w.seen else None)
        if record is not None:
            self.publish_json(self.record_topic(name), record)

    def _publish_host_record(self, host: str) -> None:
        with self._lock:
            link = self.liveness.links.get(host)
            record = (persistence.host_record(link, time.time())
                      if link is not None and link.state is not None else None)
        if record is not None:
            self.publish_json(self.topics.sub("monitor", "hosts", host), record)

    def summary(self) -> dict[str, Any]:
        with self._lock:
            return persistence.summary(self.liveness.daemons.values(), self.rules.firing(),
                                       time.time(), self.liveness.links.values(),
                                       self.config.own_host())

    def _publish_summary(self) -> None:
        if self._settled:
            self.publish_json(self.topics.sub("monitor", "summary"), self.summary())

    def _publish_rule_records(self, now: float, every_rule: bool = False) -> int:
        with self._lock:
            names = self.rules.take_dirty()
            if every_rule:
                names = {r.name for r in self.rules.rules}
            records = {name: persistence.rule_record(name, self.rules.series_of(name),
                                                     self.rules.counts.get(name), now)
                       for name in names}
        for name, record in records.items():
            self.publish_json(self.topics.sub("monitor", "rules", name), record)
        return len(records)

    def publish_records(self) -> None:
        """The periodic refresh of every retained record under <root>/monitor/."""
        if not self._settled:
            return
        with self._lock:
            names = [w.name for w in self.liveness.daemons.values() if w.seen]
            hosts = list(self.liveness.links)
        for name in names:
            self._publish_daemon_record(name)
        for host in hosts:
            self._publish_host_record(host)
        self._publish_rule_records(time.time(), every_rule=True)
        self._publish_summary()

    def heartbeat_extra(self) -> dict[str, Any]:
        with self._lock:
            counts = self.liveness.counts()
            firing = sum(len(topics) for topics in self.rules.firing().values())
        return {"daemons": counts, "rules_firing": firing}


main = Monitor.main

if __name__ == "__main__":
    sys.exit(main())
