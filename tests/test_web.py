"""pihub-web over HTTP, against a real Mosquitto (and a real VictoriaMetrics for History):
login, sessions, CSRF, roles, the JSON API, escaping, the live stream and its bounds."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import socket
import subprocess
import sys
import time

import pytest
from conftest import SRC, run_cli, wait_until, write_config
from pihub.daemons.web.auth import Auth, hash_password
from pihub.daemons.web.state import Client
from web_helpers import (
    KIOSK_TOKEN,
    PASSWORD,
    EventReader,
    WebClient,
    sse_open,
    start_web,
    web_config,
)

NOW = time.time


def data(value: float, unit: str = "°C", ts: float | None = None, **extra: object) -> dict:
    return {"value": value, "unit": unit, "ts": round(ts or NOW(), 3), **extra}


def web_meta(client: WebClient) -> dict:
    """The web daemon's last heartbeat as the page sees it; {} before the first one arrived."""
    return client.get("/api/daemons").json()["daemons"].get("web", {}).get("meta") or {}


def counters(client: WebClient, **wanted: int) -> dict:
    """The web daemon's own counters as its heartbeat reports them, once ``wanted`` hold."""
    def reported() -> dict | None:
        got = web_meta(client).get("counters", {})
        return got if all(got.get(k, 0) >= v for k, v in wanted.items()) else None

    return wait_until(reported, 15, f"web counters {wanted}")  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- login


def test_pages_and_api_need_a_login(start_daemon):
    _proc, web = start_web(start_daemon)
    page = web.get("/daemons")
    assert page.status == 303 and page.headers["location"].startswith("/login?next=")
    api = web.get("/api/state")
    assert api.status == 401 and api.headers["content-type"].startswith("application/json")
    assert "login required" in api.json()["error"]
    assert web.get("/healthz").status == 200  # for probes, says nothing about the hub
    assert web.login().status == 303
    cookie = web.cookie
    assert cookie.startswith("pihub_session=")
    login = web.post_form("/login", {"user": "admin", "password": PASSWORD})
    flags = login.headers["set-cookie"]
    assert "HttpOnly" in flags and "SameSite=Strict" in flags
    assert web.get("/api/state").status == 200
    assert web.get("/daemons").status == 200


def test_wrong_password_and_unknown_user_get_the_same_answer(start_daemon):
    _proc, web = start_web(start_daemon)
    wrong = web.post_form("/login", {"user": "admin", "password": "nope"})
    unknown = web.post_form("/login", {"user": "mallory", "password": "nope"})
    assert wrong.status == unknown.status == 401
    assert wrong.body == unknown.body
    assert "set-cookie" not in wrong.headers and "set-cookie" not in unknown.headers
    assert "Wrong user name or password" in wrong.text


def test_an_unknown_user_costs_the_same_hashing_as_a_known_one(monkeypatch):
    """Same timing by construction: the same PBKDF2 work whether the user exists or not."""
    rounds: list[int] = []
    real = hashlib.pbkdf2_hmac

    def counting(name: str, password: bytes, salt: bytes, iterations: int) -> bytes:
        rounds.append(iterations)
        return real(name, password, salt, iterations)

    auth = Auth({"admin": hash_password("x", iterations=3000)}, [], None, 3600, attempts=100)
    monkeypatch.setattr(hashlib, "pbkdf2_hmac", counting)
    assert auth.check("c", "admin", "wrong") is None
    assert auth.check("c", "nobody", "wrong") is None
    assert auth.check("c", "admin", "x") is not None
    assert rounds == [3000, 3000, 3000]


def test_login_attempts_are_rate_limited_per_client(start_daemon):
    _proc, web = start_web(start_daemon, login_attempts=3, login_window_s=600)
    for _ in range(3):
        assert web.post_form("/login", {"user": "admin", "password": "guess"}).status == 401
    limited = web.login()  # even the right password, now
    assert limited.status == 429 and int(limited.headers["retry-after"]) > 0
    assert "Too many failed logins" in limited.text
    other = WebClient(web.port, source_address="127.0.0.2")  # another client is not limited
    assert other.login().status == 303
    assert counters(other, login_failures=3, logins_limited=1)


