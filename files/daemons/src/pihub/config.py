"""Declarative daemon configuration: one YAML file, validated against dataclasses.

A daemon declares its config once, as a ``@dataclass(kw_only=True)`` subclass of
:class:`BaseConfig` whose fields are made with :func:`setting`. That declaration gives:

* validation with messages that name the key (``mqtt.port: expected an integer ...``),
* the ``--print-config-example`` text (every key, commented, with its default or example),
* typed attribute access in the daemon.

Supported field types: ``str``, ``int``, ``float``, ``bool``, ``Literal[...]``, ``X | None``,
``list[X]``, ``dict[str, X]`` and nested ``@dataclass(kw_only=True)`` classes built the same way.
A dataclass may define ``check(self) -> None`` for cross-field rules; it raises
:class:`ConfigError` with a key relative to that dataclass.
"""

from __future__ import annotations

import dataclasses
import math
import re
import socket
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from .topics import host_segment

EX_CONFIG = 78  # sysexits.h: configuration error

T = TypeVar("T")


class ConfigError(Exception):
    """A config value is wrong. ``key`` is a dotted path such as ``mqtt.port``."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message

    def under(self, prefix: str) -> ConfigError:
        """The same error, with its key placed under ``prefix``."""
        if not self.key:
            return ConfigError(prefix, self.message)
        sep = "" if self.key.startswith("[") else "."
        return ConfigError(f"{prefix}{sep}{self.key}", self.message)


def setting(
    default: Any = MISSING,
    help: str = "",
    *,
    example: Any = MISSING,
    min: float | None = None,
    max: float | None = None,
    pattern: str | None = None,
    default_factory: Callable[[], Any] | None = None,
) -> Any:
    """Declare one config key: its default (none = required), help text and constraints."""
    metadata = {"help": help, "example": example, "min": min, "max": max, "pattern": pattern}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    if isinstance(default, list | dict):
        frozen = default
        return dataclasses.field(
            default_factory=lambda: _copy(frozen), metadata=metadata
        )
    return dataclasses.field(default=default, metadata=metadata)


def _copy(value: Any) -> Any:
    if isinstance(value, list):
        return [_copy(v) for v in value]
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------- shared sections


@dataclass(kw_only=True)
class TlsConfig:
    enabled: bool = setting(False, "Connect to the broker with TLS.")
    ca_file: str | None = setting(None, "CA certificate file; null uses the system's CAs.")
    cert_file: str | None = setting(None, "Client certificate file (mutual TLS), or null.")
    key_file: str | None = setting(None, "Client key file (mutual TLS), or null.")
    insecure: bool = setting(False, "Skip the broker host name check (never in production).")


@dataclass(kw_only=True)
class MqttConfig:
    host: str = setting("127.0.0.1", "Broker host name or address.")
    port: int = setting(1883, "Broker TCP port.", min=1, max=65535)
    username: str | None = setting(None, "MQTT user name, or null for an anonymous login.")
    password_file: str | None = setting(
        None, "File holding the MQTT password (first line), readable by this daemon only."
    )
    tls: TlsConfig = setting(default_factory=TlsConfig, help="TLS to the broker.")
    keepalive: int = setting(30, "Seconds between MQTT keep-alive pings.", min=5, max=3600)
    client_id: str | None = setting(
        None, "MQTT client id; null means pihub-<daemon>-<host>."
    )
    queue_size: int = setting(
        10000,
        "Messages kept in memory while the broker is away; the oldest go first when full.",
        min=1,
    )
    reconnect_min: float = setting(1.0, "First reconnect delay, seconds.", min=0.1)
    reconnect_max: float = setting(60.0, "Longest reconnect delay, seconds.", min=1)
    max_message_bytes: int = setting(
        256 * 1024,
        "Largest payload accepted, in bytes; a bigger message is rejected (logged, counted) "
        "before it is decoded.",
        min=1024,
    )

    def check(self) -> None:
        if self.reconnect_max < self.reconnect_min:
            raise ConfigError("reconnect_max", "must be >= reconnect_min")
        if self.password_file and not self.username:
            raise ConfigError("username", "is required when password_file is set")


LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(kw_only=True)
class BaseConfig:
    """The keys every daemon shares; a daemon's own keys sit beside them."""

    mqtt: MqttConfig = setting(default_factory=MqttConfig, help="The MQTT broker.")
    topic_root: str = setting(
        "pihub", "First level of every pihub topic.", pattern=r"^[a-z0-9_-]+(/[a-z0-9_-]+)*$"
    )
    heartbeat_interval: float = setting(
        30.0, "Seconds between two heartbeats on <topic_root>/<daemon>/meta.", min=1, max=3600
    )
    log_level: Literal["debug", "info", "warning", "error"] = setting(
        "info", "One of debug, info, warning, error."
    )


