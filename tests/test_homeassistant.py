"""pihub-homeassistant against a real Mosquitto and real pihub daemons.

Every discovery config the daemon publishes is checked against Home Assistant's documented
discovery schema, written down as tests/fixtures/homeassistant/discovery_schema.json (keys of
each component, abbreviations, device and availability keys, units and state classes allowed
per device class). The real Home Assistant reads them in tests/homeassistant_real/.
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest
from conftest import Observer, Seen, run_cli, write_config
from pihub.daemons.homeassistant.discovery import (
    BINARY_CLASSES,
    QUANTITY_CLASSES,
    UNIT_CLASSES,
    sensor_classes,
)
from pihub.daemons.sensor_system import host_location

SCHEMA = json.loads((Path(__file__).parent / "fixtures" / "homeassistant" /
                     "discovery_schema.json").read_text(encoding="utf-8"))
SYSTEM = Path(__file__).parent / "fixtures" / "sensor_system"
PREFIX = "homeassistant"

DOOR = {"name": "front_door", "pin": 17, "pull": "up", "active_low": True, "debounce_ms": 0,
        "location": "hall", "kind": "contact"}
MOTION = {"name": "motion", "pin": 22, "pull": "down", "active_low": False, "debounce_ms": 0,
          "location": "hall", "kind": "motion"}
HEATER = {"name": "heater", "pin": 27, "initial": False, "safe_state": False,
          "active_low": True, "location": "hall"}


# --------------------------------------------------------------------------- the schema


def expand(config: dict[str, Any], abbreviations: dict[str, str]) -> dict[str, Any]:
    """A config with Home Assistant's abbreviations written out, as its discovery does."""
    return {abbreviations.get(k, k): v for k, v in config.items()}


def schema_errors(topic: str, payload: dict[str, Any], root: str) -> list[str]:
    """What breaks Home Assistant's documented discovery schema in one config (empty: none)."""
    errors: list[str] = []
    match = re.match(SCHEMA["discovery_topic"].replace("{prefix}", PREFIX), topic)
    if not match:
        return [f"{topic}: not a discovery topic"]
    component = match["component"]
    keys = SCHEMA["components"].get(component)
    if keys is None:
        return [f"{topic}: component {component} is not one the schema knows"]
    config = expand(payload, SCHEMA["abbreviations"])
    allowed = set(keys["required"]) | set(keys["optional"])
    errors += [f"{topic}: required key {k} missing" for k in keys["required"] if k not in config]
    errors += [f"{topic}: unknown key {k}" for k in config if k not in allowed]
    if "device" in config:
        device = expand(config["device"], SCHEMA["device_abbreviations"])
        errors += [f"{topic}: unknown device key {k}" for k in device
                   if k not in SCHEMA["device"]["keys"]]
        if not any(device.get(k) for k in SCHEMA["device"]["one_of_required"]):
            errors.append(f"{topic}: a device needs identifiers or connections")
        if not isinstance(device.get("identifiers", []), list):
            errors.append(f"{topic}: device identifiers must be a list")
        if not config.get("unique_id"):
            errors.append(f"{topic}: a device works only with a unique_id")
    if "origin" in config:
        origin = expand(config["origin"], SCHEMA["origin_abbreviations"])
        allowed_origin = set(SCHEMA["origin"]["required"]) | set(SCHEMA["origin"]["optional"])
        errors += [f"{topic}: unknown origin key {k}" for k in origin if k not in allowed_origin]
        errors += [f"{topic}: origin needs {k}" for k in SCHEMA["origin"]["required"]
                   if k not in origin]
    for item in config.get("availability", []):
        item = expand(item, SCHEMA["abbreviations"])
        allowed_item = (set(SCHEMA["availability_item"]["required"])
                        | set(SCHEMA["availability_item"]["optional"]))
        errors += [f"{topic}: unknown availability key {k}" for k in item
                   if k not in allowed_item]
        if not str(item.get("topic", "")).startswith(f"{root}/"):
            errors.append(f"{topic}: availability topic {item.get('topic')} not under {root}")
    if "availability" in config and "availability_topic" in config:
        errors.append(f"{topic}: availability and availability_topic together")
    if config.get("entity_category", "diagnostic") not in SCHEMA["entity_categories"]:
        errors.append(f"{topic}: entity_category {config['entity_category']}")
    device_class, unit = config.get("device_class"), config.get("unit_of_measurement")
    state_class = config.get("state_class")
    if state_class is not None and state_class not in SCHEMA["state_classes"]:
        errors.append(f"{topic}: state_class {state_class}")
    if component == "sensor" and device_class is not None:
        table = SCHEMA["sensor_device_classes"].get(device_class)
        if table is None:
            errors.append(f"{topic}: sensor device_class {device_class} unknown")
        else:
            if unit not in table["units"]:
                errors.append(f"{topic}: unit {unit} not allowed for {device_class}")
            if state_class is not None and state_class not in table["state_classes"]:
                errors.append(f"{topic}: state_class {state_class} not for {device_class}")
    if component == "binary_sensor" and device_class is not None and \
            device_class not in SCHEMA["binary_sensor_device_classes"]:
        errors.append(f"{topic}: binary_sensor device_class {device_class} unknown")
    if component == "switch" and device_class is not None and \
            device_class not in SCHEMA["switch_device_classes"]:
        errors.append(f"{topic}: switch device_class {device_class} unknown")
    if "expire_after" in config and (type(config["expire_after"]) is not int
                                     or config["expire_after"] <= 0):
        errors.append(f"{topic}: expire_after must be a positive integer")
    return errors