def test_hash_password_prints_a_hash_that_logs_in(start_daemon):
    done = subprocess.run([sys.executable, "-m", "pihub.daemons.web", "--hash-password"],
                          input="s3cret word\n", capture_output=True, text=True, timeout=30,
                          env={"PYTHONPATH": str(SRC)})
    assert done.returncode == 0, done.stderr
    hashed = done.stdout.strip()
    assert hashed.startswith("pbkdf2_sha256$100000$") and "s3cret" not in hashed
    _proc, web = start_web(start_daemon, users={"ann": hashed}, viewers=[])
    assert web.login("ann", "s3cret word").status == 303


# --------------------------------------------------------------------------- CSRF and roles


def test_a_post_without_the_csrf_token_is_refused_and_switches_nothing(start_daemon, observe,
                                                                      topic_root):
    obs = observe(f"{topic_root}/cmd/#", f"{topic_root}/data/#")
    _proc, web = start_web(start_daemon)
    obs.publish(f"{topic_root}/data/hall/heater", data(0, "bool", kind="output", pin=27),
                retain=True)
    web.login()
    wait_until(lambda: "hall/heater" in web.get("/api/values").json()["values"], 10,
               "the output in the state")
    refused = web.post_json("/api/outputs/heater", {"state": "on"}, csrf=False)
    assert refused.status == 403 and "CSRF" in refused.json()["error"]
    wrong = web.request("POST", "/api/outputs/heater", json.dumps({"state": "on"}),
                        {"Content-Type": "application/json", "X-CSRF-Token": "x" * 32})
    assert wrong.status == 403
    form = web.post_form("/outputs/heater", {"state": "on"})  # the no-JS form, no token
    assert form.status == 403
    sent = web.post_json("/api/outputs/heater", {"state": "on"})
    assert sent.status == 202, sent.text
    cmd = obs.wait_for(f"{topic_root}/cmd/sensor-gpio/heater")
    assert [m.text for m in obs.messages(f"{topic_root}/cmd/#")] == ["on"]
    assert cmd[0].retain is False
    assert counters(web, csrf_refused=3, commands=1)


def test_a_cross_site_post_is_refused_even_with_a_token(start_daemon):
    _proc, web = start_web(start_daemon)
    web.login()
    answer = web.request("POST", "/api/outputs/heater", json.dumps({"state": "on"}),
                         {"X-CSRF-Token": web.csrf, "Origin": "http://evil.example"})
    assert answer.status == 403 and "Origin" in answer.json()["error"]


def test_the_no_js_switch_form_posts_the_command(start_daemon, observe, topic_root):
    obs = observe(f"{topic_root}/cmd/#")
    _proc, web = start_web(start_daemon)
    obs.publish(f"{topic_root}/data/hall/lamp", data(1, "bool", kind="output"), retain=True)
    web.login()
    wait_until(lambda: 'id="o:lamp"' in web.get("/outputs").text, 10, "the lamp's row")
    page = web.get("/outputs").text
    assert 'value="off"' in page and "Switch off" in page
    answer = web.post_form("/outputs/lamp", {"state": "off", "csrf": web.csrf})
    assert answer.status == 303 and answer.headers["location"] == "/outputs"
    assert obs.wait_for(f"{topic_root}/cmd/sensor-gpio/lamp")[0].text == "off"


