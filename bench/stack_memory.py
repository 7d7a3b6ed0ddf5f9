#!/usr/bin/env python3
"""The whole stack's memory: every daemon of the example inventory, Mosquitto, VictoriaMetrics
and rrdcached, running together, idle, as the roles deploy them.

Each part is started on loopback, as the user who runs the bench (root: the units' users and
sandboxes are the play's), with what its role gives it:

* VictoriaMetrics: the ``ARGS`` and the environment of roles/timeseries'
  ``/etc/default/victoria-metrics`` template, rendered from the role's defaults (so its memory
  flags, ``timeseries_extra_args`` and basic auth are the deployed ones); data in a scratch dir,
  on 127.0.0.2 and a free port;
* rrdcached: the ``ExecStart`` of roles/rrd's unit template, rendered from the role's defaults
  (flush interval, jitter, journal), its paths in a scratch dir;
* Mosquitto: roles/mosquitto's ``pihub.conf`` from the role's defaults (persistence,
  autosave, queue and inflight limits), listening on a free port, anonymous (the password
  file and ACL are the play's work: a few KB of the broker's memory);
* every daemon of ``inventory/example/group_vars/pihub/main.yml`` (all of them, also those the
  example ships with ``enabled: false``), from a venv on Debian's python3 with pihub installed
  (``--python``, as on the Pi), with the ``Environment=`` lines of roles/pihub's unit template
  and its own ``--print-config-example`` wired to the parts above (store-tsdb and the page to
  VictoriaMetrics with its password, store-rrd to rrdcached; hardware daemons on their
  stand-ins: simulated GPIO, fake 1-wire sensors in a scratch ``w1_root``).

After every daemon has sent READY=1, the stack idles (``--idle``, default 60 s: sensor-system's
first readings go through store-tsdb into VictoriaMetrics and through store-rrd into rrdcached,
heartbeats flow); then every process (with its children) is read ``--samples`` times, 5 s apart,
and the whole stack is started ``--runs`` times (VictoriaMetrics' Go heap is as large as its
last GC left it); per process the median. Per process:

* PSS in the stack: each page it has in RAM (``/proc/<pid>/pagemap``, root only) divided by
  the number of the stack's processes that have it. It sums to the stack's distinct pages, what
  the stack takes from a Pi's RAM; the kernel's PSS would also divide by processes outside the
  stack (other benches' python3 or victoria-metrics on this machine) and come out too low;
* PSS and RSS from ``/proc/<pid>/smaps_rollup``, for comparison (RSS counts the shared pages,
  python3 itself, libc, libssl, in every process); anonymous memory.

Usage: ``python3 bench/stack_memory.py --python .cache/bench-venv/bin/python [--save LABEL]``;
``make bench`` saves as ``deployed``. ``--env KEY=VALUE`` (the daemons), ``--vm-arg=-FLAG=V``
and ``--vm-env KEY=VALUE`` (VictoriaMetrics) try a cut before it goes into a role;
``--no-unit-env`` leaves out the unit template's Environment= lines.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import daemon_footprint as fp
from stack import REPO, example_daemons, start_stack, stop, tree

RESULTS = REPO / "bench" / "results" / "stack_memory.json"


def memory(pid: int) -> dict[str, int]:
    total = {"rss_kb": 0, "pss_kb": 0, "anon_kb": 0}
    for p in tree(pid):
        try:
            text = Path(f"/proc/{p}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            name = {"Rss": "rss_kb", "Pss": "pss_kb", "Anonymous": "anon_kb"}.get(key)
            if name:
                total[name] += int(rest.split()[0])
    return total


PAGE = os.sysconf("SC_PAGE_SIZE")


def frames(pid: int) -> set[int]:
    """The physical page frames PID and its children have in RAM (/proc/<pid>/pagemap: root)."""
    out: set[int] = set()
    for p in tree(pid):
        try:
            fd = os.open(f"/proc/{p}/pagemap", os.O_RDONLY)
        except OSError:
            continue
        try:
            for line in Path(f"/proc/{p}/maps").read_text().splitlines():
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                try:
                    data = os.pread(fd, (end - start) // PAGE * 8, start // PAGE * 8)
                except OSError:  # [vsyscall]
                    continue
                out.update(e & ((1 << 55) - 1) for (e,) in struct.iter_unpack("<Q", data)
                           if e >> 63 & 1)
        finally:
            os.close(fd)
    out.discard(0)  # no frame number without CAP_SYS_ADMIN: nothing to count
    return out


def stack_pss(procs: dict[str, int]) -> tuple[dict[str, int], int]:
    """Per process, its pages each divided by the number of the stack's processes that have it
    (PSS as on a Pi that runs the stack alone: sharers outside it are not counted); and the
    stack's distinct pages. KB."""
    sets = {name: frames(pid) for name, pid in procs.items()}
    count: dict[int, int] = {}
    for frames_of in sets.values():
        for f in frames_of:
            count[f] = count.get(f, 0) + 1
    kb = PAGE // 1024
    return ({name: int(sum(kb / count[f] for f in fs)) for name, fs in sets.items()},
            len(count) * kb)


