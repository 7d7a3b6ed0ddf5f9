"""Is a daemon up, down or stopped? One state machine per daemon, and the flapping windows.

Plain objects: no MQTT, no clock of their own. The glue feeds in facts as it hears them
(:meth:`Liveness.saw_status`, :meth:`Liveness.saw_meta`, each with ``now``) and calls
:meth:`Liveness.check` every ``check_interval``; it gets back :class:`Event` s to word and send,
and the names of the daemons whose record changed.

The states (docs/monitor.md, "A daemon's state"):

* ``stopped`` - the last metadata event is ``stopping`` (a clean stop);
* ``down``    - status ``offline`` without a ``stopping`` event (the Last Will), or the last
  heartbeat is older than ``stale_factor`` x the daemon's own ``interval_s``;
* ``up``      - otherwise, once a ``starting`` or ``heartbeat`` event was seen;
* ``unknown`` - only a status, no metadata event yet.

A daemon is known by its identity (:func:`pihub.topics.identity`): ``<daemon>`` on the own host,
``<daemon>@<host>`` on a satellite. A satellite's bridge is a :class:`Link`: while it is down
(``<root>/host/<host>/bridge/state`` is ``0``) the host is *unreachable*, which is one event of
its own; its daemons are then down ("host unreachable") without an event each, and once the link
is back each gets a full deadline: one that is up again says nothing, one that is still down is
notified then.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from pihub.topics import Reject, shown, split_identity

UP, DOWN, STOPPED, UNKNOWN = "up", "down", "stopped", "unknown"
STATES = (UP, DOWN, STOPPED, UNKNOWN)
EVENTS = ("starting", "heartbeat", "stopping")
#: a witnessed offline status counts once it is this old (seconds) and the monitor still
#: has its own connection; a broker that shuts down sends every Last Will just before
OFFLINE_CONFIRM_S = 1.0
#: daemons watched: a status or meta of one more is rejected (topics of made-up daemons must
#: not grow the monitor's memory)
MAX_DAEMONS = 256
#: bytes of a metadata event (a daemon's is about 500; the last one of each daemon is kept)
MAX_META_BYTES = 16384

#: kinds of :class:`Event` (``host``: a satellite's link went down or came back)
FIRST, CHANGE, SUMMARY, HOST_EVENT = "first", "change", "summary", "host"
#: states of a satellite's :class:`Link`
REACHABLE, UNREACHABLE = "reachable", "unreachable"
#: satellites' links watched (a bridge state of one more is rejected)
MAX_HOSTS = 256


def is_number(value: Any) -> TypeGuard[int | float]:
    """A finite int or float (not a bool): what the contract calls a number."""
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def parse_status(topic: str, text: str) -> str:
    """``online``, ``offline``, or ``""`` (a cleared retained status); Reject anything else."""
    if text not in ("online", "offline", ""):
        raise Reject(f"status on {topic} must be online or offline, got {text[:40]!r}")
    return text


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
        if not is_number(value) or value <= 0:
            raise Reject(f"meta on {topic}: {key!r} must be a number > 0, got {value!r}")
    counters = data.get("counters", {})
    if not isinstance(counters, dict):
        raise Reject(f"meta on {topic}: 'counters' must be an object, got {counters!r}")
    return data


@dataclass
class Baseline:
    """What a previous monitor last said about a daemon (its retained record)."""

    state: str
    reason: str = ""
    since: float | None = None
    #: ``transitions``, ``notifications``, ``held``: carried on across the restart
    counts: dict[str, int] = field(default_factory=dict)


@dataclass
class Watched:
    """What the monitor knows about one daemon."""

    name: str
    host: str = ""
    #: the daemon's name and its satellite (None: the own host); ``name`` is their identity
    daemon: str = ""
    site: str | None = None
    #: down only because its host is unreachable: no event was sent for it
    quiet: bool = False
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
    restored: Baseline | None = None
    transitions: int = 0
    notifications: int = 0
    held: int = 0
    rejected: int = 0
    window_end: float | None = None
    window_sent: int = 0
    window_held: int = 0
    flapping: bool = False


@dataclass(frozen=True)
class Event:
    """Something that happened to one daemon, as it was at that moment.

    ``kind`` is ``first`` (the first view of a daemon, and it is down), ``change`` (a state
    change) or ``summary`` (a flapping window closed with ``flapping`` changes held in it).
    ``notify`` is False for a change held back by a flapping window.
    """

    kind: str
    daemon: str
    host: str
    state: str
    previous: str | None
    since: float | None
    reason: str
    notify: bool = True
    flapping: int = 0
    #: the satellite the daemon runs on (None: the own host); for a ``host`` event, the host
    site: str | None = None
    #: not notified because of its host's link (the host's own event speaks for it)
    muted: bool = False


@dataclass
class Link:
    """A satellite's bridge, as its ``bridge/state`` tells: reachable or not, since when."""

    host: str
    state: str | None = None  # REACHABLE / UNREACHABLE; None until judged
    heard: str | None = None  # what the last bridge/state said
    heard_at: float | None = None
    since: float | None = None
    back_at: float = 0.0  # when it was last heard reachable again: deadlines run from here
    restored: str | None = None  # a previous monitor's record
    transitions: int = 0

    def down(self) -> bool:
        return self.heard == UNREACHABLE


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


