"""The MQTT connection every daemon shares (paho-mqtt 2.x).

* connects in the background and reconnects with backoff (paho's own network thread);
* Last Will ``offline`` on the daemon's status topic, ``online`` once connected;
* subscriptions are made again after every reconnect; READY is signalled once they are acked;
* a bounded queue keeps what is published while the broker is away, and sends it in order
  when the broker is back;
* every incoming message goes through a guard: a payload over ``mqtt.max_message_bytes`` is
  rejected before any handler sees it, and a handler that raises :class:`Reject` or any other
  exception costs a log line (quoting at most :data:`pihub.logs.MAX_QUOTED` characters of the
  input) and a counter, never the daemon;
* the bus can tell whether its MQTT handling makes progress (:meth:`Bus.stalled`), for the
  daemon's systemd watchdog.

Handlers run in paho's network thread; daemons guard state shared with their timers.

Progress. A handler runs in paho's network thread, so while one is stuck nothing else of MQTT
happens: no message, no keep-alive, no acknowledgement, no heartbeat; the broker publishes the
Last Will. Python cannot interrupt a running handler safely, so "bounded" means *seen*: the
network thread leaves a sign of life each time its loop goes round (paho calls ``loop_misc`` at
least once a second while connected, even when idle), when a handler returns and at each step of
a (re)connection (before an attempt, a failed attempt, connected, disconnected). The bus is
stalled when a handler has run longer than ``stall_after`` seconds, or when the thread left no
sign for ``stall_after`` seconds while connected. While the broker is away the thread sleeps
between attempts (up to ``mqtt.reconnect_max``) and an attempt may block for paho's connect
timeout and a TLS handshake (up to ``mqtt.keepalive``), so then the silence allowed grows by
those: a broker outage is not a stall, a network thread dead for good still is.
"""

from __future__ import annotations

import collections
import logging
import socket
import ssl
import struct
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from .config import ConfigError, MqttConfig
from .logs import MAX_QUOTED, clip
from .topics import Reject, decode_json

log = logging.getLogger("pihub.bus")
_PUBACK = struct.Struct("!BBH").pack  # MQTT 3.1.1 PUBACK: type, remaining length 2, packet id


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

#: seconds paho gives one connection attempt (its default, set explicitly since the silence
#: allowed while reconnecting counts on it)
CONNECT_TIMEOUT = 5.0


