"""pihub-store-tsdb against a real Mosquitto and a real VictoriaMetrics."""

from __future__ import annotations

import base64
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonProcess, run_cli, wait_until, write_config
from pihub.durable import frame
from store_tsdb_helpers import (
    HOST,
    InfluxFront,
    counter,
    heartbeat,
    publish_series,
    stored,
)


@pytest.fixture
def store(start_daemon: Callable[..., DaemonProcess], tmp_path: Path
          ) -> Callable[..., DaemonProcess]:
    """``store(url, **keys)`` starts pihub-store-tsdb with a spool in tmp_path and short waits."""

    def start(url: str, **keys: Any) -> DaemonProcess:
        config = {"url": url, "spool_dir": str(tmp_path / "state"), "timeout": 2,
                  "flush_interval": 0.2, "retry_interval": 0.2, "retry_max": 0.5,
                  "mqtt": {"client_id": "store-tsdb-test"}, **keys}
        return start_daemon("store_tsdb", config)

    return start


def test_measurement_is_stored_with_location_host_tags_and_its_own_time(
        vm, store, observe, topic_root):
    obs = observe(f"{topic_root}/store-tsdb/#")
    store(vm.url)
    heartbeat(obs, topic_root, lambda m: m["event"] == "heartbeat")
    obs.publish(f"{topic_root}/data/kitchen/temperature",
                {"value": 21.5, "unit": "°C", "ts": 1700000000.123, "sensor": "dht22"})
    obs.publish(f"{topic_root}/data/cellar/humidity", {"value": 61, "unit": "%",
                                                         "ts": 1700000001})
    assert stored(vm, "temperature", "kitchen", 1) == [(1700000000123, 21.5)]
    assert stored(vm, "humidity", "cellar", 1) == [(1700000001000, 61.0)]
    meta = heartbeat(obs, topic_root, counter("written", 2))
    assert meta["spool_bytes"] == 0 and meta["db_available"] is True


def test_points_spooled_while_the_db_is_down_are_all_replayed_in_order_when_it_is_back(
        vm, store, observe, topic_root, tmp_path):
    obs = observe(f"{topic_root}/store-tsdb/#")
    d = store(vm.url)
    heartbeat(obs, topic_root, lambda m: m["event"] == "heartbeat")
    start = time.time() - 3600
    before = publish_series(obs, topic_root, "hall", "temperature", 5, start)
    stored(vm, "temperature", "hall", 5)
    vm.stop()
    during = publish_series(obs, topic_root, "hall", "temperature", 50, start + 5)
    meta = heartbeat(obs, topic_root, counter("spooled", 50))
    assert meta["db_available"] is False and meta["spool_bytes"] > 0
    d.wait_log("unavailable")
    vm.start()
    assert stored(vm, "temperature", "hall", 55) == before + during
    meta = heartbeat(obs, topic_root, lambda m: m["counters"].get("replayed", 0) >= 50
                     and m["spool_bytes"] == 0)
    assert meta["db_available"] is True
    d.wait_log("spool replayed")
    # every segment replayed is deleted; only the cursor is left
    assert [p.name for p in (tmp_path / "state" / "points").iterdir()] == ["cursor.json"]


def test_points_arriving_while_the_spool_drains_are_written_after_the_older_ones(
        vm, store, observe, topic_root):
    """New points go behind the spooled ones: the DB gets every point in publishing order."""
    front = InfluxFront(vm.url)
    try:
        obs = observe(f"{topic_root}/store-tsdb/#")
        store(front.url, retry_interval=2, retry_max=2, replay_batch_size=7)
        heartbeat(obs, topic_root, lambda m: m["event"] == "heartbeat")
        front.status = 503
        start = time.time() - 3600
        older = publish_series(obs, topic_root, "attic", "pressure", 30, start)
        heartbeat(obs, topic_root, counter("spooled", 30))
        front.status = None
        newer = publish_series(obs, topic_root, "attic", "pressure", 30, start + 30)
        assert stored(vm, "pressure", "attic", 60) == older + newer
        with front.lock:
            order = [int(line.rsplit(b" ", 1)[1]) for line in front.stored]
        assert order == [ts for ts, _value in older + newer]
        meta = heartbeat(obs, topic_root, lambda m: m["spool_bytes"] == 0
                         and m["counters"]["replayed"] + m["counters"]["written"] == 60)
        assert meta["counters"]["replayed"] >= 30
    finally:
        front.close()


