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
import re
import shlex
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jinja2
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import daemon_footprint as fp

REPO = Path(__file__).resolve().parent.parent
ROLES = REPO / "roles"
INVENTORY = REPO / "inventory" / "example" / "group_vars" / "pihub" / "main.yml"
RESULTS = REPO / "bench" / "results" / "stack_memory.json"
TSDB_PASSWORD = "bench-tsdb-password-0123456789"


def role_defaults(role: str) -> dict[str, Any]:
    return yaml.safe_load((ROLES / role / "defaults" / "main.yml").read_text()) or {}


def render(role: str, template: str, variables: dict[str, Any], strict: bool = True) -> str:
    """ROLE's TEMPLATE as the play renders it (strict: a variable missing here is an error;
    otherwise it renders as empty and false, for settings that need the whole inventory)."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined if strict
                             else jinja2.ChainableUndefined, keep_trailing_newline=True)
    env.filters["comment"] = lambda text: "# " + str(text)
    env.filters["ternary"] = lambda value, yes, no: yes if value else no
    env.filters["bool"] = lambda value: (str(value).lower() in ("true", "yes", "on", "1")
                                         if isinstance(value, str) else bool(value))
    env.filters["regex_replace"] = lambda value, pattern, repl: re.sub(pattern, repl, value)
    return env.from_string((ROLES / role / "templates" / template).read_text()).render(
        ansible_managed="Ansible managed", **variables)


def example_daemons() -> list[dict[str, Any]]:
    """The example inventory's pihub_daemons: name and enabled (the Jinja in them unrendered)."""
    entries = yaml.safe_load(INVENTORY.read_text())["pihub_daemons"]
    return [{"name": e["name"], "enabled": e.get("enabled", True)} for e in entries]


def unit_environment(name: str) -> dict[str, str]:
    """The Environment= lines roles/pihub's unit template gives daemon NAME."""
    defaults = role_defaults("pihub")
    text = render("pihub", "daemon.service.j2", {
        "item": {"name": name}, "pihub_heartbeat_interval": defaults["pihub_heartbeat_interval"],
        "pihub_mqtt_host": defaults["pihub_mqtt_host"], "pihub_timeseries_address": "127.0.0.2",
        "pihub_venv": "/opt/pihub/venv", "base_pihub_config_dir": "/etc/pihub",
        "base_pihub_group": "pihub", "pihub_restart_sec": defaults["pihub_restart_sec"],
        "pihub_start_timeout": defaults["pihub_start_timeout"],
        "pihub_watchdog_heartbeats": defaults["pihub_watchdog_heartbeats"]})
    env = {}
    for line in text.splitlines():
        if line.startswith("Environment="):
            for word in shlex.split(line[len("Environment="):]):
                key, _, value = word.partition("=")
                env[key] = value
    return env


