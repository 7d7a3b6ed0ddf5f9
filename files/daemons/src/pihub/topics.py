"""The topic and payload contracts of contract §2 (docs/contract.md), in one place.

Builders make topics; parsers check incoming ones and raise :class:`Reject` with a reason
when a message breaks the contract (the daemon logs and counts it, and goes on).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

SEGMENT = re.compile(r"^[a-z0-9_-]+$")

UNITS = frozenset({"°C", "%", "hPa", "V", "W", "Wh", "lx", "ppm", "bool", "count", "s", "B", "kB"})


class Reject(Exception):
    """A message breaks the contract; the text says what was expected and what came."""


def check_segment(value: str, what: str) -> str:
    if not SEGMENT.match(value):
        raise ValueError(f"{what} must be lower-case [a-z0-9_-]+, got {value!r}")
    return value


@dataclass(frozen=True)
class Topics:
    """Topic builder for one topic root (``pihub`` by default)."""

    root: str = "pihub"

    def status(self, daemon: str) -> str:
        return f"{self.root}/{daemon}/status"

    def meta(self, daemon: str) -> str:
        return f"{self.root}/{daemon}/meta"

    def data(self, location: str, quantity: str) -> str:
        check_segment(location, "location")
        check_segment(quantity, "quantity")
        return f"{self.root}/data/{location}/{quantity}"

    def display(self, board: str, item: str) -> str:
        check_segment(board, "board")
        check_segment(item, "item")
        return f"{self.root}/display/{board}/{item}"

    def notify(self, topic: str) -> str:
        check_segment(topic, "notify topic")
        return f"{self.root}/notify/{topic}"

    def cmd(self, daemon: str, target: str) -> str:
        check_segment(target, "command target")
        return f"{self.root}/cmd/{daemon}/{target}"

    def sub(self, *parts: str) -> str:
        """Any topic under the root, e.g. ``sub("data", "#")``."""
        return "/".join((self.root, *parts))

    def split(self, topic: str, kind: str, levels: int) -> list[str]:
        """Check that ``topic`` is ``<root>/<kind>/<seg>{levels}`` and return the segments."""
        prefix = f"{self.root}/{kind}/"
        if not topic.startswith(prefix):
            raise Reject(f"topic {topic!r} is not under {prefix}")
        parts = topic[len(prefix):].split("/")
        if len(parts) != levels or not all(SEGMENT.match(p) for p in parts):
            shape = "/".join(["<[a-z0-9_-]+>"] * levels)
            raise Reject(f"topic {topic!r} does not match {prefix}{shape}")
        return parts


def decode_json(payload: bytes, topic: str) -> Any:
    try:
        return json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        shown = payload[:80]
        raise Reject(f"payload on {topic} is not JSON ({exc}): {shown!r}") from None


def encode_json(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True)
class Measurement:
    """A parsed ``<root>/data/<location>/<quantity>`` message."""

    location: str
    quantity: str
    value: float
    unit: str
    ts: float
    extra: dict[str, Any] = field(default_factory=dict)

    def payload(self) -> dict[str, Any]:
        return {**self.extra, "value": self.value, "unit": self.unit, "ts": self.ts}


def measurement_payload(value: float | int | bool, unit: str, ts: float | None = None,
                        **extra: Any) -> dict[str, Any]:
    """The JSON object of a measurement, checked before it leaves the daemon."""
    if isinstance(value, bool):
        value = int(value)
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"measurement value must be a finite number, got {value!r}")
    if not unit or not isinstance(unit, str):
        raise ValueError(f"measurement unit must be a non-empty string, got {unit!r}")
    when = time.time() if ts is None else ts
    return {**extra, "value": value, "unit": unit, "ts": round(when, 3)}


def measurement_fields(data: Any, topic: str) -> tuple[float, str, float]:
    """The ``value``, ``unit`` and ``ts`` of a decoded measurement payload; Reject if wrong.

    The one place the payload rules are written. store-tsdb calls it for every message, so it
    tests ``type(x) is`` (JSON makes no subclasses, and bool is not a number here) and returns
    ``value`` as decoded (an int stays an int).
    """
    if type(data) is not dict:
        raise Reject(f"payload on {topic} must be a JSON object, got {type(data).__name__}")
    value = data.get("value")
    if type(value) is not float and type(value) is not int:
        raise Reject(f"payload on {topic}: 'value' must be a number, got {value!r}")
    if not math.isfinite(value):
        raise Reject(f"payload on {topic}: 'value' must be finite, got {value!r}")
    unit = data.get("unit")
    if type(unit) is not str or not unit:
        raise Reject(f"payload on {topic}: 'unit' must be a non-empty string, got {unit!r}")
    ts = data.get("ts")
    if (type(ts) is not float and type(ts) is not int) or not math.isfinite(ts) or ts <= 0:
        raise Reject(f"payload on {topic}: 'ts' must be UNIX seconds (a number > 0), got {ts!r}")
    return value, unit, ts


def parse_measurement(topics: Topics, topic: str, payload: bytes) -> Measurement:
    """Check topic and payload of a data message; raise Reject saying what is wrong."""
    location, quantity = topics.split(topic, "data", 2)
    data = decode_json(payload, topic)
    value, unit, ts = measurement_fields(data, topic)
    extra = {k: v for k, v in data.items() if k not in ("value", "unit", "ts")}
    return Measurement(location, quantity, float(value), unit, float(ts), extra)
