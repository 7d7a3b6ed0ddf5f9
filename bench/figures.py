#!/usr/bin/env python3
"""The figures in README.md and docs/*.md, written from the benchmarks' own results.

A bench script saves what it measured as ``bench/results/<name>.json``; a document shows it
between two markers, never typed by hand::

    <!-- figures: daemon_footprint -->
    ...the table and the sentences derived from it...
    <!-- /figures -->

``python3 bench/figures.py --write`` renders every block from its results file (``make bench``
does it after measuring); ``--check`` says which block differs from its results and exits 1
(tests/test_figures.py runs it, so a figure edited by hand or a result not rendered fails the
tests).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
BLOCK = re.compile(r"(<!-- figures: (?P<name>[a-z0-9_]+)(?: (?P<arg>[a-z0-9-]+))? -->\n)"
                   r"(?P<body>.*?)(<!-- /figures -->)", re.S)
# The idle RSS each daemon should stay within on x86_64 (issue 3; pihub-web's own: issue 15).
RSS_BUDGET_MB = {"web": 30.0}
DEFAULT_RSS_BUDGET_MB = 25.0


def documents() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _mb(kb: float) -> str:
    return f"{kb / 1024:.1f} MB"


def daemon_footprint(data: dict[str, Any], arg: str | None = None) -> str:
    """README's table and sentence, or with ARG (a daemon) that daemon's line for its doc."""
    if arg is not None:
        return _one_footprint(data, arg)
    rows = data["daemons"]
    lines = [f"Measured with `make bench` on {data['date']}: {data['python']} on "
             f"{data['machine']}, {data['runs']} runs each, medians.", "",
             "| daemon | READY after start | idle RSS | idle PSS |",
             "| --- | ---: | ---: | ---: |"]
    within, over = [], []
    for name in sorted(rows, key=lambda n: rows[n]["rss_kb"]):
        r = rows[name]
        lines.append(f"| {name} | {r['ready_s'] * 1000:.0f} ms | {_mb(r['rss_kb'])} | "
                     f"{_mb(r['pss_kb'])} |")
        budget = RSS_BUDGET_MB.get(name, DEFAULT_RSS_BUDGET_MB)
        (within if r["rss_kb"] / 1024 <= budget else over).append(name)
    slowest = max(rows, key=lambda n: rows[n]["ready_s"])
    lines += ["", f"Every daemon is READY within {rows[slowest]['ready_s'] * 1000:.0f} ms "
              f"(the slowest: {slowest}). {len(within)} of {len(rows)} are within their idle "
              f"RSS budget ({DEFAULT_RSS_BUDGET_MB:g} MB"
              + "".join(f", {n} {b:g} MB" for n, b in RSS_BUDGET_MB.items() if n in rows)
              + f"): {', '.join(sorted(within)) or 'none'}"
              + (f"; over it: {', '.join(sorted(over))}." if over else ".")]
    return "\n".join(lines) + "\n"


def _one_footprint(data: dict[str, Any], name: str) -> str:
    rows = data["daemons"]
    if name not in rows:
        raise KeyError(f"{name} is not in bench/results/daemon_footprint.json")
    r, base = rows[name], rows.get("sensor-system")
    text = (f"Idle, as deployed (`make bench` on {data['date']}, {data['python']}, "
            f"{data['machine']}, medians of {data['runs']} runs): READY "
            f"{r['ready_s'] * 1000:.0f} ms after start, RSS {_mb(r['rss_kb'])}, PSS "
            f"{_mb(r['pss_kb'])}")
    if base is not None and name != "sensor-system":
        text += (f" (sensor-system, the smallest daemon, on the same run: "
                 f"{base['ready_s'] * 1000:.0f} ms, {_mb(base['rss_kb'])}, "
                 f"{_mb(base['pss_kb'])})")
    return text + ".\n"


# Which Pi the whole stack fits (bench/stack_memory.py). Assumptions, not measured here: the
# RAM Linux gets (MemTotal, after the firmware's GPU share: gpu_mem=64 on a Zero 2 W and a
# Pi 3, 76 MB on a Pi 4) and what an idle Raspberry Pi OS Lite takes of it (kernel, systemd,
# journald, udev, sshd, NetworkManager, cron, avahi: about 100 MB "used" after boot).
PI_MODELS = [("Zero 2 W (512 MB)", 420), ("Pi 3 (1 GB)", 920), ("Pi 4/5 (2 GB)", 1900)]
OS_IDLE_MB = 100
# Headroom: what is left after the OS and the stack must be at least this share of the RAM Linux
# gets (the page cache VictoriaMetrics and the RRDs are read through, a journal burst, apt).
HEADROOM = 0.20


def _sum(parts: dict[str, Any], names: list[str], key: str = "stack_pss_kb") -> float:
    return sum(parts[n][key] for n in names)


def stack_memory(data: dict[str, Any], arg: str | None = None) -> str:
    """README's whole-stack table (every saved run a column, the last one first in detail),
    and which Pi it fits."""
    runs = data["runs"]
    labels = [label for label in ("before", "deployed") if label in runs]
    now = runs[labels[-1]]
    parts = now["parts"]
    daemons = [n for n, r in parts.items() if r["kind"] == "daemon"]
    services = [n for n, r in parts.items() if r["kind"] == "service"]
    default_set = services + [n for n in daemons if parts[n].get("example_enabled", True)]
    pkgs = now.get("packages", {})
    services_text = ", ".join(f"{p} {pkgs[p]}" if pkgs.get(p) else p
                              for p in ("victoria-metrics", "mosquitto", "rrdcached"))
    lines = [f"Measured with `make bench` on {now['date']}: the daemons on {now['python']} "
             f"(a venv, as deployed) and Debian's {services_text} on {now['machine']}, every "
             f"part as its role starts it, on loopback; idle {now['idle_s']:.0f} s after "
             f"the last daemon's READY, per process the median of {now['samples']} samples "
             f"5 s apart in each of {now.get('runs', 1)} runs. PSS in the stack: each page a "
             "process has in RAM, divided by the "
             "number of the stack's processes that have it (from /proc/<pid>/pagemap), so that "
             "the column sums to the stack's RAM; the kernel's PSS (smaps_rollup) and RSS of "
             f"the {labels[-1]!r} run for comparison. The example's default set is summed "
             "from the same run.", ""]
    head = " | ".join(f"{label}: PSS in the stack" for label in labels)
    lines += [f"| process | {head} | PSS (smaps_rollup) | RSS |",
              "| --- |" + " ---: |" * (len(labels) + 2)]
    for name in sorted(parts, key=lambda n: (-parts[n]["stack_pss_kb"], n)):
        cells = " | ".join(_mb(runs[label]["parts"][name]["stack_pss_kb"])
                           if name in runs[label]["parts"] else "" for label in labels)
        off = "" if parts[name].get("example_enabled", True) else " (off in the example)"
        lines.append(f"| {name}{off} | {cells} | {_mb(parts[name]['pss_kb'])} | "
                     f"{_mb(parts[name]['rss_kb'])} |")
    for title, names in ((f"**whole stack: {len(daemons)} daemons and "
                          f"{len(services)} services**", list(parts)),
                         (f"the example's default set ({len(default_set) - len(services)} "
                          "daemons on)", default_set)):
        cells = " | ".join(_mb(_sum(runs[label]["parts"], names)) for label in labels)
        lines.append(f"| {title} | {cells} | {_mb(_sum(parts, names, 'pss_kb'))} | "
                     f"{_mb(_sum(parts, names, 'rss_kb'))} (summed) |")
    cuts = _cuts(runs)
    if cuts:
        lines += ["", "| cut | where | saved (PSS in the stack, medians) |", "| --- | --- | ---: |"]
        lines += [f"| {cut} | {where} | {_mb(kb)} |" for cut, where, kb in cuts]
    full, default = _sum(parts, list(parts)) / 1024, _sum(parts, default_set) / 1024
    lines += ["", f"Which Pi it fits (assumed, not measured: the RAM Linux gets after the "
              f"GPU's share, and {OS_IDLE_MB} MB for an idle Raspberry Pi OS Lite; headroom: "
              f"at least {HEADROOM:.0%} of that RAM left free):", "",
              f"| Pi | RAM for Linux | left with the whole stack ({full:.0f} MB) | "
              f"left with the example's default set ({default:.0f} MB) |",
              "| --- | ---: | ---: | ---: |"]
    for model, ram in PI_MODELS:
        cells = []
        for used in (full, default):
            left = ram - OS_IDLE_MB - used
            verdict = ("fits" if left >= HEADROOM * ram else
                       "fits, headroom under " + f"{HEADROOM:.0%}" if left > 0 else
                       "does not fit")
            cells.append(f"{left:.0f} MB: {verdict}")
        lines.append(f"| {model} | {ram} MB | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


# Runs with one cut left out (bench/stack_memory.py --save LABEL): what that cut saves.
ABLATIONS = {
    "deployed without MALLOC_ARENA_MAX": ("`MALLOC_ARENA_MAX=2` in the daemons' unit",
                                          "daemon"),
    "deployed with VictoriaMetrics' 60 %": ("`-memory.allowedPercent=10` (VictoriaMetrics' "
                                            "own default: 60)", "victoria-metrics"),
}


def _cuts(runs: dict[str, Any]) -> list[tuple[str, str, float]]:
    """(cut, which processes, KB saved): store-rrd's and the notifiers' from before -> deployed
    (each touches its own processes), the role settings' from a run without them."""
    out: list[tuple[str, str, float]] = []
    now = runs.get("deployed")
    if now is None:
        return out
    parts = now["parts"]
    if "before" in runs:
        old = runs["before"]["parts"]

        def saved(names: list[str]) -> float:
            return sum(old[n]["stack_pss_kb"] - parts[n]["stack_pss_kb"] for n in names
                       if n in old and n in parts)
        out.append(("store-rrd's rrdtool process ended when unused for 30 s",
                    "store-rrd and rrdcached", saved(["store-rrd", "rrdcached"])))
        out.append(("requests imported at the first notification, not at start",
                    "notify-pushover and notify-ntfy", saved(["notify-pushover", "notify-ntfy"])))
    for label, (cut, which) in ABLATIONS.items():
        if label in runs:
            other = runs[label]["parts"]
            names = [n for n in parts if (parts[n]["kind"] == "daemon" if which == "daemon"
                                          else n == which) and n in other]
            where = f"the {len(names)} daemons" if which == "daemon" else which
            out.append((cut, where, sum(other[n]["stack_pss_kb"] - parts[n]["stack_pss_kb"]
                                        for n in names)))
    return out


