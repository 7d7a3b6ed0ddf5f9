"""pihub-homeassistant: announce pihub's series, outputs, daemons and boards to Home Assistant.

Home Assistant's MQTT discovery: for every thing of the hub this daemon publishes one retained
config on ``<discovery_prefix>/<component>/<node_id>/<object_id>/config``; Home Assistant then
reads pihub's own retained topics directly (this daemon relays no value):

* a measurement series ``<root>/data/<location>/<quantity>``: a ``sensor`` (device and state
  class from its unit, ``expire_after`` from its usual interval); unit ``bool``: a
  ``binary_sensor``, or a ``switch`` for a sensor-gpio output (``kind: output``), switched on
  ``<root>/cmd/sensor-gpio/<output>``;
* a daemon (``<root>/<daemon>/status``): a connectivity ``binary_sensor``;
* a display board item (``<root>/display/<board>/<item>``): a ``sensor`` with the payload as
  attributes.

A satellite's daemons, mirrored onto the central as ``<root>/host/<host>/<daemon>/status|meta``
(contract §2, "Fleet"), are read too: their entities (health, and the series and boards they
publish) belong to a device of their own per satellite (``pihub <host>``), with unique ids that
include the host (``host_<host>_status_<daemon>``); their availability is the mirrored status and
a satellite's output is switched on ``<root>/host/<host>/cmd/sensor-gpio/<output>``. A single
hub's configs do not change.

Each config's ``availability`` is the status of the daemon that publishes the topic: the
daemon whose ``publishes`` (its metadata, contract section 2) has the most specific filter
matching it. A series whose retained message is cleared, a daemon whose status is cleared or
that has been offline for ``forget_after``, and what they published, lose their configs (an
empty retained message). When Home Assistant says ``online`` on its birth topic, every config is
published again. Configs left on the broker by an earlier run that nothing backs any more are
removed ``cleanup_after`` seconds after start.

The MQTT handlers only update the inventory; a 1-second task in the main thread publishes what
changed (so the burst of retained messages at start costs one config per entity, not one per
message).
"""

from __future__ import annotations

import collections
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from pihub import __version__
from pihub.bus import Message
from pihub.config import BaseConfig, setting
from pihub.daemon import Daemon
from pihub.logs import clip
from pihub.topics import (
    HOST,
    SEGMENT,
    Reject,
    decode_json,
    encode_json,
    identity,
    parse_measurement,
    shown,
    split_identity,
)

from . import discovery
from .discovery import Announce, Node

#: first-level topics under the root that are not daemons (contract section 2)
NOT_DAEMONS = frozenset({"data", "display", "notify", "cmd", "sim"})
#: a metadata event or a board item: bytes read (the monitor's limit)
MAX_RECORD_BYTES = 16384
#: daemons known at most (the monitor's limit)
MAX_DAEMONS = 256
#: filters of one daemon's ``publishes`` kept
MAX_PUBLISHES = 256
#: characters of a host name or a version taken from a metadata event
MAX_NAME = 64
#: gaps between a series' measurements kept; its usual interval is the longest of them (an
#: input that changes now and then is republished every sensor-gpio ``interval``)
GAPS = 8
#: an expire_after is published again only when it moved by more than this share
EXPIRE_SLACK = 0.25
#: seconds between two looks at what changed
FLUSH_EVERY = 1.0
#: seconds between two recomputations when nothing changed (daemons forgotten with time)
RECHECK_EVERY = 60.0
COMPONENTS = ("sensor", "binary_sensor", "switch")


