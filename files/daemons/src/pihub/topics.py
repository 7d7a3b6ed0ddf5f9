"""The topic and payload contracts of contract §2 (docs/contract.md), in one place.

Builders make topics; parsers check incoming ones and raise :class:`Reject` with a reason
when a message breaks the contract (the daemon logs and counts it, and goes on).
"""

from __future__ import annotations

import json
import math
import re
import reprlib
import time
from dataclasses import dataclass, field
from typing import Any

#: Limits on what any MQTT client can send (contract §6): a message within them costs a bounded
#: amount of memory, disk and log; one beyond them is rejected.
#: characters of a topic segment (<location>, <quantity>, <target>, ...): a file name at most
MAX_SEGMENT = 64
#: a topic segment; config keys that become one use its pattern, so they are bounded too
SEGMENT = re.compile(rf"^[a-z0-9_-]{{1,{MAX_SEGMENT}}}$")
#: nesting of JSON arrays and objects in any payload (Python's decoder would recurse deeper)
MAX_DEPTH = 32
#: bytes of a measurement payload (value, unit, ts and its extra keys)
MAX_MEASUREMENT_BYTES = 1024
#: characters of a measurement's unit
MAX_UNIT = 32
#: extra keys of a measurement besides value, unit and ts
MAX_EXTRA_KEYS = 16
#: characters of the offending input quoted in a reject's log line
MAX_SHOWN = 80
#: characters of a text field published from outside input (a scraped name, a destination, a
#: reason quoting a page): longer ones are cut, ending with …
MAX_TEXT = 200

UNITS = frozenset({"°C", "%", "hPa", "V", "W", "Wh", "lx", "ppm", "bool", "count", "s", "B", "kB"})


class Reject(Exception):
    """A message breaks the contract; the text says what was expected and what came."""


_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = MAX_SHOWN
_repr.maxlevel = 3


def shown(value: Any) -> str:
    """``repr(value)`` cut to about :data:`MAX_SHOWN` characters: what a reject quotes of the
    input (a 1 MB string must not reach the log)."""
    if isinstance(value, str | bytes) and len(value) > MAX_SHOWN:
        return f"{value[:MAX_SHOWN]!r}… ({len(value)} in all)"
    text = _repr.repr(value)
    return text if len(text) <= 2 * MAX_SHOWN else text[:2 * MAX_SHOWN] + "…"


