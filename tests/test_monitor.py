"""pihub-monitor against a real Mosquitto, real daemons and hand-published meta/status/data.

These prove the MQTT glue: what the monitor hears, what it publishes, when it judges. Every
flapping, threshold, deadline and restore case is proved on a fake clock, without a broker, in
test_monitor_logic.py; so a test here does not wait for mistakes to show. It does not have to: in
one check the monitor sends its notifications before the records and the summary that follow from
them, so a notification that should not be there precedes the record a test waits for.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import yaml
from conftest import DaemonProcess, Observer, Seen, run_cli, wait_until

# short timings: daemons beat every 1 s, so they are down 2.5 s after their last heartbeat
FAST = {"check_interval": 0.2, "startup_grace": 0.5, "summary_interval": 1}
WAIT = 20.0  # generous: the test machine may be loaded


def fake_meta(name: str, event: str = "heartbeat", *, ts: float | None = None,
              interval: float = 30.0, host: str = "fakehost") -> dict[str, Any]:
    """A metadata event as a pihub daemon would publish it (docs/contract.md)."""
    return {"event": event, "daemon": name, "host": host, "pid": 4242, "version": "0.1.0",
            "ts": time.time() if ts is None else ts, "uptime_s": 12.5, "interval_s": interval,
            "rss_kb": 10240,
            "counters": {"published": 3, "received": 0, "rejected": 0, "errors": 0}}


def notes(obs: Observer, root: str, **match: Any) -> list[dict[str, Any]]:
    """Notification requests seen so far, optionally only those whose keys match."""
    out = [m.json() for m in obs.messages(f"{root}/notify/#")]
    return [n for n in out if all(n.get(k) == v for k, v in match.items())]


def wait_note(obs: Observer, root: str, timeout: float = WAIT, count: int = 1,
              **match: Any) -> list[Seen]:
    return obs.wait_for(f"{root}/notify/#",
                        lambda m: all(m.json().get(k) == v for k, v in match.items()),
                        timeout=timeout, count=count)


def wait_record(obs: Observer, root: str, daemon: str, timeout: float = WAIT,
                **match: Any) -> dict[str, Any]:
    """The first retained record of ``daemon`` by the monitor whose keys match."""
    seen = obs.wait_for(f"{root}/monitor/daemons/{daemon}",
                        lambda m: bool(m.payload) and all(m.json().get(k) == v
                                                          for k, v in match.items()),
                        timeout=timeout)
    return seen[0].json()  # type: ignore[no-any-return]


def monitor_at(start_daemon: Any, **config: Any) -> DaemonProcess:
    return start_daemon("monitor", {**FAST, **config}, name=f"monitor-{time.monotonic_ns()}")


def publish_daemon(obs: Observer, root: str, name: str, status: str = "online",
                   **meta: Any) -> None:
    """Hand-publish a daemon's retained status and meta, as a running daemon leaves them."""
    obs.publish(f"{root}/{name}/status", status, retain=True)
    obs.publish(f"{root}/{name}/meta", fake_meta(name, **meta), retain=True)


# --------------------------------------------------------------------------- config




def test_rule_without_limits_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "monitor.yml"
    path.write_text(yaml.safe_dump({"rules": [{"name": "r1", "topic": "cellar/humidity"}]}))
    checked = run_cli("monitor", "--check-config", str(path))
    assert checked.returncode == 78
    assert "rules[0].above" in checked.stderr


def test_rule_template_with_an_unknown_field_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "monitor.yml"
    path.write_text(yaml.safe_dump({"rules": [{"name": "r1", "topic": "+/humidity", "above": 1,
                                               "message": "{room} is wet"}]}))
    checked = run_cli("monitor", "--check-config", str(path))
    assert checked.returncode == 78
    assert "rules[0].message" in checked.stderr and "room" in checked.stderr


def test_overlapping_band_with_hysteresis_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "monitor.yml"
    path.write_text(yaml.safe_dump({"rules": [{"name": "r1", "topic": "a/b", "above": 10,
                                               "below": 8, "hysteresis": 2}]}))
    checked = run_cli("monitor", "--check-config", str(path))
    assert checked.returncode == 78
    assert "rules[0].below" in checked.stderr