@dataclass(kw_only=True)
class Config(BaseConfig):
    discovery_prefix: str = setting(
        "homeassistant", "Home Assistant's discovery prefix (its MQTT integration's setting).",
        pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$",
    )
    birth_topic: str | None = setting(
        None, "Home Assistant's birth topic: 'online' there makes every config be published "
        "again; null means <discovery_prefix>/status.",
        pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$",
    )
    node_id: str | None = setting(
        None, "Node id of the discovery topics and prefix of every unique_id; null means "
        "topic_root with / as _. Keep it once Home Assistant knows the entities.",
        pattern=r"^[a-zA-Z0-9_-]{1,64}$",
    )
    expire_factor: float = setting(
        3.0, "A sensor's expire_after is this many times its usual interval (the longest of "
        "its last gaps, known from two gaps on); 0 = no expire_after.", min=0, max=100,
    )
    forget_after: float = setting(
        7 * 86400.0, "A daemon offline for this many seconds (by its last metadata event) "
        "loses its configs and those of what it publishes; 0 = never.", min=0,
    )
    cleanup_after: float = setting(
        10.0, "Seconds after start to remove configs an earlier run left that nothing "
        "backs any more (the broker's retained messages all arrive before).", min=1, max=3600,
    )
    max_entities: int = setting(
        1000, "Series, daemons (with health) and board items announced at most; one more is "
        "refused (logged, counted entities_refused).", min=1, max=100000,
    )
    health: bool = setting(True, "Announce every daemon's status as a connectivity sensor.")
    boards: bool = setting(True, "Announce display board items (pihub-display-*) as sensors.")

    @property
    def node(self) -> str:
        return self.node_id or self.topic_root.replace("/", "_")

    @property
    def birth(self) -> str:
        return self.birth_topic or f"{self.discovery_prefix}/status"


@dataclass
class _Daemon:
    name: str  # its identity: <daemon>, or <daemon>@<host> for a satellite's
    status: str | None = None  # online, offline; None: not seen yet
    cleared: bool = False  # its status was deleted (an empty retained message)
    host: str | None = None
    version: str | None = None
    publishes: tuple[str, ...] = ()
    meta_ts: float = 0.0
    site: str | None = None  # the satellite it runs on; None: this hub


@dataclass
class _Series:
    location: str
    quantity: str
    unit: str
    kind: str | None
    ts: float
    gaps: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=GAPS))
    expire_after: int | None = None


@dataclass
class _Board:
    board: str
    item: str
    shape: str


def specificity(topic_filter: str) -> tuple[int, int, str]:
    """Sort key of a filter: exact before ``+`` before ``#``."""
    return topic_filter.count("#"), topic_filter.count("+"), topic_filter


