"""The bootstrap library, end to end: real daemon processes against a real Mosquitto."""

from __future__ import annotations

import itertools
import json
import signal
import socket
import time
from pathlib import Path

import pytest
from conftest import Broker, DaemonProcess, Observer, run_cli, wait_until, write_config
from pihub.topics import Measurement, Reject, Topics, parse_measurement

META_KEYS = {"event", "daemon", "host", "pid", "version", "ts", "uptime_s", "interval_s",
             "rss_kb", "counters"}
COUNTER_KEYS = {"published", "received", "rejected", "errors"}


def heartbeats(obs: Observer, root: str, daemon: str) -> list[dict]:
    return [m.json() for m in obs.messages(f"{root}/{daemon}/meta")
            if m.json()["event"] == "heartbeat"]


def test_heartbeats_follow_the_interval_with_the_design_schema(start_daemon, observe,
                                                               topic_root):
    obs = observe(f"{topic_root}/sensor-system/meta")
    d = start_daemon("sensor_system", {"interval": 60, "heartbeat_interval": 1})
    obs.wait_for(f"{topic_root}/sensor-system/meta",
                 lambda m: m.json()["event"] == "heartbeat", count=4, timeout=20)
    beats = heartbeats(obs, topic_root, "sensor-system")
    for beat in beats:
        assert set(beat) >= META_KEYS
        assert set(beat["counters"]) >= COUNTER_KEYS
        assert beat["daemon"] == "sensor-system"
        assert beat["pid"] == d.pid
        assert beat["interval_s"] == 1.0
        assert beat["rss_kb"] > 0
    gaps = [b["ts"] - a["ts"] for a, b in itertools.pairwise(beats)]
    # cadence, not speed: each gap is one interval, give or take scheduling on a busy machine
    assert all(0.5 < gap < 1.9 for gap in gaps), gaps
    uptimes = [b["uptime_s"] for b in beats]
    assert uptimes == sorted(uptimes)


def test_starting_event_and_online_status_come_first(start_daemon, observe, topic_root):
    obs = observe(f"{topic_root}/#")
    start_daemon("sensor_system", {"interval": 60})
    obs.wait_for(f"{topic_root}/sensor-system/meta", lambda m: m.json()["event"] == "starting")
    status = obs.wait_for(f"{topic_root}/sensor-system/status")
    assert status[0].text == "online"


def test_killed_daemon_goes_offline_via_last_will(start_daemon, observe, topic_root):
    obs = observe(f"{topic_root}/sensor-system/status")
    d = start_daemon("sensor_system", {"interval": 60, "mqtt": {"keepalive": 5}})
    obs.wait_for(f"{topic_root}/sensor-system/status", lambda m: m.text == "online")
    d.kill()  # SIGKILL: the daemon has no last word of its own, only the broker can say it
    obs.wait_for(f"{topic_root}/sensor-system/status", lambda m: m.text == "offline", timeout=15)
    assert [m.text for m in obs.messages()] == ["online", "offline"]
    # the Last Will is retained: a client that comes later still learns the daemon is down
    late = observe(f"{topic_root}/sensor-system/status")
    late.wait_for(f"{topic_root}/sensor-system/status", lambda m: m.retain and m.text == "offline")


def test_late_subscriber_gets_the_retained_last_measurement(start_daemon, observe, topic_root):
    d = start_daemon("sensor_system", {"interval": 60, "location": "attic"})
    first = observe(f"{topic_root}/data/attic/uptime")
    first.wait_for(f"{topic_root}/data/attic/uptime")
    assert d.stop() == 0
    late = observe(f"{topic_root}/data/attic/#")
    seen = late.wait_for(f"{topic_root}/data/attic/uptime", lambda m: m.retain)
    payload = seen[0].json()
    assert payload["unit"] == "s" and payload["value"] > 0 and payload["ts"] > 0


