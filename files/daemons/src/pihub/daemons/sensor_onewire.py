"""pihub-sensor-onewire: DS18B20 (and siblings) temperatures from the kernel's w1 sysfs tree.

Every ``interval`` seconds each sensor is read from ``<w1_root>/devices/<id>/w1_slave``, which
the w1_therm driver fills with two lines, a CRC check and the temperature in millidegrees::

    72 01 4b 46 7f ff 0e 10 57 : crc=57 YES
    72 01 4b 46 7f ff 0e 10 57 t=23125

and published, retained, on ``<root>/data/<location>/<name>``::

    {"value": 23.125, "unit": "°C", "ts": 1718000000.123, "sensor": "28-0316a2795eff"}

Sensors are those listed in ``sensors`` (id -> location, name) and, with ``publish_unknown``,
every other temperature sensor found under ``devices/`` (families in ``families``), published
as ``<unknown_location>/<id>``. A reading is not published - it is counted, logged, and the
sensor is read again next time - when its CRC failed (``crc_errors``), when it is the 85 °C
power-on value (``power_on_resets``), when the frame is all zeros or out of the sensor's range
(``bad_frames``), when the sensor is gone (``missing``) or when reading it failed
(``read_errors``). A real read takes ~750 ms per sensor (the conversion time); it runs in the
main thread's timer, never in the MQTT thread.
"""

from __future__ import annotations

import errno
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pihub.config import BaseConfig, ConfigError, setting
from pihub.daemon import Daemon
from pihub.topics import SEGMENT

SENSOR_ID = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{12}$")
FAMILY = re.compile(r"^[0-9a-f]{2}$")
POWER_ON_MILLIDEG = 85000
# (min, max) in millidegrees per family; 3b (MAX31850 thermocouple) is left unchecked
RANGES = {"10": (-55000, 125000), "22": (-55000, 125000), "28": (-55000, 125000),
          "42": (-55000, 125000)}
GONE = (errno.ENOENT, errno.ENODEV, errno.ENXIO)


@dataclass(kw_only=True)
class SensorConfig:
    id: str = setting(help="w1 device id (family-serial), as listed in /sys/bus/w1/devices.",
                      example="28-0316a2795eff", pattern=SENSOR_ID.pattern)
    location: str = setting(help="<location> of its data topic.", example="living_room",
                            pattern=SEGMENT.pattern)
    name: str = setting("temperature", "<quantity> of its data topic.", pattern=SEGMENT.pattern)


@dataclass(kw_only=True)
class Config(BaseConfig):
    interval: float = setting(60.0, "Seconds between two readings of every sensor (a reading "
                              "takes ~0.75 s per sensor).", min=2, max=86400)
    w1_root: str = setting("/sys/bus/w1", "Root of the kernel's w1 sysfs tree.")
    sensors: list[SensorConfig] = setting(
        [], "Known sensors, published on <topic_root>/data/<location>/<name>.",
        example=[{"id": "28-0316a2795eff", "location": "living_room", "name": "temperature"},
                 {"id": "28-01144f8ac1aa", "location": "outside", "name": "temperature"}],
    )
    publish_unknown: bool = setting(
        True, "Also publish sensors found but not listed, as <unknown_location>/<id>."
    )
    unknown_location: str = setting("onewire", "<location> of sensors found but not listed.",
                                    pattern=SEGMENT.pattern)
    families: list[str] = setting(
        ["10", "22", "28", "3b", "42"],
        "w1 family codes searched for: DS18S20, DS1822, DS18B20, MAX31850, DS28EA00.",
    )

    def check(self) -> None:
        for i, fam in enumerate(self.families):
            if not FAMILY.match(fam):
                raise ConfigError(f"families[{i}]", f"expected two lower-case hex digits, "
                                  f"got {fam!r}")
        ids: dict[str, int] = {}
        topics: dict[tuple[str, str], int] = {}
        for i, sensor in enumerate(self.sensors):
            if sensor.id in ids:
                raise ConfigError(f"sensors[{i}].id",
                                  f"{sensor.id} is already sensors[{ids[sensor.id]}]")
            where = (sensor.location, sensor.name)
            if where in topics:
                raise ConfigError(f"sensors[{i}]", f"{sensor.location}/{sensor.name} is "
                                  f"already the topic of sensors[{topics[where]}]")
            ids[sensor.id] = i
            topics[where] = i


class Problem(Exception):
    """A reading that is not published. ``counter`` names what is counted."""

    def __init__(self, counter: str, text: str) -> None:
        super().__init__(text)
        self.counter = counter


