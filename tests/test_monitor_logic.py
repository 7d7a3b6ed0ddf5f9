"""pihub-monitor's judging without a broker: liveness, flapping, threshold rules, wording and
records, each driven by a fake clock (``now`` is an argument everywhere), in milliseconds.

The MQTT glue around these parts is proved in test_monitor.py against a real Mosquitto.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from pihub.config import ConfigError
from pihub.daemons.monitor import Config, Rule, persistence
from pihub.daemons.monitor.liveness import (
    CHANGE,
    DOWN,
    FIRST,
    STOPPED,
    SUMMARY,
    UNKNOWN,
    UP,
    Baseline,
    Event,
    Liveness,
    parse_meta,
    parse_status,
)
from pihub.daemons.monitor.rules import FIRING, OK, PENDING, Alarm, Restored, Rules, Series
from pihub.daemons.monitor.wording import daemon_request, rule_request, when_text
from pihub.topics import Measurement, Reject

T0 = 1_800_000_000.0  # the fake clock starts here; whole seconds are exact in a float


def meta(name: str, event: str = "heartbeat", *, ts: float = T0, interval: float = 1.0,
         host: str = "pi") -> dict[str, Any]:
    """A metadata event as a pihub daemon publishes it (docs/contract.md)."""
    return {"event": event, "daemon": name, "host": host, "pid": 4242, "version": "0.1.0",
            "ts": ts, "uptime_s": 12.5, "interval_s": interval, "rss_kb": 10240,
            "counters": {"published": 3, "received": 0, "rejected": 0, "errors": 0}}


@dataclass
class Hub:
    """A :class:`Liveness` as the glue drives it, on a fake clock; keeps every event."""

    live: Liveness
    now: float = T0
    connection: int = 1
    events: list[Event] = field(default_factory=list)

    def at(self, now: float) -> Hub:
        self.now = now
        return self

    def beat(self, name: str, event: str = "heartbeat", *, retained: bool = False,
             ts: float | None = None, interval: float = 1.0) -> None:
        data = meta(name, event, ts=self.now if ts is None else ts, interval=interval)
        self.live.saw_meta(name, parse_meta(f"pihub/{name}/meta", name, data), retained,
                           self.now)

    def status(self, name: str, text: str, *, retained: bool = False) -> None:
        self.live.saw_status(name, text, retained, self.now, self.connection)

    def reconnect(self) -> None:
        self.connection += 1
        self.live.listen(self.now, self.connection)

    def check(self) -> list[Event]:
        found = self.live.check(self.now).events
        self.events += found
        return found

    def notified(self, name: str | None = None) -> list[Event]:
        return [e for e in self.events if e.notify and name in (None, e.daemon)]

    def state(self, name: str) -> str:
        return self.live.daemons[name].state


def hub(**settings: Any) -> Hub:
    """A monitor that started listening at T0 on its first connection."""
    h = Hub(Liveness(**settings))
    h.live.listen(T0, 1)
    return h


def up_daemon(h: Hub, name: str = "sensor", interval: float = 1.0) -> Hub:
    """``name`` heard live at the hub's time and judged up (silently: the first view)."""
    h.beat(name, "starting", interval=interval)
    assert h.check() == []
    assert h.state(name) == UP
    return h


# --------------------------------------------------------------------------- contract checks


@pytest.mark.parametrize(("data", "says"), [
    ("not an object", "must be a JSON object"),
    ({**meta("x"), "event": "beat"}, "'event' must be one of starting, heartbeat, stopping"),
    (meta("y"), "'daemon' must be 'x'"),
    ({**meta("x"), "host": 7}, "'host' must be a string"),
    ({**meta("x"), "ts": "now"}, "'ts' must be a number > 0"),
    ({**meta("x"), "interval_s": -1}, "'interval_s' must be a number > 0"),
    ({**meta("x"), "interval_s": True}, "'interval_s' must be a number > 0"),
    ({**meta("x"), "counters": [1]}, "'counters' must be an object"),
])
def test_meta_breaking_the_contract_is_rejected_saying_what_is_wrong(data: Any,
                                                                       says: str) -> None:
    with pytest.raises(Reject, match=says):
        parse_meta("pihub/x/meta", "x", data)


def test_status_other_than_online_or_offline_is_rejected() -> None:
    assert parse_status("pihub/x/status", "offline") == "offline"
    assert parse_status("pihub/x/status", "") == ""
    with pytest.raises(Reject, match="must be online or offline, got 'maybe'"):
        parse_status("pihub/x/status", "maybe")


def test_rejected_messages_are_counted_on_the_daemon_even_before_it_is_known() -> None:
    h = hub()
    h.live.reject("sensor")
    h.live.reject("sensor")
    h.beat("sensor")
    h.live.reject("sensor")
    assert h.live.daemons["sensor"].rejected == 3


# --------------------------------------------------------------------------- first view


def test_first_view_of_an_up_daemon_is_recorded_without_notification() -> None:
    h = up_daemon(hub())
    w = h.live.daemons["sensor"]
    assert w.seen and w.transitions == 0 and w.notifications == 0
    assert h.live.check(h.now).changed == []  # recorded once, then nothing changes


def test_first_view_of_a_stopped_daemon_is_recorded_without_notification() -> None:
    h = hub()
    h.beat("store", "stopping", retained=True, ts=T0 - 3600)
    h.status("store", "offline", retained=True)
    assert h.at(T0 + 3600).check() == []
    assert h.state("store") == STOPPED and h.live.daemons["store"].since == T0 - 3600


