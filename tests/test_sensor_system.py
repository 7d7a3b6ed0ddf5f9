"""pihub-sensor-system against hand-made /proc and thermal trees whose values are known."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonProcess, Observer
from pihub.daemons.sensor_system import host_location

FIXTURES = Path(__file__).parent / "fixtures" / "sensor_system"

#: what tests/fixtures/sensor_system holds, as the daemon must publish it
KNOWN: dict[str, tuple[float, str]] = {
    "cpu_temp": (41.615, "°C"),  # thermal_zone0 (soc-thermal): 41615 m°C
    "temp_bigcore0-thermal": (42.538, "°C"),
    "temp_gpu-thermal": (40.692, "°C"),
    "load_1m": (0.52, "count"),
    "load_5m": (0.58, "count"),
    "load_15m": (0.59, "count"),
    "memory_available": (75.0, "%"),  # MemAvailable 2912052 of MemTotal 3882736 kB
    "uptime": (98765.43, "s"),
}


def df_used_percent(mount: str | Path) -> float:
    """df's Use% of the filesystem at ``mount``, before df rounds it up: used / (used + avail).

    Reserved blocks count neither as used nor as available, as df has it.
    """
    out = subprocess.run(["df", "-B1", "--output=used,avail", str(mount)], check=True,
                         capture_output=True, text=True).stdout
    used, avail = (int(n) for n in out.splitlines()[1].split())
    return 100.0 * used / (used + avail)


def config(proc: Path = FIXTURES / "proc", **extra: Any) -> dict[str, Any]:
    return {"interval": 60, "location": "pi", "proc_root": str(proc),
            "thermal_root": str(FIXTURES / "thermal"), "filesystems": {"root": "/"}, **extra}


def first_readings(obs: Observer, root: str, location: str) -> dict[str, dict[str, Any]]:
    """Every quantity of the first poll, by name.

    ``uptime`` is published last and in order with the rest, so once it is here the others are.
    """
    obs.wait_for(f"{root}/data/{location}/uptime")
    return {m.topic.rsplit("/", 1)[1]: m.json() for m in obs.messages(f"{root}/data/{location}/+")}


def test_every_reading_has_its_known_value_and_unit(start_daemon, observe, topic_root,
                                                    tmp_path):
    obs = observe(f"{topic_root}/data/#")
    d: DaemonProcess = start_daemon("sensor_system", config(
        filesystems={"root": "/", "scratch": str(tmp_path)}))
    got = first_readings(obs, topic_root, "pi")
    disks = {q: got.pop(q) for q in ("disk_used_root", "disk_used_scratch")}
    assert {q: (r["value"], r["unit"]) for q, r in got.items()} == KNOWN
    for quantity, mount in (("disk_used_root", "/"), ("disk_used_scratch", tmp_path)):
        # the filesystem is live: df is asked after the daemon, so allow for a little drift
        assert disks[quantity]["unit"] == "%"
        assert disks[quantity]["value"] == pytest.approx(df_used_percent(mount), abs=0.5)
    assert d.stop() == 0


def test_location_defaults_to_the_host_name(start_daemon, observe, topic_root):
    location = host_location(socket.gethostname())
    obs = observe(f"{topic_root}/data/#")
    start_daemon("sensor_system", config(location=None))
    assert first_readings(obs, topic_root, location)["uptime"]["value"] == 98765.43


def _without(name: str) -> Callable[[Path], None]:
    return lambda proc: (proc / name).unlink()


def _meminfo_without_available(proc: Path) -> None:  # kernels before 3.14, some containers
    text = (proc / "meminfo").read_text()
    (proc / "meminfo").write_text("".join(line for line in text.splitlines(keepends=True)
                                          if not line.startswith("MemAvailable:")))


def _loadavg_with_commas(proc: Path) -> None:
    (proc / "loadavg").write_text("0,52 0,58 0,59 2/312 4567\n")


@pytest.mark.parametrize(("breakage", "failed", "problem"), [
    (_without("meminfo"), ["memory_available"], "memory not read: FileNotFoundError"),
    (_meminfo_without_available, ["memory_available"], "memory not read: KeyError"),
    (_loadavg_with_commas, ["load_1m", "load_5m", "load_15m"], "load not read: ValueError"),
], ids=["meminfo-missing", "meminfo-without-memavailable", "loadavg-not-numbers"])
def test_a_reading_that_fails_is_logged_and_counted_and_the_others_are_sent(
        start_daemon, observe, topic_root, tmp_path, breakage, failed, problem):
    proc = tmp_path / "proc"
    shutil.copytree(FIXTURES / "proc", proc)
    breakage(proc)
    obs = observe(f"{topic_root}/#")
    d = start_daemon("sensor_system", config(proc))
    obs.wait_for(f"{topic_root}/sensor-system/meta",
                 lambda m: m.json()["counters"].get("errors", 0) >= 1)
    got = first_readings(obs, topic_root, "pi")
    assert sorted(got) == sorted({*KNOWN, "disk_used_root"} - set(failed))
    assert [line for line in d.output().splitlines() if problem in line and " WARNING " in line]
    assert d.stop() == 0