def test_an_unknown_output_or_state_is_refused_with_a_json_error(start_daemon, observe,
                                                                 topic_root):
    obs = observe(f"{topic_root}/cmd/#")
    _proc, web = start_web(start_daemon)
    obs.publish(f"{topic_root}/data/hall/heater", data(0, "bool", kind="output"), retain=True)
    obs.publish(f"{topic_root}/data/hall/door", data(0, "bool", kind="contact"), retain=True)
    web.login()
    wait_until(lambda: len(web.get("/api/values").json()["values"]) == 2, 10, "two values")
    missing = web.post_json("/api/outputs/boiler", {"state": "on"})
    assert missing.status == 404
    assert missing.json() == {"error": "no output 'boiler'; outputs: heater"}
    assert web.post_json("/api/outputs/door", {"state": "on"}).status == 404  # an input
    bad = web.post_json("/api/outputs/heater", {"state": "maybe"})
    assert bad.status == 400 and "on, off, toggle" in bad.json()["error"]
    time.sleep(0.3)  # give a wrongly sent command time to show up (none may)
    assert obs.messages(f"{topic_root}/cmd/#") == []


def test_a_viewer_and_the_kiosk_token_may_look_but_not_switch(start_daemon, observe,
                                                              topic_root, tmp_path):
    token_file = tmp_path / "kiosk.token"
    token_file.write_text(KIOSK_TOKEN + "\n")
    obs = observe(f"{topic_root}/cmd/#")
    _proc, web = start_web(start_daemon, kiosk_token_file=str(token_file))
    obs.publish(f"{topic_root}/data/hall/heater", data(0, "bool", kind="output"), retain=True)
    viewer = WebClient(web.port)
    assert viewer.login("viewer", "just looking").status == 303
    wait_until(lambda: "hall/heater" in viewer.get("/api/values").json()["values"], 10,
               "the output")
    assert viewer.get("/api/session").json()["role"] == "viewer"
    refused = viewer.post_json("/api/outputs/heater", {"state": "on"})
    assert refused.status == 403 and "only look" in refused.json()["error"]
    assert "Switch on" not in viewer.get("/outputs").text

    kiosk = WebClient(web.port)
    assert kiosk.get("/boards?kiosk=1").status == 303  # no token, no page
    assert kiosk.get("/boards?kiosk=1&token=wrong-token-000000").status == 303
    page = kiosk.get(f"/boards?kiosk=1&theme=dark&token={KIOSK_TOKEN}")
    assert page.status == 200 and 'class="kiosk dark"' in page.text
    assert "<header>" not in page.text  # no chrome
    kiosk.csrf = kiosk.get("/api/session").json()["csrf"]
    assert kiosk.post_json("/api/outputs/heater", {"state": "on"}).status == 403
    time.sleep(0.3)
    assert obs.messages(f"{topic_root}/cmd/#") == []


# --------------------------------------------------------------------------- API and pages


