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


RENDERERS: dict[str, Callable[[dict[str, Any], str | None], str]] = {
    "daemon_footprint": daemon_footprint,
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