@dataclass(kw_only=True)
class HostsConfig(BaseConfig):
    """The keys of a daemon that shows hosts (monitor, web, homeassistant; contract §2, "Fleet")."""

    host_name: str | None = setting(
        None, "This hub's own host as the pages and records name it (its daemons publish "
        "<topic_root>/<daemon>/...; a satellite's are mirrored as <topic_root>/host/<host>/...); "
        "null: the machine's hostname, lower-cased, anything outside [a-z0-9_-] turned into -.",
        pattern=r"^[a-z0-9_-]{1,64}$",
    )

    def own_host(self) -> str:
        return self.host_name or host_segment(socket.gethostname())


C = TypeVar("C", bound=BaseConfig)


# --------------------------------------------------------------------------- loading


def load_file(cls: type[C], path: str | Path) -> C:
    """Read and validate ``path``. Raises ConfigError naming the key at fault."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read {path}: {exc.strerror or exc}") from exc
    return load_text(cls, text, source=str(path))


def load_text(cls: type[C], text: str, source: str = "<config>") -> C:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError("", f"{source} is not valid YAML{where}: {problem}") from exc
    if data is None:
        data = {}
    return build(cls, data)


def build(cls: type[T], data: Any, key: str = "") -> T:
    """Turn plain YAML data into an instance of dataclass ``cls``, checking every value."""
    if not isinstance(data, dict):
        raise ConfigError(key, f"expected a mapping of keys, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = [k for k in data if k not in fields]
    if unknown:
        name = unknown[0]
        where = f"{key}.{name}" if key else str(name)
        raise ConfigError(where, f"unknown key; known keys here: {', '.join(fields)}")
    values: dict[str, Any] = {}
    for name, field in fields.items():
        where = f"{key}.{name}" if key else name
        if name in data:
            values[name] = _convert(hints[name], data[name], where, field.metadata)
        elif field.default is MISSING and field.default_factory is MISSING:
            hint = field.metadata.get("help", "")
            raise ConfigError(where, f"is required: {hint}" if hint else "is required")
    obj = cls(**values)
    check = getattr(obj, "check", None)
    if callable(check):
        try:
            check()
        except ConfigError as exc:
            raise exc.under(key) if key else exc from None
    return obj


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _convert(tp: Any, value: Any, key: str, meta: typing.Mapping[str, Any]) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            if len(args) != len(get_args(tp)):
                return None
            raise ConfigError(key, "must not be empty")
        if len(args) == 1:
            return _convert(args[0], value, key, meta)
        errors = []
        for arg in args:
            try:
                return _convert(arg, value, key, meta)
            except ConfigError as exc:
                errors.append(exc.message)
        raise ConfigError(key, " or ".join(errors))
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(
                key, f"expected one of {', '.join(map(str, choices))}, got {_describe(value)}"
            )
        return value
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {_describe(value)}")
        return [_convert(item_tp, v, f"{key}[{i}]", {}) for i, v in enumerate(value)]
    if origin is dict:
        _key_tp, item_tp = get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {_describe(value)}")
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(key, f"keys must be strings, got {_describe(k)}")
            out[k] = _convert(item_tp, v, f"{key}.{k}", {})
        return out
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)  # type: ignore[arg-type]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer{_range(meta)}, got {_describe(value)}")
        _check_range(value, key, meta, "an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
            value
        ):
            raise ConfigError(key, f"expected a number{_range(meta)}, got {_describe(value)}")
        _check_range(value, key, meta, "a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {_describe(value)}")
        pattern = meta.get("pattern")
        if pattern and not re.fullmatch(pattern, value):
            raise ConfigError(key, f"expected a string matching {pattern}, got {value!r}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"config type {tp!r} of {key} is not supported")  # a programming error


def _range(meta: typing.Mapping[str, Any]) -> str:
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None:
        return f" between {lo:g} and {hi:g}"
    if lo is not None:
        return f" >= {lo:g}"
    if hi is not None:
        return f" <= {hi:g}"
    return ""


def _check_range(value: float, key: str, meta: typing.Mapping[str, Any], what: str) -> None:
    lo, hi = meta.get("min"), meta.get("max")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(key, f"expected {what}{_range(meta)}, got {value!r}")


# --------------------------------------------------------------------------- example text


def example_text(cls: type, daemon: str) -> str:
    """A complete, commented YAML example of ``cls``; ``--check-config`` accepts it."""
    lines = [
        f"# /etc/pihub/{daemon}.yml - configuration of pihub-{daemon}",
        "# Every key is listed with its default (or an example where there is no default).",
        "",
    ]
    lines += _example_lines(cls, 0)
    text = "\n".join(lines)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.rstrip("\n") + "\n"


def _example_lines(cls: type, indent: int, given: dict[str, Any] | None = None) -> list[str]:
    """Every key of ``cls`` with its help as a comment; values from ``given`` where it has them
    (an example of the enclosing key), else the key's own example or default."""
    pad = " " * indent
    out: list[str] = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        help_text = field.metadata.get("help", "")
        required = field.default is MISSING and field.default_factory is MISSING
        comment = [f"{pad}# {line}"
                   for line in _wrap(help_text + (" (required)" if required else ""))]
        value = given[field.name] if given and field.name in given else _example_value(field)
        inner = _dataclass_of(hints[field.name])
        items = _list_item_dataclass(hints[field.name])
        if value is MISSING and given is not None:
            continue  # an item of a list example that leaves this required key out
        out += comment
        if inner is not None and (value is MISSING or isinstance(value, dict)):
            out.append(f"{pad}{field.name}:")
            out += _example_lines(inner, indent + 2, value if isinstance(value, dict) else None)
        elif items is not None and isinstance(value, list) and value and all(
                isinstance(v, dict) for v in value):
            out.append(f"{pad}{field.name}:")
            for item in value:
                out += _list_item_lines(items, item, indent + 2)
        elif value is MISSING:
            raise TypeError(f"config key {field.name} is required but declares no example")
        else:
            dumped = yaml.safe_dump(
                {field.name: _plain(value)}, sort_keys=False, allow_unicode=True,
                default_flow_style=False,
            ).rstrip("\n")
            out += [pad + line for line in dumped.splitlines()]
        out.append("")
    return out


