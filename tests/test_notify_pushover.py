"""pihub-notify-pushover against a real Mosquitto and a fake Pushover on 127.0.0.1."""

from __future__ import annotations

import functools
import json
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import DaemonProcess, free_port, run_cli, wait_until
from notify_helpers import counters_reach as _counters_reach
from notify_helpers import request
from notify_pushover_helpers import RECEIVER, FakePushover, pushover_key
from pihub import notify
from pihub.daemons.notify_pushover import (
    MAX_MESSAGE,
    Request,
    RequestQueue,
    parse_request,
    wait_from_headers,
)
from pihub.topics import Reject

MODULE = "notify_pushover"
# waits for notify-pushover's heartbeat counters
counters_reach = functools.partial(_counters_reach, daemon="notify-pushover")


def write_secrets(tmp_path: Path, token: str, user: str) -> dict[str, str]:
    secrets = tmp_path / "secrets"
    secrets.mkdir(exist_ok=True)
    (secrets / "pushover-token").write_text(token + "\n")
    (secrets / "pushover-user").write_text(user + "\n")
    return {"token_file": str(secrets / "pushover-token"),
            "user_key_file": str(secrets / "pushover-user")}


@pytest.fixture
def notifier_config(tmp_path: Path, pushover: FakePushover) -> dict[str, Any]:
    return {
        "base_url": pushover.base_url,
        **write_secrets(tmp_path, pushover.token, pushover.user),
        "queue_dir": str(tmp_path / "queue"),
        "backoff_min": 0.2,
        "backoff_max": 1.0,
        "send_interval": 0.1,
        "timeout": 5.0,
    }


@pytest.fixture
def start_notifier(start_daemon: Callable[..., DaemonProcess], notifier_config: dict[str, Any]
                   ) -> Callable[..., DaemonProcess]:
    """Start the notifier (config overrides as keywords) and wait until it is subscribed."""

    def start(**overrides: Any) -> DaemonProcess:
        d = start_daemon(MODULE, {**notifier_config, **overrides})
        d.wait_log("ready: connected and subscribed", timeout=20)
        return d

    return start




def messages_sent(pushover: FakePushover) -> list[str]:
    return [p.fields["message"] for p in pushover.accepted()]


# --------------------------------------------------------------------------- sending


def test_request_is_posted_with_pushover_form_fields(start_notifier, observe, topic_root,
                                                     pushover):
    obs = observe(f"{topic_root}/notify-pushover/#")
    d = start_notifier()
    obs.publish(f"{topic_root}/notify/monitor",
                request("store-rrd on pi4 is down since 10:42", title="pihub: store-rrd down",
                        priority=1, ts=1718000000.75, daemon="store-rrd"))
    wait_until(pushover.accepted, 20, "a POST accepted by the fake Pushover")
    post = pushover.accepted()[0]
    assert post.fields == {
        "token": pushover.token, "user": pushover.user,
        "message": "store-rrd on pi4 is down since 10:42", "title": "pihub: store-rrd down",
        "priority": "1", "timestamp": "1718000000",
    }
    counters = counters_reach(obs, topic_root, sent=1)
    assert counters["errors"] == 0 and counters.get("retries", 0) == 0
    assert d.stop() == 0


def test_emergency_priority_carries_retry_and_expire(start_notifier, observe, topic_root,
                                                     pushover):
    obs = observe()
    start_notifier(emergency_retry=45, emergency_expire=900)
    obs.publish(f"{topic_root}/notify/monitor", request("water on the floor", priority=2))
    wait_until(pushover.accepted, 20, "the emergency POST accepted")
    fields = pushover.accepted()[0].fields
    assert (fields["priority"], fields["retry"], fields["expire"]) == ("2", "45", "900")


def test_request_without_title_or_priority_uses_defaults(start_notifier, observe, topic_root,
                                                         pushover):
    obs = observe()
    start_notifier(default_priority=-1)
    obs.publish(f"{topic_root}/notify/rules", {"message": "door open"})
    wait_until(pushover.accepted, 20, "the POST accepted")
    fields = pushover.accepted()[0].fields
    assert "title" not in fields and "retry" not in fields
    assert fields["priority"] == "-1"
    assert abs(int(fields["timestamp"]) - time.time()) < 120


def test_overlong_message_is_shortened_to_pushovers_limit(start_notifier, observe, topic_root,
                                                          pushover):
    obs = observe(f"{topic_root}/notify-pushover/#")
    start_notifier()
    obs.publish(f"{topic_root}/notify/rules", request("x" * 3000))
    wait_until(pushover.accepted, 20, "the shortened POST accepted")
    message = pushover.accepted()[0].fields["message"]
    assert len(message) == MAX_MESSAGE and message.endswith("…")
    counters_reach(obs, topic_root, truncated=1, sent=1)


