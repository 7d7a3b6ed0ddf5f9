"""pihub-homeassistant against a real Home Assistant core (not part of ``make test-unit``).

Home Assistant runs from its own virtualenv (``HA_PYTHON``, made by ``install.sh`` beside this
file), against the test's Mosquitto; its MQTT integration is set up through the config-flow
REST API, and pihub's entities are read back through the REST API: a sensor's unit, device
class and state, a switch toggling a simulated GPIO output through sensor-gpio, a stopped daemon
making its entities unavailable, and Home Assistant's own view of the documented schema this
repository's fixture holds. Run::

    tests/homeassistant_real/install.sh            # once: Home Assistant in /var/tmp
    HA_PYTHON=/var/tmp/pihub-homeassistant/venv/bin/python \\
        .venv/bin/python -m pytest tests/homeassistant_real/real_homeassistant.py -v

(The file name is not ``test_*.py``, so ``pytest tests`` does not collect it; naming it on the
command line does.)
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Broker, free_port, wait_until
from pihub.daemons.homeassistant.discovery import QUANTITY_CLASSES, UNIT_CLASSES

HA_PYTHON = os.environ.get("HA_PYTHON", "/var/tmp/pihub-homeassistant/venv/bin/python")
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SCHEMA = json.loads((FIXTURES / "homeassistant" / "discovery_schema.json").read_text())
SYSTEM = FIXTURES / "sensor_system"
USER, PASSWORD = "pihub", "pihub-test-only-password"  # a throw-away instance

MOTION = {"name": "motion", "pin": 22, "pull": "down", "active_low": False, "debounce_ms": 0,
          "location": "hall", "kind": "motion"}
HEATER = {"name": "heater", "pin": 27, "initial": False, "safe_state": False,
          "active_low": True, "location": "hall"}

pytestmark = pytest.mark.skipif(not Path(HA_PYTHON).exists(),
                                reason=f"no Home Assistant at {HA_PYTHON} (install.sh)")

CONFIGURATION = """\
homeassistant:
  name: pihub-test
  unit_system: metric
  time_zone: UTC
  latitude: 0
  longitude: 0
  elevation: 0
http:
  server_host: 127.0.0.1
  server_port: {port}
api:
config:
logger:
  default: warning
  logs:
    homeassistant.components.mqtt: info
