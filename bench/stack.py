"""Start pihub's whole stack on loopback as the roles deploy it: the shared part of the stack
benches (bench/stack_memory.py, bench/sd_writes.py).

Mosquitto with roles/mosquitto's ``pihub.conf``, VictoriaMetrics with roles/timeseries'
``ARGS`` and environment, rrdcached with the ``ExecStart`` of roles/rrd's unit (each rendered
from its role's defaults), and every daemon of the example inventory from a venv with the
``Environment=`` lines of roles/pihub's unit template and its ``--print-config-example`` wired to
the others (simulated GPIO, fake 1-wire sensors). :func:`start_stack` starts them all and waits
for every daemon's READY=1.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import jinja2
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import daemon_footprint as fp

REPO = Path(__file__).resolve().parent.parent
ROLES = REPO / "roles"
INVENTORY = REPO / "inventory" / "example" / "group_vars" / "pihub" / "main.yml"
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


def start_mosquitto(work: Path, overrides: dict[str, Any] | None = None,
                    log_file: bool = False) -> tuple[subprocess.Popen[bytes], int]:
    """OVERRIDES: role variables other than the defaults; LOG_FILE: log to a file in WORK, as
    Debian's /etc/mosquitto/mosquitto.conf (log_dest file /var/log/mosquitto/mosquitto.log)."""
    port = fp.free_port()
    variables = {**role_defaults("mosquitto"), **(overrides or {}),
                 "mosquitto_listeners": [{"port": port, "address": "127.0.0.1"}]}
    conf = [line for line in render("mosquitto", "pihub.conf.j2", variables,
                                            strict=False).splitlines()
            if not line.startswith(("password_file", "acl_file", "allow_anonymous"))]
    (work / "mosquitto").mkdir()
    conf += ["allow_anonymous true", f"persistence_location {work / 'mosquitto'}/",
             *(["user root"] if os.geteuid() == 0 else []),
             *([f"log_dest file {work / 'mosquitto.log'}"] if log_file else [])]
    (work / "mosquitto.conf").write_text("\n".join(conf) + "\n")
    proc = subprocess.Popen(["/usr/sbin/mosquitto", "-c", str(work / "mosquitto.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port("127.0.0.1", port, "mosquitto", proc)
    return proc, port


def start_victoria(work: Path, extra: list[str], extra_env: dict[str, str],
                   overrides: dict[str, Any] | None = None,
                   output: int | IO[bytes] = subprocess.DEVNULL
                   ) -> tuple[subprocess.Popen[bytes], str]:
    port = fp.free_port()
    variables = {**role_defaults("timeseries"), **(overrides or {}),
                 "timeseries_data_path": str(work / "vm"),
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
                            stdout=output, stderr=subprocess.STDOUT)
    wait_port("127.0.0.2", port, "victoria-metrics", proc)
    return proc, f"http://127.0.0.2:{port}"


def start_rrdcached(work: Path, overrides: dict[str, Any] | None = None,
                    output: int | IO[bytes] = subprocess.DEVNULL
                    ) -> tuple[subprocess.Popen[bytes], Path, Path]:
    import grp
    rrd_dir, journal, sock = work / "rrd", work / "rrd-journal", work / "rrdcached.sock"
    rrd_dir.mkdir()
    journal.mkdir()
    variables = {**role_defaults("rrd"), **(overrides or {}), "rrd_dir": str(rrd_dir),
                 "rrd_cached_journal_dir": str(journal), "rrd_cached_socket": str(sock),
                 "rrd_group": grp.getgrgid(os.getgid()).gr_name, "rrd_cached_user": "root"}
    unit = render("rrd", "rrdcached.service.j2", variables)
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    argv = shlex.split(exec_start[len("ExecStart="):].replace("/run/rrdcached/rrdcached.pid",
                                                                  str(work / "rrdcached.pid")))
    proc = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT)
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


def example_config(name: str) -> dict[str, Any]:
    """The example inventory's config keys for daemon NAME that need no inventory (no Jinja, no
    paths): intervals, pins, sensor ids, rules."""
    def plain(value: Any) -> bool:
        if isinstance(value, dict):
            return all(plain(v) for v in value.values())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return not (isinstance(value, str) and ("{{" in value or value.startswith("/")))
    entries = yaml.safe_load(INVENTORY.read_text())["pihub_daemons"]
    config = next((e.get("config") or {} for e in entries if e["name"] == name), {})
    return {k: v for k, v in config.items()
            if plain(v) and not k.endswith(("_file", "_dir", "_url"))}


def daemon_config(module: str, port: int, work: Path, python: str, vm_url: str,
                  rrd_dir: Path, rrd_sock: Path, as_example: str | None = None,
                  settings: dict[str, Any] | None = None) -> Path:
    """AS_EXAMPLE (a daemon's name): with the example inventory's settings for it and its
    default log level (the benches of memory leave both out: log level warning)."""
    path = fp.config_for(module, port, work, python)
    data = yaml.safe_load(path.read_text())
    if as_example:
        data.pop("log_level", None)
        data.update(example_config(as_example))
        data.update(fp.OFF_PI.get(module, {}))  # simulated GPIO
        if module.endswith(".sensor_system"):  # this machine's own /proc and /sys, as on a Pi
            example = yaml.safe_load(subprocess.run(
                [python, "-m", module, "--print-config-example"], capture_output=True,
                text=True, check=True).stdout)
            data.update({k: v for k, v in example.items() if k.endswith("_root")})
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
    data.update(settings or {})
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




def start_stack(work: Path, python: str, *, daemons: list[str] | None = None,
                env: dict[str, str] | None = None, unit_env: bool = True,
                vm_args: list[str] | None = None, vm_env: dict[str, str] | None = None,
                overrides: dict[str, dict[str, Any]] | None = None, as_example: bool = False,
                settings: dict[str, dict[str, Any]] | None = None,
                mosquitto_log_file: bool = False,
                output: Callable[[str], int | IO[bytes]] | None = None,
                procs: dict[str, subprocess.Popen[bytes]] | None = None
                ) -> dict[str, subprocess.Popen[bytes]]:
    """Start the stack in WORK and wait for every daemon's READY=1; the processes by name, in
    PROCS (given by the caller, so that it can stop what started when this fails). DAEMONS: the
    example's daemons to start (default all); OVERRIDES: role variables by role ("mosquitto",
    "timeseries", "rrd"); SETTINGS: config keys by daemon; AS_EXAMPLE: the example inventory's
    settings and default log level; OUTPUT: what a process's stdout and stderr go to, by name
    (default: services to /dev/null, each daemon to WORK/<name>/daemon.log)."""
    procs = {} if procs is None else procs
    overrides = overrides or {}
    out = output or (lambda name: subprocess.DEVNULL)
    procs["mosquitto"], port = start_mosquitto(work, overrides.get("mosquitto"),
                                               mosquitto_log_file)
    procs["victoria-metrics"], vm_url = start_victoria(
        work, vm_args or [], vm_env or {}, overrides.get("timeseries"), out("victoria-metrics"))
    procs["rrdcached"], rrd_dir, rrd_sock = start_rrdcached(work, overrides.get("rrd"),
                                                            out("rrdcached"))
    names = fp.daemons()
    sock_path = work / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(1)
    pending = []
    for entry in example_daemons():
        name = entry["name"]
        if daemons is not None and name not in daemons:
            continue
        dwork = work / name
        dwork.mkdir()
        (dwork / "state").mkdir()
        cfg = daemon_config(names[name], port, dwork, python, vm_url, rrd_dir, rrd_sock,
                            name if as_example else None, (settings or {}).get(name))
        exe, denv = fp.run_env(python, {**(unit_environment(name) if unit_env else {}),
                                        **(env or {}), "NOTIFY_SOCKET": str(sock_path),
                                        "STATE_DIRECTORY": str(dwork / "state")})
        if output is None:
            with open(dwork / "daemon.log", "wb") as log:
                procs[name] = subprocess.Popen([exe, "-m", names[name], "--config", str(cfg)],
                                               stdout=log, stderr=subprocess.STDOUT, env=denv,
                                               cwd=dwork)
        else:
            procs[name] = subprocess.Popen([exe, "-m", names[name], "--config", str(cfg)],
                                           stdout=output(name), stderr=subprocess.STDOUT,
                                           env=denv, cwd=dwork)
        pending.append(name)
    # READY=1 comes from the daemon's main pid; the datagram does not say which, so count
    # them: every daemon sends exactly one.
    deadline = time.monotonic() + 60
    ready = 0
    with sock:
        while ready < len(pending) and time.monotonic() < deadline:
            try:
                if "READY=1" in sock.recv(4096).decode():
                    ready += 1
            except TimeoutError:
                pass
            dead = [n for n in pending if procs[n].poll() is not None]
            if dead:
                log = work / dead[0] / "daemon.log"
                tail = log.read_text()[-300:] if log.exists() else ""
                raise SystemExit(f"exited before READY: {dead} {tail}")
    if ready < len(pending):
        raise SystemExit(f"only {ready} of {len(pending)} daemons READY within 60 s")
    return procs


def stop(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(15)
    for proc in procs.values():
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
