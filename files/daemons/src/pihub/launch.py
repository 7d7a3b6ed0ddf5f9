"""The console scripts' entry points: run a daemon, or say which extra it misses.

A daemon that needs an optional library (``pip install 'pihub[web]'`` for requests and
beautifulsoup4, ``pihub[tsdb]`` for influxdb-client) imports it at start. Without it, the
daemon prints one line naming the extra to install and exits 78 (EX_CONFIG: an installation
that does not get better by restarting, so systemd's ``RestartPreventExitStatus=78`` stops
there) instead of a ModuleNotFoundError traceback.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

EX_CONFIG = 78

# top-level module -> (what pip calls it, the extra that installs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "requests": ("requests", "web"),
    "bs4": ("beautifulsoup4", "web"),
    "influxdb_client": ("influxdb-client", "tsdb"),
}


def launch(daemon: str, argv: list[str] | None = None) -> int:
    """Import ``pihub.daemons.<daemon>`` and run its ``main``; 78 and one line if an extra
    it needs is missing (at import or while it starts)."""
    try:
        module = importlib.import_module(f"pihub.daemons.{daemon}")
        return int(module.main(argv))
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing not in EXTRAS:
            raise
        package, extra = EXTRAS[missing]
        name = "pihub-" + daemon.replace("_", "-")
        print(f"{name}: needs {package}, which is not installed: "
              f"pip install 'pihub[{extra}]' (the pihub role's pihub_package_extras)",
              file=sys.stderr)
        return EX_CONFIG


def _entry(daemon: str) -> Callable[[], int]:
    def main() -> int:
        return launch(daemon)
    main.__name__ = daemon
    return main


sensor_system = _entry("sensor_system")
sensor_gpio = _entry("sensor_gpio")
sensor_onewire = _entry("sensor_onewire")
monitor = _entry("monitor")
notify_pushover = _entry("notify_pushover")
notify_ntfy = _entry("notify_ntfy")
notify_email = _entry("notify_email")
store_rrd = _entry("store_rrd")
store_tsdb = _entry("store_tsdb")
display_bikes = _entry("display_bikes")
display_transport = _entry("display_transport")
web = _entry("web")
homeassistant = _entry("homeassistant")