"""


@dataclass
class HomeAssistant:
    url: str
    token: str
    proc: subprocess.Popen[bytes]
    log: Path

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read() or b"null")

    def state(self, entity_id: str) -> dict[str, Any] | None:
        try:
            return self.call("GET", f"/api/states/{entity_id}")  # type: ignore[no-any-return]
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def wait_state(self, entity_id: str, state: str | None = None,
                   timeout: float = 60) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            got = self.state(entity_id)
            return got if got and (state is None or got["state"] == state) else None

        try:
            return wait_until(found, timeout, f"{entity_id} in Home Assistant"  # type: ignore[no-any-return]
                              + (f" with state {state}" if state else ""), interval=0.25)
        except Exception:
            print(self.log.read_text(errors="replace")[-4000:])
            print("last state:", self.state(entity_id))
            raise


def post_json(url: str, body: dict[str, Any], form: bool = False) -> Any:
    data = (urllib.parse.urlencode(body) if form else json.dumps(body)).encode()
    kind = "application/x-www-form-urlencoded" if form else "application/json"
    request = urllib.request.Request(url, data=data, headers={"Content-Type": kind})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def login(url: str) -> str:
    """An access token: the owner made through onboarding's REST API, as the first page of a
    new Home Assistant does, and its authorization code exchanged for a token."""
    client = url + "/"
    made = post_json(url + "/api/onboarding/users", {
        "client_id": client, "name": "pihub", "username": USER, "password": PASSWORD,
        "language": "en"})
    token = post_json(url + "/auth/token", {"grant_type": "authorization_code",
                                            "code": made["auth_code"], "client_id": client},
                      form=True)
    return token["access_token"]  # type: ignore[no-any-return]


@pytest.fixture
def homeassistant(tmp_path: Path, broker: Broker) -> Iterator[HomeAssistant]:
    """Home Assistant core on a loopback port, its MQTT integration on the test's broker."""
    config = tmp_path / "ha"
    config.mkdir()
    port = free_port()
    (config / "configuration.yaml").write_text(CONFIGURATION.format(port=port))
    log = tmp_path / "ha.log"
    started = time.monotonic()
    with open(log, "ab") as out:
        proc = subprocess.Popen([HA_PYTHON, "-m", "homeassistant", "-c", str(config),
                                 "--skip-pip"], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def api_up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"Home Assistant exited: {log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url + "/api/onboarding", timeout=2).close()
            return True
        except OSError:
            return False

    try:
        wait_until(api_up, 180, "Home Assistant's HTTP server", interval=0.5)
        ha = HomeAssistant(url, login(url), proc, log)
        flow = ha.call("POST", "/api/config/config_entries/flow", {"handler": "mqtt"})
        assert flow["type"] == "form", flow
        entry = ha.call("POST", f"/api/config/config_entries/flow/{flow['flow_id']}",
                        {"broker": broker.host, "port": broker.port})
        assert entry["type"] == "create_entry", entry
        print(f"Home Assistant up with MQTT in {time.monotonic() - started:.1f} s")
        yield ha
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # Home Assistant found nothing to complain about in what pihub announced
    complaints = [line for line in log.read_text(errors="replace").splitlines()
                  if re.search(r" (WARNING|ERROR) .*\[homeassistant\.components\.(mqtt|sensor|"
                               r"binary_sensor|switch)", line)]
    assert not complaints, "\n".join(complaints)


def gpio_config(**extra: Any) -> dict[str, Any]:
    return {"backend": "simulated", "interval": 3600, "inputs": [MOTION], "outputs": [HEATER],
            **extra}


def test_home_assistant_shows_a_sensor_with_its_unit_device_class_and_state(
        homeassistant, start_daemon, topic_root):
    start_daemon("sensor_system", {"interval": 3600, "location": "pi",
                                   "proc_root": str(SYSTEM / "proc"),
                                   "thermal_root": str(SYSTEM / "thermal")})
    start_daemon("homeassistant", {"cleanup_after": 1})
    cpu = homeassistant.wait_state(f"sensor.{topic_root}_data_pi_cpu_temp", "41.615")
    assert cpu["attributes"]["unit_of_measurement"] == "°C"
    assert cpu["attributes"]["device_class"] == "temperature"
    assert cpu["attributes"]["state_class"] == "measurement"
    memory = homeassistant.wait_state(f"sensor.{topic_root}_data_pi_memory_available", "75.0")
    assert "device_class" not in memory["attributes"]
    health = homeassistant.wait_state(f"binary_sensor.{topic_root}_status_sensor_system", "on")
    assert health["attributes"]["device_class"] == "connectivity"


def test_display_boards_are_sensors_with_the_payload_as_attributes(homeassistant, start_daemon,
                                                                  observe, topic_root):
    obs = observe()
    obs.publish(f"{topic_root}/display/bikes/gare", {
        "station_id": "1", "name": "Gare", "bikes": 12, "mechanical": 7, "electric": 5,
        "docks": 3, "ts": 1.0, "stale": False, "reason": None}, retain=True)
    obs.publish(f"{topic_root}/display/bus/stop", {
        "stop": "Ost", "departures": [], "fetched_at": None, "ts": 1.0, "stale": True,
        "reason": "page unreachable"}, retain=True)
    start_daemon("homeassistant", {"cleanup_after": 1})
    bikes = homeassistant.wait_state(f"sensor.{topic_root}_display_bikes_gare", "12")
    # (Home Assistant drops attributes it reserves, such as name)
    assert bikes["attributes"]["electric"] == 5 and bikes["attributes"]["station_id"] == "1"
    assert bikes["attributes"]["unit_of_measurement"] == "bikes"
    bus = homeassistant.wait_state(f"sensor.{topic_root}_display_bus_stop", "unknown")
    assert bus["attributes"]["reason"] == "page unreachable"
    obs.publish(f"{topic_root}/display/bus/stop", {
        "stop": "Ost", "departures": [{"line": "S 5", "minutes": 4}], "fetched_at": 2.0,
        "ts": 2.0, "stale": False, "reason": None}, retain=True)
    homeassistant.wait_state(f"sensor.{topic_root}_display_bus_stop", "4")


def test_a_home_assistant_switch_toggles_a_simulated_gpio_output(homeassistant, start_daemon,
                                                                observe, topic_root):
    obs = observe(f"{topic_root}/data/hall/heater")
    start_daemon("sensor_gpio", gpio_config())
    start_daemon("homeassistant", {"cleanup_after": 1})
    switch = f"switch.{topic_root}_data_hall_heater"
    homeassistant.wait_state(switch, "off")
    homeassistant.call("POST", "/api/services/switch/turn_on", {"entity_id": switch})
    obs.wait_for(f"{topic_root}/data/hall/heater", lambda m: m.json()["value"] == 1)
    homeassistant.wait_state(switch, "on")
    homeassistant.call("POST", "/api/services/switch/turn_off", {"entity_id": switch})
    homeassistant.wait_state(switch, "off")
    motion = homeassistant.wait_state(f"binary_sensor.{topic_root}_data_hall_motion", "off")
    assert motion["attributes"]["device_class"] == "motion"


def test_a_stopped_daemon_makes_its_entities_unavailable(homeassistant, start_daemon,
                                                         topic_root):
    gpio = start_daemon("sensor_gpio", gpio_config())
    start_daemon("homeassistant", {"cleanup_after": 1})
    switch = f"switch.{topic_root}_data_hall_heater"
    motion = f"binary_sensor.{topic_root}_data_hall_motion"
    health = f"binary_sensor.{topic_root}_status_sensor_gpio"
    homeassistant.wait_state(switch, "off")
    homeassistant.wait_state(motion, "off")
    homeassistant.wait_state(health, "on")
    assert gpio.stop() == 0
    homeassistant.wait_state(switch, "unavailable")
    homeassistant.wait_state(motion, "unavailable")
    homeassistant.wait_state(health, "off")


def test_the_schema_fixture_agrees_with_home_assistants_own_code():
    """The fixture was written from the documentation; the code of the Home Assistant that
    runs these tests must agree with it (the units pihub maps and the state classes per device
    class, binary sensor classes, abbreviations)."""
    probe = """
import json
from homeassistant.components.sensor.const import DEVICE_CLASS_UNITS, DEVICE_CLASS_STATE_CLASSES
from homeassistant.components.sensor import SensorDeviceClass
from homeassistant.components.binary_sensor import BinarySensorDeviceClass
from homeassistant.components.mqtt import abbreviations as a
print(json.dumps({
  "units": {d.value: sorted(str(u) for u in DEVICE_CLASS_UNITS.get(d, ()) if u is not None)
            for d in SensorDeviceClass},
  "state_classes": {d.value: sorted(s.value for s in DEVICE_CLASS_STATE_CLASSES.get(d, ()))
                    for d in SensorDeviceClass},
  "binary": sorted(c.value for c in BinarySensorDeviceClass),
  "abbreviations": a.ABBREVIATIONS, "device": a.DEVICE_ABBREVIATIONS,
  "origin": getattr(a, "ORIGIN_ABBREVIATIONS", {})}, ensure_ascii=False))
"""
    code = json.loads(subprocess.run([HA_PYTHON, "-c", probe], check=True, capture_output=True,
                                     text=True, timeout=120).stdout)
    # units: what pihub maps to (the documentation of a newer release lists more, e.g.
    # energy in J and cal since 2024.4); state classes: all
    for unit, (device_class, state_class) in UNIT_CLASSES.items():
        assert unit in code["units"][device_class], (unit, device_class)
        assert state_class in code["state_classes"][device_class], (unit, state_class)
    for (unit, _word), device_class in QUANTITY_CLASSES.items():
        assert unit in code["units"][device_class], (unit, device_class)
    for device_class, table in SCHEMA["sensor_device_classes"].items():
        assert set(table["state_classes"]) == set(code["state_classes"][device_class]), \
            device_class
    assert set(SCHEMA["binary_sensor_device_classes"]) == set(code["binary"])
    for short, full in SCHEMA["abbreviations"].items():
        assert code["abbreviations"].get(short, short) == full, short
    # a newer documentation has more device keys (model_id since 2024.8): those both know
    # agree, and those pihub sends are known
    for short, full in code["device"].items():
        assert SCHEMA["device_abbreviations"].get(short, full) == full, short
    assert {"identifiers", "name", "manufacturer", "model", "sw_version"} <= set(
        code["device"].values())
    if code["origin"]:
        assert SCHEMA["origin_abbreviations"] == code["origin"]
