"""pihub-sensor-gpio against a real Mosquitto.

The hardware boundary is the only thing replaced: the simulated backend (driven through the
daemon's sim topic, observed through its state file), and a fake ``RPi.GPIO`` package placed on
the daemon's PYTHONPATH that records every library call.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import SRC, DaemonProcess, Observer, Seen, run_cli, wait_until, write_config
from pihub.daemons.sensor_gpio import parse_command, parse_levels
from pihub.topics import Reject

FAKE_RPI = Path(__file__).parent / "fixtures" / "sensor_gpio" / "fake_rpi"

DOOR = {"name": "front_door", "pin": 17, "pull": "up", "active_low": True, "debounce_ms": 0,
        "location": "hall", "kind": "contact"}
MOTION = {"name": "motion", "pin": 22, "pull": "down", "active_low": False, "debounce_ms": 0,
          "location": "hall", "kind": "motion"}
HEATER = {"name": "heater", "pin": 27, "initial": False, "safe_state": False,
          "active_low": True, "location": "hall"}


def gpio_config(tmp_path: Path, inputs: list[dict[str, Any]] | None = None,
                outputs: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    return {"backend": "simulated", "interval": 3600,
            "simulated_state_file": str(tmp_path / "pins.json"),
            "inputs": [DOOR, MOTION] if inputs is None else inputs,
            "outputs": [HEATER] if outputs is None else outputs, **extra}


def pins(tmp_path: Path) -> dict[str, Any]:
    return json.loads((tmp_path / "pins.json").read_text())  # type: ignore[no-any-return]


def value_is(v: int) -> Callable[[Seen], bool]:
    return lambda m: m.json()["value"] == v


def counters_reach(obs: Observer, root: str, **want: int) -> dict[str, int]:
    """Wait for a heartbeat whose counters are at least ``want``; return those counters."""
    hb = obs.wait_for(f"{root}/sensor-gpio/meta",
                      lambda m: all(m.json()["counters"].get(k, 0) >= v for k, v in want.items()),
                      timeout=20)[-1]
    return hb.json()["counters"]  # type: ignore[no-any-return]


def started(obs: Observer, root: str) -> None:
    obs.wait_for(f"{root}/sensor-gpio/status", lambda m: m.text == "online", timeout=20)
    obs.wait_for(f"{root}/sensor-gpio/meta", lambda m: m.json()["event"] == "heartbeat",
                 timeout=20)


# --------------------------------------------------------------------------- pure parsing


@pytest.mark.parametrize(("text", "current", "want"), [
    ("on", 0, 1), ("OFF", 1, 0), ("toggle", 0, 1), ("toggle", 1, 0), (" on\n", 0, 1),
    ('{"state": 1}', 0, 1), ('{"state": 0}', 1, 0),
])
def test_command_parser_accepts_the_documented_forms(text: str, current: int, want: int) -> None:
    assert parse_command(text, "t/cmd/sensor-gpio/x", current) == want


@pytest.mark.parametrize("text", ["1", "", "maybe", '{"state": 2}', '{"state": true}',
                                  '{"state": "on"}', "{bad json", "[1]"])
def test_command_parser_rejects_anything_else_naming_the_topic(text: str) -> None:
    with pytest.raises(Reject, match="t/cmd/sensor-gpio/x"):
        parse_command(text, "t/cmd/sensor-gpio/x", 0)


def test_sim_level_parser_takes_a_level_or_a_list_of_levels() -> None:
    assert parse_levels("1", "t") == [1]
    assert parse_levels("[1, 0, 1]", "t") == [1, 0, 1]
    for bad in ("2", "[]", "[1, 2]", "on", "[true]"):
        with pytest.raises(Reject):
            parse_levels(bad, "t")


# --------------------------------------------------------------------------- config




def test_check_config_names_a_pin_used_twice(tmp_path: Path) -> None:
    path = write_config(tmp_path / "dup.yml", gpio_config(
        tmp_path, outputs=[{**HEATER, "pin": 17}]))
    result = run_cli("sensor_gpio", "--check-config", str(path))
    assert result.returncode == 78
    assert "outputs[0].pin: GPIO17 is already inputs[0]" in result.stderr


def test_check_config_rejects_a_config_without_pins(tmp_path: Path) -> None:
    path = write_config(tmp_path / "empty.yml", {"backend": "simulated"})
    result = run_cli("sensor_gpio", "--check-config", str(path))
    assert result.returncode == 78
    assert "inputs: no inputs and no outputs" in result.stderr


def test_rpi_backend_without_the_library_exits_78_saying_what_to_install(
        start_daemon, tmp_path: Path) -> None:
    d: DaemonProcess = start_daemon("sensor_gpio", gpio_config(tmp_path, backend="rpi"))
    wait_until(lambda: d.proc.poll() is not None, 20, "the daemon to exit")
    assert d.proc.returncode == 78
    assert "backend: cannot import RPi.GPIO" in d.output()
    assert "rpi-lgpio" in d.output()


# --------------------------------------------------------------------------- simulated inputs


def test_inputs_publish_their_initial_state_retained(start_daemon, observe, topic_root,
                                                     tmp_path: Path) -> None:
    obs: Observer = observe(f"{topic_root}/data/#")
    start_daemon("sensor_gpio", gpio_config(tmp_path))
    door = obs.wait_for(f"{topic_root}/data/hall/front_door", timeout=20)[0]
    motion = obs.wait_for(f"{topic_root}/data/hall/motion", timeout=20)[0]
    # pull-up, active-low contact: high level = not active
    assert door.json()["value"] == 0 and door.json()["unit"] == "bool"
    assert door.json()["kind"] == "contact" and door.json()["pin"] == 17
    assert motion.json()["value"] == 0 and motion.json()["kind"] == "motion"
    late: Observer = observe(f"{topic_root}/data/hall/front_door")
    assert late.wait_for(f"{topic_root}/data/hall/front_door")[0].retain


def test_active_low_input_publishes_a_low_level_as_active(start_daemon, observe, topic_root,
                                                          tmp_path: Path) -> None:
    obs: Observer = observe(f"{topic_root}/data/#", f"{topic_root}/sensor-gpio/#")
    start_daemon("sensor_gpio", gpio_config(tmp_path))
    started(obs, topic_root)
    obs.publish(f"{topic_root}/sim/sensor-gpio/front_door", "0")
    obs.wait_for(f"{topic_root}/data/hall/front_door", value_is(1))
    obs.publish(f"{topic_root}/sim/sensor-gpio/front_door", "1")
    obs.wait_for(f"{topic_root}/data/hall/front_door", value_is(0), count=2)


def test_active_high_input_publishes_a_high_level_as_active(start_daemon, observe, topic_root,
                                                            tmp_path: Path) -> None:
    obs: Observer = observe(f"{topic_root}/data/#", f"{topic_root}/sensor-gpio/#")
    start_daemon("sensor_gpio", gpio_config(tmp_path))
    started(obs, topic_root)
    obs.publish(f"{topic_root}/sim/sensor-gpio/motion", "1")
    obs.wait_for(f"{topic_root}/data/hall/motion", value_is(1))
    late: Observer = observe(f"{topic_root}/data/hall/motion")  # sees the retained state
    assert late.wait_for(f"{topic_root}/data/hall/motion")[0].json()["value"] == 1
    counters = counters_reach(obs, topic_root, edges=1, changes=1)
    assert counters["changes"] == 1


def test_bouncing_contact_publishes_one_change(start_daemon, observe, topic_root,
                                               tmp_path: Path) -> None:
    obs: Observer = observe(f"{topic_root}/data/#", f"{topic_root}/sensor-gpio/#")
    start_daemon("sensor_gpio", gpio_config(tmp_path, inputs=[{**MOTION, "debounce_ms": 500}]))
    started(obs, topic_root)
    obs.publish(f"{topic_root}/sim/sensor-gpio/motion", "[1, 0, 1, 0, 1]")
    obs.wait_for(f"{topic_root}/data/hall/motion", value_is(1))
    counters = counters_reach(obs, topic_root, edges=5, changes=1)
    assert counters["edges"] == 5 and counters["changes"] == 1
    values = [m.json()["value"] for m in obs.messages(f"{topic_root}/data/hall/motion")]
    assert values == [0, 1]


def test_pulse_shorter_than_debounce_is_not_published(start_daemon, observe, topic_root,
                                                      tmp_path: Path) -> None:
    obs: Observer = observe(f"{topic_root}/data/#", f"{topic_root}/sensor-gpio/#")
    start_daemon("sensor_gpio", gpio_config(tmp_path, inputs=[{**MOTION, "debounce_ms": 300}]))
    started(obs, topic_root)
    obs.publish(f"{topic_root}/sim/sensor-gpio/motion", "[1, 0]")
    counters = counters_reach(obs, topic_root, edges=2, bounces=1)
    assert counters.get("changes", 0) == 0
    assert [m.json()["value"] for m in obs.messages(f"{topic_root}/data/hall/motion")] == [0]


def test_change_is_published_only_after_the_pin_was_still_for_debounce_ms(
        start_daemon, observe, topic_root, tmp_path: Path) -> None:
    obs: Observer = observe(f"{topic_root}/data/#", f"{topic_root}/sensor-gpio/#")
    start_daemon("sensor_gpio", gpio_config(tmp_path, inputs=[{**MOTION, "debounce_ms": 1500}]))
    started(obs, topic_root)
    sent = time.time()
    obs.publish(f"{topic_root}/sim/sensor-gpio/motion", "1")
    hit: Seen = obs.wait_for(f"{topic_root}/data/hall/motion", value_is(1), timeout=20)[0]
    assert hit.at - sent >= 1.5 - 0.05  # a lower bound only: never late-sensitive


def test_state_is_published_again_every_interval(start_daemon, observe, topic_root,
                                                 tmp_path: Path) -> None:
    obs: Observer = observe(f"{topic_root}/data/#")
    start_daemon("sensor_gpio", gpio_config(tmp_path, interval=1))
    obs.wait_for(f"{topic_root}/data/hall/front_door", count=3, timeout=20)
    obs.wait_for(f"{topic_root}/data/hall/heater", count=3, timeout=20)


def test_sim_topic_rejects_unknown_inputs_and_bad_levels(start_daemon, observe, topic_root,
                                                         tmp_path: Path) -> None:
    obs: Observer = observe(f"{topic_root}/sensor-gpio/#")
    d: DaemonProcess = start_daemon("sensor_gpio", gpio_config(tmp_path))
    started(obs, topic_root)
    obs.publish(f"{topic_root}/sim/sensor-gpio/garage", "1")
    obs.publish(f"{topic_root}/sim/sensor-gpio/heater", "1")  # an output, not an input
    obs.publish(f"{topic_root}/sim/sensor-gpio/motion", "high")
    counters = counters_reach(obs, topic_root, rejected=3)
    assert counters["rejected"] == 3 and counters.get("edges", 0) == 0
    assert "no input 'garage'" in d.output()
    assert "expected 0, 1 or a JSON list of 0/1, got 'high'" in d.output()


# --------------------------------------------------------------------------- simulated outputs


def test_output_starts_in_its_initial_state(start_daemon, observe, topic_root,
                                            tmp_path: Path) -> None:
    obs: Observer = observe(f"{topic_root}/data/#")
    start_daemon("sensor_gpio", gpio_config(tmp_path, outputs=[{**HEATER, "initial": True}]))
    hit = obs.wait_for(f"{topic_root}/data/hall/heater", timeout=20)[0]
    assert hit.json()["value"] == 1 and hit.json()["kind"] == "output"
    # active low: on = low level
    assert pins(tmp_path)["pins"]["27"] == {"mode": "out", "level": 0}


def test_output_commands_switch_the_pin_and_publish_the_state(start_daemon, observe, topic_root,
                                                              tmp_path: Path) -> None:
    obs: Observer = observe(f"{topic_root}/data/#", f"{topic_root}/sensor-gpio/#")
    start_daemon("sensor_gpio", gpio_config(tmp_path))
    started(obs, topic_root)
    topic = f"{topic_root}/data/hall/heater"
    cmd = f"{topic_root}/cmd/sensor-gpio/heater"
    steps = [("on", 1), ("off", 0), ("toggle", 1), ('{"state": 0}', 0), ("toggle", 1)]
    for n, (payload, want) in enumerate(steps, start=2):
        obs.publish(cmd, payload)
        hit = obs.wait_for(topic, count=n)[-1]
        assert hit.json()["value"] == want, payload
        # active low: the electrical level is the inverse of the state
        assert pins(tmp_path)["pins"]["27"]["level"] == 1 - want
    assert counters_reach(obs, topic_root, commands=5)["rejected"] == 0


def test_bad_commands_are_rejected_and_switch_nothing(start_daemon, observe, topic_root,
                                                      tmp_path: Path) -> None:
    obs: Observer = observe(f"{topic_root}/data/#", f"{topic_root}/sensor-gpio/#")
    cmd = f"{topic_root}/cmd/sensor-gpio"
    obs.publish(f"{cmd}/heater", "on", retain=True)  # stale: would be replayed at every start
    d: DaemonProcess = start_daemon("sensor_gpio", gpio_config(tmp_path))
    started(obs, topic_root)
    obs.publish(f"{cmd}/boiler", "on")  # no such output
    obs.publish(f"{cmd}/front_door", "on")  # an input
    obs.publish(f"{cmd}/heater", "maybe")
    obs.publish(f"{cmd}/heater", '{"state": 2}')
    obs.publish(f"{cmd}/heater", b"\xff\xfe")
    counters = counters_reach(obs, topic_root, rejected=6)
    assert counters["rejected"] == 6 and counters.get("commands", 0) == 0
    assert [m.json()["value"] for m in obs.messages(f"{topic_root}/data/hall/heater")] == [0]
    assert pins(tmp_path)["pins"]["27"]["level"] == 1  # still off (active low)
    out = d.output()
    assert "no output 'boiler'; outputs: heater" in out
    assert "expected on, off, toggle" in out and "'state' must be 0 or 1, got 2" in out
    assert "is retained" in out


def test_sigterm_puts_outputs_in_their_safe_state_and_cleans_up(start_daemon, observe,
                                                                topic_root, tmp_path: Path
                                                                ) -> None:
    obs: Observer = observe(f"{topic_root}/data/#", f"{topic_root}/sensor-gpio/#")
    lamp = {"name": "lamp", "pin": 5, "initial": False, "safe_state": True, "active_low": False,
            "location": "porch"}
    d: DaemonProcess = start_daemon("sensor_gpio", gpio_config(
        tmp_path, outputs=[{**HEATER, "initial": True}, lamp]))
    started(obs, topic_root)
    assert pins(tmp_path)["pins"]["27"]["level"] == 0 and pins(tmp_path)["pins"]["5"]["level"] == 0
    assert not pins(tmp_path)["cleaned_up"]
    assert d.stop() == 0
    obs.wait_for(f"{topic_root}/data/hall/heater", value_is(0))
    obs.wait_for(f"{topic_root}/data/porch/lamp", value_is(1))
    final = pins(tmp_path)
    assert final["cleaned_up"] is True
    assert final["pins"]["27"] == {"mode": "in/pull-none", "level": 1}  # heater off: high
    assert final["pins"]["5"]["level"] == 1  # lamp on: high
    assert "GPIO cleaned up" in d.output()


# --------------------------------------------------------------------------- the rpi backend


def fake_rpi_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(FAKE_RPI), str(SRC)]),
            "FAKE_RPI_LOG": str(tmp_path / "rpi-calls.jsonl"),
            "FAKE_RPI_LEVELS": str(tmp_path / "levels.json"), **extra}


def rpi_calls(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "rpi-calls.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def set_levels(tmp_path: Path, levels: dict[int, int]) -> None:
    tmp = tmp_path / "levels.json.tmp"
    tmp.write_text(json.dumps({str(k): v for k, v in levels.items()}))
    os.replace(tmp, tmp_path / "levels.json")


def test_rpi_backend_sets_up_pins_through_rpi_gpio_in_bcm_mode(start_daemon, observe,
                                                              topic_root, tmp_path: Path) -> None:
    obs: Observer = observe(f"{topic_root}/data/#", f"{topic_root}/sensor-gpio/#")
    start_daemon("sensor_gpio", gpio_config(tmp_path, backend="rpi"), env=fake_rpi_env(tmp_path))
    started(obs, topic_root)
    calls = [c for c in rpi_calls(tmp_path) if c["call"] not in ("import", "edge")]
    assert calls[0] == {"call": "setmode", "mode": "BCM"}
    assert {"call": "setup", "pin": 27, "direction": "OUT", "pull_up_down": "PUD_OFF",
            "initial": "HIGH"} in calls  # active-low heater, off
    assert {"call": "setup", "pin": 17, "direction": "IN", "pull_up_down": "PUD_UP",
            "initial": None} in calls
    assert {"call": "setup", "pin": 22, "direction": "IN", "pull_up_down": "PUD_DOWN",
            "initial": None} in calls
    for pin in (17, 22):
        assert {"call": "add_event_detect", "pin": pin, "edge": "BOTH", "callback": True,
                "bouncetime": None} in calls
    assert obs.wait_for(f"{topic_root}/data/hall/front_door")[0].json()["value"] == 0


def test_rpi_backend_edge_callback_from_the_library_thread_is_published(
        start_daemon, observe, topic_root, tmp_path: Path) -> None:
    obs: Observer = observe(f"{topic_root}/data/#", f"{topic_root}/sensor-gpio/#")
    start_daemon("sensor_gpio", gpio_config(tmp_path, backend="rpi"), env=fake_rpi_env(tmp_path))
    started(obs, topic_root)
    set_levels(tmp_path, {17: 0})  # the door contact closes to ground
    obs.wait_for(f"{topic_root}/data/hall/front_door", value_is(1), timeout=20)
    edges = [c for c in rpi_calls(tmp_path) if c["call"] == "edge"]
    assert edges[0]["pin"] == 17 and edges[0]["thread"] == "fake-rpi-events"


def test_rpi_backend_switches_outputs_and_cleans_up_on_sigterm(start_daemon, observe,
                                                               topic_root, tmp_path: Path) -> None:
    obs: Observer = observe(f"{topic_root}/data/#", f"{topic_root}/sensor-gpio/#")
    d: DaemonProcess = start_daemon("sensor_gpio", gpio_config(tmp_path, backend="rpi"),
                                    env=fake_rpi_env(tmp_path))
    started(obs, topic_root)
    obs.publish(f"{topic_root}/cmd/sensor-gpio/heater", "on")
    obs.wait_for(f"{topic_root}/data/hall/heater", value_is(1))
    assert {"call": "output", "pin": 27, "value": "LOW"} in rpi_calls(tmp_path)
    assert d.stop() == 0
    tail = [c for c in rpi_calls(tmp_path) if c["call"] != "edge"][-2:]
    assert tail == [{"call": "output", "pin": 27, "value": "HIGH"},  # safe state: off
                    {"call": "cleanup", "channel": None}]


def test_rpi_backend_polls_an_input_when_edge_detection_fails(start_daemon, observe, topic_root,
                                                              tmp_path: Path) -> None:
    obs: Observer = observe(f"{topic_root}/data/#", f"{topic_root}/sensor-gpio/#")
    d: DaemonProcess = start_daemon("sensor_gpio", gpio_config(tmp_path, backend="rpi"),
                                    env=fake_rpi_env(tmp_path, FAKE_RPI_NO_EDGES="1"))
    started(obs, topic_root)
    assert "no edge detection, polled every 0.05 s" in d.output()
    set_levels(tmp_path, {22: 1})
    obs.wait_for(f"{topic_root}/data/hall/motion", value_is(1), timeout=20)


def test_simulated_backend_never_imports_rpi_gpio(start_daemon, observe, topic_root,
                                                  tmp_path: Path) -> None:
    obs: Observer = observe(f"{topic_root}/sensor-gpio/#")
    start_daemon("sensor_gpio", gpio_config(tmp_path), env=fake_rpi_env(tmp_path))
    started(obs, topic_root)
    assert rpi_calls(tmp_path) == []  # the fake records its own import


def test_sim_lists_longer_than_the_limit_and_deep_commands_are_rejected_at_once(
        start_daemon, observe, topic_root, tmp_path: Path) -> None:
    obs: Observer = observe(f"{topic_root}/sensor-gpio/#")
    d: DaemonProcess = start_daemon("sensor_gpio", gpio_config(tmp_path))
    started(obs, topic_root)
    obs.publish(f"{topic_root}/sim/sensor-gpio/front_door", json.dumps([0, 1] * 100_000))
    obs.publish(f"{topic_root}/sim/sensor-gpio/front_door", "[" * 200_000)
    obs.publish(f"{topic_root}/cmd/sensor-gpio/heater", '{"state":' * 100 + "1" + "}" * 100)
    obs.publish(f"{topic_root}/sim/sensor-gpio/front_door", json.dumps([0, 1] * 500))
    counters = counters_reach(obs, topic_root, rejected=3, edges=900)
    assert counters["rejected"] == 3 and counters["errors"] == 0
    assert "a list of at most 1000 levels" in d.output() and "Traceback" not in d.output()
    assert max(len(line) for line in d.output().splitlines()) < 600


def test_level_and_command_parsers_bound_what_they_decode() -> None:
    with pytest.raises(Reject, match="at most 1000 levels"):
        parse_levels(json.dumps([1] * 1001), "t")
    assert len(parse_levels(json.dumps([1] * 1000), "t")) == 1000
    with pytest.raises(Reject, match="deeper than 32"):
        parse_levels("[" * 100 + "]" * 100, "t")
    with pytest.raises(Reject, match="at most 256 characters"):
        parse_command('{"state": 1' + " " * 300 + "}", "t", 0)