# The goal of issue 18: bytes written to the SD card per hour per sensor series stored.
SD_GOAL_PER_SERIES = 1_000_000


def _kb(n: float) -> str:
    return f"{n / 1000:,.0f} KB"


def sd_writes(data: dict[str, Any], arg: str | None = None) -> str:
    """README's SD card table: per process what reaches the block layer per hour in every saved
    run (before first), journald's assumed share, the whole and per sensor series."""
    runs = data["runs"]
    labels = sorted(runs, key=lambda label: (label != "before", label != "after"))
    final_label = "after" if "after" in runs else labels[-1]
    last = runs[final_label]
    pkgs = last.get("packages", {})
    services_text = ", ".join(f"{p} {pkgs[p]}" if pkgs.get(p) else p
                              for p in ("victoria-metrics", "mosquitto", "rrdcached"))
    lines = [f"Measured with `bench/sd_writes.py` on {last['date']}: the example's default "
             f"set of daemons on {last['python']} (a venv, as deployed) and Debian's "
             f"{services_text} on {last['machine']}, every part as its role starts it, data "
             f"on {last.get('filesystem') or 'a block device'}; after {last['warmup_s']:.0f} s "
             f"of warm-up, a window of {last['minutes']:g} min scaled to an hour, "
             f"{last['series']} sensor series stored. Per process `write_bytes` of "
             "/proc/<pid>/io (what reached the block layer; rrdcached's: its journal in the "
             "window plus one flush of every file times 3600 / `-w`; Mosquitto's: one save of "
             "its database times 3600 / `autosave_interval`, plus its log file), and "
             "journald's share "
             f"assumed: the text each process wrote to stdout and stderr plus "
             f"{last.get('journal_line_bytes', 500)} B a line. Per hour:", ""]
    head = " | ".join(labels)
    lines += [f"| process | {head} |", "| --- |" + " ---: |" * len(labels)]
    parts = runs[labels[0]]["parts"]
    names = sorted({n for label in labels for n in runs[label]["parts"]},
                   key=lambda n: (-parts.get(n, {}).get("write_bytes_h", 0), n))
    quiet = [n for n in names if all(runs[label]["parts"].get(n, {}).get("write_bytes_h", 0)
                                     < 1000 for label in labels)]
    for name in names:
        if name in quiet:
            continue
        cells = " | ".join(_kb(runs[label]["parts"][name]["write_bytes_h"])
                           if name in runs[label]["parts"] else "" for label in labels)
        lines.append(f"| {name} | {cells} |")
    if quiet:
        cells = " | ".join(_kb(sum(runs[label]["parts"].get(n, {}).get("write_bytes_h", 0)
                                   for n in quiet)) for label in labels)
        lines.append(f"| the other {len(quiet)} ({', '.join(sorted(quiet))}) | {cells} |")
    rows = (("journald (assumed, persistent; volatile: 0)", "journal_bytes_h"),
            ("**in all**", "total_bytes_h"))
    for title, key in rows:
        cells = " | ".join(_kb(runs[label]["totals"][key]) for label in labels)
        lines.append(f"| {title} | {cells} |")
    cells = " | ".join(f"{_kb(runs[label]['totals']['per_series_bytes_h'])} "
                       f"({runs[label]['series']} series)" for label in labels)
    lines.append(f"| **per sensor series** | {cells} |")
    first, final = runs[labels[0]]["totals"], last["totals"]
    rrd, mosq = last["parts"].get("rrdcached", {}), last["parts"].get("mosquitto", {})
    logs = sum(p["log_lines_h"] for p in last["parts"].values())
    if "flush_bytes" in rrd and "db_bytes" in mosq:
        lines += ["", f"In the {final_label!r} run: rrdcached's journal "
                  f"{_kb(rrd['window_write_bytes_h'])}/h, one flush of every file "
                  f"{_kb(rrd['flush_bytes'])}; Mosquitto's database {_kb(mosq['db_bytes'])} "
                  f"(one save: {_kb(mosq.get('save_bytes', 0))} written), its log file "
                  f"{_kb(mosq['log_file_bytes_h'])}/h; the daemons and services wrote "
                  f"{logs} log lines an hour to journald."]
    goal = final["per_series_bytes_h"] < SD_GOAL_PER_SERIES
    lines += ["", f"In all {final['total_bytes_h'] / 1e6:.2f} MB/h "
              f"({final_label}; {labels[0]}: {first['total_bytes_h'] / 1e6:.2f} MB/h), "
              f"{final['per_series_bytes_h'] / 1e3:.0f} KB/h per sensor series: "
              + ("within" if goal else "over")
              + f" the goal of {SD_GOAL_PER_SERIES / 1e6:g} MB/h per series; about "
              f"{final['total_bytes_h'] * 24 * 365 / 1e9:.0f} GB a year."]
    return "\n".join(lines) + "\n"