def test_first_view_with_only_a_status_is_unknown_and_not_notified() -> None:
    h = hub()
    h.status("sensor", "online", retained=True)
    found = h.live.check(h.now)
    assert found.events == [] and found.changed == ["sensor"]
    assert h.state("sensor") == UNKNOWN
    assert h.live.counts() == {UP: 0, DOWN: 0, STOPPED: 0, UNKNOWN: 1}


def test_first_view_of_a_down_daemon_is_news() -> None:
    h = hub()
    h.beat("store", retained=True, ts=T0 - 600)  # a retained heartbeat of a long-dead daemon
    assert h.at(T0 + 2.5).check() == []  # its deadline runs from when the monitor listens
    assert "store" not in [n for n, w in h.live.daemons.items() if w.seen]
    [down] = h.at(T0 + 2.501).check()
    assert (down.kind, down.state, down.previous, down.notify) == (FIRST, DOWN, UNKNOWN, True)
    assert down.since == T0 - 600 and down.reason == "no heartbeat for 603 s (expected every 1 s)"
    assert h.live.daemons["store"].transitions == 1


def test_retained_offline_is_down_once_the_deadline_from_listening_has_passed() -> None:
    h = hub()
    h.beat("bikes", retained=True, ts=T0 - 3600)
    h.status("bikes", "offline", retained=True)
    assert h.at(T0 + 2.5).check() == []
    [down] = h.at(T0 + 2.501).check()
    assert down.state == DOWN and down.reason == "connection lost (Last Will offline)"
    assert down.since == T0 - 3600  # no time of its own: the last heartbeat


# --------------------------------------------------------------------------- heartbeat deadline


def test_heartbeat_exactly_at_the_deadline_is_up_and_just_past_it_is_down() -> None:
    h = up_daemon(hub(), interval=2.0)  # beat at T0, deadline 2.5 x 2 s = 5 s
    assert h.at(T0 + 5.0).check() == []
    assert h.state("sensor") == UP
    [down] = h.at(T0 + 5.001).check()
    assert (down.kind, down.state, down.previous, down.since) == (CHANGE, DOWN, UP, T0)
    assert down.reason == "no heartbeat for 5 s (expected every 2 s)"


def test_stale_factor_sets_the_deadline() -> None:
    h = up_daemon(hub(stale_factor=4.0), interval=2.0)
    assert h.at(T0 + 8.0).check() == []
    assert [e.state for e in h.at(T0 + 8.001).check()] == [DOWN]


def test_each_heartbeat_moves_the_deadline() -> None:
    h = up_daemon(hub())
    for second in range(1, 20):
        h.at(T0 + second).beat("sensor")
        assert h.check() == []
    assert h.state("sensor") == UP


def test_retained_heartbeat_counts_from_its_own_time_but_never_from_the_future() -> None:
    h = hub()
    h.beat("sensor", retained=True, ts=T0 + 3600)  # the daemon's clock is ahead
    assert h.live.daemons["sensor"].last_beat == T0
    h.beat("other", retained=True, ts=T0 - 2)
    assert h.live.daemons["other"].last_beat == T0 - 2


def test_reconnected_monitor_gives_every_daemon_its_full_deadline_again() -> None:
    h = up_daemon(hub())  # beat at T0, deadline 2.5 s
    h.at(T0 + 2.0).reconnect()  # the monitor lost the broker and is back
    assert h.at(T0 + 4.5).check() == []  # 4.5 s since the beat, 2.5 s since listening
    assert h.state("sensor") == UP
    h.at(T0 + 4.5).beat("sensor")  # heard again in time: nothing to say
    assert h.at(T0 + 6.0).check() == []
    assert h.notified() == []


def test_daemon_not_heard_within_its_deadline_after_a_reconnection_is_down() -> None:
    h = up_daemon(hub())
    h.at(T0 + 2.0).reconnect()
    assert h.at(T0 + 4.5).check() == []
    [down] = h.at(T0 + 4.501).check()
    assert down.state == DOWN and down.since == T0


def test_hung_daemon_that_beats_again_is_up_from_down() -> None:
    h = up_daemon(hub())
    h.at(T0 + 3).check()
    h.at(T0 + 10).beat("sensor")
    [up] = h.check()
    assert (up.state, up.previous, up.since, up.reason) == (UP, DOWN, T0 + 10, "heartbeat")
    w = h.live.daemons["sensor"]
    assert (w.transitions, w.notifications) == (2, 2)


# --------------------------------------------------------------------------- offline, stopping


def test_witnessed_last_will_is_down_once_it_is_one_second_old() -> None:
    h = up_daemon(hub(), interval=30.0)
    h.at(T0 + 1).status("sensor", "offline")
    assert h.at(T0 + 1.999).check() == []
    [down] = h.at(T0 + 2.0).check()
    assert down.state == DOWN and down.since == T0 + 1 and "Last Will" in down.reason


def test_daemon_back_online_within_the_confirmation_second_is_not_reported() -> None:
    h = up_daemon(hub(), interval=30.0)
    h.at(T0 + 1).status("sensor", "offline")
    h.at(T0 + 1.5).check()
    h.at(T0 + 1.6).status("sensor", "online")
    h.beat("sensor", "starting", interval=30.0)
    assert h.at(T0 + 5).check() == []
    assert h.state("sensor") == UP and h.live.daemons["sensor"].transitions == 0