# --------------------------------------------------------------------------- helpers


def configs(obs: Observer, node: str) -> dict[str, dict[str, Any]]:
    """The configs now on the broker as the observer saw them last, by topic (cleared: gone)."""
    last: dict[str, Seen] = {}
    for m in obs.messages(f"{PREFIX}/+/{node}/+/config"):
        last[m.topic] = m
    return {t: m.json() for t, m in last.items() if m.payload}


def config_topic(component: str, node: str, object_id: str) -> str:
    return f"{PREFIX}/{component}/{node}/{object_id}/config"


def wait_config(obs: Observer, topic: str, predicate: Any = lambda c: True,
                timeout: float = 20) -> dict[str, Any]:
    found = obs.wait_for(topic, lambda m: bool(m.payload) and predicate(m.json()),
                         timeout=timeout)
    return found[-1].json()  # type: ignore[no-any-return]


def wait_removed(obs: Observer, topic: str, timeout: float = 20) -> None:
    obs.wait_for(topic, lambda m: not m.payload, timeout=timeout)


def measurement(value: float, unit: str, ts: float = 1_700_000_000.0, **extra: Any) -> str:
    return json.dumps({"value": value, "unit": unit, "ts": ts, **extra})


def fake_meta(daemon: str, publishes: list[str], ts: float = 1_700_000_000.0,
              event: str = "heartbeat") -> str:
    return json.dumps({"event": event, "daemon": daemon, "host": "pi-far", "pid": 4242,
                       "version": "0.1.0", "ts": ts, "uptime_s": 1.0, "interval_s": 30,
                       "rss_kb": 1, "counters": {}, "publishes": publishes})


def ha_config(**extra: Any) -> dict[str, Any]:
    return {"cleanup_after": 1, **extra}


def counters_reach(obs: Observer, root: str, **want: int) -> dict[str, int]:
    beat = obs.wait_for(f"{root}/homeassistant/meta",
                        lambda m: all(m.json()["counters"].get(k, 0) >= v
                                      for k, v in want.items()), timeout=20)[-1]
    return beat.json()["counters"]  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- the mapping


