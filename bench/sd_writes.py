#!/usr/bin/env python3
"""What the idle hub writes to its SD card: bytes per hour per process and per sensor series.

The stack is started as bench/stack_memory.py starts it (bench/stack.py: Mosquitto,
VictoriaMetrics and rrdcached as their roles start them, from the roles' defaults), with the
example inventory's default set of daemons (those it ships with ``enabled: false`` left out;
``--all`` for every one) and their example settings and default log level: the demo load,
sensor-system every 30 s, simulated GPIO and fake 1-wire sensors every 60 s, heartbeats every
30 s. Every data directory is in a scratch dir under /var/tmp, on a block device (tmpfs would
count nothing).

Method. After ``--warmup`` seconds (default 120: every series' RRD file and VictoriaMetrics'
first parts are made, the one-off writes of a first start), every process's ``/proc/<pid>/io``
(with its children's) is read, again after ``--minutes`` (default 10), and the difference
scaled to an hour:

* ``write_bytes``: what the process made reach the block layer (counted when it dirties a
  page of the page cache: a page rewritten before writeback counts once; ``cancelled_write_bytes``,
  dirty pages of files deleted before writeback, subtracted). Not in it: the filesystem's own
  metadata and journal (ext4's jbd2 writes them, not the process), so a file fsync'd often costs
  the card more than its figure;
* ``wchar``: what it passed to write() and friends, files, pipes and sockets alike (an upper
  bound of what it could write).

journald cannot run here (no systemd as PID 1): what each process writes to its stdout and
stderr, journald's input, goes to a pipe the bench reads and counts (bytes and lines). What
journald makes of it on the card is an assumption, not a measurement (``JOURNAL_LINE_BYTES``
per line on top of the text: the entry object, its fields' references, entry arrays; journald
syncs every 5 min and the kernel writes its dirty pages every 30 s). Mosquitto logs to a file as
Debian's mosquitto.conf makes it (``log_dest file``), so its log is in its own write_bytes.

rrdcached keeps an update in RAM up to ``-w`` (+ up to ``-z``) seconds, and Mosquitto saves its
database every ``autosave_interval`` seconds: both can be longer than the window. So at the end
the bench asks rrdcached to FLUSHALL and Mosquitto to save (SIGUSR1) and counts what each
writes; rrdcached's hourly figure is the window's (its journal) plus that flush times
3600 / ``-w``, Mosquitto's that save times 3600 / ``autosave_interval`` plus its log file (a
page for each 4 KB it grew, at least one when it grew).

Per sensor series: the total divided by the number of series stored (one RRD file each).
Goal (issue 18): under 1 MB/h per sensor series.

Usage: ``python3 bench/sd_writes.py --python .cache/bench-venv/bin/python [--minutes 10]
[--save LABEL]``; ``--set ROLE.VAR=VALUE`` tries a role setting (``rrd.rrd_cached_flush_interval
=3600``), ``--env KEY=VALUE`` the daemons' environment. ``--save`` keeps the figures in
bench/results/sd_writes.json, from which bench/figures.py renders README's SD card table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import daemon_footprint as fp
from stack import REPO, example_daemons, role_defaults, start_stack, stop, tree

RESULTS = REPO / "bench" / "results" / "sd_writes.json"
SCRATCH_PARENT = "/var/tmp"
# Assumed bytes journald adds on the card per log line, beyond the line itself (not measured).
JOURNAL_LINE_BYTES = 500
PAGE = os.sysconf("SC_PAGE_SIZE")
IO_KEYS = ("write_bytes", "cancelled_write_bytes", "wchar", "syscw")


class Counter:
    """Reads a process's stdout and stderr from a pipe: bytes and lines (journald's input)."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        self.bytes = self.lines = 0
        self.mark = (0, 0)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while chunk := os.read(self.read_fd, 65536):
            self.bytes += len(chunk)
            self.lines += chunk.count(b"\n")

    def start_window(self) -> None:
        self.mark = (self.bytes, self.lines)

    def window(self) -> tuple[int, int]:
        return self.bytes - self.mark[0], self.lines - self.mark[1]


def io(pid: int) -> dict[str, int]:
    total = dict.fromkeys(IO_KEYS, 0)
    for p in tree(pid):
        try:
            text = Path(f"/proc/{p}/io").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key in total:
                total[key] += int(value)
    return total


def rrdcached_flushall(sock: Path) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(sock))
        s.sendall(b"FLUSHALL\n")
        s.recv(4096)


