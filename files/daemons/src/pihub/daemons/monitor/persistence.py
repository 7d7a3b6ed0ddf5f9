"""The monitor's memory: its retained records, written as JSON and read back at start.

The monitor keeps no file (no StateDirectory): what it said survives a restart as its own
retained records in the broker, ``<root>/monitor/daemons/<daemon>`` and
``<root>/monitor/rules/<rule>``, read back once at start so that a restarted monitor neither
repeats nor forgets. ``<root>/monitor/summary`` is written only. Pure functions: the glue
publishes and subscribes; ``now`` is each record's ``ts``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pihub.topics import Reject, shown

from .liveness import STATES, Baseline, Link, Watched, is_number
from .rules import ABOVE, BELOW, FIRING, MAX_RULE_SERIES, Restored, Series
from .wording import ms

COUNTS = ("transitions", "notifications", "held")


# --------------------------------------------------------------------------- writing


def daemon_record(w: Watched, stale_factor: float, now: float) -> dict[str, Any]:
    """``<root>/monitor/daemons/<daemon>``: one daemon's state, last heartbeat and counters
    (a satellite's daemon: ``<root>/monitor/host/<host>/<daemon>``, ``daemon`` its identity
    ``<daemon>@<host>`` and ``satellite`` its host)."""
    meta = w.meta
    extra = {} if w.site is None else {"satellite": w.site}
    return {
        "daemon": w.name, "host": w.host, "state": w.state, "since": ms(w.since),
        "reason": w.reason, "status": w.status, "last_event": w.last_event,
        "last_heartbeat": ms(w.last_beat), "interval_s": w.interval_s,
        "deadline_s": (stale_factor * w.interval_s) if w.interval_s else None,
        "pid": meta.get("pid"), "version": meta.get("version"),
        "uptime_s": meta.get("uptime_s"), "rss_kb": meta.get("rss_kb"),
        "counters": meta.get("counters", {}), "transitions": w.transitions,
        "notifications": w.notifications, "held": w.held, "rejected": w.rejected,
        "flapping": w.flapping, "ts": ms(now), **extra,
    }


def host_record(link: Link, now: float) -> dict[str, Any]:
    """``<root>/monitor/hosts/<host>``: a satellite's link (its bridge), reachable or not."""
    return {"host": link.host, "state": link.state, "since": ms(link.since),
            "transitions": link.transitions, "ts": ms(now)}


def rule_record(name: str, series: dict[str, Series], counts: dict[str, int] | None,
                now: float) -> dict[str, Any]:
    """``<root>/monitor/rules/<rule>``: one rule's per-series state and its counts."""
    shown = {topic: {"state": s.state, "since": ms(s.since), "value": s.value, "unit": s.unit,
                     "ts": s.ts, "crossed": s.crossed}
             for topic, s in series.items()}
    return {
        "rule": name, "ts": ms(now),
        "firing": sum(1 for s in series.values() if s.state == FIRING),
        "counts": dict(counts if counts is not None else {"fired": 0, "cleared": 0}),
        "series": shown,
    }


def summary(daemons: Iterable[Watched], firing: dict[str, list[str]], now: float,
            links: Iterable[Link] = (), own_host: str = "") -> dict[str, Any]:
    """``<root>/monitor/summary``: every daemon's state (seen ones) in one object, keyed by
    identity; with satellites, ``hosts`` too: the own host first, then each satellite with its
    link's state and its daemons' identities."""
    seen = sorted((w for w in daemons if w.seen), key=lambda w: (w.site is not None, w.name))
    known = {link.host: link for link in links}
    sites = sorted({w.site for w in seen if w.site is not None} | set(known))
    hosts: dict[str, Any] = {}
    if sites:
        hosts[own_host] = {"satellite": False, "state": "reachable", "since": None,
                           "daemons": [w.name for w in seen if w.site is None]}
        for site in sites:
            link = known.get(site)
            hosts.setdefault(site, {}).update({
                "satellite": True, "state": link.state if link else None,
                "since": ms(link.since) if link else None,
                "daemons": [w.name for w in seen if w.site == site]})
    out = {
        "ts": ms(now),
        "counts": {state: sum(1 for w in seen if w.state == state) for state in STATES},
        "daemons": {w.name: {"state": w.state, "since": ms(w.since), "host": w.host,
                             "last_heartbeat": ms(w.last_beat), "reason": w.reason}
                    for w in seen},
        "rules_firing": firing,
    }
    if hosts:
        out["hosts"] = hosts
    return out


# --------------------------------------------------------------------------- reading back


def daemon_baseline(topic: str, data: Any) -> Baseline:
    """A previous monitor's daemon record -> the baseline of that daemon's first view."""
    if not isinstance(data, dict) or data.get("state") not in STATES:
        raise Reject(f"record on {topic}: expected an object with a 'state' of "
                     f"{', '.join(STATES)}, got {shown(data)}")
    since = data.get("since")
    return Baseline(
        state=data["state"], reason=str(data.get("reason", "")),
        since=float(since) if is_number(since) else None,
        counts={k: data[k] for k in COUNTS if isinstance(data.get(k), int)},
    )


def rule_restored(topic: str, data: Any) -> Restored:
    """A previous monitor's rule record -> its firing series and counts (the rest is judged
    afresh from the retained measurements)."""
    if not isinstance(data, dict) or not isinstance(data.get("series"), dict):
        raise Reject(f"record on {topic}: expected an object with 'series', "
                     f"got {shown(data)}")
    if len(data["series"]) > MAX_RULE_SERIES:
        raise Reject(f"record on {topic}: at most {MAX_RULE_SERIES} series, got "
                     f"{len(data['series'])}")
    series = {}
    for name, s in data["series"].items():
        if isinstance(s, dict) and s.get("state") == FIRING and is_number(s.get("since")):
            crossed = s.get("crossed") if s.get("crossed") in (ABOVE, BELOW) else None
            series[name] = Series(FIRING, float(s["since"]), crossed=crossed)
    counts = data.get("counts")
    return Restored(series, {k: v for k, v in counts.items() if isinstance(v, int)}
                    if isinstance(counts, dict) else None)