def test_the_json_api_has_every_kind_of_state(start_daemon, observe, topic_root):
    obs = observe()
    _proc, web = start_web(start_daemon)
    ts = round(NOW(), 3)
    obs.publish(f"{topic_root}/data/kitchen/temperature", data(21.5, ts=ts), retain=True)
    obs.publish(f"{topic_root}/display/bikes/gare", {"name": "Gare", "bikes": 3, "docks": 9,
                                                     "stale": False}, retain=True)
    obs.publish(f"{topic_root}/monitor/rules/cold", {"rule": "cold", "firing": 0,
                                                     "series": {}}, retain=True)
    obs.publish(f"{topic_root}/monitor/daemons/web", {"daemon": "web", "state": "up",
                                                      "since": ts, "reason": "heartbeat"},
                retain=True)
    obs.publish(f"{topic_root}/notify/monitor", {"title": "t", "message": "m", "priority": 1,
                                                 "ts": ts})
    web.login()

    def complete() -> dict | None:
        state = web.get("/api/state").json()
        ok = (state["values"] and state["boards"] and state["rules"] and state["notifications"]
              and (state["daemons"].get("web") or {}).get("monitor"))
        return state if ok else None

    state = wait_until(complete, 10, "every kind in /api/state")
    assert set(state) == {"ts", "values", "daemons", "hosts", "boards", "rules",
                          "notifications"}
    # a single hub: one host, its own, holding every daemon (contract §2, "Fleet")
    assert [h["host"] for h in state["hosts"]] == [state["daemons"]["web"]["host"]]
    assert state["hosts"][0]["satellite"] is False
    assert state["hosts"][0]["daemons"] == sorted(state["daemons"])
    assert state["values"]["kitchen/temperature"] == {
        "location": "kitchen", "quantity": "temperature", "value": 21.5, "unit": "°C",
        "ts": ts, "interval_s": None}
    assert state["boards"]["bikes/gare"] == {
        "board": "bikes", "item": "gare",
        "data": {"name": "Gare", "bikes": 3, "docks": 9, "stale": False}}
    assert state["rules"]["cold"] == {"rule": "cold", "firing": 0, "series": {}}
    note = state["notifications"][0]
    assert {k: note[k] for k in ("topic", "title", "message", "priority", "ts")} == {
        "topic": "monitor", "title": "t", "message": "m", "priority": 1, "ts": ts}
    me = state["daemons"]["web"]
    assert me["status"] == "online" and me["monitor"]["state"] == "up"
    assert {"host", "pid", "version", "ts", "uptime_s", "interval_s", "rss_kb",
            "counters"} <= set(me["meta"])
    for part in ("values", "daemons", "boards", "rules", "notifications"):
        answer = web.get(f"/api/{part}").json()
        assert set(answer) == {"ts", part}
        if part != "daemons":  # the daemons' heartbeats move on meanwhile
            assert answer[part] == state[part]
    assert web.get("/api/nothing").json() == {"error": "no API /api/nothing"}


def test_a_value_learns_its_interval_and_a_cleared_one_goes(start_daemon, observe, topic_root):
    obs = observe()
    _proc, web = start_web(start_daemon)
    web.login()
    t0 = NOW() - 100
    topic = f"{topic_root}/data/cellar/humidity"
    for i in range(3):
        obs.publish(topic, data(60 + i, "%", ts=t0 + 10 * i), retain=True)
    wait_until(lambda: (web.get("/api/values").json()["values"].get("cellar/humidity") or {})
               .get("value") == 62, 10, "the third value")
    item = web.get("/api/values").json()["values"]["cellar/humidity"]
    assert item["interval_s"] == 10.0
    page = web.get("/").text  # 80 s old, interval 10 s: stale
    assert 'id="v:cellar/humidity" class="stale"' in page
    obs.publish(topic, b"", retain=True)
    wait_until(lambda: not web.get("/api/values").json()["values"], 10, "the value gone")


def test_everything_from_mqtt_is_escaped(start_daemon, observe, topic_root):
    evil = "<script>alert(1)</script>"
    obs = observe()
    _proc, web = start_web(start_daemon)
    obs.publish(f"{topic_root}/display/bikes/evil", {"name": evil, "bikes": 1, "docks": 2,
                                                     "stale": True, "reason": evil},
                retain=True)
    obs.publish(f"{topic_root}/display/transport/evil", {
        "stop": evil, "departures": [{"line": evil, "destination": '"><img src=x>',
                                      "minutes": 3, "time": "12:00", "platform": evil}]},
        retain=True)
    obs.publish(f"{topic_root}/display/other/evil", {evil: evil}, retain=True)
    obs.publish(f"{topic_root}/data/hall/heater", data(1, unit=evil[:32], kind="output"),
                retain=True)
    obs.publish(f"{topic_root}/notify/monitor", {"title": evil, "message": evil})
    obs.publish(f"{topic_root}/evil/meta", {"event": "heartbeat", "host": evil,
                                            "version": evil, "counters": {evil: 1}})
    obs.publish(f"{topic_root}/monitor/rules/evil", {"firing": 1, "series": {
        evil: {"state": evil, "value": 1, "unit": evil}}}, retain=True)
    web.login()
    wait_until(lambda: len(web.get("/api/state").json()["notifications"]) == 1
               and len(web.get("/api/boards").json()["boards"]) == 3, 10, "the evil state")
    for path in ("/", "/daemons", "/boards", "/boards?kiosk=1", "/alerts", "/outputs",
                 "/history"):
        page = web.get(path).text
        assert "<script>alert" not in page and "<img" not in page, path
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in web.get("/boards").text
    assert "&lt;script&gt;" in web.get("/alerts").text
    assert "&lt;script&gt;" in web.get("/daemons").text
    csp = web.get("/").headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp


