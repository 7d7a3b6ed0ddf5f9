"""``pihub-store-rrd --graph``: PNG graphs of stored series, drawn by ``rrdtool graph``.

Writes ``<out>/<location>-<quantity>-<period>.png`` for each series (every series in
``rrd_dir`` by default) and period (last day, week, month, year): the average as a line, the
min-max range as a light band, the series' unit from its sidecar. With rrdcached the file is
flushed first (``--daemon``); if rrdcached cannot be reached the file is drawn as it is.
Exit 0, 1 when a series is unknown or a graph failed (named on stderr), 78 on a config error.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

from pihub.config import EX_CONFIG, ConfigError, load_file
from pihub.topics import SEGMENT

from . import DS_NAME, Config, read_sidecar, series_paths

PROG = "pihub-store-rrd --graph"
PERIODS = {"day": ("end-1d", "last 24 hours"), "week": ("end-1w", "last 7 days"),
           "month": ("end-1mon", "last month"), "year": ("end-1y", "last year")}


def escape(text: str) -> str:
    """Text for an rrdtool graph legend (colons escaped, percent signs doubled)."""
    return text.replace("\\", "\\\\").replace(":", "\\:").replace("%", "%%")


def graph_args(path: Path, out: Path, period: str, *, title: str, unit: str,
               width: int, height: int, daemon: str | None) -> list[str]:
    start, label = PERIODS[period]
    u = escape(f" {unit}") if unit else ""
    args = [
        "graph", str(out), "--imgformat", "PNG", "--start", start, "--end", "now",
        "--title", f"{title} - {label}", "--vertical-label", unit or "value",
        "--width", str(width), "--height", str(height), "--units-exponent", "0",
        "--left-axis-format", "%.6lg",
        "--alt-autoscale", "--slope-mode", "--font", "DEFAULT:9:", "--font", "TITLE:11:",
        f"DEF:avg={path}:{DS_NAME}:AVERAGE", f"DEF:min={path}:{DS_NAME}:MIN",
        f"DEF:max={path}:{DS_NAME}:MAX", "CDEF:band=max,min,-",
        "LINE:min", "AREA:band#7fb3e080:min to max:STACK",
        "LINE2:avg#1f5fa8:average\\l",
        f"GPRINT:avg:LAST:last %.2lf{u}",
        f"GPRINT:min:MIN:min %.2lf{u}",
        f"GPRINT:avg:AVERAGE:mean %.2lf{u}",
        f"GPRINT:max:MAX:max %.2lf{u}\\l",
    ]
    if daemon:
        args[2:2] = ["--daemon", daemon]
    return args


def rrdtool_graph(exe: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([exe, *args], capture_output=True, text=True,
                          env={**os.environ, "LC_ALL": "C.UTF-8"})


def all_series(rrd_dir: Path) -> list[str]:
    return sorted(f"{p.parent.name}/{p.stem}" for p in rrd_dir.glob("*/*.rrd"))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pihub-store-rrd",
        description="Render PNG graphs of stored series with rrdtool graph: "
        "<out>/<location>-<quantity>-<period>.png, average line and min-max band, in the "
        "series' unit.")
    parser.add_argument("--graph", action="store_true", required=True,
                        help="render graphs instead of running the daemon")
    parser.add_argument("series", nargs="*", metavar="LOCATION/QUANTITY",
                        help="series to draw (default: every series in rrd_dir)")
    parser.add_argument("--config", metavar="FILE", default="/etc/pihub/store-rrd.yml",
                        help="the daemon's config, for rrd_dir and rrdcached_socket "
                             "(default: %(default)s)")
    parser.add_argument("--out", metavar="DIR", default=".", help="output directory")
    parser.add_argument("--period", action="append", choices=list(PERIODS),
                        help="period to draw; repeat for several (default: all four)")
    parser.add_argument("--width", type=int, default=800, help="plot width, pixels")
    parser.add_argument("--height", type=int, default=240, help="plot height, pixels")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        config = load_file(Config, args.config)
    except ConfigError as exc:
        print(f"{PROG}: config error in {args.config}: {exc}", file=sys.stderr)
        return EX_CONFIG
    exe = shutil.which(config.rrdtool)
    if exe is None:
        print(f"{PROG}: rrdtool: program {config.rrdtool!r} not found", file=sys.stderr)
        return EX_CONFIG
    rrd_dir = Path(config.rrd_dir)
    wanted = args.series or all_series(rrd_dir)
    if not wanted:
        print(f"{PROG}: no series in {rrd_dir}", file=sys.stderr)
        return 1
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    daemon = config.rrdcached_socket
    if daemon and not daemon.startswith("unix:"):
        daemon = "unix:" + daemon
    failed = 0
    for name in wanted:
        location, _, quantity = name.partition("/")
        if not (SEGMENT.match(location) and SEGMENT.match(quantity)):
            print(f"{PROG}: {name!r}: expected LOCATION/QUANTITY, lower-case [a-z0-9_-]+",
                  file=sys.stderr)
            failed += 1
            continue
        path, sidecar = series_paths(rrd_dir, location, quantity)
        if not path.exists():
            print(f"{PROG}: {name}: no {path}", file=sys.stderr)
            failed += 1
            continue
        unit = str(read_sidecar(sidecar).get("unit", ""))
        series_args = partial(graph_args, path, title=f"{location} / {quantity}", unit=unit,
                              width=args.width, height=args.height)
        for period in args.period or list(PERIODS):
            out = out_dir / f"{location}-{quantity}-{period}.png"
            done = rrdtool_graph(exe, series_args(out, period, daemon=daemon))
            if done.returncode != 0 and daemon:
                # rrdcached unreachable: draw what is on disk already
                print(f"{PROG}: {name}: via rrdcached failed ({done.stderr.strip()}); "
                      "drawing from the file", file=sys.stderr)
                done = rrdtool_graph(exe, series_args(out, period, daemon=None))
            if done.returncode != 0:
                print(f"{PROG}: {name} ({period}): rrdtool graph failed: "
                      f"{done.stderr.strip()}", file=sys.stderr)
                failed += 1
                continue
            print(out)
    return 1 if failed else 0