def test_last_will_heard_just_before_the_monitor_lost_the_broker_waits_for_the_deadline() -> None:
    h = up_daemon(hub())  # a stopping Mosquitto sends every Last Will, then goes
    h.at(T0 + 0.5).status("sensor", "offline")
    h.at(T0 + 1.0).reconnect()
    assert h.at(T0 + 3.5).check() == []  # not witnessed on this connection: 2.5 s from listening
    [down] = h.at(T0 + 3.501).check()
    assert down.state == DOWN and "Last Will" in down.reason


def test_live_heartbeat_after_offline_brings_the_daemon_up_but_a_retained_one_does_not() -> None:
    h = up_daemon(hub(), interval=30.0)
    h.at(T0 + 1).status("sensor", "offline")
    h.beat("sensor", retained=True, ts=T0 + 1)  # a retained event says nothing new
    [down] = h.at(T0 + 2).check()
    assert down.state == DOWN
    h.at(T0 + 3).beat("sensor", "starting", interval=30.0)  # live: it is back
    [up] = h.check()
    assert (up.state, up.previous) == (UP, DOWN)


def test_last_will_down_is_not_repeated_when_the_heartbeat_deadline_passes_too() -> None:
    h = up_daemon(hub())
    h.at(T0 + 0.5).status("sensor", "offline")
    h.at(T0 + 1.5).check()
    for second in range(2, 30):
        h.at(T0 + second).check()
    assert [(e.state, e.reason) for e in h.notified()] == [
        (DOWN, "connection lost (Last Will offline)")]
    assert h.live.daemons["sensor"].transitions == 1


def test_clean_stop_is_stopped_and_the_next_start_is_up_from_stopped() -> None:
    h = up_daemon(hub(), interval=5.0)
    h.at(T0 + 1).beat("sensor", "stopping", interval=5.0)
    h.status("sensor", "offline")
    [stopped] = h.check()
    assert (stopped.state, stopped.since, stopped.reason) == (STOPPED, T0 + 1, "stopped cleanly")
    assert h.at(T0 + 100).check() == []  # no deadline for a stopped daemon
    h.status("sensor", "online")
    h.beat("sensor", "starting", interval=5.0)
    [up] = h.check()
    assert (up.state, up.previous) == (UP, STOPPED)


def test_forgotten_daemon_is_gone_and_unknown_names_are_no_news() -> None:
    h = up_daemon(hub())
    assert h.live.forget("sensor") is True
    assert "sensor" not in h.live.daemons and h.live.forget("sensor") is False
    assert h.at(T0 + 100).check() == []


# --------------------------------------------------------------------------- flapping


SLOW = 3600.0  # heartbeat interval of a flapping daemon: no deadline within these tests


def flip(h: Hub, name: str, status: str) -> list[Event]:
    """One second later: ``name`` goes offline (confirmed a second later) or comes back."""
    h.at(h.now + 1)
    if status == "offline":
        h.status(name, "offline")
        h.at(h.now + 1)
    else:
        h.status(name, "online")
        h.beat(name, interval=SLOW)
    return h.check()


def test_first_flap_max_changes_in_a_window_are_notified_at_once() -> None:
    h = up_daemon(hub(flap_window_s=300, flap_max=2), interval=SLOW)
    assert [(e.state, e.notify) for e in flip(h, "sensor", "offline")] == [(DOWN, True)]
    assert [(e.state, e.notify) for e in flip(h, "sensor", "online")] == [(UP, True)]
    assert [(e.state, e.notify) for e in flip(h, "sensor", "offline")] == [(DOWN, False)]


def test_changes_beyond_flap_max_are_held_and_counted() -> None:
    h = up_daemon(hub(flap_window_s=300, flap_max=2), interval=SLOW)
    for status in ("offline", "online", "offline", "online", "offline"):
        flip(h, "sensor", status)
    w = h.live.daemons["sensor"]
    assert [e.notify for e in h.events] == [True, True, False, False, False]
    assert all(e.kind == CHANGE for e in h.events)  # a held change is still a change
    assert (w.transitions, w.notifications, w.held, w.window_held) == (5, 2, 3, 3)
    assert w.flapping is False  # not yet: that is decided when the window closes


def test_window_close_sums_up_the_held_changes_stating_the_final_state() -> None:
    h = up_daemon(hub(flap_window_s=300, flap_max=1), interval=SLOW)
    flip(h, "sensor", "offline")  # window opens at T0 + 2
    for status in ("online", "offline", "online", "offline"):
        flip(h, "sensor", status)
    assert len(h.notified()) == 1
    assert h.at(T0 + 301.999).check() == []  # the window is still open
    [summary] = h.at(T0 + 302).check()
    assert (summary.kind, summary.state, summary.flapping, summary.previous) == (
        SUMMARY, DOWN, 4, None)
    assert summary.notify and summary.since == h.live.daemons["sensor"].since
    w = h.live.daemons["sensor"]
    assert w.flapping and w.window_held == 0 and w.notifications == 2


