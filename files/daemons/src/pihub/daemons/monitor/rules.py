"""Threshold rules: per series ``ok`` -> ``pending`` -> ``firing`` -> ``ok``, with hysteresis.

Plain objects: no MQTT, no clock of their own. The glue hands every measurement to
:meth:`Rules.measure` and calls :meth:`Rules.tick` every ``check_interval``, both with ``now``;
they return the :class:`Alarm` s (fired or cleared) to word and send.

docs/monitor.md, "Threshold rules":

* ``ok`` -> ``pending`` when the value goes beyond a limit (``> above`` or ``< below``);
* ``pending`` -> ``firing`` once it has stayed beyond for ``for_s`` seconds (counted from when
  the monitor saw it cross), one alarm; back within the limit before that -> ``ok``, none;
* ``firing`` -> ``ok`` once the value is back inside by at least ``hysteresis``, one
  "cleared" alarm. Values between the limit and the hysteresis keep it firing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from paho.mqtt.client import topic_matches_sub  # a pure function: matching, not talking

from pihub.topics import Measurement, Reject

#: series (topics) a monitor keeps the latest value of for its rules; a new one beyond is rejected
MAX_RULE_SERIES = 1000

if TYPE_CHECKING:
    from . import Rule

OK, PENDING, FIRING = "ok", "pending", "firing"
ABOVE, BELOW = "above", "below"


def beyond(rule: Rule, value: float) -> str | None:
    """``"above"``/``"below"`` when ``value`` breaks a limit of ``rule``, else None."""
    if rule.above is not None and value > rule.above:
        return ABOVE
    if rule.below is not None and value < rule.below:
        return BELOW
    return None


def cleared(rule: Rule, value: float) -> bool:
    """True when ``value`` is back inside the limits by at least the hysteresis."""
    return ((rule.above is None or value <= rule.above - rule.hysteresis)
            and (rule.below is None or value >= rule.below + rule.hysteresis))


@dataclass
class Series:
    """One rule's view of one data topic."""

    state: str = OK
    since: float = 0.0
    value: float | None = None
    unit: str = ""
    ts: float | None = None
    crossed: str | None = None


@dataclass
class Restored:
    """A previous monitor's record of one rule: its firing series and its counts."""

    series: dict[str, Series] = field(default_factory=dict)
    counts: dict[str, int] | None = None


@dataclass(frozen=True)
class Alarm:
    """A rule fired on a series (``cleared`` False) or cleared; as it was at that moment."""

    rule: Rule
    topic: str
    measurement: Measurement
    since: float
    crossed: str | None
    cleared: bool


class Rules:
    """Every rule's series, the latest value of each matching topic, and what changed."""

    def __init__(self, rules: list[Rule]) -> None:
        self.rules = list(rules)
        self.series: dict[tuple[str, str], Series] = {}
        self.latest: dict[str, Measurement] = {}
        self.counts: dict[str, dict[str, int]] = {}
        #: rules whose record must be published again
        self.dirty: set[str] = set()
        self.settled = False
        self._restored: dict[str, Restored] = {}

    def configure(self, rules: list[Rule]) -> None:
        """New rules (SIGHUP): series of rules that did not change keep their state."""
        old = {r.name: r for r in self.rules}
        keep = {r.name for r in rules if old.get(r.name) == r}
        self.series = {k: v for k, v in self.series.items() if k[0] in keep}
        self.rules = list(rules)

    def matching(self, m: Measurement) -> list[Rule]:
        return [r for r in self.rules if topic_matches_sub(r.topic, f"{m.location}/{m.quantity}")]

    def restore(self, name: str, restored: Restored) -> None:
        """A previous monitor's record of rule ``name``; used once, by :meth:`settle`."""
        self._restored[name] = restored

    def settle(self, now: float) -> list[Alarm]:
        """Start-up is over: take a previous monitor's firing series, then judge the values
        that came meanwhile (retained ones)."""
        self.settled = True
        names = {r.name for r in self.rules}
        for name, restored in self._restored.items():
            if name not in names:
                continue
            for topic, s in restored.series.items():
                self.series[(name, topic)] = Series(FIRING, s.since, crossed=s.crossed)
            if restored.counts is not None:
                self.counts[name] = dict(restored.counts)
        self._restored.clear()
        alarms: list[Alarm] = []
        for topic, m in self.latest.items():
            for rule in self.matching(m):
                alarms += self._judge(rule, topic, m, now)
        self.dirty |= names
        return alarms

    def measure(self, topic: str, m: Measurement, now: float) -> list[Alarm]:
        """A measurement on ``topic``: remembered if a rule watches it, judged once settled."""
        rules = self.matching(m)
        if not rules:
            return []
        if topic not in self.latest and len(self.latest) >= MAX_RULE_SERIES:
            raise Reject(f"{topic}: the rules watch {MAX_RULE_SERIES} series already; a new "
                         "one is not watched")
        self.latest[topic] = m
        if not self.settled:
            return []
        alarms: list[Alarm] = []
        for rule in rules:
            alarms += self._judge(rule, topic, m, now)
        return alarms

    def tick(self, now: float) -> list[Alarm]:
        """Pending series whose ``for_s`` has run out fire (with the latest value)."""
        alarms: list[Alarm] = []
        rules = {r.name: r for r in self.rules}
        for (name, topic), s in self.series.items():
            rule = rules.get(name)
            if rule is None or s.state != PENDING or now - s.since < rule.for_s:
                continue
            latest = self.latest.get(topic)
            if latest is None:
                continue
            s.state, s.since = FIRING, now
            self.dirty.add(name)
            alarms.append(self._alarm(rule, topic, latest, s, cleared=False))
        return alarms

    def take_dirty(self) -> set[str]:
        """The rules whose record changed since the last call."""
        names, self.dirty = self.dirty, set()
        return names

    def series_of(self, name: str) -> dict[str, Series]:
        """Rule ``name``'s series by topic, sorted."""
        return {topic: s for (rule, topic), s in sorted(self.series.items()) if rule == name}

    def firing(self) -> dict[str, list[str]]:
        """The topics of every firing series, by rule."""
        out: dict[str, list[str]] = {}
        for (name, topic), s in sorted(self.series.items()):
            if s.state == FIRING:
                out.setdefault(name, []).append(topic)
        return out

    def _judge(self, rule: Rule, topic: str, m: Measurement, now: float) -> list[Alarm]:
        key = (rule.name, topic)
        s = self.series.get(key)
        if s is None:
            s = self.series[key] = Series(OK, now)
        s.value, s.unit, s.ts = m.value, m.unit, m.ts
        before = s.state
        crossed = beyond(rule, m.value)
        alarms: list[Alarm] = []
        if s.state == FIRING:
            if cleared(rule, m.value):
                s.state, s.since = OK, now
                alarms.append(self._alarm(rule, topic, m, s, cleared=True))
        elif crossed is None:
            s.state, s.since, s.crossed = OK, now, None
        else:
            if s.state == OK:
                s.state, s.since = PENDING, now
            s.crossed = crossed
            if now - s.since >= rule.for_s:
                s.state, s.since = FIRING, now
                alarms.append(self._alarm(rule, topic, m, s, cleared=False))
        if s.state != before:
            self.dirty.add(rule.name)
        return alarms

    def _alarm(self, rule: Rule, topic: str, m: Measurement, s: Series, *,
               cleared: bool) -> Alarm:
        counts = self.counts.setdefault(rule.name, {"fired": 0, "cleared": 0})
        key = "cleared" if cleared else "fired"
        counts[key] = counts.get(key, 0) + 1
        return Alarm(rule, topic, m, s.since, s.crossed, cleared)