def _list_item_lines(cls: type, item: dict[str, Any], indent: int) -> list[str]:
    """One list item as ``- key: value`` lines, each key with its comment."""
    lines = [line for line in _example_lines(cls, indent + 2, item) if line.strip()]
    for i, line in enumerate(lines):
        if not line.lstrip().startswith("#"):
            lines[i] = " " * indent + "- " + line[indent + 2:]
            break
    return [*lines, ""]


def _list_item_dataclass(tp: Any) -> type | None:
    if get_origin(tp) is list:
        (item_tp,) = get_args(tp)
        return _dataclass_of(item_tp)
    return None


def _dataclass_of(tp: Any) -> type | None:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else None
    if dataclasses.is_dataclass(tp):
        return tp  # type: ignore[return-value]
    return None


def _example_value(field: dataclasses.Field[Any]) -> Any:
    example = field.metadata.get("example", MISSING)
    if example is not MISSING:
        return example
    if field.default is not MISSING:
        return field.default
    if field.default_factory is not MISSING:
        value = field.default_factory()  # type: ignore[operator,misc]
        if dataclasses.is_dataclass(value):
            return MISSING  # expanded key by key
        return value
    return MISSING


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def _wrap(text: str, width: int = 92) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    if line:
        lines.append(line)
    return lines


def as_dict(config: Any) -> dict[str, Any]:
    """The config as plain data (for comparisons on reload)."""
    return dataclasses.asdict(config)
