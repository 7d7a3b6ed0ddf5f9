"""pihub-sensor-system: the Pi's own health, every ``interval`` seconds.

The smallest real daemon, and the template for a new one; it reads as its job does:

* parse config: ``Config`` declares every key once (validation, errors naming the key,
  ``--print-config-example``);
* poll: ``setup()`` schedules ``read_all`` every ``interval``;
* publish: each reading with ``publish_measurement``. A reading that fails is logged and counted
  (``errors``); the others are still sent.

MQTT, metadata events, signals and systemd are the library's (``pihub.daemon``).

Publishes under ``<root>/data/<location>/<quantity>`` (location = host name by default):

==================  =====  ==================================================
quantity            unit   what
==================  =====  ==================================================
cpu_temp            °C     first thermal zone (the SoC on a Pi), where present
temp_<zone type>    °C     every further thermal zone, where present
load_1m/5m/15m      count  load average
memory_available    %      MemAvailable / MemTotal
disk_used_<name>    %      used share of each filesystem in ``filesystems``, as df counts it
uptime              s      seconds since boot
==================  =====  ==================================================
"""

from __future__ import annotations

import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pihub.config import BaseConfig, ConfigError, setting
from pihub.daemon import Daemon
from pihub.topics import SEGMENT


@dataclass(kw_only=True)
class Config(BaseConfig):
    interval: float = setting(60.0, "Seconds between two readings.", min=1, max=86400)
    location: str | None = setting(
        None, "Location segment of the data topics; null means this host's name.",
        pattern=SEGMENT.pattern,
    )
    filesystems: dict[str, str] = setting(
        {"root": "/"}, "Filesystems to report, name: mount point (quantity disk_used_<name>)."
    )
    thermal_root: str = setting("/sys/class/thermal", "Where the kernel lists thermal zones.")
    proc_root: str = setting("/proc", "Where procfs is mounted.")

    def check(self) -> None:
        for name in self.filesystems:
            if not SEGMENT.match(name):
                raise ConfigError(f"filesystems.{name}", "names must be lower-case [a-z0-9_-]+")


def host_location(hostname: str) -> str:
    """A host name as a topic segment: lower case, anything else becomes '-'."""
    return re.sub(r"[^a-z0-9_-]", "-", hostname.split(".")[0].lower()) or "host"


class SystemSensor(Daemon[Config]):
    name = "sensor-system"
    config_class = Config
    description = "Publish this host's CPU temperature, load, memory, disk use and uptime."

    @classmethod
    def published_topics(cls, config: Config) -> list[str]:
        # its quantities vary by host (one per thermal zone and filesystem): the location's all
        return [f"data/{config.location or host_location(socket.gethostname())}/+"]

    def setup(self) -> None:
        self.location = self.config.location or host_location(self.host)
        self._missing_logged: set[str] = set()
        self.every(self.config.interval, self.read_all)

    def read_all(self) -> None:
        ts = time.time()
        readings: list[tuple[str, float, str]] = []
        for reader in (self._temperatures, self._load, self._memory, self._disks, self._uptime):
            try:
                readings += reader()
            except (OSError, LookupError, ValueError) as exc:  # a file missing or unexpected
                self.count("errors")
                self.log.warning("%s not read: %s: %s", reader.__name__.strip("_"),
                                 type(exc).__name__, exc)
        for quantity, value, unit in readings:
            self.publish_measurement(self.location, quantity, round(value, 3), unit, ts)
        self.log.debug("published %d readings", len(readings))

    def _temperatures(self) -> list[tuple[str, float, str]]:
        root = Path(self.config.thermal_root)
        zones = sorted(root.glob("thermal_zone*"), key=lambda p: int(p.name[12:] or 0))
        out: list[tuple[str, float, str]] = []
        for index, zone in enumerate(zones):
            try:
                millideg = int((zone / "temp").read_text().strip())
                kind = (zone / "type").read_text().strip() if (zone / "type").exists() else ""
            except (OSError, ValueError) as exc:
                if zone.name not in self._missing_logged:
                    self._missing_logged.add(zone.name)
                    self.log.info("skipping %s: %s", zone, exc)
                continue
            quantity = "cpu_temp" if index == 0 else "temp_" + host_location(kind or zone.name)
            out.append((quantity, millideg / 1000.0, "°C"))
        return out

    def _load(self) -> list[tuple[str, float, str]]:
        fields = Path(self.config.proc_root, "loadavg").read_text().split()
        return [(f"load_{m}m", float(v), "count") for m, v in zip((1, 5, 15), fields[:3],
                                                                    strict=True)]

    def _memory(self) -> list[tuple[str, float, str]]:
        info = {}
        for line in Path(self.config.proc_root, "meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            info[key] = int(rest.split()[0])
        return [("memory_available", 100.0 * info["MemAvailable"] / info["MemTotal"], "%")]

    def _disks(self) -> list[tuple[str, float, str]]:
        out = []
        for name, mount in self.config.filesystems.items():
            st = os.statvfs(mount)
            usable = st.f_blocks - st.f_bfree + st.f_bavail  # what df counts as size
            used = st.f_blocks - st.f_bfree
            out.append((f"disk_used_{name}", 100.0 * used / usable if usable else 0.0, "%"))
        return out

    def _uptime(self) -> list[tuple[str, float, str]]:
        return [("uptime", float(Path(self.config.proc_root, "uptime").read_text().split()[0]),
                 "s")]


main = SystemSensor.main

if __name__ == "__main__":
    sys.exit(main())