@pytest.mark.parametrize(("unit", "quantity", "device_class", "state_class"), [
    ("°C", "cpu_temp", "temperature", "measurement"),
    ("hPa", "pressure", "pressure", "measurement"),
    ("W", "heater_power", "power", "measurement"),
    ("Wh", "meter", "energy", "total_increasing"),
    ("kWh", "meter", "energy", "total_increasing"),
    ("%", "humidity", "humidity", "measurement"),
    ("%", "cellar_humidity", "humidity", "measurement"),
    ("%", "battery", "battery", "measurement"),
    ("%", "memory_available", None, "measurement"),
    ("%", "disk_used_root", None, "measurement"),
    ("%", "battery_humidity", None, "measurement"),  # two meanings: none
    ("ppm", "co2", "carbon_dioxide", "measurement"),
    ("ppm", "voc", None, "measurement"),
    ("s", "uptime", "duration", "measurement"),
    ("count", "load_1m", None, "measurement"),
    ("furlongs", "x", None, "measurement"),
])
def test_unit_and_quantity_map_to_a_device_class_only_where_unambiguous(
        unit, quantity, device_class, state_class):
    assert sensor_classes(unit, quantity) == (device_class, state_class)


def test_every_mapping_is_a_combination_home_assistant_documents():
    table = SCHEMA["sensor_device_classes"]
    pairs = [*((u, c, s) for u, (c, s) in UNIT_CLASSES.items()),
             *((u, c, "measurement") for (u, _w), c in QUANTITY_CLASSES.items())]
    for unit, device_class, state_class in pairs:
        assert unit in table[device_class]["units"], (unit, device_class)
        assert state_class in table[device_class]["state_classes"], (unit, state_class)
    assert set(SCHEMA["binary_sensor_device_classes"]) == BINARY_CLASSES


# --------------------------------------------------------------------------- with daemons