def test_spooled_points_survive_a_restart_of_the_daemon(vm, store, observe, topic_root):
    obs = observe(f"{topic_root}/store-tsdb/#")
    d = store(vm.url)
    heartbeat(obs, topic_root, lambda m: m["event"] == "heartbeat")
    vm.stop()
    expected = publish_series(obs, topic_root, "garage", "temperature", 20, time.time() - 600)
    heartbeat(obs, topic_root, counter("spooled", 20))
    assert d.stop() == 0
    vm.start()
    d2 = store(vm.url)
    d2.wait_log("replaying them before new points")
    assert stored(vm, "temperature", "garage", 20) == expected
    heartbeat(obs, topic_root, lambda m: m["counters"].get("replayed", 0) == 20
              and m["spool_bytes"] == 0)


def test_points_published_while_the_daemon_is_stopped_are_stored_when_it_starts(
        vm, store, observe, topic_root):
    obs = observe(f"{topic_root}/store-tsdb/#")
    d = store(vm.url)
    heartbeat(obs, topic_root, lambda m: m["event"] == "heartbeat")
    assert d.stop() == 0
    expected = publish_series(obs, topic_root, "porch", "temperature", 10, time.time() - 600)
    store(vm.url)
    assert stored(vm, "temperature", "porch", 10) == expected


def test_a_full_spool_drops_and_counts_the_points_that_do_not_fit(
        vm, store, observe, topic_root):
    obs = observe(f"{topic_root}/store-tsdb/#")
    d = store(vm.url, spool_max_bytes=4096, batch_size=10, flush_idle=0.5, flush_interval=0.5)
    heartbeat(obs, topic_root, lambda m: m["event"] == "heartbeat")
    vm.stop()
    n = 200  # ~70 bytes each: about 14 kB, more than the 4 kB spool holds
    publish_series(obs, topic_root, "shed", "temperature", n, time.time() - 3600)
    meta = heartbeat(obs, topic_root, lambda m: m["counters"].get("spooled", 0)
                     + m["counters"].get("spool_full_dropped", 0) == n)
    spooled, dropped = meta["counters"]["spooled"], meta["counters"]["spool_full_dropped"]
    assert spooled > 0 and dropped > 0
    assert meta["spool_bytes"] <= 4096
    d.wait_log("spool full")
    vm.start()
    samples = stored(vm, "temperature", "shed", spooled)
    assert len(samples) == spooled
    # what was kept is the oldest part, in order
    assert samples == sorted(samples)


def test_a_point_the_db_refuses_is_dropped_alone_and_every_other_point_is_written(
        vm, store, observe, topic_root):
    front = InfluxFront(vm.url, refuse="conflict")
    try:
        obs = observe(f"{topic_root}/store-tsdb/#")
        d = store(front.url, batch_size=50, flush_idle=0.5, flush_interval=1)
        heartbeat(obs, topic_root, lambda m: m["event"] == "heartbeat")
        ts = time.time() - 100
        good = publish_series(obs, topic_root, "lab", "temperature", 20, ts)
        obs.publish(f"{topic_root}/data/lab/conflict", {"value": 1.5, "unit": "V", "ts": ts})
        good += publish_series(obs, topic_root, "lab", "temperature", 20, ts + 20)
        assert stored(vm, "temperature", "lab", 40) == good
        meta = heartbeat(obs, topic_root, counter("db_rejected", 1))
        assert meta["counters"]["db_rejected"] == 1
        assert meta["spool_bytes"] == 0
        assert meta["counters"].get("spooled", 0) == 0
        d.wait_log("refused a point (HTTP 422: failure writing points to database")
        assert "conflict,location=lab" in d.output()
        assert vm.export("conflict_value") == {}
    finally:
        front.close()


