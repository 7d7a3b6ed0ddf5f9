"""The daemon lifecycle every pihub daemon shares.

A daemon subclasses :class:`Daemon`, names itself, declares its config class, and fills in
``setup()`` (subscribe, schedule) and, if it holds resources, ``shutdown()``. Everything else
- command line, config validation, logging, MQTT, metadata events, systemd notification,
signals - happens here::

    class SystemSensor(Daemon[Config]):
        name = "sensor-system"
        config_class = Config

        def setup(self) -> None:
            self.every(self.config.interval, self.read)

    main = SystemSensor.main   # the console script pihub-sensor-system

The systemd watchdog sees the whole daemon. WATCHDOG=1 is sent by a task of the main loop (so a
stuck main loop stops it) every half ``WatchdogSec`` (W), and only while the bus's MQTT handling
makes progress (:meth:`pihub.bus.Bus.stalled`, with ``stall_after`` = W/2): a handler stuck for
more than W/2, or a network thread that went silent, stops the pings, and systemd kills and
restarts the daemon at most W later, so within 1.5 W of the stall's start. A broker outage is
not a stall: the reconnect loop's attempts are progress. The stall is logged once, and shown in
``systemctl status`` (STATUS=). Without a watchdog the same check runs every half heartbeat
interval, with ``stall_after`` = ``heartbeat_interval``, and only logs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, ClassVar, Generic, TypeVar

from . import __version__, logs
from .bus import Bus, Counters, Handler, Message
from .config import EX_CONFIG, BaseConfig, ConfigError, as_dict, example_text, load_file
from .logs import clip
from .systemd import Notifier
from .topics import (
    RESERVED,
    Measurement,
    Topics,
    encode_json,
    measurement_payload,
    parse_measurement,
)

C = TypeVar("C", bound=BaseConfig)


@dataclass
class _Task:
    name: str
    interval: float
    fn: Callable[[], None]
    due: float


def state_directory(daemon: str, configured: str | None = None) -> Path:
    """Where a daemon keeps state (spools, queues): the configured directory, else systemd's
    ``$STATE_DIRECTORY`` (``StateDirectory=pihub-<name>`` in its unit), else the same path
    systemd would give, ``/var/lib/pihub-<name>``."""
    if configured:
        return Path(configured)
    given = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(given or f"/var/lib/pihub-{daemon}")


def rss_kb() -> int:
    """Resident set size of this process, in kB (0 where /proc is missing)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Daemon(Generic[C]):
    #: unit name without ``pihub-`` and ``.service``
    name: ClassVar[str] = ""
    config_class: ClassVar[type[BaseConfig]] = BaseConfig
    #: one-line description, shown by ``--help``
    description: ClassVar[str] = ""
    #: keep the MQTT session (and QoS 1 messages) across restarts: storage daemons
    persistent_session: ClassVar[bool] = False
    #: acknowledge QoS 1 messages only when the handler calls ``message.ack()``
    manual_ack: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name in RESERVED:  # contract §2: ``<root>/host/...`` is a satellite's mirror
            raise TypeError(f"a daemon may not be called {cls.name!r}: a reserved first "
                            "segment of the topics")

    def __init__(self, config: C, config_path: str | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.log = logging.getLogger(f"pihub.{self.name}")
        self.topics = Topics(config.topic_root)
        self.host = socket.gethostname()
        self.counters = Counters()
        self.notifier = Notifier()
        self.stopping = threading.Event()
        self._wake = threading.Event()
        self._reload_requested = False
        self._ready_sent = False
        self._ready_lock = threading.Lock()
        self._stall_logged = False
        self._tasks: list[_Task] = []
        self._started = time.monotonic()
        self._refused_lock = threading.Lock()
        self._refused_since_log = 0
        self._refused_log_at = 0.0
        self.bus = Bus(
            config.mqtt,
            client_id=config.mqtt.client_id or f"pihub-{self.name}-{self.host}",
            status_topic=self.topics.status(self.name),
            counters=self.counters,
            persistent_session=self.persistent_session,
            manual_ack=self.manual_ack,
            on_ready=self._on_bus_ready,
        )

    # ------------------------------------------------------------------ hooks for daemons

    def setup(self) -> None:
        """Subscribe and schedule; called once, before the first connection."""

    def shutdown(self) -> None:
        """Release resources (outputs to safe state, flush spools); called once at stop."""

    def reload(self, new: C, changed: set[str]) -> set[str]:
        """Apply a new config's daemon-specific keys; return the keys it applied.

        The base class applies ``log_level`` and ``heartbeat_interval`` itself; a key left
        unapplied is logged as needing a restart.
        """
        return set()

    def heartbeat_extra(self) -> dict[str, Any]:
        """Extra fields for the metadata events (e.g. a spool's size)."""
        return {}

    @classmethod
    def published_topics(cls, config: C) -> list[str]:
        """Every topic (or MQTT filter) this daemon publishes outside its own subtree
        ``<root>/<name>/#``, relative to ``topic_root``, as ``config`` determines them: exact
        topics wherever the config names them (``data/hall/heater``), a filter only where it
        cannot (``data/<location>/+``). The broker's ACL is written from it (``--print-acl``,
        docs/contract.md section 2): a daemon may write nothing else outside its subtree."""
        return []

    @classmethod
    def outside_root_topics(cls, config: C) -> list[tuple[str, str]]:
        """Topics (or filters) *outside* ``topic_root`` this daemon uses, absolute, each with
        the access it needs (``read``, ``write`` or ``readwrite``): Home Assistant's discovery
        prefix, say. ``--print-acl`` prints them as ``outside_root`` (topic and access, the
        shape of an inventory entry's ``mqtt_acl``), for the ACL to grant them as they are."""
        return []

    def publishes(self) -> list[str]:
        """Every filter this daemon may publish on outside its own subtree, absolute: its
        ``published_topics`` under the root and its outside-root topics it writes. Sent as
        ``publishes`` in every metadata event, so that a reader can tell which daemon a topic
        belongs to (contract section 2)."""
        cls = type(self)
        inside = (f"{self.config.topic_root}/{t}" for t in cls.published_topics(self.config))
        outside = (t for t, access in cls.outside_root_topics(self.config)
                   if "write" in access)
        return sorted({*inside, *outside})

    # ------------------------------------------------------------------ helpers for daemons

    def every(self, interval: float, fn: Callable[[], None], *, first_in: float = 0.0,
              name: str | None = None) -> None:
        """Run ``fn`` in the main thread every ``interval`` seconds, first after ``first_in``."""
        self._tasks.append(
            _Task(name or fn.__name__, interval, fn, time.monotonic() + first_in)
        )
        self._wake.set()

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        self.bus.subscribe(topic_filter, handler, qos)

    def subscribe_data(self, handler: Callable[[Measurement, Message], None],
                       qos: int = 1) -> None:
        """Subscribe to ``<root>/data/#``; the handler gets checked measurements only."""

        def on_data(msg: Message) -> None:
            handler(parse_measurement(self.topics, msg.topic, msg.payload), msg)

        self.bus.subscribe(self.topics.sub("data", "#"), on_data, qos)

    def publish_json(self, topic: str, payload: Any, *, retain: bool = True,
                     qos: int = 1) -> None:
        self.bus.publish(topic, encode_json(payload), qos=qos, retain=retain)

    def publish_measurement(self, location: str, quantity: str, value: float | int | bool,
                            unit: str, ts: float | None = None, **extra: Any) -> None:
        """Publish one measurement, retained, on ``<root>/data/<location>/<quantity>``."""
        self.publish_json(
            self.topics.data(location, quantity), measurement_payload(value, unit, ts, **extra)
        )

    def count(self, name: str, n: int = 1) -> None:
        self.counters.inc(name, n)

    def refuse_new_series(self, topic: str, max_series: int) -> None:
        """A message of a new series beyond a storage daemon's ``max_series``: counted in
        ``rejected`` and ``series_refused``; one warning per heartbeat interval sums them up, so a
        flood of new topics costs no disk and no log (contract section 6)."""
        self.count("rejected")
        self.count("series_refused")
        with self._refused_lock:
            self._refused_since_log += 1
            now = time.monotonic()
            if now < self._refused_log_at:
                return
            self._refused_log_at = now + self.config.heartbeat_interval
            refused, self._refused_since_log = self._refused_since_log, 0
        self.log.warning("rejected %d message(s) of new series, the last on %s: max_series=%d "
                         "series are kept already (next such line in %g s at the earliest)",
                         refused, clip(topic), max_series, self.config.heartbeat_interval)

    # ------------------------------------------------------------------ lifecycle

    def meta(self, event: str) -> dict[str, Any]:
        return {
            "event": event,
            "daemon": self.name,
            "host": self.host,
            "pid": os.getpid(),
            "version": __version__,
            "ts": round(time.time(), 3),
            "uptime_s": round(time.monotonic() - self._started, 3),
            "interval_s": self.config.heartbeat_interval,
            "rss_kb": rss_kb(),
            "counters": self.counters.snapshot(),
            "publishes": self.publishes(),
            **self.heartbeat_extra(),
        }

    def _publish_meta(self, event: str) -> None:
        self.bus.publish(self.topics.meta(self.name), encode_json(self.meta(event)), qos=1,
                         retain=True)

    def _heartbeat(self) -> None:
        self._publish_meta("heartbeat")

    def _watchdog(self) -> None:
        """Feed systemd's watchdog if the MQTT side made progress too (module docstring)."""
        why = self.bus.stalled()
        if why is None:
            if self._stall_logged:
                self._stall_logged = False
                self.log.warning("MQTT handling is moving again")
                self.notifier.status("MQTT handling is moving again")
            if self.notifier.watchdog_interval:
                self.notifier.watchdog()
            return
        if not self._stall_logged:
            self._stall_logged = True
            self.log.error("MQTT handling is stalled: %s; %s", why,
                           "no more WATCHDOG=1 to systemd, which will restart the daemon"
                           if self.notifier.watchdog_interval else
                           "no systemd watchdog here to restart the daemon")
            self.notifier.status(f"MQTT handling is stalled: {why}")

    def _on_bus_ready(self) -> None:
        with self._ready_lock:
            if self._ready_sent:
                return
            self._ready_sent = True
        self.log.info("ready: connected and subscribed (%.3f s after start)",
                      time.monotonic() - self._started)
        self.notifier.ready(f"connected to {self.config.mqtt.host}:{self.config.mqtt.port}")

    def _signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._reload_requested = True
        else:
            self.stopping.set()
        self._wake.set()

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._signal)
        self.log.info("pihub-%s %s starting (pid %d)", self.name, __version__, os.getpid())
        self.setup()
        self._publish_meta("starting")
        self.every(self.config.heartbeat_interval, self._heartbeat,
                   first_in=self.config.heartbeat_interval, name="heartbeat")
        window = self.notifier.watchdog_interval
        self.bus.stall_after = window / 2 if window else self.config.heartbeat_interval
        self.every(self.bus.stall_after / (1 if window else 2), self._watchdog, name="watchdog")
        self.bus.start()
        try:
            self._loop()
        finally:
            self._stop()
        return 0

    def _loop(self) -> None:
        while not self.stopping.is_set():
            if self._reload_requested:
                self._reload_requested = False
                self._reload()
            now = time.monotonic()
            for task in list(self._tasks):
                if task.due <= now and not self.stopping.is_set():
                    self._run_task(task)
                    # fixed cadence; skip missed beats rather than bursting after a stall
                    task.due += task.interval
                    if task.due <= now:
                        task.due = now + task.interval
            self._wake.clear()
            if self.stopping.is_set() or self._reload_requested:
                continue
            next_due = min((t.due for t in self._tasks), default=now + 60)
            self._wake.wait(max(0.0, next_due - time.monotonic()))

    def _run_task(self, task: _Task) -> None:
        try:
            task.fn()
        except Exception:
            self.counters.inc("errors")
            self.log.exception("%s failed", task.name)

    def _stop(self) -> None:
        self.log.info("stopping")
        self.notifier.stopping()
        try:
            self.shutdown()
        except Exception:
            self.counters.inc("errors")
            self.log.exception("shutdown failed")
        self._publish_meta("stopping")
        self.bus.stop()
        self.log.info("stopped")

    def _reload(self) -> None:
        if not self.config_path:
            self.log.warning("SIGHUP ignored: no config file to re-read")
            return
        try:
            new = load_file(type(self.config), self.config_path)
        except ConfigError as exc:
            self.log.error("SIGHUP: %s: %s; keeping the running config", self.config_path, exc)
            return
        old_d, new_d = as_dict(self.config), as_dict(new)
        changed = {k for k in new_d if new_d[k] != old_d.get(k)}
        if not changed:
            self.log.info("SIGHUP: config unchanged")
            return
        applied = self.reload(new, changed)  # type: ignore[arg-type]
        if "log_level" in changed:
            logs.set_level(new.log_level)
            applied.add("log_level")
        if "heartbeat_interval" in changed:
            for task in self._tasks:
                if task.name == "heartbeat":
                    task.interval = new.heartbeat_interval
                    task.due = time.monotonic() + new.heartbeat_interval
            applied.add("heartbeat_interval")
        keep = changed - applied
        # keys that were not applied keep their running value, so config reflects reality
        self.config = dataclasses.replace(
            self.config, **{k: getattr(new, k) for k in applied}
        )
        self.log.info("SIGHUP: applied %s", ", ".join(sorted(applied)) or "nothing")
        if keep:
            self.log.warning("SIGHUP: %s changed; restart pihub-%s to apply",
                             ", ".join(sorted(keep)), self.name)

    # ------------------------------------------------------------------ command line

    @classmethod
    def main(cls, argv: list[str] | None = None) -> int:
        prog = f"pihub-{cls.name}"
        parser = argparse.ArgumentParser(prog=prog, description=cls.description or None)
        parser.add_argument("--config", metavar="FILE", default=f"/etc/pihub/{cls.name}.yml",
                            help="config file (default: %(default)s)")
        parser.add_argument("--check-config", metavar="FILE",
                            help="validate FILE, print what is wrong, exit 0 or 78")
        parser.add_argument("--print-config-example", action="store_true",
                            help="print a complete, commented example config")
        parser.add_argument("--print-acl", metavar="FILE",
                            help="validate FILE like --check-config, then print as JSON the "
                                 "topics the daemon publishes outside its own subtree "
                                 "(relative to topic_root; those outside the root, absolute, "
                                 "as outside_root), exit 0 or 78")
        args = parser.parse_args(argv)

        if args.print_config_example:
            sys.stdout.write(example_text(cls.config_class, cls.name))
            return 0
        if args.check_config:
            try:
                load_file(cls.config_class, args.check_config)
            except ConfigError as exc:
                print(f"{prog}: {args.check_config}: {exc}", file=sys.stderr)
                return EX_CONFIG
            print(f"{prog}: {args.check_config}: OK")
            return 0
        if args.print_acl:
            try:
                checked = load_file(cls.config_class, args.print_acl)
            except ConfigError as exc:
                print(f"{prog}: {args.print_acl}: {exc}", file=sys.stderr)
                return EX_CONFIG
            declared = sorted(set(cls.published_topics(checked)))  # type: ignore[arg-type]
            acl: dict[str, Any] = {"topic_root": checked.topic_root, "write": declared}
            outside = sorted(set(cls.outside_root_topics(checked)))  # type: ignore[arg-type]
            if outside:
                acl["outside_root"] = [{"topic": t, "access": a} for t, a in outside]
            print(json.dumps(acl))
            return 0

        try:
            config = load_file(cls.config_class, args.config)
        except ConfigError as exc:
            print(f"{prog}: config error in {args.config}: {exc}", file=sys.stderr)
            return EX_CONFIG
        logs.setup(config.log_level, cls.name)
        try:
            daemon = cls(config, args.config)  # type: ignore[arg-type]
        except ConfigError as exc:
            logging.getLogger(f"pihub.{cls.name}").error("config error in %s: %s",
                                                         args.config, exc)
            return EX_CONFIG
        return daemon.run()
