"""What a person reads: titles, messages and priorities of the notification requests.

Pure functions from an :class:`~.liveness.Event` or an :class:`~.rules.Alarm` (and ``now``, the
request's ``ts``) to the request's JSON object (docs/contract.md, notification request, plus the
monitor's extra keys; docs/monitor.md has real payloads).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Protocol

from .liveness import DOWN, STOPPED, UNREACHABLE, Event
from .rules import ABOVE, FIRING, Alarm

if TYPE_CHECKING:
    from . import Rule

#: the exceptions a format string can raise on fields it does not fit
TEMPLATE_ERRORS = (KeyError, IndexError, ValueError, TypeError, AttributeError)


class Wording(Protocol):
    """The settings the daemon requests depend on (the monitor's Config has them)."""

    priority_down: int
    priority_up: int
    priority_stopped: int
    flap_window_s: float


def when_text(ts: float | None) -> str:
    """A UNIX time as local ``YYYY-mm-dd HH:MM:SS`` (what a person reads in a notification)."""
    if ts is None:
        return "an unknown time"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def ms(value: float | None) -> float | None:
    """A time for a payload: milliseconds are plenty."""
    return None if value is None else round(value, 3)


def daemon_request(event: Event, cfg: Wording, now: float) -> dict[str, Any]:
    """The request for a daemon's state change, or for a flapping window's summary."""
    host = event.site or event.host or "an unknown host"
    daemon = event.daemon.partition("@")[0]  # the identity's daemon; the host is named apart
    who = f"pihub-{daemon} on {host}"
    since = when_text(event.since)
    if event.flapping:
        title = f"{daemon} FLAPPING on {host}, now {event.state.upper()}"
        message = (f"{who} changed state {event.flapping} more time(s) within "
                   f"{cfg.flap_window_s:g} s; now {event.state} since {since}")
        message += f": {event.reason}." if event.state == DOWN else "."
    elif event.state == DOWN:
        title = f"{daemon} DOWN on {host}"
        message = f"{who} is down since {since}: {event.reason}."
    elif event.state == STOPPED:
        title = f"{daemon} stopped on {host}"
        message = f"{who} was stopped cleanly at {since}."
    else:
        title = f"{daemon} UP on {host}"
        message = f"{who} is up again since {since} (was {event.previous})."
    if event.state == DOWN:
        priority = cfg.priority_down
    elif event.state == STOPPED or event.previous == STOPPED:
        priority = cfg.priority_stopped
    else:
        priority = cfg.priority_up
    request = {
        "title": title, "message": message, "priority": priority, "ts": ms(now),
        "daemon": event.daemon, "host": event.host, "state": event.state,
        "previous": event.previous, "since": ms(event.since), "reason": event.reason,
        "flapping": event.flapping,
    }
    if event.site is not None:
        request["satellite"] = event.site
    return request


def host_request(event: Event, cfg: Wording, now: float) -> dict[str, Any]:
    """The request for a satellite's link that went down (the host is unreachable: its
    daemons' own alerts are held) or came back."""
    since = when_text(event.since)
    if event.state == UNREACHABLE:
        title = f"host {event.host} UNREACHABLE"
        message = (f"The pihub satellite {event.host} is unreachable since {since}: "
                   f"{event.reason}. Its daemons are not watched until it is back.")
        priority = cfg.priority_down
    else:
        title = f"host {event.host} reachable again"
        message = (f"The pihub satellite {event.host} is reachable again since {since}; "
                   "its daemons are judged afresh.")
        priority = cfg.priority_up
    return {
        "title": title, "message": message, "priority": priority, "ts": ms(now),
        "satellite": event.host, "host": event.host, "state": event.state,
        "previous": event.previous, "since": ms(event.since), "reason": event.reason,
    }


def rule_fields(rule: Rule, topic: str, location: str, quantity: str, value: float, unit: str,
                threshold: float | None, condition: str, since: float, state: str
                ) -> dict[str, Any]:
    """The fields a rule's templates may use (docs/monitor.md, "Templates")."""
    return {"name": rule.name, "topic": topic, "location": location, "quantity": quantity,
            "value": value, "unit": unit, "threshold": threshold, "condition": condition,
            "above": rule.above, "below": rule.below, "hysteresis": rule.hysteresis,
            "for_s": rule.for_s, "since": when_text(since), "state": state}


def rule_request(alarm: Alarm, now: float) -> tuple[dict[str, Any], str | None]:
    """The request for a rule that fired or cleared, and what went wrong with its templates
    (None: nothing; else a plain message was used instead)."""
    rule, m = alarm.rule, alarm.measurement
    crossed = alarm.crossed or (ABOVE if rule.above is not None else "below")
    threshold = rule.above if crossed == ABOVE else rule.below
    condition = f"{crossed} {threshold:g}" if threshold is not None else crossed
    state = "cleared" if alarm.cleared else FIRING
    fields = rule_fields(rule, alarm.topic, m.location, m.quantity, m.value, m.unit, threshold,
                         condition, alarm.since, state)
    problem = None
    try:
        title = rule.title.format(**fields)
        message = (rule.clear_message if alarm.cleared else rule.message).format(**fields)
    except TEMPLATE_ERRORS as exc:
        problem = f"{type(exc).__name__}: {exc}"
        title = rule.name
        message = f"{rule.name}: {alarm.topic} is {m.value:g} {m.unit} ({condition}), {state}"
    if not alarm.cleared:
        priority = rule.priority
    elif rule.clear_priority is not None:
        priority = rule.clear_priority
    else:
        priority = min(rule.priority, 0)  # an emergency alarm does not clear with another
    return {
        "title": title, "message": message, "priority": priority, "ts": ms(now),
        "rule": rule.name, "topic": alarm.topic, "state": state, "value": m.value,
        "unit": m.unit, "since": ms(alarm.since),
    }, problem
