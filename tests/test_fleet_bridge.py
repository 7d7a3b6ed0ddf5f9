"""A fleet on loopback (contract §2, "Fleet"): a satellite's Mosquitto bridged to the central's,
configured as the roles do it (the topics, QoS 1, persistent sessions, the bridge's state; plain
TCP here, the roles add TLS), real daemons on both sides.

The central monitor sees a satellite's daemon's heartbeats, its heartbeats stopping and its Last
Will, and a bridge that goes down as one "host unreachable"; the central page lists the
satellite's daemons under their host and switches its output through the bridge.
"""

from __future__ import annotations

import signal
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Broker, Observer
from test_monitor import FAST, notes, wait_note
from test_sensor_gpio import HEATER, gpio_config
from web_helpers import start_web

from testkit.loopback import wait_until

SITE = "shed"
WAIT = 20.0


def bridge_conf(central: Broker, root: str, keepalive: int) -> str:
    """The satellite's bridge as docs/contract.md §2 ("Fleet") lays it out."""
    return "\n".join([
        "",
        f"connection {SITE}",
        f"address 127.0.0.1:{central.port}",
        "bridge_protocol_version mqttv311",
        "cleansession false",
        "local_cleansession false",
        f"keepalive_interval {keepalive}",
        "restart_timeout 1",
        "notifications true",
        f"notification_topic {root}/host/{SITE}/bridge/state",
        f"topic +/status out 1 {root}/ {root}/host/{SITE}/",
        f"topic +/meta out 1 {root}/ {root}/host/{SITE}/",
        f"topic data/# out 1 {root}/ {root}/",
        f"topic display/# out 1 {root}/ {root}/",
        f"topic notify/# out 1 {root}/ {root}/",
        f"topic cmd/# in 1 {root}/ {root}/host/{SITE}/",
        "",
    ])


@pytest.fixture
def satellite(tmp_path: Path, broker: Broker, topic_root: str) -> Iterator[Any]:
    """``satellite(keepalive)``: the satellite's Mosquitto, bridged to the central (``broker``),
    once the central has heard the bridge's state ``1``."""
    made: list[Broker] = []

    def make(keepalive: int = 2) -> Broker:
        workdir = tmp_path / "satellite-mosquitto"
        workdir.mkdir()
        sat = Broker(workdir, bridge_conf(broker, topic_root, keepalive))
        sat.start()
        made.append(sat)
        return sat

    yield make
    for sat in made:
        if sat.proc is not None and sat.proc.poll() is None:
            sat.proc.kill()
            sat.proc.wait()


def on(sat: Broker, config: dict[str, Any]) -> dict[str, Any]:
    """A daemon's config pointed at the satellite's broker."""
    return {**config, "mqtt": {"port": sat.port}}


def satellite_notes(obs: Observer, root: str) -> list[dict[str, Any]]:
    return [n for n in notes(obs, root) if n.get("satellite") == SITE and "daemon" in n]


