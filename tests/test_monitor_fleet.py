"""The fleet (contract §2, "Fleet") in the library and the monitor's judging, without a broker:
the ``host/<host>/...`` mirror's topics, identities, and a satellite's daemons and link on a
fake clock. The real bridge between two brokers is in test_fleet_bridge.py.
"""

from __future__ import annotations

import pytest
from pihub.config import ConfigError, HostsConfig, build
from pihub.daemons.monitor import persistence
from pihub.daemons.monitor.liveness import (
    DOWN,
    HOST_EVENT,
    REACHABLE,
    STOPPED,
    UNREACHABLE,
    UP,
)
from pihub.daemons.monitor.wording import daemon_request, host_request
from pihub.daemons.web import Config as WebConfig
from pihub.topics import (
    DAEMON_NAME,
    Reject,
    Topics,
    host_segment,
    identity,
    split_identity,
)
from test_monitor_logic import T0, Hub, hub, up_daemon

SAT = "sensor-gpio@shed"


# --------------------------------------------------------------------------- library


def test_mirror_topics_and_their_parser() -> None:
    t = Topics()
    assert t.host_status("shed", "sensor-gpio") == "pihub/host/shed/sensor-gpio/status"
    assert t.host_meta("shed", "sensor-gpio") == "pihub/host/shed/sensor-gpio/meta"
    assert t.host_cmd("shed", "sensor-gpio", "pump") == "pihub/host/shed/cmd/sensor-gpio/pump"
    assert t.cmd_for(None, "sensor-gpio", "pump") == "pihub/cmd/sensor-gpio/pump"
    assert t.bridge_state("shed") == "pihub/host/shed/bridge/state"
    assert t.bridge_host("pihub/host/shed/bridge/state") == "shed"
    assert t.daemon_topic("pihub/sensor-gpio/status") == (None, "sensor-gpio", "status")
    assert t.daemon_topic("pihub/host/shed/sensor-gpio/meta") == ("shed", "sensor-gpio", "meta")
    for other in ("pihub/notify/status", "pihub/data/a/b", "pihub/host/shed/bridge/state",
                  "pihub/host/shed/cmd/x/status", "pihub/host/shed/status", "elsewhere/x/meta"):
        assert t.daemon_topic(other) is None, other
    with pytest.raises(Reject, match="host must be"):
        t.daemon_topic("pihub/host/Shed/sensor-gpio/status")
    with pytest.raises(Reject, match="daemon name"):
        t.daemon_topic("pihub/host/shed/Bad/status")


def test_identity_is_the_daemon_alone_on_the_own_host_and_daemon_at_host_on_a_satellite() -> None:
    assert identity("monitor") == "monitor"
    assert identity("sensor-gpio", "shed") == SAT
    assert split_identity(SAT) == ("sensor-gpio", "shed")
    assert split_identity("monitor") == ("monitor", None)
    with pytest.raises(ValueError):
        split_identity("a@B")


def test_host_is_a_reserved_name_and_host_names_become_segments() -> None:
    assert not DAEMON_NAME.match("host") and DAEMON_NAME.match("hostess")
    assert host_segment("Shed.Pi") == "shed-pi"
    assert host_segment("front door") == "front-door"
    with pytest.raises(ConfigError, match="outputs_daemon"):
        build(WebConfig, {"outputs_daemon": "host", "login_required": False})


def test_host_name_defaults_to_the_machines_hostname_as_a_segment(monkeypatch) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "Central.Home")
    assert build(HostsConfig, {}).own_host() == "central-home"
    assert build(HostsConfig, {"host_name": "hub"}).own_host() == "hub"
    with pytest.raises(ConfigError, match="host_name"):
        build(HostsConfig, {"host_name": "Hub One"})


# --------------------------------------------------------------------------- the monitor's judging


def test_satellite_daemon_has_the_same_deadline_and_its_events_name_its_host() -> None:
    h = up_daemon(hub(), SAT)
    assert h.live.daemons[SAT].site == "shed" and h.live.daemons[SAT].daemon == "sensor-gpio"
    h.at(T0 + 2.5).check()
    assert h.notified() == []
    [down] = h.at(T0 + 2.6).check()
    assert (down.state, down.daemon, down.site) == (DOWN, SAT, "shed")
    request = daemon_request(down, _Cfg(), T0 + 3)
    assert request["title"] == "sensor-gpio DOWN on shed"
    assert request["daemon"] == SAT and request["satellite"] == "shed"
    assert "pihub-sensor-gpio on shed is down" in request["message"]


def test_own_daemons_request_has_no_satellite_key() -> None:
    h = up_daemon(hub(), "sensor-gpio")
    [down] = h.at(T0 + 3).check()
    request = daemon_request(down, _Cfg(), T0 + 3)
    assert "satellite" not in request and request["daemon"] == "sensor-gpio"


def _down_link(h: Hub, at: float) -> None:
    h.at(at)
    h.live.saw_bridge("shed", False, h.now)


