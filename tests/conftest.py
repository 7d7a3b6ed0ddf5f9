"""Shared fixtures: a real Mosquitto per test, an MQTT observer, daemons as real processes, and
web sites on loopback serving fixture files."""

from __future__ import annotations

import importlib
import json
import mimetypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from notify_pushover_helpers import FakePushover
from paho.mqtt.enums import CallbackAPIVersion
from pihub.config import ConfigError, load_file
from pihub.daemon import Daemon
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from testkit.loopback import VictoriaMetrics, free_port, wait_until

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "files" / "daemons" / "src"
PROBE = REPO / "tests" / "fixtures" / "probe"  # pihub_probe: a test-only daemon

__all__ = ["free_port", "wait_until"]  # from testkit, for the test modules


# --------------------------------------------------------------------------- Mosquitto


class Broker:
    """A real Mosquitto on a loopback port; can be stopped and started again on that port."""

    def __init__(self, workdir: Path, conf_extra: str = "") -> None:
        self.exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.port = free_port()
        self.host = "127.0.0.1"
        self.workdir = workdir
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {workdir}/\n"
            "autosave_interval 1\n"
            "max_queued_messages 100000\n"
            # every PUBLISH a client sends is logged with its client id and topic: the
            # start_daemon fixture checks each daemon's against what it declares
            "log_type all\n"
            # as root, mosquitto would switch to its own user, which cannot enter pytest's tmp
            + ("user root\n" if os.geteuid() == 0 else "")
            + conf_extra
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=log,
                                         stderr=subprocess.STDOUT)
        wait_until(self._accepts, 10, f"mosquitto on port {self.port}")

    def _accepts(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"mosquitto exited: {self.log.read_text()[-2000:]}")
        try:
            with socket.create_connection((self.host, self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # saves persistence (retained, sessions)
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    workdir = tmp_path / "mosquitto"
    workdir.mkdir()
    b = Broker(workdir)
    b.start()
    yield b
    b.stop()


@pytest.fixture
def topic_root() -> str:
    return "t" + uuid.uuid4().hex[:10]


# --------------------------------------------------------------------------- observer client


@dataclass
class Seen:
    topic: str
    payload: bytes
    retain: bool
    at: float

    def json(self) -> Any:
        return json.loads(self.payload)

    @property
    def text(self) -> str:
        return self.payload.decode()


@dataclass
class Observer:
    """An MQTT client that records what it sees, for assertions with deadlines."""

    broker: Broker
    client: mqtt.Client
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def messages(self, topic: str | None = None) -> list[Seen]:
        with self.lock:
            return [m for m in self.seen if topic is None or mqtt.topic_matches_sub(topic,
                                                                                    m.topic)]

    def wait_for(self, topic: str, predicate: Callable[[Seen], bool] = lambda m: True,
                 timeout: float = 10.0, count: int = 1) -> list[Seen]:
        def found() -> list[Seen] | None:
            hits = [m for m in self.messages(topic) if predicate(m)]
            return hits if len(hits) >= count else None

        return wait_until(found, timeout, f"{count} message(s) on {topic}")  # type: ignore[no-any-return]

    def subscribe(self, topic: str, qos: int = 1) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *a: done.set()
        self.client.subscribe(topic, qos)
        assert done.wait(5), f"no SUBACK for {topic}"

    def publish(self, topic: str, payload: Any, retain: bool = False, qos: int = 1) -> None:
        if not isinstance(payload, bytes | str):
            payload = json.dumps(payload)
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(5)

    def clear(self) -> None:
        with self.lock:
            self.seen.clear()


@pytest.fixture
def observe(broker: Broker) -> Iterator[Callable[..., Observer]]:
    """``observe("root/#")`` → a connected Observer subscribed to that filter."""
    clients: list[mqtt.Client] = []

    def make(*filters: str, client_id: str = "", clean: bool = True) -> Observer:
        client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             client_id=client_id or f"obs-{uuid.uuid4().hex[:8]}",
                             clean_session=clean)
        obs = Observer(broker, client)

        def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
            with obs.lock:
                obs.seen.append(Seen(msg.topic, msg.payload, bool(msg.retain), time.time()))

        connected = threading.Event()
        client.on_connect = lambda *a: connected.set()
        client.on_message = on_message
        client.connect(broker.host, broker.port)
        client.loop_start()
        assert connected.wait(5), "observer could not connect"
        clients.append(client)
        for f in filters:
            obs.subscribe(f)
        return obs

    yield make
    for c in clients:
        c.disconnect()
        c.loop_stop()


# --------------------------------------------------------------------------- daemons


class DaemonProcess:
    """A daemon started as ``python -m pihub.daemons.<module> --config FILE``, its output in a file.

    ``module`` is a pihub module (``sensor_system``) or a test module named ``pihub_*``.
    """

    def __init__(self, module: str, config_file: Path, log_file: Path,
                 env: dict[str, str] | None = None) -> None:
        self.module = module
        self.config_file = config_file
        self.log_file = log_file
        inherited = {k: v for k, v in os.environ.items()
                     if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM")}
        full_env = {**inherited, "PYTHONPATH": f"{SRC}:{PROBE}", "PYTHONUNBUFFERED": "1",
                    **(env or {})}
        target = module if module.startswith("pihub_") else f"pihub.daemons.{module}"
        with open(log_file, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", target, "--config", str(config_file)],
                stdout=log, stderr=subprocess.STDOUT, env=full_env,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log_file.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 10.0) -> None:
        wait_until(lambda: text in self.output(), timeout, f"{text!r} in the daemon's log")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(
                    f"daemon ignored SIGTERM:\n{self.output()[-3000:]}") from None
        return self.proc.returncode

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return path


@pytest.fixture
def start_daemon(tmp_path: Path, broker: Broker, topic_root: str
                 ) -> Iterator[Callable[..., DaemonProcess]]:
    """``start_daemon("sensor_system", {...})`` → a running daemon against the test broker.

    The config gets the broker, the test's topic root and a short heartbeat unless given.
    """
    procs: list[DaemonProcess] = []

    def start(module: str, config: dict[str, Any] | None = None, *,
              env: dict[str, str] | None = None, name: str | None = None) -> DaemonProcess:
        cfg: dict[str, Any] = {"mqtt": {"host": broker.host, "port": broker.port,
                                        "reconnect_min": 0.2, "reconnect_max": 1},
                               "topic_root": topic_root, "heartbeat_interval": 1,
                               "log_level": "debug"}
        for key, value in (config or {}).items():
            if key == "mqtt":
                cfg["mqtt"] = {**cfg["mqtt"], **value}
            else:
                cfg[key] = value
        tag = name or f"{module}-{len(procs)}"
        path = write_config(tmp_path / f"{tag}.yml", cfg)
        proc = DaemonProcess(module, path, tmp_path / f"{tag}.log", env)
        procs.append(proc)
        return proc

    yield start
    for p in procs:
        if p.proc.poll() is None:
            p.kill()
    check_published_as_declared(broker, procs)


_PUBLISH_LINE = re.compile(r"Received PUBLISH from (\S+) \(d\d, q\d, r\d, m\d+, '(.*)', \.\.\. "
                           r"\(\d+ bytes\)\)$")


def declared_filters(module: str, config_file: Path) -> tuple[str, list[str]] | None:
    """The daemon's MQTT client id and the filters it may publish on, from its config file:
    its own subtree, what ``published_topics`` declares and the outside-root topics it writes
    (what ``--print-acl`` prints and the broker's ACL grants); None for a config that does not
    load (the daemon never ran)."""
    if module.startswith("pihub_") and str(PROBE) not in sys.path:
        sys.path.append(str(PROBE))  # the test-only daemons
    target = module if module.startswith("pihub_") else f"pihub.daemons.{module}"
    found = importlib.import_module(target)
    # the module's Daemon subclass (its own, not one it imports)
    cls = next(c for c in vars(found).values() if isinstance(c, type) and issubclass(c, Daemon)
               and c.__module__ == found.__name__)
    try:
        config = load_file(cls.config_class, config_file)
    except ConfigError:
        return None
    root = config.topic_root
    client_id = config.mqtt.client_id or f"pihub-{cls.name}-{socket.gethostname()}"
    return client_id, [f"{root}/{cls.name}/#",
                       *(f"{root}/{topic}" for topic in cls.published_topics(config)),
                       *(topic for topic, access in cls.outside_root_topics(config)
                         if "write" in access)]


def check_published_as_declared(broker: Broker, procs: list[DaemonProcess]) -> None:
    """Every topic a test's daemons published (the broker's log, by client id) is in their own
    subtree or declared by their ``published_topics``: a daemon that publishes more than it
    declares would be silently refused by the ACL the roles write from the declaration."""
    allowed: dict[str, list[str]] = {}
    for proc in procs:
        found = declared_filters(proc.module, proc.config_file)
        if found is not None:
            allowed.setdefault(found[0], []).extend(found[1])
    undeclared = set()
    for line in broker.log.read_text(errors="replace").splitlines():
        match = _PUBLISH_LINE.search(line)
        if match and match[1] in allowed and not any(
                mqtt.topic_matches_sub(f, match[2]) for f in allowed[match[1]]):
            undeclared.add((match[1], match[2]))
    assert not undeclared, (f"published on topics its published_topics() does not declare: "
                            f"{sorted(undeclared)} (declared: {allowed})")


def run_cli(module: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pihub.daemons.<module> ARGS`` to completion (``--check-config`` &c.)."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run([sys.executable, "-m", f"pihub.daemons.{module}", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- web sites


class Site:
    """A web site on 127.0.0.1 whose answers a test can change while a daemon polls it.

    A path answers what :meth:`set` or :meth:`serve_file` gave it last, 404 until then; an
    answer with a ``delay`` is held back that long (released when the test ends). ``hits``
    counts the requests per path, ``agents`` records their User-Agent headers.
    """

    def __init__(self, server: HTTPServer) -> None:
        self.base = server.url_for("/").rstrip("/")
        self.routes: dict[str, tuple[int, bytes, float, str]] = {}
        self.hits: Counter[str] = Counter()
        self.agents: list[str] = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        server.expect_request(re.compile(r"/.*")).respond_with_handler(self.handle)

    def url(self, path: str) -> str:
        return self.base + path

    def set(self, path: str, body: bytes, status: int = 200, delay: float = 0.0,
            content_type: str = "application/json") -> None:
        with self.lock:
            self.routes[path] = (status, body, delay, content_type)

    def serve_file(self, path: str, file: Path, status: int = 200, delay: float = 0.0) -> str:
        """Answer ``path`` with ``file``, typed by its suffix (text as UTF-8); its URL."""
        content_type = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        if content_type.startswith("text/"):
            content_type += "; charset=utf-8"
        self.set(path, file.read_bytes(), status, delay, content_type)
        return self.url(path)

    def handle(self, request: Request) -> Response:
        with self.lock:
            self.hits[request.path] += 1
            self.agents.append(request.headers.get("User-Agent", ""))
            status, body, delay, content_type = self.routes.get(
                request.path, (404, b"not found", 0.0, "text/plain"))
        if delay:
            self.release.wait(delay)
        return Response(body, status=status, content_type=content_type)


@pytest.fixture
def site() -> Iterator[Site]:
    """A :class:`Site` on a free loopback port, for the test's duration."""
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.start()
    s = Site(server)
    yield s
    s.release.set()
    server.clear()
    server.stop()


# --------------------------------------------------------------------------- services


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[VictoriaMetrics]:
    workdir = tmp_path / "vm"
    workdir.mkdir()
    db = VictoriaMetrics(workdir)
    db.start()
    yield db
    db.stop()


@pytest.fixture
def pushover() -> Iterator[FakePushover]:
    fake = FakePushover()
    fake.start()
    yield fake
    fake.close()