# --------------------------------------------------------------------------- daemons


def test_killed_daemon_is_notified_down_after_its_last_will(start_daemon, observe,
                                                            topic_root) -> None:
    obs = observe(f"{topic_root}/#")
    monitor_at(start_daemon)
    sensor = start_daemon("sensor_system", {"interval": 1, "location": "pi"})
    wait_record(obs, topic_root, "sensor-system", state="up")
    sensor.kill()  # SIGKILL: the broker sees the socket close and sends the Last Will
    obs.wait_for(f"{topic_root}/sensor-system/status", lambda m: m.text == "offline")
    down = wait_note(obs, topic_root, daemon="sensor-system", state="down")[0].json()
    assert "Last Will" in down["reason"]
    assert down["priority"] == 1 and down["previous"] == "up"
    assert isinstance(down["since"], float) and isinstance(down["ts"], float)
    assert "sensor-system" in down["title"] and down["host"] in down["message"]
    wait_record(obs, topic_root, "sensor-system", state="down", transitions=1, notifications=1)
    assert len(notes(obs, topic_root)) == 1, notes(obs, topic_root)
    # requests are not retained: a late subscriber gets the retained summary, no request (the
    # broker sends a filter's retained messages right after its SUBACK, notify/# first)
    late = observe(f"{topic_root}/notify/#", f"{topic_root}/monitor/summary")
    late.wait_for(f"{topic_root}/monitor/summary", lambda m: m.retain)
    assert late.messages(f"{topic_root}/notify/#") == []
    # not repeated once the heartbeat deadline passes too: test_monitor_logic.py


def test_daemon_whose_heartbeats_stop_is_down_after_two_and_a_half_intervals(
        start_daemon, observe, topic_root) -> None:
    obs = observe(f"{topic_root}/#")
    monitor_at(start_daemon)
    sensor = start_daemon("sensor_system", {"interval": 5, "location": "pi"})
    wait_record(obs, topic_root, "sensor-system", state="up")
    sensor.signal(signal.SIGSTOP)  # hung: no heartbeats, but the connection stays open
    try:
        note = wait_note(obs, topic_root, daemon="sensor-system", state="down")[0]
        beats = [m for m in obs.messages(f"{topic_root}/sensor-system/meta") if m.at < note.at]
        assert note.at - beats[-1].at >= 2.4, "down before 2.5 heartbeat intervals"
        assert "no heartbeat" in note.json()["reason"]
        assert obs.messages(f"{topic_root}/sensor-system/status")[-1].text == "online"
    finally:
        sensor.signal(signal.SIGCONT)


def test_daemon_that_beats_again_after_a_down_is_notified_up(start_daemon, observe,
                                                             topic_root) -> None:
    obs = observe(f"{topic_root}/#")
    monitor_at(start_daemon)
    sensor = start_daemon("sensor_system", {"interval": 5, "location": "pi"})
    wait_record(obs, topic_root, "sensor-system", state="up")
    sensor.signal(signal.SIGSTOP)
    try:
        wait_note(obs, topic_root, daemon="sensor-system", state="down")
    finally:
        sensor.signal(signal.SIGCONT)
    up = wait_note(obs, topic_root, daemon="sensor-system", state="up")[0].json()
    assert up["previous"] == "down" and up["priority"] == 0
    record = wait_record(obs, topic_root, "sensor-system", state="up", transitions=2)
    assert record["notifications"] == 2
    assert len(notes(obs, topic_root)) == 2


def test_clean_stop_is_notified_as_stopped_at_low_priority(start_daemon, observe,
                                                           topic_root) -> None:
    obs = observe(f"{topic_root}/#")
    monitor_at(start_daemon)
    sensor = start_daemon("sensor_system", {"interval": 5, "location": "pi"})
    wait_record(obs, topic_root, "sensor-system", state="up")
    assert sensor.stop() == 0
    stopped = wait_note(obs, topic_root, daemon="sensor-system", state="stopped")[0].json()
    assert stopped["priority"] == -1 and "stopped" in stopped["message"]
    start_daemon("sensor_system", {"interval": 5, "location": "pi"})
    up = wait_note(obs, topic_root, daemon="sensor-system", state="up")[0].json()
    assert up["previous"] == "stopped" and up["priority"] == -1
    assert not notes(obs, topic_root, state="down")