def test_bridge_down_is_one_host_event_not_one_per_daemon() -> None:
    h = up_daemon(up_daemon(hub(), SAT), "sensor-system@shed")
    h.live.saw_bridge("shed", True, T0)
    assert h.check() == []  # a first view of a reachable link is no news
    _down_link(h, T0 + 0.5)
    found = h.check()
    notified = [e for e in found if e.notify]
    assert [(e.kind, e.host, e.state) for e in notified] == [(HOST_EVENT, "shed", UNREACHABLE)]
    assert {e.daemon for e in found if not e.notify and e.muted} == {SAT, "sensor-system@shed"}
    assert h.state(SAT) == DOWN and "unreachable" in h.live.daemons[SAT].reason
    h.at(T0 + 60).check()  # heartbeats long overdue: nothing more said
    assert [e for e in h.notified() if e.kind != HOST_EVENT] == []
    assert host_request(notified[0], _Cfg(), T0)["title"] == "host shed UNREACHABLE"
    # back: one host event; the daemons that beat again are up without a word
    h.at(T0 + 61)
    h.live.saw_bridge("shed", True, h.now)
    h.beat(SAT)
    h.beat("sensor-system@shed")
    found = h.check()
    assert [(e.kind, e.state) for e in found if e.notify] == [(HOST_EVENT, REACHABLE)]
    assert h.state(SAT) == UP and h.state("sensor-system@shed") == UP


def test_satellite_daemon_still_down_once_its_host_is_back_is_notified_after_its_deadline() -> None:
    h = up_daemon(hub(), SAT)
    h.live.saw_bridge("shed", True, T0)
    h.check()
    _down_link(h, T0 + 1)
    h.check()
    h.at(T0 + 30)
    h.live.saw_bridge("shed", True, h.now)
    h.check()
    h.at(T0 + 32.4).check()  # a full deadline from the link's return
    assert [e for e in h.notified() if e.kind != HOST_EVENT] == []
    [down] = h.at(T0 + 32.6).check()
    assert (down.daemon, down.state, down.notify) == (SAT, DOWN, True)


def test_daemon_down_and_notified_before_its_host_went_away_says_up_when_back() -> None:
    h = up_daemon(hub(), SAT)
    h.live.saw_bridge("shed", True, T0)
    h.at(T0 + 3).check()
    assert [e.state for e in h.notified(SAT)] == [DOWN]
    _down_link(h, T0 + 4)
    h.check()
    h.at(T0 + 10)
    h.live.saw_bridge("shed", True, h.now)
    h.beat(SAT)
    h.check()
    assert [e.state for e in h.notified(SAT)] == [DOWN, UP]


def test_clean_stop_during_the_outage_is_notified_once_the_host_is_back() -> None:
    h = up_daemon(hub(), SAT)
    h.live.saw_bridge("shed", True, T0)
    h.check()
    _down_link(h, T0 + 1)
    h.check()
    h.at(T0 + 5)
    h.live.saw_bridge("shed", True, h.now)
    h.beat(SAT, "stopping")  # queued by the bridge, delivered on its return
    h.check()
    assert [e.state for e in h.notified(SAT)] == [STOPPED]


def test_monitor_restarted_while_a_link_is_down_does_not_repeat_it() -> None:
    h = hub()
    h.live.restore_link("shed", UNREACHABLE)
    h.live.saw_bridge("shed", False, T0)
    assert [e for e in h.check() if e.notify] == []
    fresh = hub()
    fresh.live.saw_bridge("shed", False, T0)  # no record: a first view that is down is news
    assert [(e.kind, e.state) for e in fresh.check()] == [(HOST_EVENT, UNREACHABLE)]


def test_summary_of_a_single_pi_is_unchanged_and_a_fleets_lists_hosts_own_first() -> None:
    h = up_daemon(hub(), "sensor-system")
    single = persistence.summary(h.live.daemons.values(), {}, T0, h.live.links.values(), "hub")
    assert "hosts" not in single and list(single["daemons"]) == ["sensor-system"]
    up_daemon(h, SAT)
    h.live.saw_bridge("shed", True, T0)
    h.check()
    fleet = persistence.summary(h.live.daemons.values(), {}, T0, h.live.links.values(), "hub")
    assert list(fleet["daemons"]) == ["sensor-system", SAT]
    assert list(fleet["hosts"]) == ["hub", "shed"]
    assert fleet["hosts"]["shed"]["daemons"] == [SAT]
    assert fleet["hosts"]["shed"]["state"] == REACHABLE
    record = persistence.daemon_record(h.live.daemons[SAT], 2.5, T0)
    assert record["daemon"] == SAT and record["satellite"] == "shed"
    assert "satellite" not in persistence.daemon_record(h.live.daemons["sensor-system"], 2.5, T0)


class _Cfg:
    priority_down = 1
    priority_up = 0
    priority_stopped = -1
    flap_window_s = 300.0


def test_a_daemon_class_called_host_is_refused() -> None:
    from pihub.daemon import Daemon

    with pytest.raises(TypeError, match="reserved"):
        class Host(Daemon[HostsConfig]):
            name = "host"