def wait_port(host: str, port: int, what: str, proc: subprocess.Popen[bytes],
              timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{what} did not listen on {host}:{port} within {timeout:.0f} s")


def start_mosquitto(work: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = fp.free_port()
    variables = {**role_defaults("mosquitto"),
                 "mosquitto_listeners": [{"port": port, "address": "127.0.0.1"}]}
    conf = [line for line in render("mosquitto", "pihub.conf.j2", variables,
                                            strict=False).splitlines()
            if not line.startswith(("password_file", "acl_file", "allow_anonymous"))]
    (work / "mosquitto").mkdir()
    conf += ["allow_anonymous true", f"persistence_location {work / 'mosquitto'}/",
             *(["user root"] if os.geteuid() == 0 else [])]
    (work / "mosquitto.conf").write_text("\n".join(conf) + "\n")
    proc = subprocess.Popen(["/usr/sbin/mosquitto", "-c", str(work / "mosquitto.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port("127.0.0.1", port, "mosquitto", proc)
    return proc, port


def start_victoria(work: Path, extra: list[str],
                   extra_env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = fp.free_port()
    variables = {**role_defaults("timeseries"), "timeseries_data_path": str(work / "vm"),
                 "timeseries_listen_address": f"127.0.0.2:{port}",
                 "timeseries_http_password": TSDB_PASSWORD,
                 "timeseries_delete_auth_key": "bench-delete-key-0123456789"}
    env = {**os.environ, **extra_env}
    args: list[str] = []
    for line in render("timeseries", "victoria-metrics.default.j2", variables).splitlines():
        if re.match(r"^[A-Za-z_]+=", line):
            key, _, value = line.partition("=")
            value = shlex.split(value)[0]
            if key == "ARGS":
                args = shlex.split(value)
            else:
                env[key] = value
    # Debian's unit: ExecStart=/usr/bin/victoria-metrics $ARGS, LimitNOFILE=65536
    proc = subprocess.Popen(["/usr/bin/victoria-metrics", *args, *extra], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port("127.0.0.2", port, "victoria-metrics", proc)
    return proc, f"http://127.0.0.2:{port}"


def start_rrdcached(work: Path) -> tuple[subprocess.Popen[bytes], Path, Path]:
    import grp
    rrd_dir, journal, sock = work / "rrd", work / "rrd-journal", work / "rrdcached.sock"
    rrd_dir.mkdir()
    journal.mkdir()
    variables = {**role_defaults("rrd"), "rrd_dir": str(rrd_dir),
                 "rrd_cached_journal_dir": str(journal), "rrd_cached_socket": str(sock),
                 "rrd_group": grp.getgrgid(os.getgid()).gr_name, "rrd_cached_user": "root"}
    unit = render("rrd", "rrdcached.service.j2", variables)
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    argv = shlex.split(exec_start[len("ExecStart="):].replace("/run/rrdcached/rrdcached.pid",
                                                                  str(work / "rrdcached.pid")))
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"rrdcached did not make its socket ({' '.join(argv)})")
        time.sleep(0.1)
    return proc, rrd_dir, sock


def fake_w1(root: Path, config: dict[str, Any]) -> None:
    """DS18B20 stand-ins: devices/<id>/w1_slave as the kernel's w1_therm shows them."""
    for i, sensor in enumerate(config.get("sensors", [])):
        dev = root / "devices" / sensor["id"]
        dev.mkdir(parents=True, exist_ok=True)
        milli = 21500 + 250 * i
        (dev / "w1_slave").write_text(
            "50 01 4b 46 7f ff 0c 10 1c : crc=1c YES\n"
            f"50 01 4b 46 7f ff 0c 10 1c t={milli}\n")


def daemon_config(module: str, port: int, work: Path, python: str, vm_url: str,
                  rrd_dir: Path, rrd_sock: Path) -> Path:
    path = fp.config_for(module, port, work, python)
    data = yaml.safe_load(path.read_text())
    secret = work / "tsdb_password"
    secret.write_text(TSDB_PASSWORD + "\n")
    if module.endswith(".store_tsdb"):
        data.update(url=vm_url, username="pihub", password_file=str(secret))
    elif module.endswith(".web"):
        data["tsdb"] = {**data.get("tsdb", {}), "url": vm_url, "username": "pihub",
                        "password_file": str(secret)}
    elif module.endswith(".store_rrd"):
        data.update(rrd_dir=str(rrd_dir), rrdcached_socket=f"unix:{rrd_sock}")
    elif module.endswith(".sensor_onewire"):
        fake_w1(Path(data["w1_root"]), data)
    path.write_text(yaml.safe_dump(data))
    return path


def tree(pid: int) -> list[int]:
    """PID and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


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
        logs = []
        try:
            procs["mosquitto"], port = start_mosquitto(work)
            procs["victoria-metrics"], vm_url = start_victoria(
                work, args.vm_arg, dict(kv.split("=", 1) for kv in args.vm_env))
            procs["rrdcached"], rrd_dir, rrd_sock = start_rrdcached(work)
            names = fp.daemons()
            entries = example_daemons()
            sock_path = work / "notify.sock"
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(str(sock_path))
            sock.settimeout(1)
            pending = {}
            for entry in entries:
                name = entry["name"]
                dwork = work / name
                dwork.mkdir()
                (dwork / "state").mkdir()
                cfg = daemon_config(names[name], port, dwork, python, vm_url, rrd_dir,
                                    rrd_sock)
                unit_env = {} if args.no_unit_env else unit_environment(name)
                exe, env = fp.run_env(python, {**unit_env, **extra_env,
                                               "NOTIFY_SOCKET": str(sock_path),
                                               "STATE_DIRECTORY": str(dwork / "state")})
                log = open(dwork / "daemon.log", "wb")  # noqa: SIM115 - closed below
                logs.append(log)
                procs[name] = subprocess.Popen([exe, "-m", names[name], "--config", str(cfg)],
                                               stdout=log, stderr=subprocess.STDOUT, env=env,
                                               cwd=dwork)
                pending[procs[name].pid] = name
            # READY=1 comes from the daemon's main pid; the datagram does not say which, so
            # count them: every daemon sends exactly one.
            deadline = time.monotonic() + 60
            ready = 0
            while ready < len(pending) and time.monotonic() < deadline:
                try:
                    if "READY=1" in sock.recv(4096).decode():
                        ready += 1
                except TimeoutError:
                    pass
                dead = [n for n in pending.values() if procs[n].poll() is not None]
                if dead:
                    tails = {n: (work / n / "daemon.log").read_text()[-300:] for n in dead}
                    raise SystemExit(f"exited before READY: {tails}")
            if ready < len(pending):
                raise SystemExit(f"only {ready} of {len(pending)} daemons READY within 60 s")
            print(f"{len(pending)} daemons READY; idle {args.idle:.0f} s", flush=True)
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
            for proc in procs.values():
                proc.send_signal(signal.SIGTERM)
            for proc in procs.values():
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
            for log in logs:
                log.close()


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