def test_a_message_that_breaks_the_contract_is_rejected_and_counted(start_daemon, observe,
                                                                    topic_root):
    obs = observe()
    proc, web = start_web(start_daemon, max_series=2)
    web.login()
    obs.publish(f"{topic_root}/data/a/b", {"value": "hot", "unit": "°C", "ts": 1})
    obs.publish(f"{topic_root}/display/x/y", b"[1, 2]")
    obs.publish(f"{topic_root}/whatever/deep/topic", b"1")
    for q in ("one", "two", "three"):
        obs.publish(f"{topic_root}/data/room/{q}", data(1))
    got = counters(web, rejected=4, series_refused=1)
    assert got["errors"] == 0
    assert sorted(web.get("/api/values").json()["values"]) == ["room/one", "room/two"]
    proc.wait_log("'value' must be a number")


def test_static_assets_are_vendored_versioned_and_compressed(start_daemon):
    _proc, web = start_web(start_daemon)
    web.login()
    page = web.get("/history").text
    for name in ("app.js", "app.css", "uPlot.iife.min.js", "uPlot.min.css"):
        assert f"/static/{name}?v=" in page
    url = page.split('src="')[1].split('"')[0]
    asset = web.get(url, headers={"Accept-Encoding": "gzip"})
    assert asset.status == 200 and asset.headers["content-encoding"] == "gzip"
    assert "immutable" in asset.headers["cache-control"]
    assert "http://" not in page.replace("http://www.w3.org", "")  # no CDN


# --------------------------------------------------------------------------- live stream


def test_the_stream_sends_a_snapshot_then_changes_and_a_snapshot_on_reconnect(
        start_daemon, observe, topic_root):
    obs = observe()
    _proc, web = start_web(start_daemon)
    obs.publish(f"{topic_root}/data/kitchen/temp", data(20), retain=True)
    web.login()
    wait_until(lambda: web.get("/api/values").json()["values"], 10, "the first value")
    stream = EventReader(sse_open(web.port, web.cookie))
    assert stream.status == 200
    name, snap = stream.next_event()
    assert name == "snapshot" and snap["values"]["kitchen/temp"]["value"] == 20
    obs.publish(f"{topic_root}/data/kitchen/temp", data(21.25), retain=True)

    def change() -> dict | None:
        _name, event = stream.next_event()
        return event if event.get("kind") == "values" else None

    event = wait_until(change, 10, "the change on the stream")
    assert event["key"] == "kitchen/temp" and event["item"]["value"] == 21.25
    stream.sock.close()
    obs.publish(f"{topic_root}/data/kitchen/temp", data(22.5), retain=True)  # while away
    again = EventReader(sse_open(web.port, web.cookie))
    name, snap = again.next_event()
    assert name == "snapshot" and snap["values"]["kitchen/temp"]["value"] == 22.5
    again.sock.close()


def test_the_stream_needs_a_session(start_daemon):
    _proc, web = start_web(start_daemon)
    reader = EventReader(sse_open(web.port, "pihub_session=forged"))
    assert reader.status == 401


def test_a_page_queue_keeps_only_the_latest_change_per_item():
    page = Client(max_pending=2, max_lag=3600)
    for i in range(100):
        assert page.offer("values", "kitchen/temp", f"v{i}".encode())
    assert page.offer("boards", "bikes/gare", b"b")
    assert page.take(0) == [b"v99", b"b"]  # one entry per item, first-queued order
    for key in ("a", "b"):
        assert page.offer("values", key, b"x")
    assert not page.offer("values", "c", b"x")  # a third distinct item: behind, dropped
    assert page.dropped == "more than 2 changes queued"


