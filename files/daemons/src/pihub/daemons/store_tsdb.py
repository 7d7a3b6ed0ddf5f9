"""pihub-store-tsdb: every measurement of ``<root>/data/#`` into the timeseries DB, nothing lost.

Reads (QoS 1, persistent session, acknowledged only once stored)::

    <root>/data/<location>/<quantity>   {"value": 21.5, "unit": "°C", "ts": 1700000000.123}

Writes each one as a point through influxdb-client's InfluxDB v2 write API (contract §4),
in line protocol with millisecond precision::

    <quantity>,location=<location>,host=<host> value=<value> <ts in ms>

VictoriaMetrics stores that as the series ``<quantity>_value{location=..., host=...}``.

How nothing gets lost:

* messages are batched (``batch_size`` points, or ``flush_idle`` seconds without a new message,
  or ``flush_interval`` seconds after the first one) and acknowledged to the broker only after
  their batch reached the DB or the spool; until then the broker keeps them (persistent session);
* when the DB is down, slow (``timeout``) or answers 5xx/401/403/404/429, the batch goes to an
  append-only spool on disk (:class:`PointSpool`, a :class:`pihub.durable.RecordLog` in
  ``spool_dir``, bounded by ``spool_max_bytes``: fsync'd, checksummed, a torn tail cut off and
  counted as ``errors``), and every later batch goes behind it; the spool is replayed in order
  once the DB answers again (probed every ``retry_interval`` seconds, backing off to
  ``retry_max``), at least once (a replayed write cut short is written again);
* a 400/413/422 answer (bad data) is narrowed down by halving the batch to the point(s) the DB
  refuses; those are logged with the point and counted (``db_rejected``), the rest is written;
* a retained message delivered again on every (re)subscribe is not written twice: the last ``ts``
  stored per topic is remembered (and kept in ``spool_dir`` across restarts).

At most ``max_series`` series (topics) are stored: a message of a new series beyond them is
rejected and counted (``rejected`` and ``series_refused``), logged once per heartbeat interval,
and never reaches the DB; the series already known go on.

Publishes only its own ``<root>/store-tsdb/status`` and ``meta``; the heartbeat carries
``spool_bytes``, ``pending`` and ``db_available`` besides the counters ``written``, ``spooled``,
``replayed``, ``spool_full_dropped``, ``db_rejected``, ``db_unavailable``, ``duplicates``,
``series_refused`` (and ``series``, the number of series known).
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pihub.bus import Message, read_secret
from pihub.config import BaseConfig, ConfigError, setting
from pihub.daemon import Daemon, state_directory
from pihub.durable import (
    Damage,
    RecordLog,
    StateError,
    atomic_write,
    atomic_write_json,
    read_json,
)
from pihub.topics import Reject, decode_measurement, measurement_fields

DEFAULT_STATE_DIR = "/var/lib/pihub-store-tsdb"  # what state_directory() falls back to
MAX_SERIES_CACHED = 10000
# Seconds between two saves of last_ts.json while data flows (and once at stop). Each save is a
# new file, fsync'd with its directory: every 5 s that was most of the daemon's SD-card writes
# (bench/sd_writes.py). A power cut loses at most this much of it, which costs one retained value
# per topic written again with the same time and value (VictoriaMetrics' dedup keeps one).
STATE_SAVE_S = 300.0
COUNTERS = ("written", "spooled", "replayed", "spool_full_dropped", "db_rejected",
            "db_unavailable", "duplicates", "series_refused")


@dataclass(kw_only=True)
class Config(BaseConfig):
    url: str = setting(
        help="Base URL of the DB's InfluxDB v2 API (the timeseries role's VictoriaMetrics: "
        "http://127.0.0.2:8428).",
        example="http://127.0.0.2:8428", pattern=r"^https?://\S+$",
    )
    org: str = setting("pihub", "InfluxDB organisation (VictoriaMetrics ignores it).")
    bucket: str = setting("pihub", "InfluxDB bucket (VictoriaMetrics ignores it).")
    token_file: str | None = setting(
        None, "File holding the API token (first line), or null for none (VictoriaMetrics)."
    )
    username: str | None = setting(
        None, "User name for HTTP basic auth (VictoriaMetrics' -httpAuth.username), or null.",
    )
    password_file: str | None = setting(
        None, "File holding the HTTP basic auth password (first line); goes with username.",
    )
    host_tag: str | None = setting(
        None, "Value of the points' host tag; null means the hub's name: this host's name at "
        "the first start, kept in spool_dir's host_tag file (a restored hub keeps its series)."
    )
    batch_size: int = setting(
        1000, "Points per write. The broker must let this many QoS 1 messages wait for their "
        "acknowledgement (Mosquitto: max_inflight_messages, default 20, 0 = no limit), else "
        "batches only go out after flush_idle.", min=1, max=100000,
    )
    # Once a minute by default: every write becomes new files in VictoriaMetrics (it has no
    # flush setting), so how often store-tsdb writes is most of what the hub writes to its SD
    # card (bench/sd_writes.py). The history lags the live values (retained MQTT) by up to a
    # minute; nothing is lost meanwhile: the broker keeps the unacknowledged messages.
    flush_idle: float = setting(
        60.0, "Write the batch when no message came for this many seconds.", min=0.001, max=60,
    )
    flush_interval: float = setting(
        60.0, "Write the batch at the latest this many seconds after its first point.",
        min=0.01, max=300,
    )
    timeout: float = setting(
        10.0, "Seconds to wait for the DB's answer before the batch goes to the spool.",
        min=0.1, max=300,
    )
    spool_dir: str | None = setting(
        None, "Directory of the spool and of the last-ts state; null means $STATE_DIRECTORY "
        f"(systemd's StateDirectory), else {DEFAULT_STATE_DIR}.",
    )
    spool_max_bytes: int = setting(
        100_000_000, "Most bytes the spool may hold; points that do not fit are dropped, logged "
        "and counted (spool_full_dropped).", min=4096,
    )
    retry_interval: float = setting(
        5.0, "Seconds before the first replay attempt once the DB failed.", min=0.05, max=3600,
    )
    retry_max: float = setting(
        60.0, "Longest wait between two replay attempts (the wait doubles each failure).",
        min=0.05, max=3600,
    )
    replay_batch_size: int = setting(
        5000, "Points per write when replaying the spool.", min=1, max=100000,
    )
    max_series: int = setting(
        10000, "Most series (data topics) stored; a message of a new series beyond them is "
        "rejected, counted (series_refused) and logged once per heartbeat interval.", min=1,
    )
    max_ts_ahead: float = setting(
        86400.0, "Reject a measurement whose ts is more than this many seconds ahead of this "
        "host's clock (a ts in milliseconds, say): the DB would drop it silently.", min=1,
    )

    def check(self) -> None:
        if self.retry_max < self.retry_interval:
            raise ConfigError("retry_max", "must be >= retry_interval")
        if self.host_tag is not None and not self.host_tag.strip():
            raise ConfigError("host_tag", "must not be empty; use null for this host's name")
        if (self.username is None) != (self.password_file is None):
            raise ConfigError("password_file" if self.username else "username",
                              "username and password_file go together (HTTP basic auth)")
        if self.username is not None and self.token_file is not None:
            raise ConfigError("token_file", "give either token_file or username and "
                              "password_file, not both")


def _escape_tag(value: str) -> str:
    """Escape a tag value for line protocol (commas, equal signs, spaces, backslashes)."""
    return (value.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=")
            .replace(" ", "\\ "))


class PointSpool(RecordLog):
    """The batches of line-protocol points the DB did not take yet, replayed oldest first.

    A :class:`~pihub.durable.RecordLog` in ``<spool_dir>/points/``, one record per point, so a
    replay can commit exactly the points the DB took. Used by the writer thread only.

    Upgrade: versions before it spooled to ``<spool_dir>/spool/<seq>.lp`` (plain lines, unsynced)
    with a ``cursor`` file "seq offset". Points found there are appended to this log at open
    (past the size bound if need be: they were acknowledged already), then those files go.
    A crash in between replays them twice, which the DB's dedup absorbs.
    """

    def __init__(self, state_dir: Path, max_bytes: int,
                 on_damage: Callable[[Damage], None]) -> None:
        super().__init__(state_dir / "points", max_bytes, on_damage=on_damage)
        self.adopted = self._adopt_old_spool(state_dir / "spool")

    def _adopt_old_spool(self, old: Path) -> int:
        """Append the points of the old spool format to this log; return how many."""
        segments = sorted(old.glob("*.lp")) if old.is_dir() else []
        if not segments:
            if old.is_dir():
                self._remove_old(old, [])
            return 0
        cursor = old / "cursor"
        seq, offset = int(segments[0].stem), 0
        with contextlib.suppress(FileNotFoundError):
            text = cursor.read_text()
            try:
                seq, offset = (int(x) for x in text.split())
            except ValueError:
                self._report(Damage(cursor, 0, len(text), "unreadable cursor of the old spool "
                                    "format; replaying all of it"))
        adopted = 0
        for path in segments:
            if int(path.stem) < seq:
                continue  # replayed before the upgrade
            data = path.read_bytes()[offset if int(path.stem) == seq else 0:]
            keep = data.rfind(b"\n") + 1
            if keep < len(data):
                self._report(Damage(path, keep, len(data) - keep, "a point torn by a crash "
                                    "(no end of line) in the old spool format", tail=True))
            lines = [line for line in data[:keep].split(b"\n") if line]
            self.append(lines, force=True)
            adopted += len(lines)
        self._remove_old(old, segments)
        return adopted

    def _remove_old(self, old: Path, segments: list[Path]) -> None:
        for path in [*segments, old / "cursor", old / "cursor.tmp"]:
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            old.rmdir()  # kept if anything else is in it


# An entry waiting in the batch: line protocol, the message's mid (0: QoS 0, nothing to
# acknowledge), topic, ts
Entry = tuple[str, int, str, float]


class StoreTsdb(Daemon[Config]):
    name = "store-tsdb"
    config_class = Config
    description = "Store every measurement of <root>/data/# in the timeseries DB, nothing lost."
    persistent_session = True
    manual_ack = True

    def __init__(self, config: Config, config_path: str | None = None) -> None:
        super().__init__(config, config_path)
        cfg = self.config
        self.token = read_secret(cfg.token_file, "token_file") if cfg.token_file else None
        self.basic_auth = (f"{cfg.username}:{read_secret(cfg.password_file, 'password_file')}"
                           if cfg.username and cfg.password_file else None)
        self.state_dir = state_directory(self.name, cfg.spool_dir)
        try:
            self.spool = PointSpool(self.state_dir, cfg.spool_max_bytes, self._spool_damaged)
        except OSError as exc:
            raise ConfigError("spool_dir", f"cannot use {self.state_dir}: {exc}") from exc
        self.state_file = self.state_dir / "last_ts.json"
        self.stored_ts = self._load_state()
        self.seen_ts = dict(self.stored_ts)  # the handler's view, includes points in flight
        self.host_tag_file = self.state_dir / "host_tag"
        self.host_tag = _escape_tag(cfg.host_tag or self._hub_name())
        self._prefixes: dict[str, str] = {}
        # a plain Lock under the Condition: the handler enters it per message, at C speed
        self._pending_lock = threading.Lock()
        self._cond = threading.Condition(self._pending_lock)
        self._pending: list[Entry] = []
        self._high_water = 2 * cfg.batch_size  # batch_size needs a restart (not in reload)
        self._first_at = self._last_at = 0.0
        self._closing = False
        self._state_lock = threading.Lock()
        self._state_dirty = False
        self._db_available = True
        self._backoff = cfg.retry_interval
        self._retry_at = 0.0
        self._full_logged = False
        self._writer: threading.Thread | None = None
        self.client: Any = None
        self.write_api: Any = None

    # ------------------------------------------------------------------ setup and state

    def setup(self) -> None:
        # numpy is optional for influxdb-client (DataFrames) and costs ~15 MB: we never use it
        sys.modules.setdefault("numpy", None)  # type: ignore[arg-type]
        from influxdb_client import InfluxDBClient
        from influxdb_client.client.write_api import SYNCHRONOUS

        for counter in COUNTERS:
            self.count(counter, 0)  # every counter in every heartbeat, from the start
        cfg = self.config
        # HTTP basic auth: influxdb-client sends "Basic base64(token)" with auth_basic
        self.client = InfluxDBClient(url=cfg.url, token=self.basic_auth or self.token or "",
                                     auth_basic=self.basic_auth is not None, org=cfg.org,
                                     timeout=int(cfg.timeout * 1000), retries=False,
                                     enable_gzip=False)
        self.write_api = self.client.write_api(write_options=SYNCHRONOUS)
        if self.spool.adopted:
            self.log.info("spool: took over %d point(s) from the spool format of an earlier "
                          "version in %s", self.spool.adopted, self.state_dir / "spool")
        if not self.spool.empty:
            self.log.info("spool holds %d bytes from before; replaying them before new points",
                          self.spool.size)
        self._writer = threading.Thread(target=self._write_loop, name="writer", daemon=True)
        self._writer.start()
        self.subscribe(self.topics.sub("data", "#"), self._on_message)
        self.every(STATE_SAVE_S, self._save_state, first_in=STATE_SAVE_S,
                   name="save-state")

    def shutdown(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._writer is not None:
            self._writer.join(self.config.timeout * 2 + 5)
            if self._writer.is_alive():
                self.log.error("writer still busy at stop; unacknowledged points stay with "
                               "the broker")
        self._save_state()
        if self.client is not None:
            self.client.close()

    def heartbeat_extra(self) -> dict[str, Any]:
        with self._cond:
            pending = len(self._pending)
        return {"spool_bytes": self.spool.size, "pending": pending,
                "db_available": self._db_available, "series": len(self.seen_ts)}

    def reload(self, new: Config, changed: set[str]) -> set[str]:
        return changed & {"max_series"}

    def _spool_damaged(self, damage: Damage) -> None:
        """A damaged stretch of the spool (a crash or a bad card): skipped, logged, counted."""
        self.count("errors")
        self.log.warning("spool: %s; the points before and after it are kept", damage)

    def _hub_name(self) -> str:
        """The ``host`` tag when ``host_tag`` is null: the name this hub first stored under.

        Kept in ``<spool_dir>/host_tag`` (written at the first start), so that it travels with
        the state: a hub restored onto a new Pi of another host name (playbooks/restore.yml)
        goes on with the same series instead of starting a second set under the new name.
        """
        try:
            kept = self.host_tag_file.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            kept = ""
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError("host_tag", f"cannot read {self.host_tag_file} (the hub's name "
                              f"its points are tagged with): {exc}") from exc
        if kept:
            if kept != self.host:
                self.log.info("points tagged host=%s as before (%s), not this host's name %s",
                              kept, self.host_tag_file, self.host)
            return kept
        try:
            atomic_write(self.host_tag_file, self.host + "\n")
        except OSError as exc:
            raise ConfigError("spool_dir", f"cannot write {self.host_tag_file}: {exc}") from exc
        return self.host

    def _load_state(self) -> dict[str, float]:
        try:
            data = read_json(self.state_file)
        except StateError as exc:
            self.count("errors")
            self.log.warning("%s; retained messages may be stored twice once", exc)
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: float(v) for k, v in data.items() if isinstance(v, int | float)}

    def _save_state(self) -> None:
        with self._state_lock:
            if not self._state_dirty:
                return
            snapshot = dict(self.stored_ts)
            self._state_dirty = False
        try:
            atomic_write_json(self.state_file, snapshot)
        except OSError as exc:
            self.count("errors")
            self.log.error("cannot save %s: %s", self.state_file, exc)
            with self._state_lock:
                self._state_dirty = True

    # ------------------------------------------------------------------ the MQTT side

    def _on_message(self, msg: Message) -> None:
        """Check a data message and put it in the batch (paho's network thread).

        The hot path: ``topics.measurement_fields`` checks the payload, the topic's parse (and
        its line-protocol prefix) is cached per topic.
        """
        topic = msg.topic
        cfg = self.config
        prefix = self._prefixes.get(topic)
        cached = prefix is not None
        if prefix is None:
            location, quantity = self.topics.split(topic, "data", 2)
            prefix = f"{quantity},location={location},host={self.host_tag} value="
        if topic not in self.seen_ts and len(self.seen_ts) >= cfg.max_series:
            self.refuse_new_series(topic, cfg.max_series)
            msg.ack()
            return
        if not cached:
            if len(self._prefixes) >= MAX_SERIES_CACHED:
                self._prefixes.clear()
            self._prefixes[topic] = prefix
        value, _unit, ts = measurement_fields(decode_measurement(msg.payload, topic), topic)
        if ts > time.time() + cfg.max_ts_ahead:
            raise Reject(f"payload on {topic}: 'ts' {ts!r} is more than "
                         f"{cfg.max_ts_ahead:g} s ahead of this host's clock "
                         "(expected UNIX seconds)")
        last = self.seen_ts.get(topic)
        if last is not None and (ts == last or (msg.retain and ts < last)):
            self.count("duplicates")
            self.log.debug("skipped %s ts %r: stored before (retained=%s)", topic, ts,
                           msg.retain)
            msg.ack()
            return
        self.seen_ts[topic] = ts
        line = f"{prefix}{float(value)!r} {round(ts * 1000)}"
        mid = msg.mid if msg.qos else 0
        with self._pending_lock:  # the Condition's lock
            pending = self._pending
            # bounded memory: wait while the writer is behind by two batches
            while len(pending) >= self._high_water and not self._closing:
                self._cond.wait(1.0)
                pending = self._pending
            mono = time.monotonic()
            if not pending:
                self._first_at = mono
                self._cond.notify()
            self._last_at = mono
            pending.append((line, mid, topic, ts))
            if len(pending) == cfg.batch_size:
                self._cond.notify()

    # ------------------------------------------------------------------ the writer thread

    def _write_loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                if batch:
                    self._store(batch)
                if not batch or not self.spool.empty:
                    self._replay_some()
            except Exception:
                self.count("errors")
                self.log.exception("writer failed; points stay unacknowledged with the broker")
                time.sleep(1.0)

    def _next_batch(self) -> list[Entry] | None:
        """Wait until a batch is due (or a replay); None when closing and nothing is left."""
        cfg = self.config
        with self._cond:
            while True:
                now = time.monotonic()
                n = len(self._pending)
                if self._closing:
                    if not n:
                        return None
                    break
                if n >= cfg.batch_size:
                    break
                deadlines = []
                if n:
                    due = min(self._first_at + cfg.flush_interval,
                              self._last_at + cfg.flush_idle)
                    if due <= now:
                        break
                    deadlines.append(due)
                if not self.spool.empty:
                    if self._retry_at <= now:
                        return []  # time to replay
                    deadlines.append(self._retry_at)
                self._cond.wait(max(0.001, min(deadlines) - now) if deadlines else None)
            batch, self._pending = self._pending, []
            self._cond.notify_all()
            return batch

    def _store(self, batch: list[Entry]) -> None:
        """Write ``batch`` to the DB (or the spool), then acknowledge it."""
        lines = [e[0] for e in batch]
        if self.spool.empty:
            started = time.monotonic()
            rest = self._write(lines)
            self.count("written", len(lines) - len(rest))
            self.log.debug("wrote %d of %d point(s) in %.0f ms", len(lines) - len(rest),
                           len(lines), (time.monotonic() - started) * 1000)
            if rest:
                self._db_failed()
        else:
            rest = lines  # older points wait in the spool: keep the order
        if rest:
            self._to_spool(rest)
        # stored or spooled: acknowledged all at once (one packet, one wake-up of paho's thread)
        self.bus.ack_many([e[1] for e in batch])
        with self._state_lock:
            for _line, _mid, topic, ts in batch:
                self.stored_ts[topic] = ts
            self._state_dirty = True

    def _to_spool(self, lines: list[str]) -> None:
        encoded = [line.encode() for line in lines]
        while True:
            try:
                ok = self.spool.append(encoded)
            except OSError as exc:
                # nothing acked yet: keep trying, the broker holds back the rest meanwhile
                self.count("errors")
                self.log.error("cannot write the spool in %s: %s; retrying in %.0f s",
                               self.spool.dir, exc, self.config.retry_interval)
                if self.stopping.wait(self.config.retry_interval):
                    self.log.error("stopping with %d points neither stored nor spooled; they "
                                   "stay unacknowledged with the broker", len(lines))
                    raise
                continue
            break
        if ok:
            self.count("spooled", len(lines))
            self._full_logged = False
            return
        self.count("spool_full_dropped", len(lines))
        if not self._full_logged:
            self._full_logged = True
            self.log.error("spool full (%d of spool_max_bytes=%d bytes used): dropping %d "
                           "point(s), the first %s; points are dropped until the DB is back",
                           self.spool.size, self.spool.max_bytes, len(lines), lines[0])
        else:
            self.log.debug("spool full: dropped %d more point(s)", len(lines))

    def _replay_some(self) -> None:
        """Write the oldest spooled points; on failure wait (backoff) before the next try."""
        if self.spool.empty or self._retry_at > time.monotonic():
            return
        lines = self.spool.read(self.config.replay_batch_size)
        if not lines:
            return
        texts = [line.decode() for line in lines]
        rest = self._write(texts)
        done = len(lines) - len(rest)
        if done:
            self.spool.commit(done)
            self.count("replayed", done)
        if rest:
            self._db_failed()
            return
        if not self._db_available:
            self._db_available = True
            self._backoff = self.config.retry_interval
            self.log.info("DB at %s answers again; replaying the spool (%d bytes left)",
                          self.config.url, self.spool.size)
        if self.spool.empty:
            self.log.info("spool replayed; writing directly again")

    def _db_failed(self) -> None:
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, self.config.retry_max)

    def _write(self, lines: list[str]) -> list[str]:
        """Write ``lines``; return the suffix not stored because the DB is unavailable.

        Points the DB refuses as bad data are logged, counted and dropped (halving the batch
        to find them), so they never block the others.
        """
        from influxdb_client.rest import ApiException
        from urllib3.exceptions import HTTPError

        try:
            self.write_api.write(self.config.bucket, self.config.org,
                                 "\n".join(lines).encode(), write_precision="ms")
        except ApiException as exc:
            status = exc.status or 0
            if status in (400, 413, 422):
                if len(lines) == 1:
                    self.count("db_rejected")
                    self.log.error("DB at %s refused a point (HTTP %d: %s): %s",
                                   self.config.url, status, _reason(exc), lines[0])
                    return []
                half = len(lines) // 2
                rest = self._write(lines[:half])
                return rest + lines[half:] if rest else self._write(lines[half:])
            self._unavailable(f"HTTP {status}: {_reason(exc)}")
            return lines
        except (HTTPError, OSError) as exc:
            self._unavailable(str(exc))
            return lines
        return []

    def _unavailable(self, why: str) -> None:
        self.count("db_unavailable")
        if self._db_available:
            self._db_available = False
            self.log.error("DB at %s unavailable (%s): spooling to %s until it is back",
                           self.config.url, why, self.spool.dir)
        else:
            self.log.debug("DB at %s still unavailable: %s", self.config.url, why)


def _reason(exc: Any) -> str:
    body = exc.body
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    text = (body or exc.reason or "").strip()
    try:
        message = json.loads(text).get("message")
        if message:
            text = str(message)
    except (ValueError, AttributeError):
        pass
    return text[:300]


main = StoreTsdb.main

if __name__ == "__main__":
    sys.exit(main())