def test_daemon_that_keeps_flapping_gets_one_summary_per_window() -> None:
    h = up_daemon(hub(flap_window_s=300, flap_max=2), interval=SLOW)
    for status in ("offline", "online", "offline"):  # window 1 opens at T0 + 2
        flip(h, "sensor", status)
    [first] = h.at(T0 + 302).check()  # window 1 closes; window 2 runs to T0 + 602
    assert (first.kind, first.state, first.flapping) == (SUMMARY, DOWN, 1)
    for status in ("online", "offline", "online", "offline"):  # all held: it is flapping
        assert [e.notify for e in flip(h, "sensor", status)] == [False]
    assert h.at(T0 + 601.999).check() == []
    [second] = h.at(T0 + 602).check()
    assert (second.kind, second.state, second.flapping) == (SUMMARY, DOWN, 4)
    flip(h, "sensor", "online")
    [third] = h.at(T0 + 902).check()
    assert (third.kind, third.state, third.flapping) == (SUMMARY, UP, 1)
    assert [e.kind for e in h.notified()] == [CHANGE, CHANGE, SUMMARY, SUMMARY, SUMMARY]


def test_window_without_held_changes_closes_silently_and_ends_the_flapping() -> None:
    h = up_daemon(hub(flap_window_s=300, flap_max=1), interval=SLOW)
    flip(h, "sensor", "offline")
    flip(h, "sensor", "online")
    h.at(T0 + 302).check()  # summary; flapping, window 2 to T0 + 602
    h.beat("sensor", interval=SLOW)
    assert h.at(T0 + 602).check() == []  # nothing held in window 2: no summary
    w = h.live.daemons["sensor"]
    assert not w.flapping and w.window_end is None
    [down] = flip(h, "sensor", "offline")  # a new outage is news again at once
    assert down.notify and down.kind == CHANGE and down.state == DOWN


def test_summary_of_a_window_that_ends_up_states_up() -> None:
    h = up_daemon(hub(flap_window_s=60, flap_max=2), interval=SLOW)
    for status in ("offline", "online", "offline", "online"):
        flip(h, "sensor", status)
    [summary] = h.at(T0 + 62).check()
    assert (summary.state, summary.flapping) == (UP, 2)


def test_flap_window_zero_turns_flapping_control_off() -> None:
    h = up_daemon(hub(flap_window_s=0, flap_max=1), interval=SLOW)
    for status in ("offline", "online") * 4:
        flip(h, "sensor", status)
    assert [e.notify for e in h.events] == [True] * 8
    assert h.live.daemons["sensor"].held == 0


def test_first_view_down_opens_a_flapping_window() -> None:
    h = hub(flap_window_s=300, flap_max=1)
    h.beat("store", retained=True, ts=T0 - 600, interval=30.0)
    h.status("store", "offline", retained=True)
    assert [e.kind for e in h.at(T0 + 75.001).check()] == [FIRST]
    h.status("store", "online")
    h.beat("store", interval=30.0)
    assert [e.notify for e in h.check()] == [False]


# --------------------------------------------------------------------------- restoring a daemon


def test_daemon_reported_down_before_a_restart_is_not_reported_again() -> None:
    h = hub()
    h.beat("store", retained=True, ts=T0 - 600)
    h.live.restore("store", persistence.daemon_baseline("pihub/monitor/daemons/store", {
        "state": "down", "since": T0 - 597.5, "reason": "no heartbeat for 3 s",
        "transitions": 3, "notifications": 2, "held": 1}))
    found = h.at(T0 + 2.501).live.check(h.now)
    assert found.events == [] and found.changed == ["store"]
    w = h.live.daemons["store"]
    assert (w.state, w.since, w.reason) == (DOWN, T0 - 597.5, "no heartbeat for 3 s")
    assert (w.transitions, w.notifications, w.held) == (3, 2, 1)


def test_daemon_back_since_a_restored_down_gets_its_up() -> None:
    h = hub()
    h.live.restore("store", Baseline(DOWN, "connection lost (Last Will offline)", T0 - 60))
    h.beat("store", retained=True, ts=T0 - 0.5)
    [up] = h.check()
    assert (up.kind, up.state, up.previous) == (CHANGE, UP, DOWN)


def test_restored_unknown_record_is_no_baseline() -> None:
    h = hub()
    h.live.restore("store", Baseline(UNKNOWN))
    h.beat("store", retained=True, ts=T0 - 600)
    assert [(e.kind, e.state) for e in h.at(T0 + 3).check()] == [(FIRST, DOWN)]


def test_restored_record_without_a_time_takes_the_judged_one() -> None:
    h = hub()
    h.live.restore("store", persistence.daemon_baseline("t", {"state": "up", "since": "x"}))
    h.beat("store", retained=True, ts=T0 - 1)
    assert h.check() == []
    assert h.live.daemons["store"].since == T0 - 1


@pytest.mark.parametrize("data", [[], {"state": "sleeping"}, {"since": 1.0}])
def test_own_daemon_record_that_is_not_one_is_rejected(data: Any) -> None:
    with pytest.raises(Reject, match="record on t: expected an object with a 'state'"):
        persistence.daemon_baseline("t", data)


# --------------------------------------------------------------------------- records