def test_configs_of_series_outputs_daemons_and_boards_follow_home_assistants_schema(
        start_daemon, observe, topic_root, tmp_path):
    obs = observe(f"{PREFIX}/#", f"{topic_root}/#")
    gpio = {"backend": "simulated", "interval": 3600, "inputs": [DOOR, MOTION],
            "outputs": [HEATER], "simulated_state_file": str(tmp_path / "pins.json")}
    start_daemon("sensor_gpio", gpio)
    start_daemon("sensor_system", {"interval": 3600, "location": "pi",
                                   "proc_root": str(SYSTEM / "proc"),
                                   "thermal_root": str(SYSTEM / "thermal")})
    # a display daemon, as its retained messages and meta say it is
    obs.publish(f"{topic_root}/display-bikes/meta",
                fake_meta("display-bikes", [f"{topic_root}/display/bikes/gare"]), retain=True)
    obs.publish(f"{topic_root}/display-bikes/status", "online", retain=True)
    obs.publish(f"{topic_root}/display/bikes/gare", {"station_id": "1", "name": "Gare",
                                                     "bikes": 12, "mechanical": 7,
                                                     "electric": 5, "docks": 3, "ts": 1.0,
                                                     "stale": False, "reason": None},
                retain=True)
    obs.publish(f"{topic_root}/display/bus/stop", {"stop": "Ost", "departures": [
        {"line": "S 5", "minutes": 4}], "ts": 1.0, "stale": False, "reason": None},
        retain=True)
    start_daemon("homeassistant", ha_config())
    node = topic_root
    want = {
        config_topic("sensor", node, "data_pi_cpu_temp"),
        config_topic("sensor", node, "data_pi_memory_available"),
        config_topic("sensor", node, "data_pi_uptime"),
        config_topic("binary_sensor", node, "data_hall_front_door"),
        config_topic("binary_sensor", node, "data_hall_motion"),
        config_topic("switch", node, "data_hall_heater"),
        config_topic("binary_sensor", node, "status_sensor-gpio"),
        config_topic("binary_sensor", node, "status_sensor-system"),
        config_topic("binary_sensor", node, "status_homeassistant"),
        config_topic("binary_sensor", node, "status_display-bikes"),
        config_topic("sensor", node, "display_bikes_gare"),
        config_topic("sensor", node, "display_bus_stop"),
    }
    for topic in want:
        # wait for the final shape: with the owner's availability once its meta is in
        wait_config(obs, topic, lambda c: "availability" in c or "status_" in c["unique_id"]
                    or "bus_stop" in c["unique_id"])
    got = configs(obs, node)
    assert want <= set(got)
    errors = [e for topic, c in got.items() for e in schema_errors(topic, c, topic_root)]
    assert not errors, errors

    def avail(c: dict[str, Any]) -> list[str]:
        return [a["topic"] for a in c.get("availability", [])]

    cpu = got[config_topic("sensor", node, "data_pi_cpu_temp")]
    assert cpu["state_topic"] == f"{topic_root}/data/pi/cpu_temp"
    assert cpu["value_template"] == "{{ value_json.value }}"
    assert (cpu["unit_of_measurement"], cpu["device_class"], cpu["state_class"]) == (
        "°C", "temperature", "measurement")
    assert cpu["unique_id"] == f"{node}_data_pi_cpu_temp"
    assert avail(cpu) == [f"{topic_root}/sensor-system/status"]
    host = socket.gethostname()
    assert cpu["device"]["identifiers"] == [f"{node}_{host_location(host)}"]
    assert cpu["device"]["model"] == "pihub" and cpu["device"]["sw_version"]
    memory = got[config_topic("sensor", node, "data_pi_memory_available")]
    assert "device_class" not in memory and memory["unit_of_measurement"] == "%"
    assert got[config_topic("sensor", node, "data_pi_uptime")]["device_class"] == "duration"

    door = got[config_topic("binary_sensor", node, "data_hall_front_door")]
    assert "device_class" not in door  # a contact: open or closed is not known
    assert (door["payload_on"], door["payload_off"]) == ("1", "0")
    assert avail(door) == [f"{topic_root}/sensor-gpio/status"]
    assert got[config_topic("binary_sensor", node, "data_hall_motion")][
        "device_class"] == "motion"

    heater = got[config_topic("switch", node, "data_hall_heater")]
    assert heater["command_topic"] == f"{topic_root}/cmd/sensor-gpio/heater"
    assert (heater["payload_on"], heater["payload_off"]) == ("on", "off")
    assert (heater["state_on"], heater["state_off"]) == ("1", "0")
    assert heater["state_topic"] == f"{topic_root}/data/hall/heater"
    assert avail(heater) == [f"{topic_root}/sensor-gpio/status"]

    health = got[config_topic("binary_sensor", node, "status_sensor-gpio")]
    assert health["state_topic"] == f"{topic_root}/sensor-gpio/status"
    assert (health["payload_on"], health["payload_off"], health["device_class"]) == (
        "online", "offline", "connectivity")
    assert "availability" not in health

    bikes = got[config_topic("sensor", node, "display_bikes_gare")]
    assert bikes["json_attributes_topic"] == bikes["state_topic"] == (
        f"{topic_root}/display/bikes/gare")
    assert bikes["value_template"] == "{{ value_json.bikes }}"
    assert avail(bikes) == [f"{topic_root}/display-bikes/status"]
    assert bikes["device"]["identifiers"] == [f"{node}_pi-far"]
    # a board nobody declares: no availability, on this host's device
    assert "availability" not in got[config_topic("sensor", node, "display_bus_stop")]


def test_the_switch_config_switches_the_simulated_output(start_daemon, observe, topic_root,
                                                         tmp_path):
    obs = observe(f"{PREFIX}/#", f"{topic_root}/data/#")
    start_daemon("sensor_gpio", {"backend": "simulated", "interval": 3600,
                                 "outputs": [HEATER]})
    start_daemon("homeassistant", ha_config())
    heater = wait_config(obs, config_topic("switch", topic_root, "data_hall_heater"))
    obs.publish(heater["command_topic"], heater["payload_on"])
    state = obs.wait_for(heater["state_topic"], lambda m: m.json()["value"] == 1)[-1]
    assert str(state.json()["value"]) == heater["state_on"]
    obs.publish(heater["command_topic"], heater["payload_off"])
    obs.wait_for(heater["state_topic"], lambda m: m.json()["value"] == 0)