def test_monitor_start_with_retained_state_sends_no_up_notifications(
        start_daemon, observe, topic_root) -> None:
    obs = observe(f"{topic_root}/#")
    start_daemon("sensor_system", {"interval": 5, "location": "pi"})
    obs.wait_for(f"{topic_root}/sensor-system/meta")
    for name in ("store-rrd", "display-bikes", "notify-pushover"):
        publish_daemon(obs, topic_root, name)
    monitor_at(start_daemon)
    summary = obs.wait_for(f"{topic_root}/monitor/summary",
                           lambda m: m.json()["counts"]["up"] == 4)[0].json()
    assert set(summary["daemons"]) == {"sensor-system", "store-rrd", "display-bikes",
                                       "notify-pushover"}
    assert notes(obs, topic_root) == []  # they would precede the summary of that first view


def test_retained_heartbeat_of_a_long_dead_daemon_is_notified_down_once(
        start_daemon, observe, topic_root) -> None:
    obs = observe(f"{topic_root}/#")
    publish_daemon(obs, topic_root, "store-rrd", ts=time.time() - 600, interval=1)
    monitor = monitor_at(start_daemon)
    monitor.wait_log("connected to")
    listening = time.time()
    note = wait_note(obs, topic_root, daemon="store-rrd", state="down")[0]
    assert note.at - listening >= 2.5, "the deadline runs from when the monitor listens"
    down = note.json()
    assert "no heartbeat for 6" in down["reason"] and down["host"] == "fakehost"
    wait_record(obs, topic_root, "store-rrd", state="down", transitions=1, notifications=1)
    assert len(notes(obs, topic_root)) == 1


def test_retained_clean_stop_is_recorded_as_stopped_without_notification(
        start_daemon, observe, topic_root) -> None:
    obs = observe(f"{topic_root}/#")
    publish_daemon(obs, topic_root, "store-rrd", "offline", event="stopping",
                   ts=time.time() - 3600)
    publish_daemon(obs, topic_root, "display-bikes", "offline", ts=time.time() - 3600,
                   interval=1)
    monitor_at(start_daemon)
    assert wait_record(obs, topic_root, "store-rrd")["state"] == "stopped"
    bikes = wait_record(obs, topic_root, "display-bikes")
    assert bikes["state"] == "down" and "Last Will" in bikes["reason"]
    down = wait_note(obs, topic_root, daemon="display-bikes", state="down")[0].json()
    # a retained offline was not witnessed: down since its last heartbeat, an hour ago
    assert down["since"] == bikes["last_heartbeat"] < time.time() - 3000
    assert notes(obs, topic_root, daemon="store-rrd") == []


def test_restarted_monitor_does_not_repeat_a_down_it_already_reported(
        start_daemon, observe, topic_root) -> None:
    obs = observe(f"{topic_root}/#")
    publish_daemon(obs, topic_root, "store-rrd", ts=time.time() - 600, interval=1)
    first = monitor_at(start_daemon)
    wait_note(obs, topic_root, daemon="store-rrd", state="down")
    wait_record(obs, topic_root, "store-rrd", state="down")
    assert first.stop() == 0
    obs.clear()
    monitor_at(start_daemon)
    obs.wait_for(f"{topic_root}/monitor/summary", lambda m: m.json()["counts"]["down"] == 1)
    record = wait_record(obs, topic_root, "store-rrd", state="down")
    assert record["transitions"] == 1 and record["notifications"] == 1  # carried on
    assert notes(obs, topic_root) == []