def test_daemon_record_holds_state_last_heartbeat_and_counters() -> None:
    h = up_daemon(hub(), interval=2.0)
    h.live.reject("sensor")
    w = h.live.daemons["sensor"]
    record = persistence.daemon_record(w, 3.0, T0 + 0.12345)
    assert record == {
        "daemon": "sensor", "host": "pi", "state": "up", "since": T0, "reason": "heartbeat",
        "status": None, "last_event": "starting", "last_heartbeat": T0, "interval_s": 2.0,
        "deadline_s": 6.0, "pid": 4242, "version": "0.1.0", "uptime_s": 12.5, "rss_kb": 10240,
        "counters": {"published": 3, "received": 0, "rejected": 0, "errors": 0},
        "transitions": 0, "notifications": 0, "held": 0, "rejected": 1, "flapping": False,
        "ts": 1_800_000_000.123,
    }


def test_daemon_record_read_back_is_the_baseline() -> None:
    h = up_daemon(hub())
    flip(h, "sensor", "offline")
    w = h.live.daemons["sensor"]
    base = persistence.daemon_baseline("t", persistence.daemon_record(w, 2.5, h.now))
    assert base == Baseline(DOWN, w.reason, w.since, {"transitions": 1, "notifications": 1,
                                                      "held": 0})


def test_summary_lists_seen_daemons_with_counts_per_state() -> None:
    h = up_daemon(hub())
    h.beat("store", "stopping", retained=True, ts=T0 - 10)
    h.beat("late", retained=True, ts=T0 - 600)  # not judged yet: not in the summary
    h.check()
    summary = persistence.summary(h.live.daemons.values(), {"wet": ["pihub/data/a/b"]}, T0)
    assert summary["counts"] == {"up": 1, "down": 0, "stopped": 1, "unknown": 0}
    assert list(summary["daemons"]) == ["sensor", "store"]
    assert summary["daemons"]["store"] == {"state": "stopped", "since": T0 - 10, "host": "pi",
                                           "last_heartbeat": None, "reason": "stopped cleanly"}
    assert summary["rules_firing"] == {"wet": ["pihub/data/a/b"]} and summary["ts"] == T0


# --------------------------------------------------------------------------- wording (daemons)


class Priorities:
    priority_down, priority_up, priority_stopped, flap_window_s = 1, 0, -1, 300.0


def event(state: str, previous: str | None, flapping: int = 0, reason: str = "heartbeat"
          ) -> Event:
    kind = SUMMARY if flapping else CHANGE
    return Event(kind, "sensor", "pi", state, previous, T0 + 0.4567, reason, True, flapping)


def test_down_request_says_who_where_since_when_and_why() -> None:
    request = daemon_request(event(DOWN, UP, reason="connection lost (Last Will offline)"),
                             Priorities(), T0 + 1.23456)
    assert request == {
        "title": "sensor DOWN on pi",
        "message": f"pihub-sensor on pi is down since {when_text(T0)}: "
                   "connection lost (Last Will offline).",
        "priority": 1, "ts": 1_800_000_001.235, "daemon": "sensor", "host": "pi",
        "state": "down", "previous": "up", "since": 1_800_000_000.457,
        "reason": "connection lost (Last Will offline)", "flapping": 0,
    }


@pytest.mark.parametrize(("state", "previous", "priority", "title", "says"), [
    (UP, DOWN, 0, "sensor UP on pi", "is up again since"),
    (STOPPED, UP, -1, "sensor stopped on pi", "was stopped cleanly at"),
    (UP, STOPPED, -1, "sensor UP on pi", "(was stopped)"),
])
def test_each_kind_of_change_has_its_title_and_priority(state: str, previous: str,
                                                        priority: int, title: str,
                                                        says: str) -> None:
    request = daemon_request(event(state, previous), Priorities(), T0)
    assert request["priority"] == priority and request["title"] == title
    assert says in request["message"] and request["previous"] == previous


@pytest.mark.parametrize(("state", "priority", "ending"), [
    (DOWN, 1, "since {}: no heartbeat for 3 s."), (UP, 0, "since {}."),
    (STOPPED, -1, "since {}."),
])
def test_flapping_summary_states_the_final_state_at_its_priority(state: str, priority: int,
                                                                  ending: str) -> None:
    request = daemon_request(event(state, None, 4, "no heartbeat for 3 s"), Priorities(), T0)
    assert request["title"] == f"sensor FLAPPING on pi, now {state.upper()}"
    assert request["message"] == ("pihub-sensor on pi changed state 4 more time(s) within "
                                  f"300 s; now {state} " + ending.format(when_text(T0)))
    assert request["priority"] == priority and request["flapping"] == 4
    assert request["previous"] is None


def test_daemon_without_a_host_yet_is_on_an_unknown_host() -> None:
    bare = Event(FIRST, "sensor", "", DOWN, UNKNOWN, None, "connection lost", True)
    request = daemon_request(bare, Priorities(), T0)
    assert request["title"] == "sensor DOWN on an unknown host"
    assert "since an unknown time" in request["message"] and request["host"] == ""


# --------------------------------------------------------------------------- threshold rules


DATA = "pihub/data/cellar/humidity"


def m(value: float, location: str = "cellar", quantity: str = "humidity", unit: str = "%"
      ) -> Measurement:
    return Measurement(location, quantity, float(value), unit, T0)


def settled(*rules: Rule) -> Rules:
    r = Rules(list(rules))
    assert r.settle(T0) == []
    return r


def wet(**keys: Any) -> Rule:
    return Rule(**{"name": "wet", "topic": "cellar/humidity", "above": 70.0, **keys})


def states(alarms: list[Alarm]) -> list[tuple[str, bool]]:
    return [(a.topic, a.cleared) for a in alarms]