def threads(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


def run(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    python = str(Path(args.python).absolute())
    extra_env = dict(kv.split("=", 1) for kv in args.env)
    with tempfile.TemporaryDirectory(prefix="pihub-stack-") as tmp:
        work = Path(tmp)
        procs: dict[str, subprocess.Popen[bytes]] = {}
        try:
            start_stack(work, python, env=extra_env, unit_env=not args.no_unit_env,
                        vm_args=args.vm_arg,
                        vm_env=dict(kv.split("=", 1) for kv in args.vm_env), procs=procs)
            entries = example_daemons()
            print(f"{len(entries)} daemons READY; idle {args.idle:.0f} s", flush=True)
            time.sleep(args.idle)  # a benchmark: let the stack settle into its idle state
            samples: dict[str, list[dict[str, int]]] = {n: [] for n in procs}
            distinct = []
            for i in range(args.samples):
                if i:
                    time.sleep(5)
                for name, proc in procs.items():
                    if proc.poll() is not None:
                        raise SystemExit(f"{name} exited with {proc.returncode} while idle")
                    samples[name].append(memory(proc.pid))
                own, total = stack_pss({n: p.pid for n, p in procs.items()})
                if not total:  # no pagemap frames (not root): the kernel's PSS instead
                    own = {n: samples[n][-1]["pss_kb"] for n in procs}
                    total = sum(own.values())
                distinct.append(total)
                for name, kb in own.items():
                    samples[name][-1]["stack_pss_kb"] = kb
            enabled = {e["name"]: e["enabled"] for e in entries}
            parts = {}
            for name, got in samples.items():
                row = {k: int(statistics.median(s[k] for s in got)) for k in got[0]}
                row["threads"] = threads(procs[name].pid)
                row["kind"] = "daemon" if name in enabled else "service"
                if name in enabled:
                    row["example_enabled"] = enabled[name]
                parts[name] = row
            return parts, int(statistics.median(distinct))
        finally:
            stop(procs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", required=True,
                        help="interpreter with pihub installed (make bench: .cache/bench-venv)")
    parser.add_argument("--idle", type=float, default=60.0, help="seconds idle after READY")
    parser.add_argument("--samples", type=int, default=3, help="per run, 5 s apart")
    parser.add_argument("--runs", type=int, default=3,
                        help="the stack started this many times; per process the median")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="more environment for every daemon (to try a cut)")
    parser.add_argument("--vm-arg", action="append", default=[],
                        help="more VictoriaMetrics flags (to try a cut)")
    parser.add_argument("--vm-env", action="append", default=[], metavar="KEY=VALUE",
                        help="more environment for VictoriaMetrics (to try a cut)")
    parser.add_argument("--no-unit-env", action="store_true",
                        help="without the unit template's Environment= lines")
    parser.add_argument("--save", metavar="LABEL",
                        help="keep the figures under LABEL in bench/results/stack_memory.json "
                             "(make bench: deployed), from which bench/figures.py renders README")
    parser.add_argument("--note", default="", help="what LABEL's run is (with --save)")
    args = parser.parse_args()
    exe, env = fp.run_env(args.python)
    version = subprocess.run([exe, "--version"], capture_output=True, text=True,
                             env=env).stdout.strip()
    packages = {}
    for package in ("victoria-metrics", "mosquitto", "rrdcached"):  # Debian's, as the roles'
        packages[package] = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package],
                                           capture_output=True, text=True).stdout.strip()
    # Go's heap (VictoriaMetrics) is as large as the last GC left it: medians over runs
    results = [run(args) for _ in range(args.runs)]
    parts = {name: {key: (int(statistics.median(r[0][name][key] for r in results))
                          if isinstance(value, int) and not isinstance(value, bool) else value)
                    for key, value in row.items()}
             for name, row in results[0][0].items()}
    distinct = int(statistics.median(r[1] for r in results))
    print("| process | threads | PSS in the stack | PSS | RSS | anonymous |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in sorted(parts.items(), key=lambda kv: -kv[1]["stack_pss_kb"]):
        print(f"| {name} | {r['threads']} | {r['stack_pss_kb'] / 1024:.1f} MB | "
              f"{r['pss_kb'] / 1024:.1f} MB | {r['rss_kb'] / 1024:.1f} MB | "
              f"{r['anon_kb'] / 1024:.1f} MB |")
    total = {k: sum(r[k] for r in parts.values()) for k in ("stack_pss_kb", "pss_kb", "rss_kb")}
    print(f"\nwhole stack: {distinct / 1024:.1f} MB of distinct pages (PSS in the stack summed "
          f"{total['stack_pss_kb'] / 1024:.1f} MB, smaps_rollup PSS summed "
          f"{total['pss_kb'] / 1024:.1f} MB, RSS summed {total['rss_kb'] / 1024:.1f} MB)")
    if args.save:
        data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": {}}
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip()
        data["runs"][args.save] = {
            "date": time.strftime("%Y-%m-%d"), "commit": commit, "python": version,
            "packages": packages,
            "machine": f"{os.cpu_count()}-core {os.uname().machine}",
            "idle_s": args.idle, "samples": args.samples, "runs": args.runs, "note": args.note
            or data["runs"].get(args.save, {}).get("note", ""),
            "env": args.env, "vm_args": args.vm_arg, "vm_env": args.vm_env,
            "unit_env": not args.no_unit_env,
            "distinct_kb": distinct, "parts": parts}
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(data, indent=1) + "\n")
        print(f"saved {RESULTS.relative_to(REPO)} [{args.save}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
