"""History without a timeseries DB: store-rrd's files, drawn by ``rrdtool graph`` on request.

The files are ``<rrd_dir>/<location>/<quantity>.rrd`` with the data source ``value`` and
AVERAGE/MIN/MAX archives (docs/contract.md section 4, docs/store-rrd.md); the unit is in the
sidecar ``<quantity>.json``. A graph is kept for ``cache_s`` seconds (at most
:data:`MAX_CACHED` of them), so a page reloaded by many clients costs one rrdtool run.
"""

from __future__ import annotations

import collections
import json
import subprocess
import threading
import time
from pathlib import Path

#: store-rrd's data source name (contract section 4)
DS_NAME = "value"
PERIODS = {"1h": ("end-1h", "last hour"), "24h": ("end-1d", "last 24 hours"),
           "7d": ("end-1w", "last 7 days"), "30d": ("end-1mon", "last 30 days"),
           "1y": ("end-1y", "last year")}
MAX_CACHED = 64
TIMEOUT = 20.0


class RrdError(Exception):
    """rrdtool could not draw; the text says why."""


class RrdGraphs:
    def __init__(self, rrd_dir: str, rrdtool: str, cache_s: float,
                 rrdcached_socket: str | None = None) -> None:
        self.rrd_dir = Path(rrd_dir)
        self.rrdtool = rrdtool
        self.cache_s = cache_s
        self.rrdcached_socket = rrdcached_socket
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[tuple[str, str, str], tuple[float, bytes]] = (
            collections.OrderedDict())

    def exists(self, location: str, quantity: str) -> bool:
        return (self.rrd_dir / location / f"{quantity}.rrd").is_file()

    def png(self, location: str, quantity: str, span: str) -> bytes:
        """The graph of one series (segments already checked); LookupError if there is no
        such file, RrdError if rrdtool fails."""
        path = self.rrd_dir / location / f"{quantity}.rrd"
        if not path.is_file():
            raise LookupError(f"no RRD {location}/{quantity} in {self.rrd_dir}")
        key = (location, quantity, span)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > now:
                return hit[1]
        png = self._draw(path, location, quantity, span)
        with self._lock:
            self._cache[key] = (now + self.cache_s, png)
            self._cache.move_to_end(key)
            while len(self._cache) > MAX_CACHED:
                self._cache.popitem(last=False)
        return png

    def _draw(self, path: Path, location: str, quantity: str, span: str) -> bytes:
        start, label = PERIODS[span]
        unit = ""
        try:
            sidecar = json.loads((path.parent / f"{quantity}.json").read_text("utf-8"))
            if isinstance(sidecar, dict) and isinstance(sidecar.get("unit"), str):
                unit = sidecar["unit"][:32]
        except (OSError, ValueError):
            pass
        u = escape(f" {unit}") if unit else ""
        args = [self.rrdtool, "graph", "-", "--imgformat", "PNG", "--start", start, "--end",
                "now", "--title", escape(f"{location} / {quantity} - {label}"),
                "--vertical-label", escape(unit or "value"), "--width", "900", "--height",
                "260", "--units-exponent", "0", "--left-axis-format", "%.6lg",
                "--alt-autoscale", "--slope-mode", "--font", "DEFAULT:9:",
                f"DEF:avg={path}:{DS_NAME}:AVERAGE", f"DEF:min={path}:{DS_NAME}:MIN",
                f"DEF:max={path}:{DS_NAME}:MAX", "CDEF:band=max,min,-", "LINE:min",
                "AREA:band#7fb3e080:min to max:STACK", "LINE2:avg#2563eb:average\\l",
                f"GPRINT:avg:LAST:last %.2lf{u}", f"GPRINT:min:MIN:min %.2lf{u}",
                f"GPRINT:max:MAX:max %.2lf{u}\\l"]
        if self.rrdcached_socket:
            args[2:2] = ["--daemon", self.rrdcached_socket]
        try:
            done = subprocess.run(args, capture_output=True, timeout=TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RrdError(f"{self.rrdtool} graph {path}: {exc}") from None
        if done.returncode != 0 or not done.stdout.startswith(b"\x89PNG"):
            raise RrdError(f"{self.rrdtool} graph {path}: exit {done.returncode}: "
                           f"{done.stderr.decode('utf-8', 'replace').strip()[:200]}")
        return done.stdout


def escape(text: str) -> str:
    """Text for an rrdtool graph legend or title (colons escaped, percent signs doubled)."""
    return text.replace("\\", "\\\\").replace(":", "\\:").replace("%", "%%")