def clip_text(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` cut to ``limit`` characters, ending with … when it was longer."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


#: the reserved first segment of a satellite's mirror on the central hub (contract §2, "Fleet"):
#: ``<root>/host/<host>/<daemon>/status|meta``; no daemon may be called so
HOST = "host"
#: a daemon's name: a segment other than :data:`HOST` (config keys that name a daemon use it)
DAEMON_NAME = re.compile(rf"^(?!{HOST}$)[a-z0-9_-]{{1,{MAX_SEGMENT}}}$")
#: first segments under the root that are no daemon's (``<root>/notify/status`` is a notify topic)
RESERVED = frozenset({"data", "display", "notify", "cmd", "sim", HOST})
_NOT_SEGMENT_CHAR = re.compile(r"[^a-z0-9_-]")


def host_segment(name: str) -> str:
    """A host name as a topic segment: lower-cased, anything outside ``[a-z0-9_-]`` turned into
    ``-``, cut to :data:`MAX_SEGMENT` (``Shed.Pi`` -> ``shed-pi``); ``host`` if nothing is left."""
    text = _NOT_SEGMENT_CHAR.sub("-", name.lower())[:MAX_SEGMENT]
    return text or "host"


def identity(daemon: str, host: str | None = None) -> str:
    """The single-string identity of a daemon: ``<daemon>`` on the own host (``host`` None),
    ``<daemon>@<host>`` on a satellite (contract §2, "Fleet")."""
    return daemon if host is None else f"{daemon}@{host}"


def split_identity(text: str) -> tuple[str, str | None]:
    """``sensor-gpio@shed`` -> ``("sensor-gpio", "shed")``; ``monitor`` -> ``("monitor", None)``.
    ValueError unless both parts are segments."""
    daemon, at, host = text.partition("@")
    if not SEGMENT.match(daemon) or (at and not SEGMENT.match(host)):
        raise ValueError(f"a daemon's identity is <daemon> or <daemon>@<host>, got {shown(text)}")
    return daemon, (host if at else None)


def check_segment(value: str, what: str) -> str:
    if not SEGMENT.match(value):
        raise ValueError(f"{what} must be lower-case [a-z0-9_-]+ of at most {MAX_SEGMENT} "
                         f"characters, got {shown(value)}")
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

    # -- a satellite's mirror on the central hub (contract §2, "Fleet")

    def host_status(self, host: str, daemon: str) -> str:
        """``<root>/host/<host>/<daemon>/status``: a satellite's daemon's status, as its bridge
        mirrors it onto the central."""
        return f"{self.root}/{HOST}/{host}/{daemon}/status"

    def host_meta(self, host: str, daemon: str) -> str:
        return f"{self.root}/{HOST}/{host}/{daemon}/meta"

    def host_cmd(self, host: str, daemon: str, target: str) -> str:
        """``<root>/host/<host>/cmd/<daemon>/<target>``: a command for a satellite's daemon (its
        bridge delivers it there as ``<root>/cmd/<daemon>/<target>``)."""
        check_segment(host, "host")
        check_segment(target, "command target")
        return f"{self.root}/{HOST}/{host}/cmd/{daemon}/{target}"

    def bridge_state(self, host: str) -> str:
        """``<root>/host/<host>/bridge/state``: ``1``/``0``, retained, published by the
        satellite's bridge (``0`` is its Last Will on the central)."""
        return f"{self.root}/{HOST}/{host}/bridge/state"

    def cmd_for(self, host: str | None, daemon: str, target: str) -> str:
        """The command topic for ``daemon`` on the own host (``host`` None) or a satellite."""
        return self.cmd(daemon, target) if host is None else self.host_cmd(host, daemon, target)

    def daemon_topic(self, topic: str) -> tuple[str | None, str, str] | None:
        """``(host, daemon, kind)`` of a status or meta topic: ``<root>/<daemon>/<kind>`` (host
        None: the own host) or ``<root>/host/<host>/<daemon>/<kind>`` (a satellite's), kind
        ``status`` or ``meta``; None for any other topic. Reject when a segment is not one, or
        the daemon is called ``host``."""
        prefix = self.root + "/"
        if not topic.startswith(prefix):
            return None
        parts = topic[len(prefix):].split("/")
        if parts[-1] not in ("status", "meta"):
            return None
        if len(parts) == 2:
            host, daemon = None, parts[0]
        elif len(parts) == 4 and parts[0] == HOST:
            host, daemon = parts[1], parts[2]
            if not SEGMENT.match(host):
                raise Reject(f"topic {shown(topic)}: host must be lower-case [a-z0-9_-]+ of at "
                             f"most {MAX_SEGMENT} characters")
        else:
            return None
        if daemon in RESERVED:
            return None
        if not DAEMON_NAME.match(daemon):
            raise Reject(f"topic {shown(topic)}: daemon name must be lower-case [a-z0-9_-]+ of "
                         f"at most {MAX_SEGMENT} characters, not {HOST!r}")
        return host, daemon, parts[-1]

    def bridge_host(self, topic: str) -> str | None:
        """The ``<host>`` of ``<root>/host/<host>/bridge/state``, else None."""
        prefix = f"{self.root}/{HOST}/"
        if not topic.startswith(prefix) or not topic.endswith("/bridge/state"):
            return None
        host = topic[len(prefix):-len("/bridge/state")]
        return host if SEGMENT.match(host) else None

    def sub(self, *parts: str) -> str:
        """Any topic under the root, e.g. ``sub("data", "#")``."""
        return "/".join((self.root, *parts))

    def split(self, topic: str, kind: str, levels: int) -> list[str]:
        """Check that ``topic`` is ``<root>/<kind>/<seg>{levels}`` and return the segments."""
        prefix = f"{self.root}/{kind}/"
        if not topic.startswith(prefix):
            raise Reject(f"topic {shown(topic)} is not under {prefix}")
        parts = topic[len(prefix):].split("/")
        if len(parts) != levels or not all(SEGMENT.match(p) for p in parts):
            shape = "/".join(["<[a-z0-9_-]+>"] * levels)
            raise Reject(f"topic {shown(topic)} does not match {prefix}{shape} (segments of at "
                         f"most {MAX_SEGMENT} characters)")
        return parts


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth(payload: bytes) -> int:
    """The deepest nesting of arrays and objects in JSON text (strings skipped), without
    recursion: linear in the payload's size."""
    if payload.count(b"[") + payload.count(b"{") <= 1:
        return min(1, payload.count(b"[") + payload.count(b"{"))
    brackets = _JSON_STRING.sub(b"", payload).translate(None, _NOT_BRACKET)
    depth = deepest = 0
    for b in brackets:
        if b in b"[{":
            depth += 1
            if depth > deepest:
                deepest = depth
        else:
            depth -= 1
    return deepest


def decode_json(payload: bytes, topic: str) -> Any:
    """A payload's JSON; Reject if it is not UTF-8 JSON or nests deeper than MAX_DEPTH."""
    if json_depth(payload) > MAX_DEPTH:
        raise Reject(f"payload on {topic} nests arrays/objects deeper than {MAX_DEPTH} levels "
                     f"({len(payload)} bytes): {shown(payload)}")
    try:
        return json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise Reject(f"payload on {topic} is not JSON ({shown(str(exc))}): "
                     f"{shown(payload)}") from None


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
    if not unit or not isinstance(unit, str) or len(unit) > MAX_UNIT:
        raise ValueError(f"measurement unit must be a non-empty string of at most {MAX_UNIT} "
                         f"characters, got {shown(unit)}")
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
    if len(data) > 3 + MAX_EXTRA_KEYS:
        raise Reject(f"payload on {topic}: at most {MAX_EXTRA_KEYS} keys besides value, unit "
                     f"and ts, got {len(data) - 3} or more")
    value = data.get("value")
    if type(value) is not float and type(value) is not int:
        raise Reject(f"payload on {topic}: 'value' must be a number, got {shown(value)}")
    if not math.isfinite(value):
        raise Reject(f"payload on {topic}: 'value' must be finite, got {value!r}")
    unit = data.get("unit")
    if type(unit) is not str or not unit or len(unit) > MAX_UNIT:
        raise Reject(f"payload on {topic}: 'unit' must be a non-empty string of at most "
                     f"{MAX_UNIT} characters, got {shown(unit)}")
    ts = data.get("ts")
    if (type(ts) is not float and type(ts) is not int) or not math.isfinite(ts) or ts <= 0:
        raise Reject(f"payload on {topic}: 'ts' must be UNIX seconds (a number > 0), "
                     f"got {shown(ts)}")
    return value, unit, ts


def decode_measurement(payload: bytes, topic: str) -> Any:
    """A measurement payload's JSON, checked against MAX_MEASUREMENT_BYTES first."""
    if len(payload) > MAX_MEASUREMENT_BYTES:
        raise Reject(f"payload on {topic}: a measurement is at most {MAX_MEASUREMENT_BYTES} "
                     f"bytes, got {len(payload)}: {shown(payload)}")
    return decode_json(payload, topic)


def parse_measurement(topics: Topics, topic: str, payload: bytes) -> Measurement:
    """Check topic and payload of a data message; raise Reject saying what is wrong."""
    location, quantity = topics.split(topic, "data", 2)
    data = decode_measurement(payload, topic)
    value, unit, ts = measurement_fields(data, topic)
    extra = {k: v for k, v in data.items() if k not in ("value", "unit", "ts")}
    return Measurement(location, quantity, float(value), unit, float(ts), extra)