def test_sigterm_sends_stopping_then_offline_and_exits_zero(start_daemon, observe, topic_root):
    obs = observe(f"{topic_root}/sensor-system/#")
    d = start_daemon("sensor_system", {"interval": 60})
    obs.wait_for(f"{topic_root}/sensor-system/status", lambda m: m.text == "online")
    assert d.stop() == 0
    stopping = obs.wait_for(f"{topic_root}/sensor-system/meta",
                            lambda m: m.json()["event"] == "stopping")[0]
    offline = obs.wait_for(f"{topic_root}/sensor-system/status", lambda m: m.text == "offline")[0]
    order = obs.messages(f"{topic_root}/sensor-system/#")
    assert order.index(stopping) < order.index(offline)
    assert "stopped" in d.output()


@pytest.mark.parametrize(
    ("config", "key", "problem"),
    [
        ({"mqtt": {"port": "eighteen"}}, "mqtt.port", "expected an integer"),
        ({"mqtt": {"prot": 1883}}, "mqtt.prot", "unknown key"),
        ({"mqtt": {"max_message_bytes": 100}}, "mqtt.max_message_bytes", "integer >= 1024"),
        ({"heartbeat_interval": 0}, "heartbeat_interval", "between 1 and 3600"),
        ({"log_level": "loud"}, "log_level", "expected one of debug, info, warning, error"),
        ({"filesystems": {"Root Disk": "/"}}, "filesystems.Root Disk", "lower-case"),
        ({"topic_root": "Pi Hub"}, "topic_root", "matching"),
    ],
)
def test_bad_config_exits_78_naming_the_key(tmp_path, config, key, problem):
    path = write_config(tmp_path / "bad.yml", config)
    run = run_cli("sensor_system", "--config", str(path))
    assert run.returncode == 78, run.stderr
    assert f"{key}: " in run.stderr and problem in run.stderr, run.stderr
    check = run_cli("sensor_system", "--check-config", str(path))
    assert check.returncode == 78
    assert key in check.stderr and problem in check.stderr


def test_example_config_shows_the_message_size_limit_and_its_default():
    example = run_cli("sensor_system", "--print-config-example")
    assert example.returncode == 0
    assert "  max_message_bytes: 262144\n" in example.stdout


def test_config_that_is_not_yaml_exits_78_with_the_line(tmp_path):
    path = tmp_path / "broken.yml"
    path.write_text("mqtt:\n  host: [unclosed\n")
    run = run_cli("sensor_system", "--check-config", str(path))
    assert run.returncode == 78
    assert "not valid YAML at line" in run.stderr


def test_unreadable_password_file_exits_78_naming_the_key(tmp_path):
    path = write_config(tmp_path / "c.yml", {"mqtt": {"username": "u",
                                                      "password_file": "/nonexistent/pw"}})
    run = run_cli("sensor_system", "--config", str(path))
    assert run.returncode == 78
    assert "mqtt.password_file" in run.stderr and "/nonexistent/pw" in run.stderr




@pytest.mark.parametrize("topic, payload, why", [
    ("pihub/data/lab/temp", b"not json", "payload on pihub/data/lab/temp is not JSON"),
    ("pihub/data/lab/temp", b"\xff\xfe", "is not JSON"),
    ("pihub/data/lab/temp", b"[1]", "must be a JSON object, got list"),
    ("pihub/data/lab/temp", b'{"unit": "C", "ts": 1}', "'value' must be a number, got None"),
    ("pihub/data/lab/temp", b'{"value": true, "unit": "C", "ts": 1}',
     "'value' must be a number, got True"),
    ("pihub/data/lab/temp", b'{"value": "21", "unit": "C", "ts": 1}',
     "'value' must be a number, got '21'"),
    ("pihub/data/lab/temp", b'{"value": -Infinity, "unit": "C", "ts": 1}',
     "'value' must be finite, got -inf"),
    ("pihub/data/lab/temp", b'{"value": 1, "unit": "", "ts": 1}',
     "'unit' must be a non-empty string"),
    ("pihub/data/lab/temp", b'{"value": 1, "unit": 5, "ts": 1}',
     "'unit' must be a non-empty string"),
    ("pihub/data/lab/temp", b'{"value": 1, "unit": "C", "ts": 0}',
     "'ts' must be UNIX seconds (a number > 0), got 0"),
    ("pihub/data/lab/temp", b'{"value": 1, "unit": "C", "ts": false}',
     "'ts' must be UNIX seconds (a number > 0), got False"),
    ("pihub/data/lab/temp", b'{"value": 1, "unit": "C", "ts": NaN}',
     "'ts' must be UNIX seconds (a number > 0), got nan"),
    ("pihub/data/Lab/temp", b'{"value": 1, "unit": "C", "ts": 1}',
     "topic 'pihub/data/Lab/temp' does not match pihub/data/"),
    ("pihub/notify/x", b'{"value": 1, "unit": "C", "ts": 1}', "is not under pihub/data/"),
])
def test_parse_measurement_says_what_is_wrong(topic, payload, why):
    with pytest.raises(Reject) as err:
        parse_measurement(Topics(), topic, payload)
    assert why in str(err.value)