def test_flapping_daemon_gives_one_notification_per_window(start_daemon, observe,
                                                           topic_root) -> None:
    obs = observe(f"{topic_root}/#")
    publish_daemon(obs, topic_root, "display-bikes")
    monitor_at(start_daemon, flap_window_s=8, flap_max=1)
    wait_record(obs, topic_root, "display-bikes", state="up")

    def flip(status: str, transitions: int) -> None:
        obs.publish(f"{topic_root}/display-bikes/status", status, retain=True)
        if status == "online":
            obs.publish(f"{topic_root}/display-bikes/meta", fake_meta("display-bikes"),
                        retain=True)
        wait_record(obs, topic_root, "display-bikes", transitions=transitions)

    flip("offline", 1)
    first = wait_note(obs, topic_root, daemon="display-bikes")[0].json()
    assert first["state"] == "down" and first["flapping"] == 0
    for n, status in enumerate(("online", "offline", "online", "offline"), start=2):
        flip(status, n)
    assert len(notes(obs, topic_root)) == 1  # the window is still open: all held
    summary = wait_note(obs, topic_root, daemon="display-bikes", flapping=4)[0].json()
    assert summary["state"] == "down" and "4 more time(s) within 8 s" in summary["message"]
    assert summary["priority"] == 1 and summary["previous"] is None
    record = wait_record(obs, topic_root, "display-bikes", flapping=True)
    assert record["held"] == 4 and record["notifications"] == 2
    assert len(notes(obs, topic_root)) == 2
    # one summary per window while it keeps flapping, with the final state, and every other
    # window case: test_monitor_logic.py


def test_malformed_meta_and_status_are_rejected_and_counted(start_daemon, observe,
                                                            topic_root) -> None:
    obs = observe(f"{topic_root}/#")
    monitor = monitor_at(start_daemon)
    obs.wait_for(f"{topic_root}/monitor/status", lambda m: m.text == "online")
    obs.publish(f"{topic_root}/store-rrd/status", "maybe")
    obs.publish(f"{topic_root}/store-rrd/meta", "not json")
    obs.publish(f"{topic_root}/store-rrd/meta", {"event": "heartbeat", "daemon": "store-rrd"})
    obs.publish(f"{topic_root}/store-rrd/meta", {**fake_meta("store-rrd"), "interval_s": -1})
    obs.publish(f"{topic_root}/store-rrd/meta", fake_meta("display-bikes"))  # wrong daemon
    obs.publish(f"{topic_root}/Store_RRD/meta", fake_meta("Store_RRD"))
    obs.wait_for(f"{topic_root}/monitor/meta",
                 lambda m: m.json()["counters"]["rejected"] >= 6)
    publish_daemon(obs, topic_root, "store-rrd")
    record = wait_record(obs, topic_root, "store-rrd", state="up")
    assert record["rejected"] == 5
    assert "must be online or offline" in monitor.output()
    assert "'interval_s' must be a number > 0" in monitor.output()
    assert notes(obs, topic_root) == []


def test_summary_is_retained_and_lists_every_daemon_but_the_monitor(
        start_daemon, observe, topic_root) -> None:
    obs = observe(f"{topic_root}/#")
    start_daemon("sensor_system", {"interval": 5, "location": "pi"})
    publish_daemon(obs, topic_root, "store-rrd", "offline", event="stopping")
    monitor_at(start_daemon)
    obs.wait_for(f"{topic_root}/monitor/summary", lambda m: m.json()["counts"]["up"] == 1)
    wait_record(obs, topic_root, "sensor-system", last_event="heartbeat")
    late = observe(f"{topic_root}/monitor/summary", f"{topic_root}/monitor/daemons/+")
    summary = late.wait_for(f"{topic_root}/monitor/summary", lambda m: m.retain)[0].json()
    assert summary["counts"] == {"up": 1, "down": 0, "stopped": 1, "unknown": 0}
    assert summary["daemons"]["sensor-system"]["state"] == "up"
    assert summary["daemons"]["store-rrd"]["state"] == "stopped"
    assert "monitor" not in summary["daemons"]
    record = late.wait_for(f"{topic_root}/monitor/daemons/sensor-system",
                           lambda m: m.retain)[0].json()
    assert record["interval_s"] == 1 and record["deadline_s"] == 2.5
    assert record["counters"]["published"] > 0 and record["last_heartbeat"] > 0
    beat = obs.wait_for(f"{topic_root}/monitor/meta",
                        lambda m: m.json()["daemons"]["stopped"] == 1)[0].json()
    assert beat["daemons"] == {"up": 1, "down": 0, "stopped": 1, "unknown": 0}
    assert beat["rules_firing"] == 0