RENDERERS: dict[str, Callable[[dict[str, Any], str | None], str]] = {
    "daemon_footprint": daemon_footprint,
    "stack_memory": stack_memory,
    "sd_writes": sd_writes,
}


def render(name: str, arg: str | None = None) -> str:
    if name not in RENDERERS:
        raise KeyError(f"no renderer for figures block {name!r} (bench/figures.py)")
    path = RESULTS / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path.relative_to(REPO)} is missing: run the bench that "
                                "writes it (make bench)")
    return RENDERERS[name](json.loads(path.read_text()), arg)


def update(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + render(m.group("name"), m.group("arg"))
                     + m.group(5), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="render every block in place")
    mode.add_argument("--check", action="store_true", help="exit 1 if a block is stale")
    args = parser.parse_args(argv)
    stale = []
    for doc in documents():
        text = doc.read_text()
        new = update(text)
        if new != text:
            if args.write:
                doc.write_text(new)
                print(f"{doc.relative_to(REPO)}: figures rewritten")
            else:
                names = [m.group("name") for m in BLOCK.finditer(text)
                         if m.group(0) != update(m.group(0))]
                stale.append(f"{doc.relative_to(REPO)}: {', '.join(names)}")
    if stale:
        print("figures differ from bench/results (run: python3 bench/figures.py --write):\n  "
              + "\n  ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