def test_parse_measurement_returns_floats_and_keeps_extra_keys():
    got = parse_measurement(Topics("hub"), "hub/data/lab/temp",
                            '{"value": 21, "unit": "°C", "ts": 1700000000, "sensor": "x"}'.encode())
    assert got == Measurement("lab", "temp", 21.0, "°C", 1700000000.0, {"sensor": "x"})
    assert type(got.value) is float and type(got.ts) is float


def _data_topic(root: str, loc: str = "lab", qty: str = "temp") -> str:
    return f"{root}/data/{loc}/{qty}"


def test_malformed_payloads_and_topics_are_rejected_and_counted(start_daemon, observe,
                                                                 topic_root):
    obs = observe(f"{topic_root}/#")
    d = start_daemon("pihub_probe")
    d.wait_log("ready: connected and subscribed")
    bad = [
        (_data_topic(topic_root), b"not json"),
        (_data_topic(topic_root), b'{"value": "warm", "unit": "\\u00b0C", "ts": 1}'),
        (_data_topic(topic_root), b'{"value": 21.5, "ts": 1}'),
        (_data_topic(topic_root), b'{"value": 21.5, "unit": "\\u00b0C"}'),
        (_data_topic(topic_root), b"[1, 2, 3]"),
        (_data_topic(topic_root), b"\xff\xfe"),
        (f"{topic_root}/data/Lab/temp", b'{"value": 1, "unit": "%", "ts": 1}'),
        (f"{topic_root}/data/lab/temp/extra", b'{"value": 1, "unit": "%", "ts": 1}'),
    ]
    for topic, payload in bad:
        obs.publish(topic, payload)
    obs.publish(_data_topic(topic_root), {"value": 21.5, "unit": "°C", "ts": time.time()})
    echo = obs.wait_for(f"{topic_root}/probe/echo")[0].json()
    assert echo["value"] == 21.5
    beat = obs.wait_for(f"{topic_root}/probe/meta",
                        lambda m: m.json()["counters"]["rejected"] >= len(bad))[-1].json()
    assert beat["counters"]["rejected"] == len(bad)
    assert beat["counters"]["errors"] == 0
    assert d.proc.poll() is None
    assert "rejected: topic" in d.output() and "is not JSON" in d.output()


def test_broker_restart_reconnects_resubscribes_and_sends_what_was_queued(
        start_daemon, observe, broker: Broker, topic_root):
    # a persistent observer session keeps every QoS 1 message the broker gets while we look away
    watcher = observe(client_id=f"watch-{topic_root}", clean=False)
    watcher.subscribe(f"{topic_root}/data/#")
    sensor = start_daemon("sensor_system", {"interval": 1, "location": "pi"})
    probe = start_daemon("pihub_probe")
    watcher.wait_for(f"{topic_root}/data/pi/uptime")
    probe.wait_log("ready: connected and subscribed")

    broker.stop()
    down_at = time.time()
    sensor.wait_log("lost the broker")
    wait_until(lambda: time.time() - down_at > 3, 10, "readings taken while the broker is away")
    broker.start()
    up_at = time.time()

    # readings measured while the broker was down arrive once it is back
    taken_while_down = watcher.wait_for(
        f"{topic_root}/data/pi/uptime",
        lambda m: down_at + 0.5 < m.json()["ts"] < up_at - 0.5, count=2, timeout=20)
    stamps = [m.json()["ts"] for m in taken_while_down]
    assert stamps == sorted(stamps), "queued readings must arrive in the order they were taken"
    assert "queued message(s)" in sensor.output()
    # the probe subscribed again: a new measurement reaches its handler
    obs = observe(f"{topic_root}/probe/echo")
    wait_until(lambda: probe.output().count("connected to") >= 2, 20, "probe reconnect")
    def echoed() -> bool:
        obs.publish(_data_topic(topic_root, "hall"), {"value": 1, "unit": "bool",
                                                       "ts": time.time()})
        return bool(obs.messages(f"{topic_root}/probe/echo"))
    wait_until(echoed, 15, "the probe's echo after the broker restart", interval=0.5)
    assert sensor.stop() == 0 and probe.stop() == 0