# --------------------------------------------------------------------------- failures


def test_server_errors_are_retried_until_pushover_accepts(start_notifier, observe, topic_root,
                                                          pushover):
    obs = observe(f"{topic_root}/notify-pushover/#")
    pushover.answer_next(500, {"status": 0, "errors": ["internal error"]})
    pushover.answer_next(503, {"status": 0, "errors": ["service unavailable"]})
    d = start_notifier()
    obs.publish(f"{topic_root}/notify/monitor", request("retried"))
    wait_until(pushover.accepted, 20, "the POST accepted after two server errors")
    assert [p.status for p in pushover.all_posts()] == [500, 503, 200]
    assert all(p.fields["message"] == "retried" for p in pushover.all_posts())
    counters_reach(obs, topic_root, sent=1, retries=2)
    assert "HTTP 503: service unavailable" in d.output()


def test_request_waits_while_pushover_is_unreachable_and_goes_out_when_it_is_back(
        start_notifier, observe, topic_root, pushover, tmp_path):
    pushover.stop()
    obs = observe()
    d = start_notifier()
    obs.publish(f"{topic_root}/notify/monitor", request("sent once the network is back"))
    d.wait_log("ConnectionError", timeout=20)
    assert len(list((tmp_path / "queue").glob("*.json"))) == 1
    pushover.start()
    wait_until(pushover.accepted, 20, "the POST accepted once the server is back")
    assert messages_sent(pushover) == ["sent once the network is back"]
    wait_until(lambda: not list((tmp_path / "queue").glob("*.json")), 10,
               "the queue file removed after the send")


def test_refused_request_is_dropped_and_pushovers_error_logged(start_notifier, observe,
                                                               topic_root, pushover):
    obs = observe(f"{topic_root}/notify-pushover/#")
    pushover.error_answer(400, user="user identifier is not a valid user, group, or subscribed "
                                    "user key")
    d = start_notifier()
    obs.publish(f"{topic_root}/notify/monitor", request("refused"))
    obs.publish(f"{topic_root}/notify/monitor", request("accepted"))
    wait_until(pushover.accepted, 20, "the second request accepted")
    assert [p.fields["message"] for p in pushover.all_posts()] == ["refused", "accepted"]
    counters_reach(obs, topic_root, failed=1, sent=1)
    assert "HTTP 400: user identifier is not a valid user, group, or subscribed user key" in (
        d.output())


def test_wrong_token_is_refused_with_pushovers_error_text(start_notifier, observe, topic_root,
                                                          pushover, tmp_path):
    obs = observe()
    d = start_notifier(**write_secrets(tmp_path, pushover_key(), pushover.user))
    obs.publish(f"{topic_root}/notify/monitor", request("never delivered"))
    d.wait_log("application token is invalid", timeout=20)
    assert pushover.accepted() == []
    assert len(pushover.all_posts()) == 1  # a 4xx is not retried


def test_over_quota_holds_sending_until_the_reset_pushover_gives(start_notifier, observe,
                                                                 topic_root, pushover):
    obs = observe(f"{topic_root}/notify-pushover/#")
    reset = int(time.time()) + 3
    pushover.answer_next(429, {"status": 0, "errors": ["application is over its message quota"],
                               "request": "d2f1e5c8-0000-4000-8000-000000000001"},
                         {"X-Limit-App-Limit": "10000", "X-Limit-App-Remaining": "0",
                          "X-Limit-App-Reset": str(reset)})
    d = start_notifier()  # backoff_min 0.2 s: only the quota answer makes it wait longer
    obs.publish(f"{topic_root}/notify/monitor", request("after the quota reset"))
    wait_until(pushover.accepted, 30, "the POST accepted after the quota reset")
    first, second = pushover.all_posts()
    assert first.status == 429
    assert second.at >= reset - 1  # the header has whole seconds
    counters_reach(obs, topic_root, quota_waits=1, sent=1)
    assert "application is over its message quota" in d.output()


def test_over_quota_honours_retry_after(start_notifier, observe, topic_root, pushover):
    obs = observe()
    pushover.answer_next(429, {"status": 0, "errors": ["too many requests"]},
                         {"Retry-After": "2"})
    start_notifier()
    obs.publish(f"{topic_root}/notify/monitor", request("after retry-after"))
    wait_until(pushover.accepted, 30, "the POST accepted after Retry-After")
    first, second = pushover.all_posts()
    assert second.at - first.at >= 1.9