@dataclass
class Check:
    """What one :meth:`Liveness.check` found: events in order, daemons whose record changed."""

    events: list[Event] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    #: satellites whose link changed state
    hosts: list[str] = field(default_factory=list)


class Liveness:
    """Every daemon's state, judged from what was heard and when; flapping windows."""

    def __init__(self, stale_factor: float = 2.5, flap_window_s: float = 300.0,
                 flap_max: int = 2) -> None:
        self.stale_factor = stale_factor
        self.flap_window_s = flap_window_s
        self.flap_max = flap_max
        self.daemons: dict[str, Watched] = {}
        self.links: dict[str, Link] = {}
        self._rejected_unknown: dict[str, int] = {}
        self.listening_since = 0.0
        self.connection = 0

    # ------------------------------------------------------------------ facts

    def listen(self, now: float, connection: int) -> None:
        """The monitor (re)connected at ``now``: deadlines run from here (connection number)."""
        self.listening_since = now
        self.connection = connection

    def watched(self, name: str) -> Watched:
        w = self.daemons.get(name)
        if w is None:
            if len(self.daemons) >= MAX_DAEMONS:
                raise Reject(f"a daemon {shown(name)} beyond the {MAX_DAEMONS} watched already; "
                             "not watched")
            daemon, site = split_identity(name)
            w = self.daemons[name] = Watched(name, daemon=daemon, site=site)
            w.rejected = self._rejected_unknown.pop(name, 0)
        return w

    def saw_status(self, name: str, text: str, retained: bool, now: float,
                   connection: int) -> None:
        """A status (``online``/``offline``/``""``) on the monitor's ``connection``-th link."""
        w = self.watched(name)
        w.status = text or None
        if text == "offline":
            if not w.offline:
                w.offline = True
                w.offline_at = None if retained else now
                w.offline_retained = retained
                w.offline_connection = connection
        else:
            w.offline = False
            w.offline_at = None

    def saw_meta(self, name: str, data: dict[str, Any], retained: bool, now: float) -> None:
        """A metadata event that passed :func:`parse_meta`."""
        # a retained event is as old as it says; a live one is now (no clock-skew surprises)
        when = min(float(data["ts"]), now) if retained else now
        w = self.watched(name)
        w.host = data["host"]
        w.interval_s = float(data["interval_s"])
        w.meta = data
        w.last_event = data["event"]
        w.event_at = when
        if data["event"] != "stopping":
            w.last_beat = max(w.last_beat or 0.0, when)
            if not retained:
                w.offline = False  # a live sign of life outweighs an older offline status
                w.offline_at = None

    def link(self, host: str) -> Link:
        link = self.links.get(host)
        if link is None:
            if len(self.links) >= MAX_HOSTS:
                raise Reject(f"a host {shown(host)} beyond the {MAX_HOSTS} watched already; "
                             "not watched")
            link = self.links[host] = Link(host)
        return link

    def saw_bridge(self, host: str, up: bool, now: float) -> None:
        """A satellite's ``bridge/state``: ``1`` (``up``) or ``0``."""
        link = self.link(host)
        heard = REACHABLE if up else UNREACHABLE
        if heard != link.heard:
            link.heard, link.heard_at = heard, now
            if up:
                link.back_at = now

    def restore_link(self, host: str, state: str) -> None:
        self.link(host).restored = state

    def reject(self, name: str) -> None:
        """Count a message of ``name`` that broke the contract (its record shows it)."""
        w = self.daemons.get(name)
        if w is not None:
            w.rejected += 1
        elif name in self._rejected_unknown or len(self._rejected_unknown) < MAX_DAEMONS:
            self._rejected_unknown[name] = self._rejected_unknown.get(name, 0) + 1

    def restore(self, name: str, baseline: Baseline) -> None:
        """A previous monitor's record: the baseline for this daemon's first view."""
        self.watched(name).restored = baseline

    def forget(self, name: str) -> bool:
        """The daemon is decommissioned; True if it was known."""
        return self.daemons.pop(name, None) is not None

    # ------------------------------------------------------------------ judging

    def check(self, now: float) -> Check:
        """Close flapping windows that ran out, then judge every daemon."""
        found = Check()
        for link in self.links.values():
            event = self._judge_link(link)
            if event is not None:
                found.events.append(event)
                found.hosts.append(link.host)
        for w in self.daemons.values():
            event = self._close_window(w, now)
            if event is not None:
                found.events.append(event)
                found.changed.append(w.name)
        for w in self.daemons.values():
            before = (w.seen, w.state, w.transitions, w.window_held)
            event = self._judge(w, now)
            if event is not None:
                found.events.append(event)
            if (w.seen, w.state, w.transitions, w.window_held) != before:
                found.changed.append(w.name)
        found.changed = list(dict.fromkeys(found.changed))
        return found

    def counts(self) -> dict[str, int]:
        """How many daemons (seen ones) are in each state."""
        return {state: sum(1 for w in self.daemons.values() if w.seen and w.state == state)
                for state in STATES}

    def _judge_link(self, link: Link) -> Event | None:
        if link.heard is None or link.heard == link.state:
            return None
        previous, link.state, link.since = link.state, link.heard, link.heard_at
        if previous is None:
            base, link.restored = link.restored, None
            if base == link.state or link.state == REACHABLE:
                return None  # what was said already, or a first view that is fine: no news
        link.transitions += 1
        reason = ("its bridge to this hub is down" if link.state == UNREACHABLE
                  else "its bridge to this hub is up again")
        return Event(HOST_EVENT, "", link.host, link.state, previous, link.since, reason,
                     site=link.host)

    def _judge(self, w: Watched, now: float) -> Event | None:
        link = self.links.get(w.site) if w.site is not None else None
        if link is not None and link.down():
            # the host is unreachable: its daemons are down with it; the host's event says so
            if w.seen and w.state == DOWN and not w.quiet:
                return None  # down (and said so) before its host went away
            changed = not w.seen or w.state != DOWN
            previous = w.state if w.seen else UNKNOWN
            w.seen, w.quiet, w.restored = True, True, None
            w.state, w.reason = DOWN, f"host {w.site} unreachable (its bridge is down)"
            if not changed:
                return None
            w.since = link.heard_at
            w.transitions += 1
            return Event(CHANGE, w.name, w.host, DOWN, previous, w.since, w.reason,
                         notify=False, site=w.site, muted=True)
        listening = self.listening_since
        if link is not None and w.quiet:
            listening = max(listening, link.back_at)  # a full deadline after the link is back
        verdict = evaluate(w, now, self.stale_factor, listening, self.connection)
        if verdict is None:
            return None
        state, since, reason = verdict
        if w.quiet:
            w.quiet = False
            if state == UNKNOWN:
                state, reason = DOWN, "no metadata event since its host is reachable again"
            previous, w.state, w.since, w.reason = w.state, state, since, reason
            if state in (DOWN, STOPPED):  # still down once its host is back: that is news
                w.transitions += 1
                return self._gate(w, CHANGE, previous, now)
            if state != previous:
                w.transitions += 1
                return Event(CHANGE, w.name, w.host, state, previous, since, reason,
                             notify=False, site=w.site, muted=True)
            return None
        if not w.seen:
            w.seen = True
            base, w.restored = w.restored, None
            if base is not None and base.state in (UP, DOWN, STOPPED):
                # what a previous monitor last said is the baseline
                w.state, w.reason = base.state, base.reason
                w.since = base.since if base.since is not None else since
                for key in ("transitions", "notifications", "held"):
                    if key in base.counts:
                        setattr(w, key, base.counts[key])
            else:
                w.state, w.since, w.reason = state, since, reason
                if state == DOWN:  # a first view that is down is news; up or stopped is not
                    w.transitions += 1
                    return self._gate(w, FIRST, UNKNOWN, now)
                return None
        if state == w.state:
            return None
        previous = w.state
        w.state, w.since, w.reason = state, since, reason
        if state == UNKNOWN:
            return None
        w.transitions += 1
        return self._gate(w, CHANGE, previous, now)

    def _gate(self, w: Watched, kind: str, previous: str, now: float) -> Event:
        """Let a change through, or hold it for the flapping window's summary."""
        window = self.flap_window_s
        notify = True
        if window > 0 and w.window_end is not None and now < w.window_end:
            budget = 0 if w.flapping else self.flap_max
            if w.window_sent >= budget:
                w.window_held += 1
                w.held += 1
                notify = False
            else:
                w.window_sent += 1
        elif window > 0:
            w.window_end, w.window_sent, w.window_held, w.flapping = now + window, 1, 0, False
        if notify:
            w.notifications += 1
        return Event(kind, w.name, w.host, w.state, previous, w.since, w.reason, notify,
                     site=w.site)

    def _close_window(self, w: Watched, now: float) -> Event | None:
        """A window that ran out: one summary if changes were held in it (and a new window,
        in which every change is held: one summary per window while it flaps), else done."""
        if w.window_end is None or now < w.window_end:
            return None
        if not w.window_held:
            w.window_end, w.window_sent, w.flapping = None, 0, False
            return None
        event = Event(SUMMARY, w.name, w.host, w.state, None, w.since, w.reason,
                      flapping=w.window_held, site=w.site)
        w.notifications += 1
        w.window_end = now + self.flap_window_s
        w.window_sent, w.window_held, w.flapping = 1, 0, True
        return event
