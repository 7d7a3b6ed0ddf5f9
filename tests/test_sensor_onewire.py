"""pihub-sensor-onewire against a real Mosquitto and a fake w1 sysfs tree in tmp_path.

The tree holds w1_slave files in the w1_therm driver's real format (tests/fixtures/sensor_onewire).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonProcess, Observer, run_cli, write_config
from pihub.daemons.sensor_onewire import Problem, parse_w1_slave

FIXTURES = Path(__file__).parent / "fixtures" / "sensor_onewire"
LIVING = "28-0316a2795eff"
OUTSIDE = "28-01144f8ac1aa"


class W1Tree:
    """A fake ``/sys/bus/w1``: ``devices/<id>/w1_slave`` beside ``w1_bus_master1``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "devices" / "w1_bus_master1").mkdir(parents=True)

    def put(self, sensor_id: str, fixture: str) -> None:
        path = self.root / "devices" / sensor_id
        path.mkdir(exist_ok=True)
        tmp = path / "w1_slave.tmp"
        shutil.copyfile(FIXTURES / f"{fixture}.w1_slave", tmp)
        os.replace(tmp, path / "w1_slave")

    def unplug(self, sensor_id: str) -> None:
        shutil.rmtree(self.root / "devices" / sensor_id)


@pytest.fixture
def w1(tmp_path: Path) -> W1Tree:
    return W1Tree(tmp_path / "w1")


def config(w1: W1Tree, **extra: Any) -> dict[str, Any]:
    return {"interval": 2, "w1_root": str(w1.root),
            "sensors": [{"id": LIVING, "location": "living_room", "name": "temperature"},
                        {"id": OUTSIDE, "location": "outside", "name": "temperature"}],
            **extra}


def counters_reach(obs: Observer, root: str, **want: int) -> dict[str, int]:
    hb = obs.wait_for(f"{root}/sensor-onewire/meta",
                      lambda m: all(m.json()["counters"].get(k, 0) >= v for k, v in want.items()),
                      timeout=20)[-1]
    return hb.json()["counters"]  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- parsing


def test_parser_reads_millidegrees_from_a_good_frame() -> None:
    assert parse_w1_slave((FIXTURES / "ok_23125.w1_slave").read_text(), "28") == 23125
    assert parse_w1_slave((FIXTURES / "ok_minus_10125.w1_slave").read_text(), "28") == -10125


@pytest.mark.parametrize(("fixture", "counter"), [
    ("crc_no", "crc_errors"), ("power_on", "power_on_resets"), ("zeros", "bad_frames"),
])
def test_parser_refuses_frames_that_must_not_be_published(fixture: str, counter: str) -> None:
    with pytest.raises(Problem) as caught:
        parse_w1_slave((FIXTURES / f"{fixture}.w1_slave").read_text(), "28")
    assert caught.value.counter == counter


def test_parser_refuses_a_truncated_file_and_an_out_of_range_value() -> None:
    with pytest.raises(Problem, match="expected two lines"):
        parse_w1_slave("72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n", "28")
    frame = "00 01 02 03 04 05 06 07 08 : crc=08 YES\n00 01 02 03 04 05 06 07 08 t=130000\n"
    with pytest.raises(Problem, match="outside the sensor's range"):
        parse_w1_slave(frame, "28")
    assert parse_w1_slave(frame, "3b") == 130000  # a thermocouple may read that


# --------------------------------------------------------------------------- config




def test_check_config_names_a_malformed_sensor_id(tmp_path: Path) -> None:
    path = write_config(tmp_path / "bad.yml", {"sensors": [
        {"id": "28-XYZ", "location": "hall"}]})
    result = run_cli("sensor_onewire", "--check-config", str(path))
    assert result.returncode == 78
    assert "sensors[0].id: expected a string matching" in result.stderr


def test_check_config_refuses_two_sensors_on_one_topic(tmp_path: Path) -> None:
    path = write_config(tmp_path / "dup.yml", {"sensors": [
        {"id": LIVING, "location": "hall"}, {"id": OUTSIDE, "location": "hall"}]})
    result = run_cli("sensor_onewire", "--check-config", str(path))
    assert result.returncode == 78
    assert "sensors[1]: hall/temperature is already the topic of sensors[0]" in result.stderr


# --------------------------------------------------------------------------- the daemon


def test_listed_sensors_are_published_at_their_location(start_daemon, observe, topic_root,
                                                        w1: W1Tree) -> None:
    w1.put(LIVING, "ok_23125")
    w1.put(OUTSIDE, "ok_minus_10125")
    obs: Observer = observe(f"{topic_root}/data/#")
    start_daemon("sensor_onewire", config(w1))
    living = obs.wait_for(f"{topic_root}/data/living_room/temperature", timeout=20)[0].json()
    outside = obs.wait_for(f"{topic_root}/data/outside/temperature", timeout=20)[0].json()
    assert (living["value"], living["unit"], living["sensor"]) == (23.125, "°C", LIVING)
    assert outside["value"] == -10.125
    late: Observer = observe(f"{topic_root}/data/outside/temperature")
    assert late.wait_for(f"{topic_root}/data/outside/temperature")[0].retain


