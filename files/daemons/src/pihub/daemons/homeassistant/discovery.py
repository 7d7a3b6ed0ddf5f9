"""What Home Assistant is told about pihub's topics: discovery configs, from plain data.

Pure functions, no MQTT: the daemon (``__init__``) keeps the inventory and decides *when*;
this module decides *what*. Every config names its entity by a stable ``unique_id``
(``<node_id>_<object_id>``), points ``state_topic`` at the pihub topic itself (Home Assistant
reads pihub's retained messages directly, this daemon relays nothing), and carries the
``device`` of the pihub host and the ``availability`` of the daemon that publishes the topic.

The mapping from a measurement's unit (and, where the unit alone says too little, its
quantity) to Home Assistant's ``device_class`` and ``state_class`` is :data:`UNIT_CLASSES` and
:data:`QUANTITY_CLASSES`; anything else gets no device class (docs/homeassistant.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

#: unit -> (device_class, state_class), where the unit alone is unambiguous
UNIT_CLASSES: dict[str, tuple[str, str]] = {
    "°C": ("temperature", "measurement"),
    "hPa": ("pressure", "measurement"),
    "W": ("power", "measurement"),
    "kW": ("power", "measurement"),
    "Wh": ("energy", "total_increasing"),
    "kWh": ("energy", "total_increasing"),
    "V": ("voltage", "measurement"),
    "lx": ("illuminance", "measurement"),
    "s": ("duration", "measurement"),
    "B": ("data_size", "measurement"),
    "kB": ("data_size", "measurement"),
}
#: (unit, a word of the quantity) -> device_class, where the unit needs the quantity's word
#: (``%`` is a humidity, a battery's charge, a disk's use, ...); two matching words: none
QUANTITY_CLASSES: dict[tuple[str, str], str] = {
    ("%", "humidity"): "humidity",
    ("%", "battery"): "battery",
    ("ppm", "co2"): "carbon_dioxide",
}
#: Home Assistant's binary_sensor device classes: a sensor-gpio input whose ``kind`` is one of
#: these gets it (active = on); contact, button and other kinds say nothing about meaning
BINARY_CLASSES = frozenset({
    "battery", "battery_charging", "carbon_monoxide", "cold", "connectivity", "door",
    "garage_door", "gas", "heat", "light", "lock", "moisture", "motion", "moving", "occupancy",
    "opening", "plug", "power", "presence", "problem", "running", "safety", "smoke", "sound",
    "tamper", "update", "vibration", "window",
})
#: the unit of on/off measurements (contract section 2)
BOOL = "bool"
VALUE = "{{ value_json.value }}"
_NOT_ID = re.compile(r"[^a-z0-9_-]+")


def sensor_classes(unit: str, quantity: str) -> tuple[str | None, str]:
    """``(device_class, state_class)`` of a numeric measurement: a device class only where
    unit (and quantity) make it unambiguous; every pihub measurement is a number, so its
    state class is ``measurement`` unless the device class says otherwise."""
    if unit in UNIT_CLASSES:
        return UNIT_CLASSES[unit]
    words = set(re.split(r"[_-]", quantity))
    found = {cls for (u, word), cls in QUANTITY_CLASSES.items() if u == unit and word in words}
    return (found.pop() if len(found) == 1 else None), "measurement"


def status_topic(root: str, daemon: str) -> str:
    """The status topic of a daemon by identity: ``<root>/<daemon>/status``, or for
    ``<daemon>@<host>`` (a satellite's) its mirror ``<root>/host/<host>/<daemon>/status``."""
    name, _, site = daemon.partition("@")
    return f"{root}/host/{site}/{name}/status" if site else f"{root}/{name}/status"


def health_id(daemon: str, site: str | None) -> str:
    """The object id of a daemon's health: ``status_<daemon>``, a satellite's
    ``host_<host>_status_<daemon>`` (its unique id includes its host)."""
    return f"status_{daemon}" if site is None else f"host_{site}_status_{daemon}"


def ident(text: str) -> str:
    """``text`` as an id segment (``[a-z0-9_-]``, at most 64 characters)."""
    return _NOT_ID.sub("-", text.lower()).strip("-")[:64] or "x"


@dataclass(frozen=True)
class Node:
    """Who announces: the topic root, the node id of the discovery topics, the version."""

    root: str
    prefix: str
    node_id: str
    version: str

    def topic(self, component: str, object_id: str) -> str:
        return f"{self.prefix}/{component}/{self.node_id}/{object_id}/config"

    def device(self, host: str, version: str | None) -> dict[str, Any]:
        """The Home Assistant device of one pihub host: every entity of that host is in it."""
        return {"identifiers": [f"{self.node_id}_{ident(host)}"], "name": f"pihub {host}",
                "manufacturer": "pihub", "model": "pihub", "sw_version": version or self.version}

    def common(self, object_id: str, name: str, host: str, version: str | None,
               daemon: str | None) -> dict[str, Any]:
        """The keys every config has; ``availability`` follows ``daemon`` when it is known."""
        config: dict[str, Any] = {
            "name": name,
            "unique_id": f"{self.node_id}_{object_id}",
            "object_id": f"{self.node_id}_{object_id}",
            "device": self.device(host, version),
            "origin": {"name": "pihub-homeassistant", "sw_version": self.version},
        }
        if daemon is not None:
            config["availability"] = [{"topic": status_topic(self.root, daemon),
                                       "payload_available": "online",
                                       "payload_not_available": "offline"}]
        return config


@dataclass(frozen=True)
class Announce:
    """One discovery config: where it goes and what it says."""

    component: str
    object_id: str
    config: dict[str, Any]


def measurement(node: Node, location: str, quantity: str, unit: str, kind: str | None,
                expire_after: int | None, host: str, version: str | None,
                daemon: str | None) -> Announce:
    """A series ``<root>/data/<location>/<quantity>``: a sensor; with unit ``bool`` a
    binary_sensor, or a switch for a sensor-gpio output (``kind: output``)."""
    object_id = f"data_{location}_{quantity}"
    topic = f"{node.root}/data/{location}/{quantity}"
    config = node.common(object_id, f"{location} {quantity}", host, version, daemon)
    config.update(state_topic=topic, value_template=VALUE)
    if unit == BOOL and kind == "output":
        site = daemon.partition("@")[2] if daemon else ""  # a satellite's: through its bridge
        command = (f"{node.root}/host/{site}/cmd/sensor-gpio/{quantity}" if site
                   else f"{node.root}/cmd/sensor-gpio/{quantity}")
        config.update(command_topic=command,
                      payload_on="on", payload_off="off", state_on="1", state_off="0",
                      retain=False)
        return Announce("switch", object_id, config)
    if expire_after:
        config["expire_after"] = expire_after
    if unit == BOOL:
        config.update(payload_on="1", payload_off="0")
        if kind in BINARY_CLASSES:
            config["device_class"] = kind
        return Announce("binary_sensor", object_id, config)
    device_class, state_class = sensor_classes(unit, quantity)
    config["unit_of_measurement"] = unit
    if device_class:
        config["device_class"] = device_class
    config["state_class"] = state_class
    return Announce("sensor", object_id, config)


def health(node: Node, daemon: str, host: str, version: str | None) -> Announce:
    """A daemon's health: its status topic, online/offline, as a connectivity binary_sensor
    (``daemon`` is its identity: ``<daemon>@<host>`` for a satellite's)."""
    name, _, site = daemon.partition("@")
    object_id = health_id(name, site or None)
    config = node.common(object_id, f"pihub-{name}", host, version, None)
    config.update(state_topic=status_topic(node.root, daemon), payload_on="online",
                  payload_off="offline", device_class="connectivity",
                  entity_category="diagnostic")
    return Announce("binary_sensor", object_id, config)


#: a display board's shape (by a key its payload has) -> (state template, unit)
BOARD_SHAPES: dict[str, tuple[str, str]] = {
    "bikes": ("{{ value_json.bikes }}", "bikes"),
    "departures": ("{{ value_json.departures[0].minutes if value_json.departures else None }}",
                   "min"),
}


def board(node: Node, board_name: str, item: str, shape: str, host: str,
          version: str | None, daemon: str | None) -> Announce:
    """A display board item: its headline number as the state (bikes available, minutes to
    the next departure; ``None`` = unknown), the whole payload as attributes."""
    template, unit = BOARD_SHAPES[shape]
    object_id = f"display_{board_name}_{item}"
    topic = f"{node.root}/display/{board_name}/{item}"
    config = node.common(object_id, f"{board_name} {item}", host, version, daemon)
    config.update(state_topic=topic, value_template=template, unit_of_measurement=unit,
                  state_class="measurement", json_attributes_topic=topic)
    return Announce("sensor", object_id, config)