class HomeAssistant(Daemon[Config]):
    name = "homeassistant"
    config_class = Config
    description = ("Announce pihub's series, GPIO outputs, daemons and display boards to Home "
                   "Assistant through its MQTT discovery.")

    @classmethod
    def outside_root_topics(cls, config: Config) -> list[tuple[str, str]]:
        # its configs (read too: those an earlier run left) and Home Assistant's birth
        return [*((f"{config.discovery_prefix}/{c}/{config.node}/#", "readwrite")
                  for c in COMPONENTS), (config.birth, "read")]

    def __init__(self, config: Config, config_path: str | None = None) -> None:
        super().__init__(config, config_path)
        self.node = Node(config.topic_root, config.discovery_prefix, config.node, __version__)
        self._lock = threading.Lock()
        self.daemons: dict[str, _Daemon] = {}
        self.series: dict[str, _Series] = {}  # data topic -> series
        self.boards: dict[str, _Board] = {}  # display topic -> item
        self._ids: dict[str, str] = {}  # object id -> the topic that has it
        self._owners: dict[str, str | None] = {}  # topic -> its daemon, until a publishes changes
        self._published: dict[str, bytes] = {}  # config topic -> payload last published
        self._leftovers: set[str] = set()  # config topics on the broker, not published by us
        self._dirty = True
        self._republish = False
        self._swept = False
        self._checked_at = 0.0
        self._refused_log_at = 0.0
        self._refused_since_log = 0

    # ------------------------------------------------------------------ lifecycle

    def setup(self) -> None:
        root, prefix, node = self.config.topic_root, self.config.discovery_prefix, self.node
        self.subscribe(f"{root}/+/status", self.on_status)
        self.subscribe(f"{root}/+/meta", self.on_meta)
        self.subscribe(f"{root}/{HOST}/+/+/status", self.on_status)
        self.subscribe(f"{root}/{HOST}/+/+/meta", self.on_meta)
        self.subscribe(f"{root}/data/#", self.on_data)
        if self.config.boards:
            self.subscribe(f"{root}/display/+/+", self.on_board)
        for component in COMPONENTS:
            self.subscribe(f"{prefix}/{component}/{node.node_id}/+/config", self.on_config)
        self.subscribe(self.config.birth, self.on_birth)
        self.every(FLUSH_EVERY, self.flush, first_in=FLUSH_EVERY)
        self.log.info("announcing to %s/+/%s/... (birth topic %s)", prefix, node.node_id,
                      self.config.birth)

    def heartbeat_extra(self) -> dict[str, Any]:
        with self._lock:
            return {"entities": len(self._published), "series": len(self.series),
                    "daemons": len(self.daemons), "boards": len(self.boards)}

    # ------------------------------------------------------------------ MQTT handlers

    def _daemon_name(self, topic: str) -> str | None:
        """The identity of the daemon whose status or meta ``topic`` is (``<daemon>``, or
        ``<daemon>@<host>`` for a satellite's mirror); None for no daemon's."""
        try:
            found = self.topics.daemon_topic(topic)
        except Reject:
            return None
        if found is None or found[1] in NOT_DAEMONS:
            return None
        return identity(found[1], found[0])

    def _daemon(self, name: str, topic: str) -> _Daemon | None:
        """The record of ``name``, made if new and within ``max_entities``."""
        found = self.daemons.get(name)
        if found is not None:
            return found
        if len(self.daemons) >= MAX_DAEMONS:
            self.count("rejected")
            self.count("entities_refused")
            self.log.warning("rejected %s: %d daemons are known already", clip(topic),
                             MAX_DAEMONS)
            return None
        daemon, site = split_identity(name)
        if self.config.health and not self._admit(topic, discovery.health_id(daemon, site)):
            return None
        found = self.daemons[name] = _Daemon(name, site=site)
        return found

    def on_status(self, msg: Message) -> None:
        name = self._daemon_name(msg.topic)
        if name is None:
            return
        text = msg.payload.decode("utf-8", "replace").strip()
        if text and text not in ("online", "offline"):
            raise Reject(f"status on {msg.topic}: expected online or offline, got {shown(text)}")
        with self._lock:
            record = self.daemons.get(name) if not text else self._daemon(name, msg.topic)
            if record is None:
                return
            record.status, record.cleared = (text or None), not text
            self._dirty = True
        if not text:
            self.log.info("pihub-%s is gone (its status was cleared)", name)

    def on_meta(self, msg: Message) -> None:
        name = self._daemon_name(msg.topic)
        if name is None or not msg.payload:
            return
        if len(msg.payload) > MAX_RECORD_BYTES:
            raise Reject(f"metadata on {msg.topic}: at most {MAX_RECORD_BYTES} bytes, got "
                         f"{len(msg.payload)}")
        data = decode_json(msg.payload, msg.topic)
        if not isinstance(data, dict):
            raise Reject(f"metadata on {msg.topic} must be a JSON object, got {shown(data)}")
        host, version, ts = data.get("host"), data.get("version"), data.get("ts")
        publishes = data.get("publishes", [])
        if not isinstance(host, str) or not host:
            raise Reject(f"metadata on {msg.topic}: 'host' must be a non-empty string, "
                         f"got {shown(host)}")
        if not isinstance(publishes, list) or not all(isinstance(p, str) for p in publishes):
            raise Reject(f"metadata on {msg.topic}: 'publishes' must be a list of topic "
                         f"filters, got {shown(publishes)}")
        if len(publishes) > MAX_PUBLISHES:
            self.count("rejected")
            self.log.warning("metadata on %s: %d filters in 'publishes', the first %d kept",
                             msg.topic, len(publishes), MAX_PUBLISHES)
        root = self.config.topic_root + "/"
        mine = tuple(sorted(p for p in publishes[:MAX_PUBLISHES] if p.startswith(root)))
        with self._lock:
            record = self._daemon(name, msg.topic)
            if record is None:
                return
            record.host = host[:MAX_NAME]
            record.version = version[:MAX_NAME] if isinstance(version, str) else None
            if isinstance(ts, int | float) and math.isfinite(ts):
                record.meta_ts = float(ts)
            if mine != record.publishes:
                record.publishes = mine
                self._owners.clear()
                self._dirty = True

    def on_data(self, msg: Message) -> None:
        if not msg.payload:  # the retained value was deleted: the series is gone
            with self._lock:
                if self.series.pop(msg.topic, None) is not None:
                    self._forget_id(msg.topic)
                    self._dirty = True
                    self.log.info("series %s is gone (its retained value was cleared)",
                                  msg.topic)
            return
        m = parse_measurement(self.topics, msg.topic, msg.payload)
        kind = m.extra.get("kind")
        kind = kind if isinstance(kind, str) and SEGMENT.match(kind) else None
        with self._lock:
            series = self.series.get(msg.topic)
            if series is None:
                if not self._admit(msg.topic, f"data_{m.location}_{m.quantity}"):
                    return
                self.series[msg.topic] = _Series(m.location, m.quantity, m.unit, kind, m.ts)
                self._dirty = True
                return
            if (m.unit, kind) != (series.unit, series.kind):
                series.unit, series.kind = m.unit, kind
                self._dirty = True
            if m.ts > series.ts:
                series.gaps.append(m.ts - series.ts)
                series.ts = m.ts
                self._dirty |= self._update_expire(series)

    def on_board(self, msg: Message) -> None:
        board_name, item = self.topics.split(msg.topic, "display", 2)
        if not msg.payload:
            with self._lock:
                if self.boards.pop(msg.topic, None) is not None:
                    self._forget_id(msg.topic)
                    self._dirty = True
            return
        if len(msg.payload) > MAX_RECORD_BYTES:
            raise Reject(f"board item on {msg.topic}: at most {MAX_RECORD_BYTES} bytes, got "
                         f"{len(msg.payload)}")
        data = decode_json(msg.payload, msg.topic)
        if not isinstance(data, dict):
            raise Reject(f"board item on {msg.topic} must be a JSON object, got {shown(data)}")
        shape = next((s for s in discovery.BOARD_SHAPES if s in data), None)
        if shape is None:
            raise Reject(f"board item on {msg.topic}: expected a key of "
                         f"{', '.join(discovery.BOARD_SHAPES)} (display-bikes, "
                         f"display-transport), got keys {shown(sorted(data)[:8])}")
        with self._lock:
            known = self.boards.get(msg.topic)
            if known is not None and known.shape == shape:
                return
            if known is None and not self._admit(msg.topic, f"display_{board_name}_{item}"):
                return
            self.boards[msg.topic] = _Board(board_name, item, shape)
            self._dirty = True

    def on_config(self, msg: Message) -> None:
        """A config under our node id: remember those an earlier run left, until the sweep."""
        with self._lock:
            if self._swept or msg.topic in self._published:
                return
            if not msg.payload:
                self._leftovers.discard(msg.topic)
            elif len(self._leftovers) < 2 * self.config.max_entities:
                self._leftovers.add(msg.topic)

    def on_birth(self, msg: Message) -> None:
        if msg.payload.decode("utf-8", "replace").strip() != "online":
            return
        with self._lock:
            self._republish = self._dirty = True
        self.log.info("Home Assistant is online (%s): publishing every config again",
                      msg.topic)

    # ------------------------------------------------------------------ bounds

    def _admit(self, topic: str, object_id: str) -> bool:
        """Under the lock: one more entity, if ``max_entities`` allows and ``object_id`` is not
        another topic's (``hall_a/temp`` and ``hall/a_temp`` would both be ``hall_a_temp``)."""
        holder = self._ids.get(object_id)
        if holder is not None and holder != topic:
            self.count("rejected")
            self.count("entities_refused")
            self.log.warning("rejected %s: its entity id %s is already %s's", clip(topic),
                             object_id, clip(holder))
            return False
        if holder is None and len(self._ids) >= self.config.max_entities:
            self.count("rejected")
            self.count("entities_refused")
            self._refused_since_log += 1
            now = time.monotonic()
            if now >= self._refused_log_at:
                self._refused_log_at = now + self.config.heartbeat_interval
                self.log.warning("refused %d new entit(ies), the last for %s: max_entities=%d "
                                 "are announced already (next such line in %g s at the "
                                 "earliest)", self._refused_since_log, clip(topic),
                                 self.config.max_entities, self.config.heartbeat_interval)
                self._refused_since_log = 0
            return False
        self._ids[object_id] = topic
        return True

    def _forget_id(self, topic: str) -> None:
        self._owners.pop(topic, None)
        for object_id in [o for o, t in self._ids.items() if t == topic]:
            del self._ids[object_id]

    def _update_expire(self, series: _Series) -> bool:
        """Under the lock: a new expire_after from the series' gaps; True if it moved."""
        if not self.config.expire_factor or len(series.gaps) < 2:
            return False
        new = max(1, math.ceil(self.config.expire_factor * max(series.gaps)))
        old = series.expire_after
        if old is not None and abs(new - old) <= EXPIRE_SLACK * old:
            return False
        series.expire_after = new
        return True

    # ------------------------------------------------------------------ announcing

    def _owner(self, topic: str) -> _Daemon | None:
        """The daemon whose most specific ``publishes`` filter matches ``topic`` (cached until
        a daemon's ``publishes`` changes)."""
        if topic not in self._owners:
            best: tuple[tuple[int, int, str], str] | None = None
            for record in self.daemons.values():
                for f in record.publishes:
                    if mqtt.topic_matches_sub(f, topic):
                        key = (specificity(f), record.name)
                        if best is None or key < best:
                            best = key
            self._owners[topic] = best[1] if best else None
        name = self._owners[topic]
        return self.daemons[name] if name else None

    def _gone(self, record: _Daemon, now: float) -> bool:
        if record.cleared:
            return True
        forget = self.config.forget_after
        return (record.status == "offline" and forget > 0 and record.meta_ts > 0
                and now - record.meta_ts > forget)

    def desired(self, now: float) -> dict[str, bytes]:
        """Under the lock: every config that should be on the broker, by topic."""
        hosts: dict[str, str] = {}
        for record in self.daemons.values():
            device = record.site or record.host  # a satellite's device: its host's segment
            if device and record.version:
                hosts[device] = max(hosts.get(device, ""), record.version)
        out: list[Announce] = []

        def place(owner: _Daemon | None) -> tuple[str, str | None, str | None] | None:
            """(host, version, daemon) for a topic's owner; None if the owner is gone."""
            if owner is not None and self._gone(owner, now):
                return None
            host = (owner.site or owner.host or self.host) if owner else self.host
            return host, hosts.get(host), owner.name if owner else None

        for topic, s in self.series.items():
            where = place(self._owner(topic))
            if where is not None:
                out.append(discovery.measurement(self.node, s.location, s.quantity, s.unit,
                                                 s.kind, s.expire_after, *where))
        for topic, b in self.boards.items():
            where = place(self._owner(topic))
            if where is not None:
                out.append(discovery.board(self.node, b.board, b.item, b.shape, *where))
        if self.config.health:
            for record in self.daemons.values():
                if record.status is not None and not self._gone(record, now):
                    host = record.site or record.host or self.host
                    out.append(discovery.health(self.node, record.name, host, hosts.get(host)))
        return {self.node.topic(a.component, a.object_id): encode_json(a.config) for a in out}

    def flush(self) -> None:
        """Main thread: publish what changed, remove what is gone, and once, the leftovers."""
        now = time.time()
        with self._lock:
            sweep = not self._swept and time.monotonic() - self._started >= \
                self.config.cleanup_after
            if not (self._dirty or sweep or now - self._checked_at >= RECHECK_EVERY):
                return
            self._dirty, republish, self._checked_at = False, self._republish, now
            self._republish = False
            want = self.desired(now)
            changed = {t: p for t, p in want.items()
                       if republish or self._published.get(t) != p}
            gone = [t for t in self._published if t not in want]
            if sweep:
                gone += sorted(self._leftovers - want.keys() - set(gone))
                self._leftovers.clear()
                self._swept = True
            for topic in gone:
                self._published.pop(topic, None)
            self._published.update(changed)
        for topic, payload in sorted(changed.items()):
            self.bus.publish(topic, payload, qos=1, retain=True)
            self.count("configs_published")
        for topic in gone:
            self.bus.publish(topic, b"", qos=1, retain=True)
            self.count("configs_removed")
        if republish:
            self.count("republished")
        if changed or gone:
            self.log.info("%s %d config(s), removed %d%s", "published again" if republish
                          else "published", len(changed), len(gone),
                          f": {', '.join(clip(t) for t in gone[:5])}" if gone else "")


main = HomeAssistant.main

if __name__ == "__main__":
    sys.exit(main())