def test_broker_restart_does_not_make_the_monitor_report_daemons_down(
        broker, start_daemon, observe, topic_root) -> None:
    obs = observe(f"{topic_root}/#")
    # the sensor beats every 3 s (down after 7.5 s) and comes back 10 s after losing the
    # broker; the monitor is back after the 5 s outage, so it hears the sensor again 5 s
    # later: within 7.5 s of listening, though long after the sensor's last heartbeat
    start_daemon("sensor_system", {"interval": 5, "location": "pi", "heartbeat_interval": 3,
                                   "mqtt": {"reconnect_min": 10, "reconnect_max": 10}})
    monitor = monitor_at(start_daemon)
    wait_record(obs, topic_root, "sensor-system", state="up")
    broker.stop()
    time.sleep(5)  # not a wait for something: the length of the outage
    broker.start()
    wait_until(lambda: monitor.output().count("connected to") >= 2, WAIT,
               "the monitor to reconnect")
    fresh = observe(f"{topic_root}/#")
    live = fresh.wait_for(f"{topic_root}/sensor-system/meta", lambda m: not m.retain,
                          timeout=30)[0].json()
    # the first record that knows this heartbeat: a down and up would have come before it
    record = fresh.wait_for(
        f"{topic_root}/monitor/daemons/sensor-system",
        lambda m: m.json()["last_heartbeat"] >= live["ts"] - 0.01)[0].json()
    assert record["state"] == "up" and record["transitions"] == 0
    assert notes(fresh, topic_root) == []


def test_cleared_retained_meta_makes_the_monitor_forget_the_daemon(start_daemon, observe,
                                                                    topic_root) -> None:
    obs = observe(f"{topic_root}/#")
    publish_daemon(obs, topic_root, "old-thing")
    publish_daemon(obs, topic_root, "store-rrd")
    monitor_at(start_daemon)
    obs.wait_for(f"{topic_root}/monitor/summary", lambda m: m.json()["counts"]["up"] == 2)
    obs.publish(f"{topic_root}/old-thing/meta", b"", retain=True)
    obs.publish(f"{topic_root}/old-thing/status", b"", retain=True)
    obs.wait_for(f"{topic_root}/monitor/daemons/old-thing", lambda m: m.payload == b"")
    summary = obs.wait_for(f"{topic_root}/monitor/summary",
                           lambda m: "old-thing" not in m.json()["daemons"])[0].json()
    assert list(summary["daemons"]) == ["store-rrd"]
    assert notes(obs, topic_root) == []


# --------------------------------------------------------------------------- threshold rules


def measurement(value: float, unit: str = "%") -> dict[str, Any]:
    return {"value": value, "unit": unit, "ts": time.time()}


def series_state(obs: Observer, root: str, rule: str, topic: str, **match: Any) -> None:
    def ok(m: Seen) -> bool:
        s = m.json()["series"].get(topic)
        return s is not None and all(s.get(k) == v for k, v in match.items())

    obs.wait_for(f"{root}/monitor/rules/{rule}", ok, timeout=WAIT)


def test_threshold_rule_fires_once_after_for_s_and_clears_once_past_hysteresis(
        start_daemon, observe, topic_root) -> None:
    obs = observe(f"{topic_root}/#")
    rule = {"name": "cellar_humidity", "topic": "cellar/humidity", "above": 70,
            "hysteresis": 5, "for_s": 1.5, "priority": 1,
            "message": "{location} {quantity} {value:g}{unit} {condition}"}
    monitor_at(start_daemon, rules=[rule])
    obs.wait_for(f"{topic_root}/monitor/summary")
    data = f"{topic_root}/data/cellar/humidity"
    started = time.time()
    obs.publish(data, measurement(75), retain=True)
    series_state(obs, topic_root, "cellar_humidity", data, state="pending")
    obs.publish(data, measurement(80), retain=True)
    fired = wait_note(obs, topic_root, rule="cellar_humidity", state="firing")[0]
    assert fired.at - started >= 1.5
    assert fired.json()["message"] == "cellar humidity 80% above 70"
    assert fired.json()["priority"] == 1 and fired.json()["topic"] == data
    for value in (68, 72, 66):  # below the limit, but not by the hysteresis: still firing
        obs.publish(data, measurement(value), retain=True)
    obs.publish(data, measurement(64), retain=True)
    cleared = wait_note(obs, topic_root, rule="cellar_humidity", state="cleared")[0].json()
    assert cleared["value"] == 64 and cleared["priority"] == 0
    series_state(obs, topic_root, "cellar_humidity", data, state="ok", value=64)
    assert len(notes(obs, topic_root)) == 2