class _Client(mqtt.Client):
    """paho's client, telling the bus each time its network loop goes round."""

    on_loop: Callable[[], None] | None = None

    def loop_misc(self) -> mqtt.MQTTErrorCode:
        # called by paho's network thread at the end of every loop iteration (select timeout
        # 1 s): the cheapest sign that the thread is alive and not stuck in a handler
        if self.on_loop is not None:
            self.on_loop()
        return super().loop_misc()


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
        #: a handler running longer than this, or a network thread silent this long while
        #: connected, is a stall (the daemon sets it from its watchdog interval)
        self.stall_after = 30.0
        # monotonic time of the network thread's last sign of life (see the module docstring)
        self._last_sign = time.monotonic()
        # (topic, monotonic start) of the handler running in the network thread, if any
        self._running: tuple[str, float] | None = None

        client = _Client(
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
        client.connect_timeout = CONNECT_TIMEOUT
        client.on_loop = self._sign
        client.on_pre_connect = lambda client, userdata: self._sign()
        client.on_connect_fail = lambda client, userdata: self._sign()
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
        self._sign()
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

    # ------------------------------------------------------------------ progress

    def _sign(self) -> None:
        """The network thread is alive (called from it only)."""
        self._last_sign = time.monotonic()

    def stalled(self) -> str | None:
        """Why MQTT handling looks stuck, or None while it makes progress (module docstring).

        Called from the daemon's main loop; reads values the network thread writes whole,
        without the bus's lock (a network thread stuck holding it must not hang the caller).
        """
        now = time.monotonic()
        running = self._running
        if running is not None:
            topic, started = running
            if now - started > self.stall_after:
                return (f"the handler for {clip(topic)} has been running for "
                        f"{now - started:.0f} s (limit {self.stall_after:g} s)")
            return None
        silent = now - self._last_sign
        if self._connected:
            if silent > self.stall_after:
                return f"the MQTT network thread has been silent for {silent:.0f} s"
            return None
        # broker away: the thread sleeps between attempts, and an attempt may block
        allowed = (self.stall_after + self.cfg.reconnect_max + CONNECT_TIMEOUT
                   + self.cfg.keepalive)
        if silent > allowed:
            return (f"the MQTT network thread has been silent for {silent:.0f} s while "
                    f"reconnecting (allowed {allowed:.0f} s)")
        return None

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

    def ack_many(self, mids: list[int]) -> None:
        """Acknowledge many QoS 1 messages at once (``manual_ack``), by their ``Message.mid``;
        a mid of 0 (a QoS 0 message) is skipped.

        The PUBACKs go to paho as one queued packet: one wake-up of the network thread and one
        send for a whole batch, where :meth:`Message.ack` costs both per message (a storage
        daemon acknowledging a thousand messages from its writer thread spent a tenth of its
        CPU there). A paho without that internal falls back to one ``ack`` per message.
        """
        if not self.manual_ack:
            return
        client = self._client
        queue = getattr(client, "_packet_queue", None)
        if queue is None:  # pragma: no cover (paho 2.x has it)
            for mid in mids:
                if mid:
                    client.ack(mid, 1)
            return
        packet = b"".join(_PUBACK(0x40, 2, mid) for mid in mids if mid)
        if packet:
            queue(0x40, packet, 0, 0)  # command PUBACK, no mid/qos of its own to track

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
        own per-message filter matching was a fair share of a storage daemon's CPU. A payload
        over ``mqtt.max_message_bytes`` is rejected here, before any handler decodes it.
        """
        size = len(msg.payload)
        if size > self.cfg.max_message_bytes:
            self.counters.inc("received")
            self.counters.inc("rejected")
            log.warning("rejected: payload on %s is %d bytes, over mqtt.max_message_bytes (%d)",
                        clip(msg.topic), size, self.cfg.max_message_bytes)
            if self.manual_ack and msg.qos > 0:
                client.ack(msg.mid, msg.qos)
            return
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
            started = time.monotonic()
            self._running = (message.topic, started)
            try:
                handler(message)
            except Reject as exc:
                self.counters.inc("rejected")
                log.warning("rejected: %s", clip(str(exc), 3 * MAX_QUOTED))
                message.ack()
            except Exception as exc:
                self.counters.inc("errors")
                # the frames, then the exception's text cut: that text may quote the input
                frames = "".join(traceback.format_tb(exc.__traceback__, limit=-8)).rstrip()
                log.error("handler for %s failed: %s: %s\n%s", clip(message.topic),
                          type(exc).__name__, clip(str(exc)), frames)
                message.ack()
            else:
                if not self.manual_ack:
                    message.ack()
            finally:
                self._running = None
                self._sign()
            took = time.monotonic() - started
            if took > self.stall_after:
                log.warning("the handler for %s took %.1f s (limit %g s); no other MQTT "
                            "message, keep-alive or heartbeat went through meanwhile",
                            clip(message.topic), took, self.stall_after)

        return on_message

    def _on_unmatched(self, client: mqtt.Client, msg: mqtt.MQTTMessage) -> None:
        # A persistent session may deliver messages of an old subscription.
        self.counters.inc("rejected")
        log.warning("rejected: no handler for topic %s", clip(msg.topic))
        if self.manual_ack and msg.qos > 0:
            client.ack(msg.mid, msg.qos)

    # ------------------------------------------------------------------ paho callbacks

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any,
                    reason: Any, properties: Any) -> None:
        self._sign()
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
        self._sign()
        with self._lock:
            was = self._connected
            self._connected = False
        if was and reason.is_failure:
            log.warning("lost the broker (%s); reconnecting with backoff", reason)
        elif was:
            log.info("disconnected from the broker")
