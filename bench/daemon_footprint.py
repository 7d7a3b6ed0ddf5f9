#!/usr/bin/env python3
"""Idle memory and start-up time of every pihub daemon.

For each console script ``pihub-<name>`` in files/daemons/pyproject.toml, start the daemon
(``python -m pihub.daemons.<module>``) against a local Mosquitto with its own
``--print-config-example``
(broker, file and directory keys pointed at a scratch dir), and report:

* time from process start to ``READY=1`` on its NOTIFY_SOCKET (connected and subscribed),
* RSS and PSS (``/proc/<pid>/smaps_rollup``) once it has been idle for a few seconds.

Budget (issue 3): idle RSS <= 25 MB per daemon on x86_64, READY within 1 s of start.
Outside services the daemons talk to (a DB, a web feed) are not started: the figures are the
daemons' own idle cost. Usage: ``python3 bench/daemon_footprint.py [--runs 3] [--idle 5]
[--python /opt/pihub/venv/bin/python]``: with ``--python`` the daemons run from that
interpreter's installed pihub (as deployed: a venv on Debian's python3), otherwise from this
source tree with the current interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
PKG = REPO / "files" / "daemons"


def daemons() -> dict[str, str]:
    scripts = tomllib.loads((PKG / "pyproject.toml").read_text())["project"]["scripts"]
    out = {}
    for script, target in scripts.items():
        module, _, attr = target.partition(":")
        if module == "pihub.launch":  # pihub.launch:<module> runs pihub.daemons.<module>
            module = f"pihub.daemons.{attr}"
        if script.startswith("pihub-") and module.startswith("pihub."):
            out[script[len("pihub-"):]] = module
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_broker(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                    + ("user root\n" if os.geteuid() == 0 else ""))
    proc = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    raise SystemExit("mosquitto did not start")


def scratch(value: Any, key: str, workdir: Path) -> Any:
    """Point file and directory settings of an example config at the scratch dir."""
    if isinstance(value, dict):
        return {k: scratch(v, k, workdir) for k, v in value.items()}
    if isinstance(value, list):
        return [scratch(v, key, workdir) for v in value]
    if isinstance(value, str) and value.startswith("/") and re.search(r"(_file|_dir|_root)$",
                                                                       key):
        path = workdir / key / Path(value).name
        if key.endswith("_file"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("bench-secret\n")
        else:
            path.mkdir(parents=True, exist_ok=True)
        return str(path)
    return value


def run_env(python: str | None, extra: dict[str, str] | None = None) -> tuple[str, dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if python is None:
        env["PYTHONPATH"] = str(PKG / "src")
    return python or sys.executable, {**env, **(extra or {})}


# Example settings that need hardware this machine lacks, replaced by their stand-ins.
OFF_PI: dict[str, dict[str, Any]] = {
    "pihub.daemons.sensor_gpio": {"backend": "simulated"},
    # the page on loopback, on a free port (its example says 0.0.0.0:8080): see config_for
}


def config_for(module: str, port: int, workdir: Path, python: str | None) -> Path:
    exe, env = run_env(python)
    example = subprocess.run([exe, "-m", module, "--print-config-example"],
                             capture_output=True, text=True, check=True, env=env).stdout
    data = scratch(yaml.safe_load(example), "", workdir)
    data["mqtt"] = {**data.get("mqtt", {}), "host": "127.0.0.1", "port": port,
                    "username": None, "password_file": None}
    data["log_level"] = "warning"
    data.update(OFF_PI.get(module, {}))
    if module == "pihub.daemons.web":  # the page on loopback, on a port free right now
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            data.update(listen_address="127.0.0.1", port=probe.getsockname()[1])
    path = workdir / "config.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def smaps(pid: int) -> tuple[int, int]:
    rss = pss = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1])
        elif line.startswith("Pss:"):
            pss = int(line.split()[1])
    return rss, pss


def measure(module: str, port: int, idle: float, python: str | None) -> dict[str, float] | str:
    with tempfile.TemporaryDirectory(prefix="pihub-bench-") as tmp:
        workdir = Path(tmp)
        cfg = config_for(module, port, workdir, python)
        sock_path = workdir / "notify.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(sock_path))
        sock.settimeout(15)
        exe, env = run_env(python, {"NOTIFY_SOCKET": str(sock_path),
                                    "STATE_DIRECTORY": str(workdir / "state")})
        (workdir / "state").mkdir()
        log = open(workdir / "daemon.log", "wb")  # noqa: SIM115 - closed below
        t0 = time.perf_counter()
        proc = subprocess.Popen([exe, "-m", module, "--config", str(cfg)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                try:
                    msg = sock.recv(4096).decode()
                except TimeoutError:
                    tail = (workdir / "daemon.log").read_text()[-400:]
                    return f"no READY within 15 s: {tail!r}"
                if "READY=1" in msg:
                    ready = time.perf_counter() - t0
                    break
            time.sleep(idle)  # a benchmark, not a test: let it settle into its idle state
            if proc.poll() is not None:
                return f"exited with {proc.returncode}"
            rss, pss = smaps(proc.pid)
            return {"ready_s": ready, "rss_kb": rss, "pss_kb": pss}
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
            sock.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--idle", type=float, default=5.0, help="seconds idle before measuring")
    parser.add_argument("--only", nargs="*", help="daemon names to measure")
    parser.add_argument("--python", help="interpreter with pihub installed (default: source)")
    parser.add_argument("--save", action="store_true",
                        help="write the medians to bench/results/daemon_footprint.json, from "
                             "which bench/figures.py renders README's table")
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}

    with tempfile.TemporaryDirectory(prefix="pihub-bench-broker-") as tmp:
        broker, port = start_broker(Path(tmp))
        try:
            exe, env = run_env(args.python)
            version = subprocess.run([exe, "--version"], capture_output=True, text=True,
                                     env=env).stdout.strip()
            print(f"{version} ({exe}) on {os.uname().machine}, "
                  f"{args.runs} runs each, medians\n")
            print("| daemon | READY after start | idle RSS | idle PSS |")
            print("| --- | ---: | ---: | ---: |")
            for name, module in sorted(daemons().items()):
                if args.only and name not in args.only:
                    continue
                runs = [measure(module, port, args.idle, args.python) for _ in range(args.runs)]
                good = [r for r in runs if isinstance(r, dict)]
                if not good:
                    print(f"| {name} | failed: {runs[0]} | | |")
                    continue
                med = {k: statistics.median(r[k] for r in good) for k in good[0]}
                results[name] = med
                print(f"| {name} | {med['ready_s'] * 1000:.0f} ms | "
                      f"{med['rss_kb'] / 1024:.1f} MB | {med['pss_kb'] / 1024:.1f} MB |",
                      flush=True)
        finally:
            broker.terminate()
            broker.wait(5)
    if args.save:
        out = REPO / "bench" / "results" / "daemon_footprint.json"
        out.parent.mkdir(exist_ok=True)
        # --only re-measures some daemons: the others keep their figures of the last run
        kept = json.loads(out.read_text())["daemons"] if args.only and out.exists() else {}
        out.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "python": version,
            "machine": f"{os.cpu_count()}-core {os.uname().machine}", "runs": args.runs,
            "daemons": {**kept, **results}}, indent=1, sort_keys=True) + "\n")
        print(f"saved {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