def test_a_page_that_falls_behind_is_dropped_and_counted(start_daemon, observe, topic_root):
    obs = observe()
    _proc, web = start_web(start_daemon, sse_max_lag_s=0.5)
    web.login()
    slow = sse_open(web.port, web.cookie, rcvbuf=4096)  # connected, never read
    wait_until(lambda: web_meta(web).get("counters", {}).get("http_requests", 0) >= 3, 10,
               "the stream open")
    filler = "x" * 12000

    def dropped() -> bool:
        for i in range(20):
            obs.publish(f"{topic_root}/display/fill/item", {"n": i, "pad": filler})
        got = web_meta(web).get("counters", {})
        return got.get("sse_dropped", 0) >= 1

    wait_until(dropped, 30, "the slow page dropped", interval=0.2)
    wait_until(lambda: web_meta(web).get("clients") == 0, 10,
               "the heartbeat's gauge of open pages back to 0")
    slow.close()
    fresh = EventReader(sse_open(web.port, web.cookie))  # a page that reads is served
    assert fresh.next_event()[0] == "snapshot"
    fresh.sock.close()


def test_a_page_with_too_many_queued_changes_is_dropped(start_daemon, observe, topic_root):
    obs = observe()
    _proc, web = start_web(start_daemon, sse_queue=5, sse_max_lag_s=60)
    web.login()
    slow = sse_open(web.port, web.cookie, rcvbuf=4096)
    filler = "y" * 12000

    def dropped() -> bool:
        for i in range(40):  # distinct items: the queue keeps one per item, and overflows
            obs.publish(f"{topic_root}/display/fill/i{i}", {"pad": filler})
        got = web_meta(web).get("counters", {})
        return got.get("sse_dropped", 0) >= 1

    wait_until(dropped, 30, "the page dropped", interval=0.2)
    slow.close()


# --------------------------------------------------------------------------- history


def write_points(url: str, lines: list[str]) -> None:
    import urllib.request

    body = "\n".join(lines).encode()
    req = urllib.request.Request(f"{url}/api/v2/write?precision=ms", data=body, method="POST")
    urllib.request.urlopen(req, timeout=10).close()
    urllib.request.urlopen(f"{url}/internal/force_flush", timeout=10).close()


def test_history_returns_the_points_written_into_victoriametrics(start_daemon, vm):
    now = int(NOW()) // 60 * 60
    # 20 points, one per minute, each in the middle of its minute
    points = [(now - 60 * k - 30, 15.0 + k) for k in range(20)]
    write_points(vm.url, [f"temp,location=cellar,host=pi value={v} {t * 1000}"
                          for t, v in points])
    _proc, web = start_web(start_daemon, tsdb={"url": vm.url})
    web.login()

    def drawn() -> dict | None:
        answer = web.get("/api/history?series=cellar/temp&range=1h&step=60").json()
        return answer if len(answer["series"][0]["points"]) == 20 else None

    answer = wait_until(drawn, 20, "20 points from VictoriaMetrics")
    assert answer["step"] == 60 and answer["band"] is False
    got = sorted(v for _t, v in answer["series"][0]["points"])
    assert got == sorted(v for _t, v in points)
    week = web.get("/api/history?series=cellar/temp&range=7d").json()["series"][0]
    assert week["min"] and week["max"]  # the band of a long range
    assert min(v for _t, v in week["min"]) == 15.0 and max(v for _t, v in week["max"]) == 34.0
    bad = web.get("/api/history?series=../etc&range=1h")
    assert bad.status == 400 and "series must be" in bad.json()["error"]
    assert web.get("/api/history?series=a/b&range=2h").status == 400