def parse_w1_slave(text: str, family: str) -> int:
    """The temperature in millidegrees from a w1_slave file; Problem if it must not be used."""
    lines = text.splitlines()
    if len(lines) < 2 or "crc=" not in lines[0] or "t=" not in lines[1]:
        raise Problem("bad_frames", f"expected two lines '... crc=XX YES' and '... t=N', got "
                      f"{text[:120]!r}")
    verdict = lines[0].rsplit(None, 1)[-1]
    if verdict != "YES":
        raise Problem("crc_errors", f"CRC check says {verdict!r}: {lines[0].strip()}")
    frame = lines[0].split(":", 1)[0].split()
    if frame and all(b == "00" for b in frame):
        raise Problem("bad_frames", "all-zero frame (a short or a missing pull-up on the bus)")
    try:
        millideg = int(lines[1].rsplit("t=", 1)[1].strip())
    except ValueError:
        raise Problem("bad_frames", f"temperature is not an integer: {lines[1].strip()!r}") \
            from None
    if millideg == POWER_ON_MILLIDEG:
        raise Problem("power_on_resets", "85 °C power-on value: the sensor reset (check its "
                      "power supply) and had not converted yet")
    low, high = RANGES.get(family, (None, None))
    if low is not None and high is not None and not low <= millideg <= high:
        raise Problem("bad_frames", f"{millideg / 1000:g} °C is outside the sensor's range "
                      f"{low / 1000:g}..{high / 1000:g} °C")
    return millideg


@dataclass
class _Sensor:
    id: str
    location: str
    name: str
    listed: bool
    problem: str | None = None  # what was last logged at warning level


class OneWireSensor(Daemon[Config]):
    name = "sensor-onewire"
    config_class = Config
    description = "Publish DS18B20 (and sibling) 1-wire temperatures from the w1 sysfs tree."

    @classmethod
    def published_topics(cls, config: Config) -> list[str]:
        listed = [f"data/{sensor.location}/{sensor.name}" for sensor in config.sensors]
        # sensors found but not listed are published under their ids, not known in advance
        return listed + ([f"data/{config.unknown_location}/+"] if config.publish_unknown else [])

    def setup(self) -> None:
        self.devices = Path(self.config.w1_root) / "devices"
        self.sensors = {s.id: _Sensor(s.id, s.location, s.name, True)
                        for s in self.config.sensors}
        self._ignored: set[str] = set()
        self._bus_missing = False
        self.every(self.config.interval, self.read_all)

    def heartbeat_extra(self) -> dict[str, Any]:
        return {"sensors": len(self.sensors),
                "sensors_ok": sum(1 for s in self.sensors.values() if s.problem is None)}

    def discover(self) -> list[str]:
        """Ids of temperature sensors present under ``devices/``."""
        try:
            entries = [p.name for p in self.devices.iterdir()]
        except OSError as exc:
            if not self._bus_missing:
                self._bus_missing = True
                self.log.warning("cannot list %s (%s): is the w1-gpio overlay enabled?",
                                 self.devices, exc.strerror or exc)
            return []
        if self._bus_missing:
            self._bus_missing = False
            self.log.info("%s is back", self.devices)
        families = set(self.config.families)
        return sorted(e for e in entries if SENSOR_ID.match(e) and e[:2] in families)

    def read_all(self) -> None:
        for sensor_id in self.discover():
            if sensor_id in self.sensors or sensor_id in self._ignored:
                continue
            if self.config.publish_unknown:
                self.sensors[sensor_id] = _Sensor(sensor_id, self.config.unknown_location,
                                                  sensor_id, False)
                self.log.info("found %s, not in sensors: publishing it as %s/%s", sensor_id,
                              self.config.unknown_location, sensor_id)
            else:
                self._ignored.add(sensor_id)
                self.log.info("found %s, not in sensors: ignored (publish_unknown is false)",
                              sensor_id)
        published = 0
        for sensor in list(self.sensors.values()):
            if self.stopping.is_set():
                break
            published += self.read_one(sensor)
        self.log.debug("published %d of %d sensors", published, len(self.sensors))

    def read_one(self, sensor: _Sensor) -> int:
        path = self.devices / sensor.id / "w1_slave"
        try:
            text = self._read(path)
            millideg = parse_w1_slave(text, sensor.id[:2])
        except Problem as problem:
            self._problem(sensor, problem.counter, str(problem))
            return 0
        ts = time.time()
        if sensor.problem is not None:
            self.log.info("%s (%s/%s) reads again", sensor.id, sensor.location, sensor.name)
            sensor.problem = None
        self.publish_measurement(sensor.location, sensor.name, millideg / 1000.0, "°C", ts,
                                 sensor=sensor.id)
        return 1

    @staticmethod
    def _read(path: Path) -> str:
        try:
            return path.read_text(encoding="ascii", errors="replace")
        except OSError as exc:
            if exc.errno in GONE:
                raise Problem("missing", f"{path} is gone: the sensor is disconnected") \
                    from None
            raise Problem("read_errors", f"cannot read {path}: {exc.strerror or exc}") \
                from None

    def _problem(self, sensor: _Sensor, counter: str, text: str) -> None:
        self.count(counter)
        where = f"{sensor.id} ({sensor.location}/{sensor.name})"
        if sensor.problem != counter:
            # log each kind of trouble once as it starts; repeats go to debug
            sensor.problem = counter
            self.log.warning("%s not published: %s", where, text)
        else:
            self.log.debug("%s not published again: %s", where, text)


main = OneWireSensor.main

if __name__ == "__main__":
    sys.exit(main())