def test_central_monitor_and_page_see_a_satellites_daemons_through_a_real_bridge(
        start_daemon, observe, satellite, topic_root, tmp_path) -> None:
    root = topic_root
    obs = observe(f"{root}/#")
    sat = satellite()
    obs.wait_for(f"{root}/host/{SITE}/bridge/state", lambda m: m.text == "1", timeout=WAIT)
    start_daemon("monitor", {**FAST, "host_name": "hub"}, name="monitor")
    _web_proc, web = start_web(start_daemon, host_name="hub")
    system = start_daemon("sensor_system", on(sat, {"location": SITE}), name="sat-system")
    gpio = start_daemon("sensor_gpio", on(sat, gpio_config(
        tmp_path, inputs=[], outputs=[{**HEATER, "location": SITE}])), name="sat-gpio")

    # the heartbeats cross the bridge under host/<host>/ and the monitor records them apart
    obs.wait_for(f"{root}/host/{SITE}/sensor-system/meta",
                 lambda m: m.json()["event"] == "heartbeat", timeout=WAIT)
    record = obs.wait_for(f"{root}/monitor/host/{SITE}/sensor-system",
                          lambda m: bool(m.payload) and m.json()["state"] == "up",
                          timeout=WAIT)[0].json()
    assert record["daemon"] == f"sensor-system@{SITE}" and record["satellite"] == SITE
    assert obs.messages(f"{root}/monitor/daemons/sensor-system") == []  # not the central's
    summary = obs.wait_for(f"{root}/monitor/summary",
                           lambda m: f"sensor-gpio@{SITE}" in m.json()["daemons"],
                           timeout=WAIT)[0].json()
    assert list(summary["hosts"]) == ["hub", SITE]

    # the page: the satellite's daemons under their host, after the central's own
    web.login()

    def grouped() -> list[dict[str, Any]] | None:
        hosts = web.get("/api/state").json()["hosts"]
        ok = len(hosts) == 2 and len(hosts[1]["daemons"]) == 2 and "web" in hosts[0]["daemons"]
        return hosts if ok else None

    hosts = wait_until(grouped, WAIT, "the satellite's daemons in /api/state")
    assert hosts[0]["host"] == "hub" and hosts[0]["satellite"] is False
    assert hosts[1] == {**hosts[1], "host": SITE, "satellite": True, "bridge": "1",
                        "daemons": [f"sensor-gpio@{SITE}", f"sensor-system@{SITE}"]}
    daemons = web.get("/api/daemons").json()["daemons"]
    assert daemons[f"sensor-system@{SITE}"]["name"] == "sensor-system"
    page = web.get("/daemons").text
    assert page.index('id="h:hub"') < page.index('id="d:web"') < page.index(f'id="h:{SITE}"')
    assert page.index(f'id="h:{SITE}"') < page.index(f'id="d:sensor-system@{SITE}"')

    # the output: switched from the central page through the bridge
    wait_until(lambda: (web.get("/api/values").json()["values"].get(f"{SITE}/heater") or {}
                        ).get("target") == f"heater@{SITE}", WAIT, "the satellite's output")
    sent = web.post_json("/api/outputs/" + urllib.parse.quote(f"heater@{SITE}"), {"state": "on"})
    assert sent.status == 202, sent.text
    cmd = obs.wait_for(f"{root}/host/{SITE}/cmd/sensor-gpio/heater", timeout=WAIT)
    assert cmd[0].text == "on" and obs.messages(f"{root}/cmd/#") == []
    obs.wait_for(f"{root}/data/{SITE}/heater", lambda m: m.json()["value"] == 1, timeout=WAIT)
    wait_until(lambda: web.get("/api/values").json()["values"][f"{SITE}/heater"]["value"] == 1,
               WAIT, "the switched output on the page")

    # heartbeats stop (a hung daemon): down within 2.5 heartbeats, naming the host
    system.signal(signal.SIGSTOP)
    stopped_at = time.time()
    try:
        down = wait_note(obs, root, daemon=f"sensor-system@{SITE}", state="down")[0]
    finally:
        system.signal(signal.SIGCONT)
    last = max(m.at for m in obs.messages(f"{root}/host/{SITE}/sensor-system/meta"))
    assert down.at - last < 2.5 * 1 + 1.5, (down.at - last, down.at - stopped_at)
    assert down.json()["title"] == f"sensor-system DOWN on {SITE}"
    wait_note(obs, root, daemon=f"sensor-system@{SITE}", state="up")

    # killed: its Last Will crosses the bridge
    gpio.kill()
    obs.wait_for(f"{root}/host/{SITE}/sensor-gpio/status", lambda m: m.text == "offline",
                 timeout=WAIT)
    will = wait_note(obs, root, daemon=f"sensor-gpio@{SITE}", state="down")[0].json()
    assert "Last Will" in will["reason"] and will["title"] == f"sensor-gpio DOWN on {SITE}"
    assert not [n for n in notes(obs, root) if n.get("daemon") in ("sensor-gpio",
                                                                  "sensor-system")]


def test_a_satellites_bridge_going_down_is_one_host_notification(
        start_daemon, observe, satellite, topic_root, tmp_path) -> None:
    root = topic_root
    obs = observe(f"{root}/#")
    sat = satellite(keepalive=2)  # a lost link is noticed in ~3 s, before the heartbeats' 10 s
    obs.wait_for(f"{root}/host/{SITE}/bridge/state", lambda m: m.text == "1", timeout=WAIT)
    start_daemon("monitor", {**FAST, "host_name": "hub"}, name="monitor")
    for module in ("sensor_system", "sensor_gpio"):
        cfg = {"location": SITE} if module == "sensor_system" else gpio_config(
            tmp_path, inputs=[], outputs=[{**HEATER, "location": SITE}])
        start_daemon(module, on(sat, {**cfg, "heartbeat_interval": 4}), name=f"sat-{module}")
    for daemon in ("sensor-system", "sensor-gpio"):
        obs.wait_for(f"{root}/monitor/host/{SITE}/{daemon}",
                     lambda m: bool(m.payload) and m.json()["state"] == "up", timeout=WAIT)

    assert sat.proc is not None
    sat.proc.kill()  # the satellite's broker dies (a power cut, a cable): its bridge's Will
    sat.proc.wait()
    gone = wait_note(obs, root, state="unreachable")[0].json()
    assert gone["title"] == f"host {SITE} UNREACHABLE" and gone["satellite"] == SITE
    obs.wait_for(f"{root}/monitor/hosts/{SITE}",
                 lambda m: m.json()["state"] == "unreachable", timeout=WAIT)
    record = obs.wait_for(f"{root}/monitor/host/{SITE}/sensor-system",
                          lambda m: m.json()["state"] == "down", timeout=WAIT)[0].json()
    assert "unreachable" in record["reason"]
    time.sleep(2.5 * 4 + 2)  # well past the daemons' own deadlines: still no alert of theirs
    assert satellite_notes(obs, root) == []

    sat.start()  # back on its port, with its persistence: the bridge reconnects
    wait_note(obs, root, state="reachable")
    for daemon in ("sensor-system", "sensor-gpio"):
        obs.wait_for(f"{root}/monitor/host/{SITE}/{daemon}",
                     lambda m: m.json()["state"] == "up", timeout=WAIT)
    assert satellite_notes(obs, root) == []  # up again without a word: nothing was said
    assert [n["state"] for n in notes(obs, root)] == ["unreachable", "reachable"]