def settle(pid: int, quiet: float = 3.0, limit: float = 60.0) -> None:
    """Wait until PID's write_bytes has not moved for QUIET seconds."""
    last, since, deadline = io(pid)["write_bytes"], time.monotonic(), time.monotonic() + limit
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        time.sleep(0.5)
        now = io(pid)["write_bytes"]
        if now != last:
            last, since = now, time.monotonic()


def run(args: argparse.Namespace) -> dict[str, Any]:
    python = str(Path(args.python).absolute())
    overrides: dict[str, dict[str, Any]] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        role, _, var = key.partition(".")
        overrides.setdefault(role, {})[var] = yaml.safe_load(value)
    rrd = {**role_defaults("rrd"), **overrides.get("rrd", {})}
    mosq = {**role_defaults("mosquitto"), **overrides.get("mosquitto", {})}
    settings: dict[str, dict[str, Any]] = {}
    for item in args.config:
        key, _, value = item.partition("=")
        daemon, _, var = key.partition(".")
        settings.setdefault(daemon, {})[var] = yaml.safe_load(value)
    entries = example_daemons()
    names = [e["name"] for e in entries if args.all or e["enabled"]]
    counters: dict[str, Counter] = {}

    def output(name: str) -> int:
        counters[name] = Counter()
        return counters[name].write_fd

    Path(SCRATCH_PARENT).mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pihub-sd-", dir=SCRATCH_PARENT) as tmp:
        work = Path(tmp)
        procs: dict[str, subprocess.Popen[bytes]] = {}
        try:
            start_stack(work, python, daemons=names, env=dict(kv.split("=", 1)
                                                              for kv in args.env),
                        overrides=overrides, settings=settings, as_example=True,
                        mosquitto_log_file=True, output=output, procs=procs)
            for counter in counters.values():
                os.close(counter.write_fd)  # the children have theirs
            print(f"{len(names)} daemons READY; warm-up {args.warmup:.0f} s, then "
                  f"{args.minutes:g} min measured", flush=True)
            time.sleep(args.warmup)  # a benchmark: the first start's one-off writes pass
            before = {n: io(p.pid) for n, p in procs.items()}
            for counter in counters.values():
                counter.start_window()
            started = time.monotonic()
            mosq_log = work / "mosquitto.log"
            log0 = mosq_log.stat().st_size if mosq_log.exists() else 0
            time.sleep(args.minutes * 60)
            window = time.monotonic() - started
            after = {n: io(p.pid) for n, p in procs.items()}
            for name, proc in procs.items():
                if proc.poll() is not None:
                    raise SystemExit(f"{name} exited with {proc.returncode} while measured")
            log_growth = (mosq_log.stat().st_size if mosq_log.exists() else 0) - log0
            # rrdcached's RRD files are written every -w seconds: one FLUSHALL, counted
            f0 = io(procs["rrdcached"].pid)["write_bytes"]
            rrdcached_flushall(work / "rrdcached.sock")
            settle(procs["rrdcached"].pid)
            flush_bytes = io(procs["rrdcached"].pid)["write_bytes"] - f0
            # Mosquitto saves its database every autosave_interval: one save (SIGUSR1), counted
            m0 = io(procs["mosquitto"].pid)["write_bytes"]
            procs["mosquitto"].send_signal(signal.SIGUSR1)
            settle(procs["mosquitto"].pid)
            save_bytes = io(procs["mosquitto"].pid)["write_bytes"] - m0
            series = sorted(str(p.relative_to(work / "rrd")) for p in (work / "rrd").rglob("*.rrd"))
            mosq_db = work / "mosquitto" / "mosquitto.db"
            parts: dict[str, Any] = {}
            for name in procs:
                d = {k: after[name][k] - before[name][k] for k in IO_KEYS}
                log_bytes, log_lines = counters[name].window() if name in counters else (0, 0)
                per_h = 3600 / window
                row = {
                    "kind": "service" if name in ("mosquitto", "victoria-metrics", "rrdcached")
                    else "daemon",
                    "write_bytes_h": round((d["write_bytes"] - d["cancelled_write_bytes"]) * per_h),
                    "wchar_h": round(d["wchar"] * per_h),
                    "writes_h": round(d["syscw"] * per_h),
                    "log_bytes_h": round(log_bytes * per_h),
                    "log_lines_h": round(log_lines * per_h),
                }
                parts[name] = row
            m = parts["mosquitto"]
            m["log_file_bytes_h"] = round(log_growth * 3600 / window)
            m["db_bytes"] = mosq_db.stat().st_size if mosq_db.exists() else 0
            m["window_write_bytes_h"] = m["write_bytes_h"]
            m["save_bytes"] = save_bytes
            # its log: each append dirties a page again once the last was written back
            m["write_bytes_h"] = round(save_bytes * 3600 / int(mosq["mosquitto_autosave_interval"])
                                       + -(-log_growth // PAGE) * PAGE * 3600 / window)
            w = int(rrd["rrd_cached_flush_interval"])
            parts["rrdcached"]["window_write_bytes_h"] = parts["rrdcached"]["write_bytes_h"]
            parts["rrdcached"]["flush_bytes"] = flush_bytes
            parts["rrdcached"]["write_bytes_h"] += round(flush_bytes * 3600 / w)
            return {"window_s": round(window, 1), "series": len(series), "series_names": series,
                    "parts": parts}
        finally:
            stop(procs)
            for counter in counters.values():
                counter.thread.join(5)


def totals(result: dict[str, Any]) -> dict[str, int]:
    parts = result["parts"].values()
    disk = sum(p["write_bytes_h"] for p in parts)
    journal = sum(p["log_bytes_h"] + JOURNAL_LINE_BYTES * p["log_lines_h"] for p in parts)
    return {"write_bytes_h": disk, "journal_bytes_h": journal, "total_bytes_h": disk + journal,
            "per_series_bytes_h": round((disk + journal) / max(result["series"], 1))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_python = REPO / ".cache" / "bench-venv" / "bin" / "python"
    parser.add_argument("--python", default=str(default_python) if default_python.exists()
                        else None, required=not default_python.exists(),
                        help="interpreter with pihub installed (make bench: .cache/bench-venv)")
    parser.add_argument("--minutes", type=float, default=10.0, help="the window measured")
    parser.add_argument("--warmup", type=float, default=120.0,
                        help="seconds after the last READY before the window")
    parser.add_argument("--all", action="store_true",
                        help="every daemon of the example, also those it ships disabled")
    parser.add_argument("--set", action="append", default=[], metavar="ROLE.VAR=VALUE",
                        help="a role variable other than its default (to try a cut), e.g. "
                             "rrd.rrd_cached_flush_interval=3600")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="more environment for every daemon")
    parser.add_argument("--config", action="append", default=[], metavar="DAEMON.KEY=VALUE",
                        help="a daemon's config key other than the example's (to try a cut), "
                             "e.g. store-tsdb.flush_interval=300")
    parser.add_argument("--save", metavar="LABEL",
                        help="keep the figures under LABEL in bench/results/sd_writes.json")
    parser.add_argument("--note", default="", help="what LABEL's run is (with --save)")
    args = parser.parse_args()
    result = run(args)
    t = totals(result)
    print(f"window {result['window_s']:.0f} s, {result['series']} series stored")
    print("| process | write_bytes/h | wchar/h | log (journald input)/h | log lines/h |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, r in sorted(result["parts"].items(), key=lambda kv: -kv[1]["write_bytes_h"]):
        print(f"| {name} | {r['write_bytes_h'] / 1024:.0f} KB | {r['wchar_h'] / 1024:.0f} KB | "
              f"{r['log_bytes_h'] / 1024:.1f} KB | {r['log_lines_h']} |")
    print(f"\nblock layer {t['write_bytes_h'] / 1e6:.2f} MB/h, journald (assumed) "
          f"{t['journal_bytes_h'] / 1e6:.2f} MB/h, in all {t['total_bytes_h'] / 1e6:.2f} MB/h: "
          f"{t['per_series_bytes_h'] / 1e3:.0f} KB/h per series")
    if args.save:
        data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": {}}
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip()
        exe, env = fp.run_env(args.python)
        version = subprocess.run([exe, "--version"], capture_output=True, text=True,
                                 env=env).stdout.strip()
        packages = {p: subprocess.run(["dpkg-query", "-W", "-f", "${Version}", p],
                                      capture_output=True, text=True).stdout.strip()
                    for p in ("victoria-metrics", "mosquitto", "rrdcached")}
        fs = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "--target", SCRATCH_PARENT],
                            capture_output=True, text=True).stdout.strip()
        data["runs"][args.save] = {
            "date": time.strftime("%Y-%m-%d"), "commit": commit, "python": version,
            "packages": packages, "machine": f"{os.cpu_count()}-core {os.uname().machine}",
            "filesystem": fs, "minutes": args.minutes, "warmup_s": args.warmup,
            "note": args.note or data["runs"].get(args.save, {}).get("note", ""),
            "set": args.set, "config": args.config, "env": args.env, "all": args.all,
            "journal_line_bytes": JOURNAL_LINE_BYTES, **result, "totals": t}
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(data, indent=1) + "\n")
        print(f"saved {RESULTS.relative_to(REPO)} [{args.save}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