def test_a_db_answering_5xx_or_too_slowly_gets_the_points_later_from_the_spool(
        vm, store, observe, topic_root):
    front = InfluxFront(vm.url)
    try:
        obs = observe(f"{topic_root}/store-tsdb/#")
        d = store(front.url, timeout=0.5)
        heartbeat(obs, topic_root, lambda m: m["event"] == "heartbeat")
        start = time.time() - 100
        front.status = 503
        expected = publish_series(obs, topic_root, "loft", "temperature", 10, start)
        heartbeat(obs, topic_root, counter("spooled", 10))
        d.wait_log("HTTP 503")
        front.delay = 2.0  # now it does not even answer in time
        expected += publish_series(obs, topic_root, "loft", "temperature", 10, start + 10)
        heartbeat(obs, topic_root, counter("spooled", 20))
        front.status, front.delay = None, 0.0
        assert stored(vm, "temperature", "loft", 20) == expected
        heartbeat(obs, topic_root, lambda m: m["spool_bytes"] == 0 and m["db_available"])
    finally:
        front.close()


def test_a_retained_measurement_delivered_again_on_resubscribe_is_not_written_twice(
        vm, store, observe, topic_root, broker):
    obs = observe(f"{topic_root}/store-tsdb/#")
    d = store(vm.url)
    heartbeat(obs, topic_root, lambda m: m["event"] == "heartbeat")
    publish_series(obs, topic_root, "office", "temperature", 1, 1700000000, retain=True)
    stored(vm, "temperature", "office", 1)
    # the broker restarts: the daemon re-subscribes and gets the retained message again
    broker.restart()
    obs = observe(f"{topic_root}/store-tsdb/#")
    heartbeat(obs, topic_root, counter("duplicates", 1))
    # the daemon restarts: the last stored ts comes back from its state file
    assert d.stop() == 0
    d2 = store(vm.url)
    heartbeat(obs, topic_root, lambda m: m["pid"] == d2.pid and m["event"] == "heartbeat"
              and m["counters"].get("duplicates", 0) == 1)
    # a newer retained value is stored as usual
    publish_series(obs, topic_root, "office", "temperature", 1, 1700000060, retain=True)
    assert stored(vm, "temperature", "office", 2) == [(1700000000000, 20.0),
                                                      (1700000060000, 20.0)]
    assert len(vm.export("temperature_value")[("office", HOST)]) == 2


@pytest.mark.parametrize("topic, payload, why", [
    ("data/kitchen/temperature", b"not json", "is not JSON"),
    ("data/kitchen/temperature", b'{"unit": "C", "ts": 1700000000}', "'value' must be a number"),
    ("data/kitchen/temperature", b'{"value": NaN, "unit": "C", "ts": 1700000000}',
     "'value' must be finite"),
    ("data/kitchen/temperature", b'{"value": "21", "unit": "C", "ts": 1700000000}',
     "'value' must be a number"),
    ("data/kitchen/temperature", b'{"value": 21, "unit": "C", "ts": 1700000000000}',
     "ahead of this host's clock"),
    ("data/Kitchen/temperature", b'{"value": 21, "unit": "C", "ts": 1700000000}',
     "does not match"),
    ("data/kitchen/temperature/extra", b'{"value": 21, "unit": "C", "ts": 1700000000}',
     "does not match"),
])
def test_bad_input_is_rejected_and_counted_and_the_next_good_point_is_stored(
        vm, store, observe, topic_root, topic, payload, why):
    obs = observe(f"{topic_root}/store-tsdb/#")
    d = store(vm.url)
    heartbeat(obs, topic_root, lambda m: m["event"] == "heartbeat")
    obs.publish(f"{topic_root}/{topic}", payload)
    heartbeat(obs, topic_root, counter("rejected", 1))
    d.wait_log(why)
    obs.publish(f"{topic_root}/data/kitchen/temperature",
                {"value": 22.0, "unit": "°C", "ts": 1700000100})
    assert stored(vm, "temperature", "kitchen", 1) == [(1700000100000, 22.0)]
    meta = heartbeat(obs, topic_root, counter("written", 1))
    assert meta["counters"]["rejected"] == 1 and meta["counters"]["errors"] == 0
    assert d.proc.poll() is None