def test_value_beyond_the_limit_fires_at_once_without_for_s() -> None:
    rules = settled(wet())
    assert rules.measure(DATA, m(70), T0) == []  # at the limit is not beyond it
    [fired] = rules.measure(DATA, m(70.5), T0 + 1)
    assert (fired.cleared, fired.crossed, fired.since) == (False, "above", T0 + 1)
    assert rules.series[("wet", DATA)].state == FIRING


def test_firing_series_does_not_fire_again_while_it_stays_beyond() -> None:
    rules = settled(wet())
    rules.measure(DATA, m(80), T0)
    for second in range(1, 10):
        assert rules.measure(DATA, m(80 + second), T0 + second) == []
        assert rules.tick(T0 + second) == []
    assert rules.counts["wet"] == {"fired": 1, "cleared": 0}


def test_for_s_delays_firing_until_the_value_has_stayed_beyond_that_long() -> None:
    rules = settled(wet(for_s=10.0))
    assert rules.measure(DATA, m(75), T0) == []
    assert rules.series[("wet", DATA)].state == PENDING
    assert rules.measure(DATA, m(80), T0 + 9.999) == []
    assert rules.tick(T0 + 9.999) == []
    [fired] = rules.tick(T0 + 10.0)  # exactly for_s after crossing
    assert fired.measurement.value == 80 and fired.since == T0 + 10.0
    assert rules.tick(T0 + 20) == []


def test_pending_series_fires_on_a_measurement_once_for_s_has_run_out() -> None:
    rules = settled(wet(for_s=10.0))
    rules.measure(DATA, m(75), T0)
    [fired] = rules.measure(DATA, m(76), T0 + 10.0)
    assert fired.measurement.value == 76 and not fired.cleared


def test_value_back_inside_before_for_s_cancels_and_a_new_crossing_starts_over() -> None:
    rules = settled(wet(for_s=10.0))
    rules.measure(DATA, m(90), T0)
    assert rules.measure(DATA, m(60), T0 + 5) == []
    assert rules.series[("wet", DATA)].state == OK
    assert rules.tick(T0 + 30) == []
    rules.measure(DATA, m(90), T0 + 31)  # the clock starts again at the new crossing
    assert rules.tick(T0 + 40.999) == []
    assert len(rules.tick(T0 + 41)) == 1
    assert rules.counts["wet"] == {"fired": 1, "cleared": 0}


def test_above_rule_clears_only_past_the_hysteresis() -> None:
    rules = settled(wet(hysteresis=5.0))
    rules.measure(DATA, m(75), T0)
    for value in (70, 68, 72, 65.001):  # inside the limit but not by 5: still firing
        assert rules.measure(DATA, m(value), T0 + 1) == []
        assert rules.series[("wet", DATA)].state == FIRING
    [cleared] = rules.measure(DATA, m(65), T0 + 2)  # exactly above - hysteresis
    assert cleared.cleared and cleared.measurement.value == 65
    assert rules.series[("wet", DATA)].state == OK


def test_below_rule_clears_only_past_the_hysteresis() -> None:
    rules = settled(Rule(name="cold", topic="cellar/temperature", below=10.0, hysteresis=2.0))
    topic = "pihub/data/cellar/temperature"
    assert rules.measure(topic, m(10, quantity="temperature"), T0) == []
    [fired] = rules.measure(topic, m(9.5, quantity="temperature"), T0)
    assert fired.crossed == "below"
    for value in (10, 11, 11.999):
        assert rules.measure(topic, m(value, quantity="temperature"), T0 + 1) == []
    [cleared] = rules.measure(topic, m(12, quantity="temperature"), T0 + 2)
    assert cleared.cleared


def test_band_rule_fires_on_either_side_and_says_which() -> None:
    rules = settled(Rule(name="freezer", topic="+/freezer", above=-12.0, below=-30.0))
    topic = "pihub/data/kitchen/freezer"
    [warm] = rules.measure(topic, m(-10, "kitchen", "freezer"), T0)
    assert warm.crossed == "above"
    [back] = rules.measure(topic, m(-20, "kitchen", "freezer"), T0 + 1)
    assert back.cleared
    [cold] = rules.measure(topic, m(-31, "kitchen", "freezer"), T0 + 2)
    assert cold.crossed == "below"


def test_wildcard_rule_keeps_one_state_per_series() -> None:
    rules = settled(Rule(name="cold", topic="+/temperature", below=10.0, hysteresis=2.0))
    attic, cellar = "pihub/data/attic/temperature", "pihub/data/cellar/temperature"
    assert states(rules.measure(attic, m(8, "attic", "temperature"), T0)) == [(attic, False)]
    assert rules.measure(cellar, m(15, "cellar", "temperature"), T0) == []
    assert states(rules.measure(cellar, m(5, "cellar", "temperature"), T0)) == [(cellar, False)]
    assert rules.measure(attic, m(11, "attic", "temperature"), T0) == []
    assert states(rules.measure(attic, m(12.5, "attic", "temperature"), T0)) == [(attic, True)]
    assert rules.firing() == {"cold": [cellar]}


def test_measurement_no_rule_watches_is_not_kept() -> None:
    rules = settled(wet())
    assert rules.measure("pihub/data/attic/humidity", m(99, "attic"), T0) == []
    assert rules.latest == {} and rules.series == {}