def test_home_assistants_birth_message_makes_every_config_come_again(start_daemon, observe,
                                                                     topic_root):
    obs = observe(f"{PREFIX}/#")
    obs.publish(f"{topic_root}/data/garden/temperature", measurement(12.5, "°C"), retain=True)
    obs.publish(f"{topic_root}/data/garden/humidity", measurement(80, "%"), retain=True)
    start_daemon("homeassistant", ha_config())
    topics = [config_topic("sensor", topic_root, f"data_garden_{q}")
              for q in ("temperature", "humidity")]
    for topic in topics:
        wait_config(obs, topic)
    before = configs(obs, topic_root)
    obs.clear()
    obs.publish(f"{PREFIX}/status", "offline")
    obs.publish(f"{PREFIX}/status", "online")  # Home Assistant restarted
    for topic in topics:
        again = obs.wait_for(topic, lambda m: bool(m.payload))[-1]
        assert again.json() == before[topic]


def test_a_custom_birth_topic_and_prefix_are_used(start_daemon, observe, topic_root):
    obs = observe("ha/#")
    obs.publish(f"{topic_root}/data/garden/temperature", measurement(12.5, "°C"), retain=True)
    start_daemon("homeassistant", ha_config(discovery_prefix="ha", birth_topic="ha/birth",
                                            node_id="home"))
    topic = "ha/sensor/home/data_garden_temperature/config"
    assert obs.wait_for(topic)[-1].json()["unique_id"] == "home_data_garden_temperature"
    obs.clear()
    obs.publish("ha/birth", "online")
    obs.wait_for(topic)


def test_a_cleared_series_loses_its_config(start_daemon, observe, topic_root):
    obs = observe(f"{PREFIX}/#")
    obs.publish(f"{topic_root}/data/garden/temperature", measurement(12.5, "°C"), retain=True)
    obs.publish(f"{topic_root}/data/garden/rain", measurement(3, "mm"), retain=True)
    d = start_daemon("homeassistant", ha_config())
    gone = config_topic("sensor", topic_root, "data_garden_temperature")
    wait_config(obs, gone)
    wait_config(obs, config_topic("sensor", topic_root, "data_garden_rain"))
    obs.publish(f"{topic_root}/data/garden/temperature", b"", retain=True)
    wait_removed(obs, gone)
    assert config_topic("sensor", topic_root, "data_garden_rain") in configs(obs, topic_root)
    d.wait_log("series " + f"{topic_root}/data/garden/temperature is gone")


def test_availability_is_the_publishing_daemons_status_and_its_removal_removes_its_configs(
        start_daemon, observe, topic_root, tmp_path):
    obs = observe(f"{PREFIX}/#", f"{topic_root}/sensor-gpio/status")
    gpio = start_daemon("sensor_gpio", {"backend": "simulated", "interval": 3600,
                                        "inputs": [MOTION], "outputs": [HEATER]})
    start_daemon("homeassistant", ha_config())
    motion = config_topic("binary_sensor", topic_root, "data_hall_motion")
    heater = config_topic("switch", topic_root, "data_hall_heater")
    health = config_topic("binary_sensor", topic_root, "status_sensor-gpio")
    for topic in (motion, heater):
        cfg = wait_config(obs, topic, lambda c: "availability" in c)
        assert cfg["availability"] == [{"topic": f"{topic_root}/sensor-gpio/status",
                                        "payload_available": "online",
                                        "payload_not_available": "offline"}]
    wait_config(obs, health)
    # stopped: offline on the availability topic (Home Assistant shows it unavailable), and
    # the configs stay: a stopped daemon comes back
    assert gpio.stop() == 0
    obs.wait_for(f"{topic_root}/sensor-gpio/status", lambda m: m.text == "offline")
    # removed from the hub (its status cleared, as the role does): its configs go
    obs.publish(f"{topic_root}/sensor-gpio/status", b"", retain=True)
    for topic in (motion, heater, health):
        wait_removed(obs, topic)