def test_wait_from_headers_reads_retry_after_and_app_reset():
    now = 1_700_000_000.0
    assert wait_from_headers({"Retry-After": "30"}, now) == (30.0, "Retry-After: 30")
    when = "Tue, 14 Nov 2023 22:14:20 GMT"  # now + 60 s
    assert wait_from_headers({"Retry-After": when}, now)[0] == pytest.approx(60, abs=1)
    assert wait_from_headers({"X-Limit-App-Reset": "1700003600"}, now)[0] == 3600
    assert wait_from_headers({}, now)[0] is None


# --------------------------------------------------------------------------- dedupe


def test_identical_requests_within_the_window_are_sent_once(start_notifier, observe, topic_root,
                                                            pushover):
    obs = observe(f"{topic_root}/notify-pushover/#")
    start_notifier(dedupe_window_s=600)
    for _ in range(3):
        obs.publish(f"{topic_root}/notify/monitor", request("same", priority=1))
    obs.publish(f"{topic_root}/notify/monitor", request("same", priority=0))  # differs
    obs.publish(f"{topic_root}/notify/monitor", request("last"))
    wait_until(lambda: "last" in messages_sent(pushover), 20, "the last request sent")
    assert [(p.fields["message"], p.fields["priority"]) for p in pushover.accepted()] == [
        ("same", "1"), ("same", "0"), ("last", "0")]
    counters_reach(obs, topic_root, deduped=2, sent=3)


def test_identical_request_after_the_window_is_sent_again(start_notifier, observe, topic_root,
                                                          pushover):
    obs = observe()
    start_notifier(dedupe_window_s=1)
    obs.publish(f"{topic_root}/notify/monitor", request("again"))
    wait_until(pushover.accepted, 20, "the first request sent")
    sent_at = time.monotonic()
    wait_until(lambda: time.monotonic() - sent_at > 1.2, 5, "the dedupe window to pass")
    obs.publish(f"{topic_root}/notify/monitor", request("again"))
    wait_until(lambda: len(pushover.accepted()) == 2, 20, "the repeat sent after the window")


# --------------------------------------------------------------------------- queue


def test_queued_requests_survive_a_restart_and_go_out_in_order(start_notifier, observe,
                                                               topic_root, pushover, tmp_path):
    pushover.stop()
    obs = observe()
    d = start_notifier()
    for i in range(3):
        obs.publish(f"{topic_root}/notify/monitor", request(f"queued {i}"))
    wait_until(lambda: len(list((tmp_path / "queue").glob("*.json"))) == 3, 20,
               "three requests in the on-disk queue")
    assert d.stop() == 0
    assert "3 request(s) not sent yet stay queued" in d.output()
    pushover.start()
    d2 = start_notifier()
    wait_until(lambda: len(pushover.accepted()) == 3, 20, "the three queued requests sent")
    assert messages_sent(pushover) == ["queued 0", "queued 1", "queued 2"]
    assert "3 request(s) left from the last run" in d2.output()
    assert d2.stop() == 0


def test_requests_published_while_stopped_are_sent_after_start(start_notifier, observe,
                                                               topic_root, pushover):
    obs = observe()
    d = start_notifier()
    assert d.stop() == 0
    obs.publish(f"{topic_root}/notify/monitor", request("while the notifier was away"))
    start_notifier()
    wait_until(pushover.accepted, 20, "the request kept by the persistent session sent")
    assert messages_sent(pushover) == ["while the notifier was away"]


def test_full_queue_drops_the_oldest_requests(start_notifier, observe, topic_root, pushover,
                                              tmp_path):
    pushover.stop()
    obs = observe(f"{topic_root}/notify-pushover/#")
    d = start_notifier(max_queue=2)
    for i in range(4):
        obs.publish(f"{topic_root}/notify/monitor", request(f"request {i}"))
    d.wait_log("dropped the oldest request #2", timeout=20)
    wait_until(lambda: len(list((tmp_path / "queue").glob("*.json"))) == 2, 10,
               "the queue trimmed to max_queue files")
    pushover.start()
    wait_until(lambda: len(pushover.accepted()) == 2, 20, "the two kept requests sent")
    assert messages_sent(pushover) == ["request 2", "request 3"]
    counters_reach(obs, topic_root, overflow=2, sent=2)