def test_value_beyond_the_limit_for_less_than_for_s_is_not_notified(
        start_daemon, observe, topic_root) -> None:
    obs = observe(f"{topic_root}/#")
    rule = {"name": "wet", "topic": "cellar/humidity", "above": 70, "for_s": 2}
    monitor_at(start_daemon, rules=[rule])
    obs.wait_for(f"{topic_root}/monitor/summary")
    data = f"{topic_root}/data/cellar/humidity"
    obs.publish(data, measurement(90), retain=True)
    series_state(obs, topic_root, "wet", data, state="pending")
    obs.publish(data, measurement(60), retain=True)
    series_state(obs, topic_root, "wet", data, state="ok", value=60)
    assert notes(obs, topic_root) == []
    # and no firing later from the cancelled crossing: test_monitor_logic.py


def test_wildcard_rule_keeps_one_state_per_series(start_daemon, observe, topic_root) -> None:
    obs = observe(f"{topic_root}/#")
    rule = {"name": "cold", "topic": "+/temperature", "below": 10, "hysteresis": 2,
            "notify_topic": "rooms"}
    monitor_at(start_daemon, rules=[rule])
    obs.wait_for(f"{topic_root}/monitor/summary")
    attic, cellar = (f"{topic_root}/data/{room}/temperature" for room in ("attic", "cellar"))
    obs.publish(attic, measurement(8, "°C"), retain=True)
    wait_note(obs, topic_root, topic=attic, state="firing")
    obs.publish(cellar, measurement(15, "°C"), retain=True)
    series_state(obs, topic_root, "cold", cellar, state="ok")
    obs.publish(cellar, measurement(5, "°C"), retain=True)
    wait_note(obs, topic_root, topic=cellar, state="firing")
    obs.publish(attic, measurement(11, "°C"), retain=True)  # inside the hysteresis
    series_state(obs, topic_root, "cold", attic, state="firing", value=11)
    obs.publish(attic, measurement(12.5, "°C"), retain=True)
    wait_note(obs, topic_root, topic=attic, state="cleared")
    all_notes = obs.messages(f"{topic_root}/notify/#")
    assert {m.topic for m in all_notes} == {f"{topic_root}/notify/rooms"}
    assert [(n["topic"], n["state"]) for n in notes(obs, topic_root)] == [
        (attic, "firing"), (cellar, "firing"), (attic, "cleared")]
    assert "below 10" in notes(obs, topic_root)[0]["message"]


def test_firing_rule_is_not_repeated_by_a_restarted_monitor(start_daemon, observe,
                                                            topic_root) -> None:
    obs = observe(f"{topic_root}/#")
    rule = {"name": "wet", "topic": "cellar/humidity", "above": 70}
    first = monitor_at(start_daemon, rules=[rule])
    obs.wait_for(f"{topic_root}/monitor/summary")
    data = f"{topic_root}/data/cellar/humidity"
    obs.publish(data, measurement(90), retain=True)
    wait_note(obs, topic_root, rule="wet", state="firing")
    series_state(obs, topic_root, "wet", data, state="firing")
    assert first.stop() == 0
    obs.clear()
    monitor_at(start_daemon, rules=[rule])
    obs.wait_for(f"{topic_root}/monitor/summary",
                 lambda m: m.json()["rules_firing"] == {"wet": [data]})
    series_state(obs, topic_root, "wet", data, state="firing", value=90)
    assert notes(obs, topic_root) == []
    obs.publish(data, measurement(50), retain=True)
    wait_note(obs, topic_root, rule="wet", state="cleared")