def test_check_config_names_the_key_of_a_bad_value(tmp_path):
    path = write_config(tmp_path / "bad.yml", {"url": "http://127.0.0.1:8428",
                                               "retry_interval": 10, "retry_max": 5})
    checked = run_cli("store_tsdb", "--check-config", str(path))
    assert checked.returncode == 78
    assert "retry_max: must be >= retry_interval" in checked.stderr


def test_an_unreadable_token_file_stops_the_daemon_with_a_config_error(
        store, tmp_path):
    d = store("http://127.0.0.1:9", token_file=str(tmp_path / "missing-token"))
    wait_until(lambda: d.proc.poll() is not None, 20, "the daemon to exit")
    assert d.proc.returncode == 78
    assert "token_file: cannot read" in d.output()


def test_the_token_is_sent_as_influxdb_token_authorization(store, observe, topic_root,
                                                           tmp_path, httpserver):
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    httpserver.expect_request("/api/v2/write", method="POST").respond_with_data("", 204)
    obs = observe(f"{topic_root}/store-tsdb/#")
    store(httpserver.url_for("/").rstrip("/"), token_file=str(token), org="home", bucket="b1")
    heartbeat(obs, topic_root, lambda m: m["event"] == "heartbeat")
    obs.publish(f"{topic_root}/data/kitchen/temperature",
                {"value": 1, "unit": "°C", "ts": 1700000000})
    wait_until(lambda: httpserver.log, 20, "a write request")
    request = httpserver.log[0][0]
    assert request.headers["Authorization"] == "Token s3cret-token"
    assert request.args["org"] == "home" and request.args["bucket"] == "b1"
    assert request.args["precision"] == "ms"
    assert request.get_data().decode() == (
        f"temperature,location=kitchen,host={HOST} value=1.0 1700000000000")


def test_username_and_password_file_are_sent_as_http_basic_auth(store, observe, topic_root,
                                                                tmp_path, httpserver):
    """VictoriaMetrics with -httpAuth.* refuses a write without them (the timeseries role)."""
    password = tmp_path / "password"
    password.write_text("s3cret pass\n")
    httpserver.expect_request("/api/v2/write", method="POST").respond_with_data("", 204)
    obs = observe(f"{topic_root}/store-tsdb/#")
    store(httpserver.url_for("/").rstrip("/"), username="pihub-store-tsdb",
          password_file=str(password))
    heartbeat(obs, topic_root, lambda m: m["event"] == "heartbeat")
    obs.publish(f"{topic_root}/data/kitchen/temperature",
                {"value": 1, "unit": "°C", "ts": 1700000000})
    wait_until(lambda: httpserver.log, 20, "a write request")
    expected = base64.b64encode(b"pihub-store-tsdb:s3cret pass").decode()
    assert httpserver.log[0][0].headers["Authorization"] == f"Basic {expected}"


@pytest.mark.parametrize(("config", "message"), [
    ({"username": "u"}, "password_file: username and password_file go together"),
    ({"password_file": "/p"}, "username: username and password_file go together"),
    ({"username": "u", "password_file": "/p", "token_file": "/t"},
     "token_file: give either token_file or username and password_file"),
])
def test_basic_auth_keys_are_checked_together(tmp_path, config, message):
    path = write_config(tmp_path / "auth.yml", {"url": "http://127.0.0.1:8428", **config})
    checked = run_cli("store_tsdb", "--check-config", str(path))
    assert checked.returncode == 78
    assert message in checked.stderr