def test_unreadable_queue_file_is_moved_aside(start_notifier, observe, topic_root, pushover,
                                              tmp_path):
    queue = tmp_path / "queue"
    queue.mkdir()
    (queue / "000000000007.json").write_text('{"seq": 7, "topic": "x", "mess')
    good = {"seq": 8, "topic": f"{topic_root}/notify/monitor", "title": None,
            "message": "left from before", "priority": 0, "ts": 1718000000.0}
    (queue / "000000000008.json").write_text(json.dumps(good))
    d = start_notifier()
    wait_until(pushover.accepted, 20, "the readable queued request sent")
    assert messages_sent(pushover) == ["left from before"]
    assert (queue / "000000000007.json.bad").exists()
    assert "000000000007.json is unreadable" in d.output()


def test_a_queue_left_by_an_earlier_version_is_sent_in_order_and_numbering_goes_on(
        start_notifier, observe, topic_root, pushover, tmp_path):
    """The queue's format is unchanged: <seq>.json files, and a .tmp a crash left behind."""
    queue = tmp_path / "queue"
    queue.mkdir()
    for seq in (3, 12, 5):
        record = {"seq": seq, "topic": f"{topic_root}/notify/monitor", "title": "old",
                  "message": f"left from before {seq}", "priority": 0, "ts": 1718000000.0}
        (queue / f"{seq:012d}.json").write_text(json.dumps(record))
    (queue / ".000000000013.json.tmp").write_text('{"seq": 13, "mess')  # never acknowledged
    obs = observe()
    d = start_notifier()
    wait_until(lambda: len(pushover.accepted()) == 3, 20, "the three queued requests sent")
    assert messages_sent(pushover) == [f"left from before {seq}" for seq in (3, 5, 12)]
    assert "3 request(s) left from the last run" in d.output()
    obs.publish(f"{topic_root}/notify/monitor", request("new"))
    d.wait_log("sent #13 'pihub'", timeout=20)
    assert messages_sent(pushover)[-1] == "new"
    wait_until(lambda: not list(queue.iterdir()), 10, "an empty queue directory")


def test_a_queued_request_is_a_private_file_and_its_removal_is_synced(tmp_path, monkeypatch):
    queue = RequestQueue(tmp_path)
    assert queue.load() == []
    item = Request(queue.next_seq(), "pihub/notify/x", "message", None, 1, 1718000000.0)
    assert queue.put(item, max_items=10) == ([], None)
    path = tmp_path / "000000000001.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == item.record()
    synced: list[Path] = []
    monkeypatch.setattr(notify, "fsync_directory", synced.append)  # the queue is pihub.notify's
    queue.remove(item)
    assert not path.exists() and synced == [tmp_path]
    again = RequestQueue(tmp_path)
    assert again.load() == [] and again.items() == []


# --------------------------------------------------------------------------- contract


MALFORMED: list[tuple[str, bytes]] = [
    ("not JSON", b"disk full"),
    ("not an object", b'["message"]'),
    ("no message", json.dumps({"title": "t", "priority": 0, "ts": 1718000000}).encode()),
    ("blank message", json.dumps({"message": "  ", "priority": 0}).encode()),
    ("priority out of range", json.dumps({"message": "m", "priority": 3}).encode()),
    ("priority a word", json.dumps({"message": "m", "priority": "high"}).encode()),
    ("title a number", json.dumps({"message": "m", "title": 5}).encode()),
    ("ts a string", json.dumps({"message": "m", "ts": "yesterday"}).encode()),
]


def test_malformed_requests_are_rejected_and_never_sent(start_notifier, observe, topic_root,
                                                        pushover):
    obs = observe(f"{topic_root}/notify-pushover/#")
    d = start_notifier()
    for _, payload in MALFORMED:
        obs.publish(f"{topic_root}/notify/monitor", payload)
    obs.publish(f"{topic_root}/notify/monitor/extra/levels", request("wrong topic"))
    obs.publish(f"{topic_root}/notify/monitor", request("well formed"))
    wait_until(pushover.accepted, 20, "the well-formed request sent")
    counters_reach(obs, topic_root, rejected=len(MALFORMED) + 1, sent=1)
    assert messages_sent(pushover) == ["well formed"]
    assert len(pushover.all_posts()) == 1
    out = d.output()
    assert "'priority' must be an integer -2..2, got 3" in out
    assert "'message' must be a non-empty string" in out
    assert d.proc.poll() is None