def test_values_that_came_before_start_up_ended_are_judged_when_it_ends() -> None:
    rules = Rules([wet()])
    assert rules.measure(DATA, m(60), T0) == []
    assert rules.measure(DATA, m(90), T0 + 1) == []  # retained values, start-up grace
    assert rules.series == {}
    [fired] = rules.settle(T0 + 3)
    assert fired.measurement.value == 90
    assert rules.take_dirty() == {"wet"} and rules.take_dirty() == set()


def test_changed_series_marks_its_rule_for_a_new_record() -> None:
    rules = settled(wet(for_s=5.0), Rule(name="dry", topic="cellar/humidity", below=20.0))
    rules.take_dirty()
    rules.measure(DATA, m(50), T0)
    assert rules.take_dirty() == set()  # new series, ok: the periodic refresh shows them
    rules.measure(DATA, m(80), T0 + 2)
    assert rules.take_dirty() == {"wet"}
    rules.tick(T0 + 7)
    assert rules.take_dirty() == {"wet"}


def test_reloaded_rules_keep_the_series_of_unchanged_rules_only() -> None:
    rules = settled(wet(), Rule(name="dry", topic="cellar/humidity", below=40.0))
    rules.measure(DATA, m(90), T0)
    rules.configure([wet(), Rule(name="dry", topic="cellar/humidity", below=30.0)])
    assert list(rules.series) == [("wet", DATA)]
    assert rules.series[("wet", DATA)].state == FIRING
    assert rules.measure(DATA, m(91), T0 + 1) == []  # still firing: no repeat


# --------------------------------------------------------------------------- restoring rules


def test_rule_firing_before_a_restart_is_not_repeated_and_clears_once() -> None:
    before = settled(wet())
    before.measure(DATA, m(90), T0)
    record = persistence.rule_record("wet", before.series_of("wet"), before.counts["wet"], T0)
    after = Rules([wet()])
    after.restore("wet", persistence.rule_restored("pihub/monitor/rules/wet", record))
    after.measure(DATA, m(91), T0 + 60)  # the retained value, during start-up
    assert after.settle(T0 + 63) == []
    assert after.firing() == {"wet": [DATA]}
    assert after.series[("wet", DATA)].since == T0  # firing since the first monitor said so
    [cleared] = after.measure(DATA, m(50), T0 + 70)
    assert cleared.cleared and after.counts["wet"] == {"fired": 1, "cleared": 1}


def test_rule_record_holds_every_series_and_the_counts() -> None:
    rules = settled(Rule(name="cold", topic="+/temperature", below=10.0))
    rules.measure("pihub/data/b/temperature", m(5, "b", "temperature", "°C"), T0)
    rules.measure("pihub/data/a/temperature", m(15, "a", "temperature", "°C"), T0 + 1)
    record = persistence.rule_record("cold", rules.series_of("cold"), rules.counts.get("cold"),
                                     T0 + 2)
    assert record == {
        "rule": "cold", "ts": T0 + 2, "firing": 1, "counts": {"fired": 1, "cleared": 0},
        "series": {
            "pihub/data/a/temperature": {"state": "ok", "since": T0 + 1, "value": 15.0,
                                         "unit": "°C", "ts": T0, "crossed": None},
            "pihub/data/b/temperature": {"state": "firing", "since": T0, "value": 5.0,
                                         "unit": "°C", "ts": T0, "crossed": "below"}},
    }
    assert list(record["series"]) == sorted(record["series"])
    empty = persistence.rule_record("none", {}, None, T0)
    assert empty["counts"] == {"fired": 0, "cleared": 0} and empty["firing"] == 0


def test_restored_rule_record_keeps_only_well_formed_firing_series() -> None:
    restored = persistence.rule_restored("t", {"series": {
        "a": {"state": "firing", "since": T0, "crossed": "below"},
        "b": {"state": "pending", "since": T0},
        "c": {"state": "firing", "since": "yesterday"},
        "d": "firing",
        "e": {"state": "firing", "since": T0, "crossed": "sideways"},
    }, "counts": {"fired": 4, "cleared": "x"}})
    assert {t: (s.state, s.since, s.crossed) for t, s in restored.series.items()} == {
        "a": (FIRING, T0, "below"), "e": (FIRING, T0, None)}
    assert restored.counts == {"fired": 4}


@pytest.mark.parametrize("data", [[], {"series": []}, {"rule": "wet"}])
def test_own_rule_record_that_is_not_one_is_rejected(data: Any) -> None:
    with pytest.raises(Reject, match="record on t: expected an object with 'series'"):
        persistence.rule_restored("t", data)


def test_restored_record_of_a_rule_that_no_longer_exists_is_dropped() -> None:
    rules = Rules([wet()])
    rules.restore("gone", Restored({DATA: Series(FIRING, T0)}, {"fired": 1}))
    assert rules.settle(T0) == [] and rules.series == {} and "gone" not in rules.counts


def test_rule_records_arriving_after_start_up_are_ignored() -> None:
    rules = settled(wet())
    rules.restore("wet", Restored({DATA: Series(FIRING, T0)}))
    assert rules.measure(DATA, m(50), T0) == []
    assert rules.firing() == {} and rules.series[("wet", DATA)].state == OK


# --------------------------------------------------------------------------- wording (rules)


def fired(rule: Rule, value: float, *, cleared: bool = False, crossed: str | None = "above"
          ) -> Alarm:
    return Alarm(rule, DATA, m(value), T0, crossed, cleared)