def test_a_daemon_offline_longer_than_forget_after_loses_its_configs(start_daemon, observe,
                                                                     topic_root):
    obs = observe(f"{PREFIX}/#")
    far = [f"{topic_root}/data/far/+"]
    obs.publish(f"{topic_root}/sensor-far/meta", fake_meta("sensor-far", far, ts=2e9),
                retain=True)
    obs.publish(f"{topic_root}/sensor-far/status", "online", retain=True)
    obs.publish(f"{topic_root}/data/far/temperature", measurement(3.5, "°C"), retain=True)
    start_daemon("homeassistant", ha_config(forget_after=3600))
    series = config_topic("sensor", topic_root, "data_far_temperature")
    cfg = wait_config(obs, series, lambda c: "availability" in c)
    assert cfg["availability"][0]["topic"] == f"{topic_root}/sensor-far/status"
    assert cfg["device"]["name"] == "pihub pi-far"
    # it stopped long ago (the ts of its last metadata event) and is still offline
    obs.publish(f"{topic_root}/sensor-far/meta",
                fake_meta("sensor-far", far, ts=1e9, event="stopping"), retain=True)
    obs.publish(f"{topic_root}/sensor-far/status", "offline", retain=True)
    wait_removed(obs, series)
    wait_removed(obs, config_topic("binary_sensor", topic_root, "status_sensor-far"))


def test_the_most_specific_declaration_owns_a_series(start_daemon, observe, topic_root):
    obs = observe(f"{PREFIX}/#")
    obs.publish(f"{topic_root}/wide/meta", fake_meta("wide", [f"{topic_root}/data/#"]),
                retain=True)
    obs.publish(f"{topic_root}/exact/meta",
                fake_meta("exact", [f"{topic_root}/data/hall/heater"]), retain=True)
    obs.publish(f"{topic_root}/data/hall/heater", measurement(1, "bool"), retain=True)
    obs.publish(f"{topic_root}/data/hall/other", measurement(1, "W"), retain=True)
    start_daemon("homeassistant", ha_config())
    heater = wait_config(obs, config_topic("binary_sensor", topic_root, "data_hall_heater"),
                         lambda c: "availability" in c)
    other = wait_config(obs, config_topic("sensor", topic_root, "data_hall_other"),
                        lambda c: "availability" in c)
    assert heater["availability"][0]["topic"] == f"{topic_root}/exact/status"
    assert other["availability"][0]["topic"] == f"{topic_root}/wide/status"


def test_expire_after_is_a_multiple_of_the_series_usual_interval(start_daemon, observe,
                                                                 topic_root):
    obs = observe(f"{PREFIX}/#")
    start_daemon("homeassistant", ha_config(expire_factor=3))
    # its own health config: it reads its topics now, so it sees each measurement below
    wait_config(obs, config_topic("binary_sensor", topic_root, "status_homeassistant"))
    topic = config_topic("sensor", topic_root, "data_garden_temperature")
    for i, ts in enumerate((1000.0, 1060.0, 1090.0)):  # gaps 60 and 30: usually 60
        obs.publish(f"{topic_root}/data/garden/temperature", measurement(10 + i, "°C", ts),
                    retain=True)
    assert wait_config(obs, topic, lambda c: "expire_after" in c)["expire_after"] == 180


def test_configs_an_earlier_run_left_are_removed_and_its_still_backed_ones_kept(
        start_daemon, observe, topic_root):
    obs = observe(f"{PREFIX}/#")
    stale = config_topic("sensor", topic_root, "data_attic_temperature")
    kept = config_topic("sensor", topic_root, "data_garden_temperature")
    other_node = config_topic("sensor", "someone-else", "data_attic_temperature")
    for topic in (stale, kept, other_node):
        obs.publish(topic, {"state_topic": "x", "unique_id": "left"}, retain=True)
    obs.publish(f"{topic_root}/data/garden/temperature", measurement(12.5, "°C"), retain=True)
    d = start_daemon("homeassistant", ha_config(cleanup_after=1))
    wait_removed(obs, stale)
    assert kept in configs(obs, topic_root)
    assert configs(obs, "someone-else")  # not ours: untouched
    assert d.stop() == 0