def test_retained_request_is_rejected(start_notifier, observe, topic_root, pushover):
    obs = observe(f"{topic_root}/notify-pushover/#")
    obs.publish(f"{topic_root}/notify/stale", request("stale retained alarm"), retain=True)
    d = start_notifier()
    d.wait_log("must not be retained", timeout=20)
    counters_reach(obs, topic_root, rejected=1)
    assert pushover.all_posts() == []
    obs.publish(f"{topic_root}/notify/stale", b"", retain=True)  # clear it


@pytest.mark.parametrize("payload", [
    {"message": "m", "priority": True},
    {"message": "m", "priority": 1.5},
    {"message": "m", "ts": -1},
    {"message": "m", "ts": float("nan")},
])
def test_parse_request_rejects_bad_fields(payload):
    with pytest.raises(Reject):
        parse_request("pihub/notify/x", payload, 0, 1.0)


def test_parse_request_takes_whole_float_priority_and_ignores_extra_keys():
    assert parse_request("pihub/notify/x", {"message": "m", "priority": 2.0, "url": "u"}, 0,
                         5.0) == ("m", None, 2, 5.0)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(("config", "key"), [
    ({"emergency_retry": 10}, "emergency_retry"),
    ({"emergency_expire": 20000}, "emergency_expire"),
    ({"backoff_min": 10, "backoff_max": 5}, "backoff_max"),
    ({"default_priority": 3}, "default_priority"),
    ({"base_url": "api.pushover.net"}, "base_url"),
])
def test_check_config_names_the_wrong_key(tmp_path, config, key):
    path = tmp_path / "bad.yml"
    path.write_text(json.dumps({"token_file": "/t", "user_key_file": "/u", **config}))
    checked = run_cli(MODULE, "--check-config", str(path))
    assert checked.returncode == 78
    assert f": {key}: " in checked.stderr


def test_missing_token_file_stops_the_daemon_with_ex_config(start_daemon, notifier_config,
                                                            tmp_path):
    d = start_daemon(MODULE, {**notifier_config, "token_file": str(tmp_path / "nope")})
    wait_until(lambda: d.proc.poll() is not None, 20, "the daemon to exit")
    assert d.proc.returncode == 78
    assert "token_file: cannot read" in d.output()


# --------------------------------------------------------------------------- stand-in


def test_stand_in_receiver_records_the_pushover_request(start_daemon, notifier_config, observe,
                                                        topic_root, tmp_path):
    """The Molecule stand-in's receiver, run as its unit runs it, gets the right form fields."""
    port = free_port()
    out = tmp_path / "requests.jsonl"
    token, user = pushover_key(), pushover_key()
    log = open(tmp_path / "receiver.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, str(RECEIVER), "--port", str(port), "--out",
                             str(out), "--token", token, "--user", user], stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "pushover receiver on" in (tmp_path / "receiver.log").read_text(),
                   10, "the receiver to listen")
        obs = observe()
        d = start_daemon(MODULE, {**notifier_config, "base_url": f"http://127.0.0.1:{port}",
                                  **write_secrets(tmp_path, token, user)})
        d.wait_log("ready: connected and subscribed", timeout=20)
        obs.publish(f"{topic_root}/notify/monitor",
                    request("stand-in check", title="pihub test", priority=2, ts=1718000000))
        wait_until(lambda: out.exists() and out.read_text().strip(), 20,
                   "a request recorded by the receiver")
        record = json.loads(out.read_text().splitlines()[0])
        assert record["accepted"] is True
        assert record["fields"] == {"token": token, "user": user, "message": "stand-in check",
                                    "title": "pihub test", "priority": "2",
                                    "timestamp": "1718000000", "retry": "60",
                                    "expire": "3600"}
        d.wait_log("sent #1", timeout=20)
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_sighup_rereads_the_secret_files(start_notifier, observe, topic_root, pushover,
                                         tmp_path):
    obs = observe()
    wrong = tmp_path / "old-token"
    wrong.write_text(pushover_key() + "\n")
    d = start_notifier(token_file=str(wrong))
    obs.publish(f"{topic_root}/notify/monitor", request("with the old token"))
    d.wait_log("application token is invalid", timeout=20)
    config = yaml.safe_load(d.config_file.read_text())
    config.update(write_secrets(tmp_path, pushover.token, pushover.user))
    d.config_file.write_text(yaml.safe_dump(config))
    d.signal(signal.SIGHUP)
    d.wait_log("SIGHUP: applied token_file", timeout=20)
    obs.publish(f"{topic_root}/notify/monitor", request("with the new token"))
    wait_until(pushover.accepted, 20, "the request with the new token accepted")
    assert messages_sent(pushover) == ["with the new token"]