def test_unlisted_sensor_is_published_under_unknown_location(start_daemon, observe, topic_root,
                                                             w1: W1Tree) -> None:
    w1.put("10-000802b4f1c9", "ok_23125")  # a DS18S20
    w1.put("01-000012345678", "ok_23125")  # a DS2401 id chip: not a thermometer
    obs: Observer = observe(f"{topic_root}/data/#")
    start_daemon("sensor_onewire", config(w1, sensors=[], unknown_location="attic"))
    obs.wait_for(f"{topic_root}/data/attic/10-000802b4f1c9", timeout=20)
    obs.wait_for(f"{topic_root}/data/attic/10-000802b4f1c9", count=2, timeout=20)
    assert {m.topic for m in obs.messages()} == {f"{topic_root}/data/attic/10-000802b4f1c9"}


def test_unlisted_sensor_is_ignored_without_publish_unknown(start_daemon, observe, topic_root,
                                                            w1: W1Tree) -> None:
    w1.put(LIVING, "ok_23125")
    w1.put("28-aaaaaaaaaaaa", "ok_23125")
    obs: Observer = observe(f"{topic_root}/data/#")
    d: DaemonProcess = start_daemon("sensor_onewire", config(w1, publish_unknown=False))
    obs.wait_for(f"{topic_root}/data/living_room/temperature", count=2, timeout=20)
    assert not obs.messages(f"{topic_root}/data/onewire/#")
    assert "found 28-aaaaaaaaaaaa, not in sensors: ignored" in d.output()


def test_failed_crc_is_counted_not_published_and_read_again(start_daemon, observe, topic_root,
                                                            w1: W1Tree) -> None:
    w1.put(LIVING, "crc_no")
    w1.put(OUTSIDE, "ok_minus_10125")
    obs: Observer = observe(f"{topic_root}/data/#", f"{topic_root}/sensor-onewire/#")
    d: DaemonProcess = start_daemon("sensor_onewire", config(w1))
    counters_reach(obs, topic_root, crc_errors=2)
    assert not obs.messages(f"{topic_root}/data/living_room/temperature")
    assert obs.messages(f"{topic_root}/data/outside/temperature")  # the others go on
    assert "CRC check says 'NO'" in d.output()
    w1.put(LIVING, "ok_23125")
    obs.wait_for(f"{topic_root}/data/living_room/temperature", timeout=20)
    d.wait_log(f"{LIVING} (living_room/temperature) reads again")


def test_power_on_value_of_85_degrees_is_not_published(start_daemon, observe, topic_root,
                                                       w1: W1Tree) -> None:
    w1.put(LIVING, "power_on")
    w1.put(OUTSIDE, "zeros")
    obs: Observer = observe(f"{topic_root}/data/#", f"{topic_root}/sensor-onewire/#")
    d: DaemonProcess = start_daemon("sensor_onewire", config(w1))
    counters = counters_reach(obs, topic_root, power_on_resets=2, bad_frames=2)
    assert counters["published"] > 0  # heartbeats, status
    assert not obs.messages(f"{topic_root}/data/#")
    assert "85 °C power-on value" in d.output() and "all-zero frame" in d.output()


def test_vanished_sensor_is_counted_missing_until_it_is_back(start_daemon, observe, topic_root,
                                                             w1: W1Tree) -> None:
    w1.put(LIVING, "ok_23125")
    obs: Observer = observe(f"{topic_root}/data/#", f"{topic_root}/sensor-onewire/#")
    d: DaemonProcess = start_daemon("sensor_onewire", config(w1))
    obs.wait_for(f"{topic_root}/data/living_room/temperature", timeout=20)
    counters_reach(obs, topic_root, missing=1)  # OUTSIDE was never there
    d.wait_log(f"{OUTSIDE} (outside/temperature) not published: ")
    w1.unplug(LIVING)
    before = counters_reach(obs, topic_root)["missing"]
    counters_reach(obs, topic_root, missing=before + 2)
    d.wait_log(f"{LIVING} (living_room/temperature) not published: ")
    obs.clear()
    w1.put(LIVING, "ok_minus_10125")
    back = obs.wait_for(f"{topic_root}/data/living_room/temperature", timeout=20)[0]
    assert back.json()["value"] == -10.125


def test_missing_w1_bus_keeps_the_daemon_running(start_daemon, observe, topic_root,
                                                 tmp_path: Path) -> None:
    obs: Observer = observe(f"{topic_root}/sensor-onewire/#")
    d: DaemonProcess = start_daemon("sensor_onewire", {
        "interval": 2, "w1_root": str(tmp_path / "no-w1"),
        "sensors": [{"id": LIVING, "location": "living_room"}]})
    counters_reach(obs, topic_root, missing=2)
    assert "is the w1-gpio overlay enabled?" in d.output()
    assert d.stop() == 0


def test_standin_fake_w1_bus_writes_frames_the_daemon_accepts(tmp_path: Path) -> None:
    script = (Path(__file__).parent.parent / "molecule" / "standin-fixtures" / "sensor-onewire"
              / "fake_w1_bus.py")
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "w1"), "--once"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    files = sorted((tmp_path / "w1" / "devices").glob("28-*/w1_slave"))
    assert len(files) == 3
    assert (tmp_path / "w1" / "devices" / "w1_bus_master1").is_dir()
    for path in files:
        millideg = parse_w1_slave(path.read_text(), "28")
        assert -55000 <= millideg <= 125000
