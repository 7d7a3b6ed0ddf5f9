"""Bounded fuzz: every subscribing daemon at once, against a real Mosquitto, takes a few thousand
malformed, oversized, deeply nested and wrong-typed messages on data, notify, cmd, sim, status
and meta topics, and a flood of new series beyond its max_series (issue 14, contract §6).

Afterwards each daemon runs with the PID it started with and still sends heartbeats, its RSS
grew by less than RSS_GROWTH_KB, its ``rejected`` counter grew by exactly the bad messages it was
sent, no RRD file beyond max_series exists, and its log stays under LOG_BYTES with no line longer
than LINE_CHARS. The messages are drawn from a seeded generator: the same run every time.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from conftest import DaemonProcess, Observer, wait_until
from notify_pushover_helpers import FakePushover

from testkit.loopback import VictoriaMetrics

SEED = 14
RSS_GROWTH_KB = 15 * 1024
LOG_BYTES = 1024 * 1024
LINE_CHARS = 1000
RRD_MAX_SERIES = 20
TSDB_MAX_SERIES = 100
FLOOD_SERIES = 300

DAEMONS = ("store-tsdb", "store-rrd", "monitor", "notify-pushover", "sensor-gpio")


# --------------------------------------------------------------------------- bad payloads


def bad_payloads(rng: random.Random) -> list[bytes]:
    """Payloads no subscriber may accept (never empty or blank: an empty retained meta or
    status means "forget this daemon", and never ``0``/``1``: levels a sim topic takes)."""
    now = time.time()
    deep = [b"[" * 33 + b"]" * 33, b"[" * 1000, b"[" * 200_000, b'{"a":' * 5000 + b"1",
            b'{"value": 1, "unit": "C", "ts": 1, "x": ' + b"[" * 40 + b"]" * 40 + b"}"]
    wrong = [b"2", b"1.5", b'"s"', b"null", b"true", b"{}", b"[2]", b"[true]", b"[]",
             b"not json", b"{bad json", b"\xff\xfe\xfd\xfc garbage",
             b'{"value": "21", "unit": "C", "ts": 1}', b'{"value": NaN, "unit": "C", "ts": 1}',
             b'{"value": 1, "unit": "C", "ts": -5}', b'{"value": true, "unit": "bool"}',
             b'{"state": 2}', b'{"message": 5}', b'{"message": ""}',
             b'{"message": "x", "priority": 7}', b'{"message": "x", "title": [1]}',
             b'{"event": "heartbeat"}']
    sized = [json.dumps({"value": 1, "unit": "u" * n, "ts": now}).encode()
             for n in (33, 1000, 200_000, 1_000_000)]
    sized += [json.dumps({"value": 1, "unit": "C", "ts": now,
                          **{f"k{i}": i for i in range(n)}}).encode() for n in (17, 5000)]
    sized += [b'"' + b"x" * n + b'"' for n in (10_000, 200_000, 300_000)]
    sized += [json.dumps([0, 1] * 100_000).encode(), b"[" + b"0," * 1000 + b"0]"]
    noise = [bytes(rng.randrange(256) for _ in range(rng.randrange(16, 200))) for _ in range(20)]
    return deep + wrong + sized + noise


def flood_payload(i: int) -> bytes:
    return json.dumps({"value": 20.0 + i % 10, "unit": "°C", "ts": time.time()}).encode()


# --------------------------------------------------------------------------- the daemons


def start_all(start_daemon: Callable[..., DaemonProcess], tmp_path: Path, vm: VictoriaMetrics,
              pushover: FakePushover) -> dict[str, DaemonProcess]:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "token").write_text(pushover.token + "\n")
    (secrets / "user").write_text(pushover.user + "\n")
    rrd_dir = tmp_path / "rrd"
    quiet = {"log_level": "info"}
    return {
        "store-tsdb": start_daemon("store_tsdb", {
            **quiet, "url": vm.url, "spool_dir": str(tmp_path / "tsdb"), "flush_interval": 0.2,
            "max_series": TSDB_MAX_SERIES}),
        "store-rrd": start_daemon("store_rrd", {
            **quiet, "rrd_dir": str(rrd_dir), "max_series": RRD_MAX_SERIES}),
        "monitor": start_daemon("monitor", {
            **quiet, "check_interval": 0.2, "startup_grace": 0.5, "summary_interval": 1,
            "rules": [{"name": "hot", "topic": "+/temperature", "above": 1000}]}),
        "notify-pushover": start_daemon("notify_pushover", {
            **quiet, "base_url": pushover.base_url, "token_file": str(secrets / "token"),
            "user_key_file": str(secrets / "user"), "queue_dir": str(tmp_path / "queue"),
            "send_interval": 0.1, "backoff_min": 0.2, "backoff_max": 1.0}),
        "sensor-gpio": start_daemon("sensor_gpio", {
            **quiet, "backend": "simulated", "interval": 3600,
            "simulated_state_file": str(tmp_path / "pins.json"),
            "inputs": [{"name": "front_door", "pin": 17, "pull": "up", "location": "hall",
                        "kind": "contact", "debounce_ms": 0}],
            "outputs": [{"name": "heater", "pin": 22, "location": "hall"}]}),
    }


def heartbeats(obs: Observer, root: str, name: str, after: float = 0.0) -> list[dict[str, Any]]:
    return [m.json() for m in obs.messages(f"{root}/{name}/meta")
            if m.at > after and m.json()["event"] == "heartbeat"]


def next_heartbeat(obs: Observer, root: str, name: str, after: float,
                   pred: Callable[[dict[str, Any]], bool] = lambda m: True,
                   timeout: float = 60) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        return next((m for m in heartbeats(obs, root, name, after) if pred(m)), None)

    return wait_until(found, timeout, f"a heartbeat of {name}")  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- the test


def test_a_few_thousand_bad_messages_crash_nothing_and_every_one_is_counted(
        start_daemon, observe, topic_root, tmp_path, vm, pushover):
    root = topic_root
    obs: Observer = observe(f"{root}/+/meta", f"{root}/+/status")
    procs = start_all(start_daemon, tmp_path, vm, pushover)
    # settled: every daemon heartbeats, both stores hold sensor-gpio's two series
    for name in DAEMONS:
        next_heartbeat(obs, root, name, 0.0)
    for name in ("store-tsdb", "store-rrd"):
        next_heartbeat(obs, root, name, 0.0, lambda m: m["series"] == 2)
    mark = time.time()
    before = {name: next_heartbeat(obs, root, name, mark) for name in DAEMONS}

    rng = random.Random(SEED)
    bad = bad_payloads(rng)
    sends: list[tuple[str, bytes]] = []
    want = dict.fromkeys(DAEMONS, 0)

    def send(topic: str, payload: bytes, *to: str) -> None:
        sends.append((f"{root}/{topic}", payload))
        for name in to:
            want[name] += 1

    data_topics = ["data/lab/temperature", "data/Lab/temperature", "data/a", "data/a/b/c",
                   "data/" + "l" * 65 + "/temperature", "data/lab/" + "q" * 60_000]
    for _ in range(1200):
        send(rng.choice(data_topics), rng.choice(bad), "store-tsdb", "store-rrd", "monitor")
    for _ in range(500):
        send(rng.choice(["notify/fuzz", "notify/a/b"]), rng.choice(bad), "notify-pushover")
    for _ in range(300):
        send(rng.choice(["cmd/sensor-gpio/heater", "cmd/sensor-gpio/nope"]), rng.choice(bad),
             "sensor-gpio")
    for _ in range(300):
        send(rng.choice(["sim/sensor-gpio/front_door", "sim/sensor-gpio/nope"]),
             rng.choice(bad), "sensor-gpio")
    for _ in range(300):
        send(f"fz{rng.randrange(400)}/{rng.choice(['meta', 'status'])}", rng.choice(bad),
             "monitor")
    for i in range(FLOOD_SERIES):  # new series: the monitor's rule watches them all
        send(f"data/fz{i}/temperature", flood_payload(i))
    want["store-rrd"] += FLOOD_SERIES - (RRD_MAX_SERIES - 2)
    want["store-tsdb"] += FLOOD_SERIES - (TSDB_MAX_SERIES - 2)
    for i in range(3):  # valid, cut to Pushover's limits and sent
        send("notify/fuzz", json.dumps({"title": "t" * 100_000, "message": f"{i} " + "m" * 100_000,
                                        "priority": -1}).encode())
    rng.shuffle(sends)
    # the flood after the bad ones: the order of new series decides which are refused
    sends.sort(key=lambda s: "/data/fz" in s[0])

    started = time.monotonic()
    sender = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                         client_id=f"fuzz-{root}")
    sender.max_inflight_messages_set(50)
    sender.connect(obs.broker.host, obs.broker.port)
    sender.loop_start()
    try:
        infos = [sender.publish(topic, payload, qos=1) for topic, payload in sends]
        for info in infos:
            info.wait_for_publish(30)
    finally:
        sender.disconnect()
        sender.loop_stop()
    sent_at = time.time()

    after: dict[str, dict[str, Any]] = {}
    for name in DAEMONS:
        base = before[name]["counters"]["rejected"]
        after[name] = next_heartbeat(
            obs, root, name, sent_at,
            lambda m, b=base, n=name: m["counters"]["rejected"] - b >= want[n], timeout=60)
    # one more beat: nothing counted twice, nothing late
    final = {name: next_heartbeat(obs, root, name, time.time()) for name in DAEMONS}
    took = time.monotonic() - started

    report = []
    for name in DAEMONS:
        b, a = before[name], final[name]
        rejected = a["counters"]["rejected"] - b["counters"]["rejected"]
        growth = a["rss_kb"] - b["rss_kb"]
        size = procs[name].log_file.stat().st_size
        report.append(f"{name}: rejected +{rejected} (want {want[name]}), rss {b['rss_kb']} -> "
                      f"{a['rss_kb']} kB ({growth:+d}), log {size} bytes")
    print(f"\n{len(sends)} messages in {took:.1f} s\n" + "\n".join(report))

    for name in DAEMONS:
        proc, b, a = procs[name], before[name], final[name]
        assert proc.proc.poll() is None, f"{name} exited:\n{proc.output()[-3000:]}"
        assert a["pid"] == b["pid"] == proc.pid, f"{name} restarted"
        starts = [m for m in obs.messages(f"{root}/{name}/meta") if m.json()["event"] == "starting"]
        assert len(starts) == 1, f"{name} started {len(starts)} times"
        assert a["counters"]["rejected"] - b["counters"]["rejected"] == want[name], report
        assert a["counters"]["errors"] == b["counters"]["errors"], proc.output()[-3000:]
        assert a["rss_kb"] - b["rss_kb"] < RSS_GROWTH_KB, report
        output = proc.output()
        assert "Traceback" not in output and "RecursionError" not in output
        assert len(output.encode()) < LOG_BYTES, report
        longest = max(output.splitlines(), key=len)
        assert len(longest) < LINE_CHARS, longest[:300]

    # no series beyond the caps: files on disk, series in the DB; both counted
    assert len(list((tmp_path / "rrd").glob("*/*.rrd"))) == RRD_MAX_SERIES
    assert final["store-rrd"]["counters"]["series_refused"] == FLOOD_SERIES - RRD_MAX_SERIES + 2
    assert final["store-tsdb"]["counters"]["series_refused"] == FLOOD_SERIES - TSDB_MAX_SERIES + 2
    assert final["store-tsdb"]["series"] == TSDB_MAX_SERIES
    stored = vm.export("temperature_value")
    assert len(stored) == TSDB_MAX_SERIES - 2
    # the valid oversized notifications were cut and sent
    wait_until(lambda: len(pushover.accepted()) >= 3, 30, "3 notifications sent")
    assert all(len(p.fields["message"]) <= 1024 for p in pushover.accepted())
