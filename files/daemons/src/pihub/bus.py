"""The MQTT connection every daemon shares (paho-mqtt 2.x).

* connects in the background and reconnects with backoff (paho's own network thread);
* Last Will ``offline`` on the daemon's status topic, ``online`` once connected;
* subscriptions are made again after every reconnect; READY is signalled once they are acked;
* a bounded queue keeps what is published while the broker is away, and sends it in order
  when the broker is back;
* every incoming message goes through a guard: a handler that raises :class:`Reject` or any
  other exception costs a log line and a counter, never the daemon.

Handlers run in paho's network thread; daemons guard state shared with their timers.
"""

from __future__ import annotations

import collections
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from .config import ConfigError, MqttConfig
from .topics import Reject, decode_json

log = logging.getLogger("pihub.bus")


class Counters:
    """Thread-safe event counters, reported in every heartbeat."""

    STANDARD = ("published", "received", "rejected", "errors")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, int] = dict.fromkeys(self.STANDARD, 0)

    def inc(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._values[name] = self._values.get(name, 0) + n

    def get(self, name: str) -> int:
        with self._lock:
            return self._values.get(name, 0)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)


@dataclass
class Message:
    """An incoming MQTT message."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int = 0
    _ack: Callable[[], None] | None = field(default=None, repr=False)

    def json(self) -> Any:
        return decode_json(self.payload, self.topic)

    def text(self) -> str:
        try:
            return self.payload.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise Reject(f"payload on {self.topic} is not UTF-8 text: {self.payload[:40]!r}")\
                from None

    def ack(self) -> None:
        """Acknowledge a QoS>0 message (daemons with ``manual_ack``); idempotent."""
        if self._ack is not None:
            ack, self._ack = self._ack, None
            ack()


Handler = Callable[[Message], None]


def read_secret(path: str, key: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.readline().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror or exc}") from exc


class Bus:
    def __init__(
        self,
        cfg: MqttConfig,
        *,
        client_id: str,
        status_topic: str,
        counters: Counters,
        persistent_session: bool = False,
        manual_ack: bool = False,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.status_topic = status_topic
        self.counters = counters
        self.manual_ack = manual_ack
        self._on_ready = on_ready
        self._lock = threading.RLock()
        self._connected = False
        self._pending: collections.deque[tuple[str, bytes, int, bool]] = collections.deque()
        self._subscriptions: dict[str, tuple[int, Handler]] = {}
        # topic -> the guarded handlers of the filters it matches; filled as topics show up
        self._routes: dict[str, list[Callable[[mqtt.MQTTMessage], None]]] = {}
        self._sub_mids: set[int] = set()
        self._dropped_logged = False
        self.connections = 0

        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=not persistent_session,
            protocol=mqtt.MQTTv311,
            manual_ack=manual_ack,
        )
        if cfg.username:
            password = read_secret(cfg.password_file, "mqtt.password_file") if (
                cfg.password_file) else None
            client.username_pw_set(cfg.username, password)
        if cfg.tls.enabled:
            try:
                client.tls_set(
                    ca_certs=cfg.tls.ca_file, certfile=cfg.tls.cert_file, keyfile=cfg.tls.key_file,
                    cert_reqs=ssl.CERT_REQUIRED,
                )
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError("mqtt.tls", f"cannot load TLS files: {exc}") from exc
            client.tls_insecure_set(cfg.tls.insecure)
        client.will_set(status_topic, b"offline", qos=1, retain=True)
        client.reconnect_delay_set(min_delay=max(1, round(cfg.reconnect_min)),
                                   max_delay=max(1, round(cfg.reconnect_max)))
        client.max_inflight_messages_set(100)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._dispatch
        self._client = client

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        log.info("connecting to mqtt%s://%s:%d as %s", "s" if self.cfg.tls.enabled else "",
                 self.cfg.host, self.cfg.port, self.cfg.username or "anonymous")
        self._client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive)
        self._client.loop_start()

    def stop(self, timeout: float = 5.0) -> None:
        """Publish ``offline``, wait for what is in flight, disconnect."""
        with self._lock:
            connected = self._connected
        if connected:
            info = self._client.publish(self.status_topic, b"offline", qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as exc:
                log.warning("could not publish offline status: %s", exc)
            if not info.is_published():
                log.warning("offline status not acknowledged within %.0f s", timeout)
        else:
            log.warning("broker unreachable at stop; the Last Will will say offline")
        self._client.disconnect()
        self._client.loop_stop()

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._connected

    @property
    def queued(self) -> int:
        with self._lock:
            return len(self._pending)

    # ------------------------------------------------------------------ publishing

    def publish(self, topic: str, payload: bytes | str, *, qos: int = 1,
                retain: bool = False) -> None:
        """Publish now, or keep it in the bounded queue until the broker is back."""
        data = payload.encode("utf-8") if isinstance(payload, str) else payload
        with self._lock:
            if self._connected:
                info = self._client.publish(topic, data, qos=qos, retain=retain)
                if info.rc == mqtt.MQTT_ERR_SUCCESS:
                    self.counters.inc("published")
                    return
                if info.rc != mqtt.MQTT_ERR_NO_CONN:
                    self.counters.inc("errors")
                    log.error("publish to %s failed: %s", topic, mqtt.error_string(info.rc))
                    return
            self._enqueue(topic, data, qos, retain)

    def _enqueue(self, topic: str, data: bytes, qos: int, retain: bool) -> None:
        if len(self._pending) >= self.cfg.queue_size:
            self._pending.popleft()
            self.counters.inc("dropped")
            if not self._dropped_logged:
                log.warning("broker away and queue full (mqtt.queue_size=%d): dropping the "
                            "oldest messages", self.cfg.queue_size)
                self._dropped_logged = True
        self._pending.append((topic, data, qos, retain))

    # ------------------------------------------------------------------ subscribing

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Route messages matching ``topic_filter`` to ``handler``; kept across reconnects."""
        with self._lock:
            self._subscriptions[topic_filter] = (qos, handler)
            self._routes = {}
            if self._connected:
                result, mid = self._client.subscribe(topic_filter, qos)
                if result == mqtt.MQTT_ERR_SUCCESS and mid is not None:
                    self._sub_mids.add(mid)

    def _dispatch(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        """Route a message to the handlers of the filters its topic matches.

        Topics repeat (one per series), so the match is made once per topic and kept: paho's
        own per-message filter matching was a fair share of a storage daemon's CPU.
        """
        topic = msg.topic
        routes = self._routes.get(topic)
        if routes is None:
            with self._lock:
                routes = [self._guard(handler) for topic_filter, (_qos, handler)
                          in self._subscriptions.items()
                          if mqtt.topic_matches_sub(topic_filter, topic)]
                if len(self._routes) >= 100_000:  # a bound against topic churn
                    self._routes = {}
                self._routes[topic] = routes
        if not routes:
            self._on_unmatched(client, msg)
        for route in routes:
            route(msg)

    def _guard(self, handler: Handler) -> Callable[[mqtt.MQTTMessage], None]:
        client = self._client

        def on_message(msg: mqtt.MQTTMessage) -> None:
            ack = None
            if self.manual_ack and msg.qos > 0:
                mid, qos = msg.mid, msg.qos

                def ack() -> None:
                    client.ack(mid, qos)

            message = Message(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), msg.mid,
                              ack)
            self.counters.inc("received")
            try:
                handler(message)
            except Reject as exc:
                self.counters.inc("rejected")
                log.warning("rejected: %s", exc)
                message.ack()
            except Exception:
                self.counters.inc("errors")
                log.exception("handler for %s failed", msg.topic)
                message.ack()
            else:
                if not self.manual_ack:
                    message.ack()

        return on_message

    def _on_unmatched(self, client: mqtt.Client, msg: mqtt.MQTTMessage) -> None:
        # A persistent session may deliver messages of an old subscription.
        self.counters.inc("rejected")
        log.warning("rejected: no handler for topic %s", msg.topic)
        if self.manual_ack and msg.qos > 0:
            client.ack(msg.mid, msg.qos)

    # ------------------------------------------------------------------ paho callbacks

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any,
                    reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.error("broker %s:%d refused the connection: %s", self.cfg.host, self.cfg.port,
                      reason)
            return
        self._no_delay(client)
        with self._lock:
            self.connections += 1
            log.info("connected to %s:%d%s", self.cfg.host, self.cfg.port,
                     " (session resumed)" if getattr(flags, "session_present", False) else "")
            client.publish(self.status_topic, b"online", qos=1, retain=True)
            self._sub_mids.clear()
            for topic_filter, (qos, _handler) in self._subscriptions.items():
                result, mid = client.subscribe(topic_filter, qos)
                if result == mqtt.MQTT_ERR_SUCCESS and mid is not None:
                    self._sub_mids.add(mid)
            flushed = 0
            while self._pending:
                topic, data, qos, retain = self._pending.popleft()
                client.publish(topic, data, qos=qos, retain=retain)
                self.counters.inc("published")
                flushed += 1
            if flushed:
                log.info("sent %d queued message(s)", flushed)
            self._dropped_logged = False
            self._connected = True
            subscribed = not self._sub_mids
        if subscribed:
            self._ready()

    @staticmethod
    def _no_delay(client: mqtt.Client) -> None:
        """Send small packets (a command's answer, a state change) at once, not after the peer's
        delayed ACK: Nagle's algorithm costs such a publish some 40 ms."""
        sock = client.socket()
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[union-attr]
        except (OSError, AttributeError) as exc:
            log.debug("TCP_NODELAY not set: %s", exc)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                      reason_codes: list[Any], properties: Any) -> None:
        for code in reason_codes:
            if code.is_failure:
                self.counters.inc("errors")
                log.error("broker refused a subscription (mid %d): %s; check the ACL", mid, code)
        with self._lock:
            self._sub_mids.discard(mid)
            done = not self._sub_mids
        if done:
            self._ready()

    def _ready(self) -> None:
        if self._on_ready is not None:
            self._on_ready()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any,
                       reason: Any, properties: Any) -> None:
        with self._lock:
            was = self._connected
            self._connected = False
        if was and reason.is_failure:
            log.warning("lost the broker (%s); reconnecting with backoff", reason)
        elif was:
            log.info("disconnected from the broker")