def test_entities_beyond_max_entities_are_refused_and_counted(start_daemon, observe,
                                                              topic_root):
    obs = observe(f"{PREFIX}/#", f"{topic_root}/homeassistant/meta")
    for q in ("a", "b", "c"):
        obs.publish(f"{topic_root}/data/garden/{q}", measurement(1, "W"), retain=True)
    d = start_daemon("homeassistant", ha_config(max_entities=2, health=False))
    counters = counters_reach(obs, topic_root, entities_refused=1)
    assert counters["rejected"] >= 1
    beat = obs.messages(f"{topic_root}/homeassistant/meta")[-1].json()
    assert beat["series"] == 2
    assert len(configs(obs, topic_root)) == 2
    assert "max_entities=2" in d.output()


def test_malformed_meta_board_and_measurement_are_rejected_and_counted(start_daemon, observe,
                                                                       topic_root):
    obs = observe(f"{topic_root}/homeassistant/meta")
    d = start_daemon("homeassistant", ha_config())
    obs.wait_for(f"{topic_root}/homeassistant/meta")
    obs.publish(f"{topic_root}/x/meta", {"host": "h", "publishes": "data/#"})
    obs.publish(f"{topic_root}/display/b/i", {"what": 1})
    obs.publish(f"{topic_root}/data/garden/t", {"value": "warm", "unit": "°C", "ts": 1})
    obs.publish(f"{topic_root}/y/status", "maybe")
    counters_reach(obs, topic_root, rejected=4)
    out = d.output()
    assert "'publishes' must be a list of topic filters" in out
    assert "expected a key of bikes, departures" in out
    assert "'value' must be a number" in out
    assert "expected online or offline" in out
    assert d.stop() == 0


# --------------------------------------------------------------------------- the library


def test_every_daemons_meta_lists_the_topics_it_publishes_absolute(start_daemon, observe,
                                                                   topic_root):
    obs = observe(f"{topic_root}/+/meta")
    start_daemon("sensor_gpio", {"backend": "simulated", "interval": 3600,
                                 "inputs": [MOTION], "outputs": [HEATER]})
    start_daemon("homeassistant", ha_config())
    gpio = obs.wait_for(f"{topic_root}/sensor-gpio/meta")[-1].json()
    assert gpio["publishes"] == [f"{topic_root}/data/hall/heater",
                                 f"{topic_root}/data/hall/motion"]
    ha = obs.wait_for(f"{topic_root}/homeassistant/meta")[-1].json()
    assert ha["publishes"] == sorted(f"{PREFIX}/{c}/{topic_root}/#"
                                     for c in ("binary_sensor", "sensor", "switch"))


def test_print_acl_names_the_discovery_topics_outside_the_root(tmp_path):
    path = write_config(tmp_path / "ha.yml", {"topic_root": "home"})
    result = run_cli("homeassistant", "--print-acl", str(path))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "topic_root": "home", "write": [],
        "outside_root": [
            {"topic": "homeassistant/binary_sensor/home/#", "access": "readwrite"},
            {"topic": "homeassistant/sensor/home/#", "access": "readwrite"},
            {"topic": "homeassistant/status", "access": "read"},
            {"topic": "homeassistant/switch/home/#", "access": "readwrite"}]}


def test_print_acl_of_a_daemon_without_outside_topics_is_unchanged(tmp_path):
    path = write_config(tmp_path / "s.yml", {"topic_root": "home", "location": "pi"})
    result = run_cli("sensor_system", "--print-acl", str(path))
    assert json.loads(result.stdout) == {"topic_root": "home", "write": ["data/pi/+"]}


def test_a_birth_topic_filter_is_a_config_error(tmp_path):
    path = write_config(tmp_path / "ha.yml", {"birth_topic": "homeassistant/+"})
    result = run_cli("homeassistant", "--check-config", str(path))
    assert result.returncode == 78
    assert "birth_topic" in result.stderr