def test_rule_request_words_the_default_templates() -> None:
    request, problem = rule_request(fired(wet(), 74.5), T0 + 0.0004)
    assert problem is None
    assert request == {"title": "wet", "message": "wet: cellar/humidity is 74.5 % (above 70)",
                       "priority": 0, "ts": T0, "rule": "wet", "topic": DATA,
                       "state": "firing", "value": 74.5, "unit": "%", "since": T0}
    request, _ = rule_request(fired(wet(), 64, cleared=True), T0)
    assert request["message"] == "wet: cellar/humidity is back to 64 %"
    assert request["state"] == "cleared"


def test_rule_request_fills_every_template_field() -> None:
    rule = wet(hysteresis=3.0, for_s=600.0, title="{name} {state}",
               message="{topic}|{location}|{quantity}|{value:.1f}|{unit}|{threshold:g}|"
                       "{condition}|{above:g}|{below}|{hysteresis:g}|{for_s:g}|{since}")
    request, problem = rule_request(fired(rule, 74.5), T0)
    assert problem is None and request["title"] == "wet firing"
    assert request["message"] == (f"{DATA}|cellar|humidity|74.5|%|70|above 70|70|None|3|600|"
                                  f"{when_text(T0)}")


@pytest.mark.parametrize(("priority", "clear_priority", "firing", "clearing"), [
    (1, None, 1, 0), (2, None, 2, 0), (-1, None, -1, -1), (2, 1, 2, 1),
])
def test_clearing_priority_is_the_lower_of_priority_and_zero_unless_given(
        priority: int, clear_priority: int | None, firing: int, clearing: int) -> None:
    rule = wet(priority=priority, clear_priority=clear_priority)
    assert rule_request(fired(rule, 80), T0)[0]["priority"] == firing
    assert rule_request(fired(rule, 60, cleared=True), T0)[0]["priority"] == clearing


def test_restored_series_without_a_crossing_is_worded_by_the_rule_s_first_limit() -> None:
    rule = Rule(name="cold", topic="cellar/humidity", below=10.0)
    request, _ = rule_request(fired(rule, 12, cleared=True, crossed=None), T0)
    assert request["message"] == "cold: cellar/humidity is back to 12 %"
    request, _ = rule_request(fired(wet(message="{condition}"), 60, crossed=None), T0)
    assert request["message"] == "above 70"


def test_template_failing_at_run_time_sends_a_plain_message_and_says_why() -> None:
    rule = wet(message="{value:d}")  # the start check would refuse it; built here without
    request, problem = rule_request(fired(rule, 74.5), T0)
    assert problem is not None and problem.startswith("ValueError")
    assert request["title"] == "wet"
    assert request["message"] == f"wet: {DATA} is 74.5 % (above 70), firing"


def test_rule_template_with_an_unknown_field_fails_the_config_check() -> None:
    with pytest.raises(ConfigError, match="room"):
        wet(message="{room} is wet").check()
    with pytest.raises(ConfigError, match="a rule needs above, below or both"):
        Rule(name="r", topic="a/b").check()
    Config(rules=[wet()]).check()
    with pytest.raises(ConfigError, match="duplicate rule name 'wet'"):
        Config(rules=[wet(), wet(above=80.0)]).check()


# --------------------------------------------------------------------------- limits


def test_liveness_watches_at_most_max_daemons_and_rejects_one_more():
    from pihub.daemons.monitor.liveness import MAX_DAEMONS

    live = Liveness()
    for i in range(MAX_DAEMONS):
        live.saw_status(f"d{i}", "online", False, T0, 1)
    with pytest.raises(Reject, match=f"beyond the {MAX_DAEMONS} watched"):
        live.saw_meta("one-more", meta("one-more"), False, T0)
    live.saw_status("d0", "offline", False, T0, 1)  # a known one goes on
    for i in range(10 * MAX_DAEMONS):
        live.reject(f"unknown{i}")
    assert len(live.daemons) == MAX_DAEMONS and len(live._rejected_unknown) <= MAX_DAEMONS


def test_rules_watch_at_most_max_rule_series_and_reject_one_more():
    from pihub.daemons.monitor.rules import MAX_RULE_SERIES

    rules = settled(Rule(name="hot", topic="+/temperature", above=1000.0))
    for i in range(MAX_RULE_SERIES):
        rules.measure(f"pihub/data/r{i}/temperature",
                      Measurement(f"r{i}", "temperature", 20.0, "°C", T0), T0)
    with pytest.raises(Reject, match=f"watch {MAX_RULE_SERIES} series already"):
        rules.measure("pihub/data/new/temperature",
                      Measurement("new", "temperature", 20.0, "°C", T0), T0)
    rules.measure("pihub/data/r0/temperature", Measurement("r0", "temperature", 21.0, "°C", T0),
                  T0)  # a known one goes on
    assert len(rules.latest) == MAX_RULE_SERIES


def test_a_rule_record_with_too_many_series_is_rejected():
    from pihub.daemons.monitor.rules import MAX_RULE_SERIES

    series = {f"pihub/data/r{i}/t": {"state": "firing", "since": T0}
              for i in range(MAX_RULE_SERIES + 1)}
    with pytest.raises(Reject, match=f"at most {MAX_RULE_SERIES} series"):
        persistence.rule_restored("pihub/monitor/rules/hot", {"series": series})