def test_sighup_applies_log_level_and_heartbeat_and_names_keys_needing_restart(
        start_daemon, observe, topic_root):
    obs = observe(f"{topic_root}/probe/meta")
    d = start_daemon("pihub_probe", {"heartbeat_interval": 30, "log_level": "info"})
    d.wait_log("ready: connected and subscribed")
    cfg = json.loads(json.dumps(__import__("yaml").safe_load(d.config_file.read_text())))
    cfg.update({"heartbeat_interval": 1, "log_level": "debug", "greeting": "hi"})
    write_config(d.config_file, cfg)
    d.signal(signal.SIGHUP)
    d.wait_log("SIGHUP: applied heartbeat_interval, log_level")
    d.wait_log("greeting changed; restart pihub-probe to apply")
    obs.wait_for(f"{topic_root}/probe/meta", lambda m: m.json()["event"] == "heartbeat"
                 and m.json()["interval_s"] == 1.0, timeout=10)
    # a broken file on SIGHUP keeps the running config
    d.config_file.write_text("heartbeat_interval: -5\n")
    d.signal(signal.SIGHUP)
    d.wait_log("keeping the running config")
    assert d.proc.poll() is None


def test_systemd_hears_ready_watchdog_pings_and_stopping_last(start_daemon, tmp_path,
                                                              topic_root):
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(15)
    try:
        d = start_daemon("sensor_system", {"interval": 60},
                         env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "1000000"})
        got: list[str] = []
        while not any("STOPPING=1" in g for g in got):
            got.append(sock.recv(4096).decode())
            pings = sum("WATCHDOG=1" in g for g in got)
            if pings >= 3 and any("READY=1" in g for g in got) and d.proc.poll() is None:
                d.signal(signal.SIGTERM)
        assert sum("READY=1" in g for g in got) == 1  # once, however often it reconnects
        assert "STOPPING=1" in got[-1]
        assert d.proc.wait(10) == 0
    finally:
        sock.close()


def test_queue_is_bounded_while_the_broker_is_away(start_daemon, broker: Broker, topic_root,
                                                   observe):
    broker.stop()
    d = start_daemon("sensor_system", {"interval": 1, "mqtt": {"queue_size": 5}})
    d.wait_log("queue full (mqtt.queue_size=5)", timeout=15)
    broker.start()
    obs = observe(f"{topic_root}/sensor-system/meta")
    obs.wait_for(f"{topic_root}/sensor-system/meta",
                 lambda m: m.json()["counters"].get("dropped", 0) > 0, timeout=15)
    # the queue was full when the broker came back: exactly queue_size messages went out of it
    assert "sent 5 queued message(s)" in d.output(), d.output()[-3000:]
    assert d.stop() == 0


def test_daemon_keeps_retrying_when_the_broker_is_not_there_yet(start_daemon, broker: Broker,
                                                                 observe, topic_root):
    broker.stop()
    d: DaemonProcess = start_daemon("sensor_system", {"interval": 60})
    wait_until(lambda: d.proc.poll() is None and "connecting to" in d.output(), 10, "start")
    broker.start()
    obs = observe(f"{topic_root}/sensor-system/status")
    obs.wait_for(f"{topic_root}/sensor-system/status", lambda m: m.text == "online", timeout=20)
    assert d.stop() == 0


def test_journal_output_has_priority_prefixes_and_no_timestamps(tmp_path: Path):
    import logging

    from pihub.logs import JournalFormatter

    record = logging.LogRecord("pihub.x", logging.WARNING, __file__, 1, "two\nlines", None, None)
    text = JournalFormatter("%(name)s: %(message)s").format(record)
    assert text == "<4>pihub.x: two\n<4>lines"