def test_history_asks_the_tsdb_with_its_credentials(start_daemon, httpserver, tmp_path):
    password = tmp_path / "tsdb.password"
    password.write_text("db pass\n")
    httpserver.expect_request("/api/v1/query_range").respond_with_json(
        {"status": "success", "data": {"resultType": "matrix", "result": [
            {"metric": {}, "values": [[1700000000, "1.5"]]}]}})
    _proc, web = start_web(start_daemon, tsdb={
        "url": httpserver.url_for("/").rstrip("/"), "username": "pihub-web",
        "password_file": str(password)})
    web.login()
    answer = web.get("/api/history?series=hall/temp&range=24h").json()
    assert answer["series"][0]["points"] == [[1700000000.0, 1.5]]
    request = httpserver.log[0][0]
    assert request.headers["Authorization"] == "Basic " + base64.b64encode(
        b"pihub-web:db pass").decode()
    assert request.args["query"] == 'avg(avg_over_time({__name__="temp_value",'\
        'location="hall"}[120s]))'


def test_history_without_a_tsdb_says_so(start_daemon):
    _proc, web = start_web(start_daemon)
    web.login()
    assert 'id="no-tsdb"' in web.get("/history").text
    answer = web.get("/api/history?series=a/b")
    assert answer.status == 404 and "no timeseries database" in answer.json()["error"]


def make_rrd(rrd_dir, location: str, quantity: str, unit: str) -> None:
    """An RRD as store-rrd makes it (data source value, AVERAGE/MIN/MAX), an hour of points."""
    path = rrd_dir / location / f"{quantity}.rrd"
    path.parent.mkdir(parents=True)
    now = int(NOW()) // 60 * 60
    subprocess.run(["rrdtool", "create", str(path), "--start", str(now - 3700), "--step", "60",
                    "DS:value:GAUGE:120:U:U", *(f"RRA:{cf}:0.5:1:2880" for cf in (
                        "AVERAGE", "MIN", "MAX"))], check=True)
    subprocess.run(["rrdtool", "update", str(path),
                    *(f"{now - 3600 + 60 * k}:{10 + k % 5}" for k in range(60))], check=True)
    (path.parent / f"{quantity}.json").write_text(json.dumps({"unit": unit}))


@pytest.mark.skipif(not shutil.which("rrdtool"), reason="needs Debian's rrdtool")
def test_without_a_tsdb_history_draws_store_rrds_files(start_daemon, tmp_path):
    rrd_dir = tmp_path / "rrd"
    make_rrd(rrd_dir, "cellar", "temperature", "°C")
    _proc, web = start_web(start_daemon, rrd={"dir": str(rrd_dir)})
    web.login()
    page = web.get("/history?series=cellar/temperature&range=24h").text
    assert '<img alt="cellar/temperature, 24h" src="/api/rrd?series=cellar%2Ftemperature&amp;' \
           'range=24h">' in page
    graph = web.get("/api/rrd?series=cellar/temperature&range=24h")
    assert graph.status == 200 and graph.headers["content-type"] == "image/png"
    assert graph.body.startswith(b"\x89PNG")
    assert web.get("/api/rrd?series=cellar/temperature&range=24h").body == graph.body  # cached
    missing = web.get("/api/rrd?series=attic/temperature&range=24h")
    assert missing.status == 404 and "no RRD attic/temperature" in missing.json()["error"]
    assert web.get("/api/rrd?series=../x&range=24h").status == 400


@pytest.mark.skipif(not shutil.which("rrdtool"), reason="needs Debian's rrdtool")
def test_an_rrd_graph_that_fails_is_a_json_error_and_counted(start_daemon, tmp_path):
    rrd_dir = tmp_path / "rrd"
    make_rrd(rrd_dir, "cellar", "temperature", "°C")
    (rrd_dir / "cellar" / "temperature.rrd").write_bytes(b"not an rrd")
    _proc, web = start_web(start_daemon, rrd={"dir": str(rrd_dir)})
    web.login()
    answer = web.get("/api/rrd?series=cellar/temperature&range=7d")
    assert answer.status == 502 and "rrdtool graph" in answer.json()["error"]
    assert counters(web, rrd_errors=1)