def test_state_file_keeps_the_last_stored_ts_per_topic(vm, store, observe, topic_root,
                                                        tmp_path):
    obs = observe(f"{topic_root}/store-tsdb/#")
    d = store(vm.url)
    heartbeat(obs, topic_root, lambda m: m["event"] == "heartbeat")
    publish_series(obs, topic_root, "den", "temperature", 3, 1700000000)
    stored(vm, "temperature", "den", 3)
    assert d.stop() == 0
    state = json.loads((tmp_path / "state" / "last_ts.json").read_text())
    assert state == {f"{topic_root}/data/den/temperature": 1700000002.0}


def test_a_spool_with_a_torn_tail_counts_an_error_and_stores_every_point_before_it(
        vm, store, observe, topic_root, tmp_path):
    obs = observe(f"{topic_root}/store-tsdb/#")
    d = store(vm.url)
    heartbeat(obs, topic_root, lambda m: m["event"] == "heartbeat")
    vm.stop()
    start = time.time() - 600
    expected = publish_series(obs, topic_root, "attic", "temperature", 20, start)
    heartbeat(obs, topic_root, counter("spooled", 20))
    assert d.stop() == 0
    # a power cut in the middle of the next append: half a record at the end of the segment
    segment = sorted((tmp_path / "state" / "points").glob("*.rec"))[-1]
    torn = frame(f"temperature,location=attic,host={HOST} value=1.0 "
                 f"{round((start + 20) * 1000)}".encode())
    with open(segment, "ab") as fh:
        fh.write(torn[:len(torn) // 2])
    vm.start()
    d2 = store(vm.url)
    assert stored(vm, "temperature", "attic", 20) == expected
    meta = heartbeat(obs, topic_root, lambda m: m["pid"] == d2.pid
                     and m["counters"]["replayed"] == 20 and m["spool_bytes"] == 0)
    assert meta["counters"]["errors"] == 1
    assert f"cut off a torn tail of {len(torn) // 2} byte(s)" in d2.output()
    assert len(vm.export("temperature_value")[("attic", HOST)]) == 20


def test_a_spool_in_the_format_of_an_earlier_version_is_replayed_after_the_upgrade(
        vm, store, observe, topic_root, tmp_path):
    """<spool_dir>/spool/<seq>.lp and its cursor "seq offset": the points not replayed go on."""
    old = tmp_path / "state" / "spool"
    old.mkdir(parents=True)
    start = int(time.time()) - 3600
    points = [(1000 * (start + i), 20 + i / 4) for i in range(30)]
    lines = [f"temperature,location=cellar,host={HOST} value={v!r} {ts}".encode()
             for ts, v in points]
    first = b"".join(line + b"\n" for line in lines[:10])
    (old / "000000000001.lp").write_bytes(first)
    (old / "000000000002.lp").write_bytes(b"".join(line + b"\n" for line in lines[10:])
                                          + b"temperature,location=cel")  # torn by a crash
    replayed_before = sum(len(line) + 1 for line in lines[:3])
    (old / "cursor").write_text(f"1 {replayed_before}\n")
    obs = observe(f"{topic_root}/store-tsdb/#")
    d = store(vm.url)
    assert stored(vm, "temperature", "cellar", 27) == points[3:]
    meta = heartbeat(obs, topic_root, lambda m: m["spool_bytes"] == 0
                     and m["counters"]["replayed"] == 27)
    assert meta["counters"]["errors"] == 1  # the torn line
    assert "took over 27 point(s) from the spool format of an earlier version" in d.output()
    assert not old.exists()
    assert len(vm.export("temperature_value")[("cellar", HOST)]) == 27


def test_new_series_beyond_max_series_are_refused_counted_logged_once_and_never_stored(
        vm, store, observe, topic_root):
    obs = observe(f"{topic_root}/store-tsdb/#")
    d = store(vm.url, max_series=3, heartbeat_interval=60)
    obs.wait_for(f"{topic_root}/store-tsdb/status", lambda m: m.text == "online", timeout=20)
    for i in range(10):
        obs.publish(f"{topic_root}/data/room{i}/temperature",
                    {"value": 20.0 + i, "unit": "°C", "ts": 1700000000 + i})
    obs.publish(f"{topic_root}/data/room0/temperature",
                {"value": 30.0, "unit": "°C", "ts": 1700000100})
    obs.publish(f"{topic_root}/data/room0/temperature", b"end-of-test")  # in order, last
    d.wait_log("end-of-test", timeout=20)
    assert stored(vm, "temperature", "room0", 2) == [(1700000000000, 20.0),
                                                     (1700000100000, 30.0)]
    d.signal(signal.SIGTERM)  # the stopping event carries the final counters
    final = heartbeat(obs, topic_root, lambda m: m["event"] == "stopping")
    c = final["counters"]
    assert (c["written"], c["series_refused"], c["rejected"]) == (4, 7, 8)
    assert final["series"] == 3
    assert sorted(vm.export("temperature_value")) == [(f"room{i}", HOST) for i in range(3)]
    refused = [line for line in d.output().splitlines() if "message(s) of new series" in line]
    assert len(refused) == 1 and "max_series=3" in refused[0]


def test_stored_messages_are_acknowledged_so_the_restarted_daemon_gets_none_of_them_again(
        vm, store, observe, topic_root):
    """Acknowledged once stored, a batch at a time: 120 QoS 1 messages (the broker lets 20 wait
    for their acknowledgement) and 5 at QoS 0 all stored, and after a restart the persistent
    session hands the daemon none of them again."""
    obs = observe(f"{topic_root}/store-tsdb/#")
    d = store(vm.url, batch_size=50)
    heartbeat(obs, topic_root, lambda m: m["event"] == "heartbeat")
    start = time.time() - 3600
    expected = publish_series(obs, topic_root, "hall", "temperature", 120, start)
    for i in range(5):
        ts = round(start + 120 + i, 3)
        obs.publish(f"{topic_root}/data/hall/temperature",
                    {"value": 1.5, "unit": "°C", "ts": ts}, qos=0)
        expected.append((round(ts * 1000), 1.5))
    assert stored(vm, "temperature", "hall", 125) == expected
    heartbeat(obs, topic_root, counter("written", 125))
    assert d.stop() == 0
    d2 = store(vm.url)
    obs.publish(f"{topic_root}/data/hall/temperature",
                {"value": 2.5, "unit": "°C", "ts": round(start + 200, 3)})
    stored(vm, "temperature", "hall", 126)
    meta = heartbeat(obs, topic_root, lambda m: m["pid"] == d2.pid
                     and m["counters"]["written"] >= 1)
    assert (meta["counters"]["received"], meta["counters"]["written"]) == (1, 1)
    assert len(vm.export("temperature_value")[("hall", HOST)]) == 126


def test_the_host_tag_is_kept_in_the_state_so_a_restored_hub_goes_on_with_its_series(
        vm, store, observe, topic_root, tmp_path):
    obs = observe(f"{topic_root}/store-tsdb/#")
    d = store(vm.url)
    heartbeat(obs, topic_root, lambda m: m["event"] == "heartbeat")
    # the first start keeps this host's name as the hub's
    assert (tmp_path / "state" / "host_tag").read_text() == f"{HOST}\n"
    assert d.stop() == 0
    # the state of another hub comes back (playbooks/restore.yml onto a new Pi): its name stays
    (tmp_path / "state" / "host_tag").write_text("old-pi\n")
    d2 = store(vm.url)
    heartbeat(obs, topic_root, lambda m: m["pid"] == d2.pid and m["event"] == "heartbeat")
    publish_series(obs, topic_root, "attic", "temperature", 1, 1700000000)
    wait_until(lambda: vm.export("temperature_value").get(("attic", "old-pi")), 20,
               "the point under the kept host tag", interval=0.2)
    assert list(vm.export("temperature_value")) == [("attic", "old-pi")]
    # a configured host_tag wins
    assert d2.stop() == 0
    store(vm.url, host_tag="shed")
    publish_series(obs, topic_root, "attic", "temperature", 1, 1700000060)
    wait_until(lambda: vm.export("temperature_value").get(("attic", "shed")), 20,
               "the point under the configured host tag", interval=0.2)