def test_a_tsdb_that_is_down_is_a_json_error_and_counted(start_daemon):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    _proc, web = start_web(start_daemon, tsdb={"url": f"http://127.0.0.1:{port}"})
    web.login()
    answer = web.get("/api/history?series=a/b&range=1h")
    assert answer.status == 502 and answer.json()["error"].startswith(
        f"http://127.0.0.1:{port}/api/v1/query_range: ")
    assert counters(web, tsdb_errors=1)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(("change", "message"), [
    ({"users": {"admin": "plain-password"}}, "users.admin: expected pbkdf2_sha256$"),
    ({"users": {"admin": "pbkdf2_sha256$10$c2FsdA==$" + "A" * 43 + "="}},
     "users.admin: at least 1000 iterations"),
    ({"users": {}, "viewers": []}, "users: at least one user"),
    ({"viewers": ["nobody"]}, "viewers[0]: 'nobody' is not one of users"),
    ({"tls_cert_file": "/x.pem"}, "tls_key_file: tls_cert_file and tls_key_file go together"),
    ({"tsdb": {"url": "http://x", "username": "u"}}, "tsdb.password_file: username and"),
    ({"port": 0}, "port: expected an integer between 1 and 65535"),
], ids=["hash-not-a-hash", "hash-too-cheap", "no-users", "viewer-unknown", "tls-half",
        "tsdb-auth-half", "port"])
def test_a_bad_config_is_refused_with_the_key_and_exit_78(tmp_path, change, message):
    path = write_config(tmp_path / "web.yml", {**web_config(), **change})
    checked = run_cli("web", "--check-config", str(path))
    assert checked.returncode == 78 and message in checked.stderr, checked.stderr


def test_a_port_in_use_stops_it_with_exit_78(start_daemon):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        proc = start_daemon("web", {**web_config(), "port": s.getsockname()[1]})
        assert proc.proc.wait(20) == 78
    assert "port: cannot listen on 127.0.0.1:" in proc.output()


def test_the_example_config_is_complete_and_valid(tmp_path):
    example = run_cli("web", "--print-config-example")
    assert example.returncode == 0
    path = tmp_path / "example.yml"
    path.write_text(example.stdout)
    assert run_cli("web", "--check-config", str(path)).returncode == 0
    for key in ("listen_address", "port", "users", "kiosk_token_file", "tsdb:",
                "password_file", "sse_queue"):
        assert key in example.stdout


def test_tls_serves_https(start_daemon, tmp_path):
    import ssl

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days",
                           "1", "-subj", "/CN=localhost", "-keyout", str(key), "-out",
                           str(cert)], capture_output=True, timeout=60)
    if made.returncode != 0:
        pytest.skip("openssl cannot make a test certificate here")
    cfg = web_config(tls_cert_file=str(cert), tls_key_file=str(key))
    proc = start_daemon("web", cfg)
    proc.wait_log("serving https://127.0.0.1:")
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False
    import http.client

    conn = http.client.HTTPSConnection("127.0.0.1", cfg["port"], context=context, timeout=10)
    conn.request("GET", "/login")
    first = conn.getresponse()
    assert first.status == 200 and b"Log in" in first.read()
    conn.request("POST", "/login", body=f"user=admin&password={PASSWORD.replace(' ', '+')}",
                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    resp = conn.getresponse()
    assert resp.status == 303 and "; Secure" in resp.getheader("Set-Cookie", "")
    conn.close()


def test_a_clean_stop_exits_0_with_pages_open(start_daemon):
    proc, web = start_web(start_daemon)
    web.login()
    stream = EventReader(sse_open(web.port, web.cookie))
    assert stream.next_event()[0] == "snapshot"
    assert proc.stop() == 0
    stream.sock.close()

