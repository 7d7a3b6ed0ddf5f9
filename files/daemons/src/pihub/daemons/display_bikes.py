"""pihub-display-bikes: bike-sharing availability from a GBFS feed, for a display.

Reads a system's GBFS discovery file (``gbfs.json``, versions 2.x and 3.x; Velib's 2.x-like
feed included), then ``station_information``, ``vehicle_types`` (when listed) and
``station_status``, with requests. ``station_status`` is polled every ``interval`` seconds, but
never again before its ``ttl`` has run out; the other files every ``info_interval`` seconds (or
their ttl, when longer).

Publishes one retained JSON message per configured station on
``<root>/display/<board>/<item>`` (never under ``data/``: nothing stores it)::

    {"station_id": "213688169", "name": "Bastille", "feed_name": "Bastille - Rue de la Roquette",
     "bikes": 12, "mechanical": 7, "electric": 5, "docks": 23,
     "is_installed": true, "is_renting": true, "is_returning": true,
     "last_reported": 1715000000.0, "fetched_at": 1715000042.123, "ts": 1715000042.130,
     "stale": false, "reason": null}

``mechanical``/``electric`` are null when the feed does not split the count; ``docks`` and the
flags are null when the feed leaves them out. When the feed is down, slow, malformed, or the
station is missing from it, the last good values are published again with ``stale: true`` and
the reason; a station never seen yet is published with null counts, ``stale: true`` and a
reason saying it is unknown. Failures count ``fetch_errors`` (and ``errors``) in the heartbeat.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urljoin

import requests

from pihub import __version__
from pihub.config import BaseConfig, ConfigError, setting
from pihub.daemon import Daemon
from pihub.topics import SEGMENT, clip_text, shown
from pihub.web import FetchError, fetch, session

MAX_BYTES = 32 * 1024 * 1024  # the biggest station_information files are a few MB
TICK = 1.0  # seconds between two checks of what is due


@dataclass(kw_only=True)
class StationConfig:
    item: str = setting(
        help="Topic segment of this station: <root>/display/<board>/<item>.",
        example="bastille", pattern=SEGMENT.pattern,
    )
    id: str | int | None = setting(
        None, "The feed's station_id (its short_name or Velib stationCode also match); "
        "give id or name.",
    )
    name: str | None = setting(
        None, "The station's name as station_information spells it (any case), instead of id."
    )
    display_name: str | None = setting(
        None, "Name to show; null shows the feed's name."
    )

    def check(self) -> None:
        if (self.id is None) == (self.name is None):
            raise ConfigError("id", "give exactly one of id or name for a station")


@dataclass(kw_only=True)
class Config(BaseConfig):
    discovery_url: str = setting(
        help="URL of the system's GBFS discovery file (gbfs.json), e.g. Velib's "
        "https://velib-metropole-opendata.smovengo.cloud/opendata/Velib_Metropole/gbfs.json "
        "(the example is the stand-in's local fixture).",
        example="http://127.0.0.1:8081/v2/gbfs.json",
        pattern=r"^https?://\S+$",
    )
    stations: list[StationConfig] = setting(
        help="The stations to show, each with a topic item and an id or a name.",
        example=[
            {"item": "godard", "id": "213688169", "display_name": "Godard"},
            {"item": "gare-de-lyon", "name": "Gare de Lyon - Diderot"},
        ],
    )
    board: str = setting("bikes", "Board segment of the topics.", pattern=SEGMENT.pattern)
    language: str = setting(
        "en", "Language of the feed list (GBFS 2.x) and of station names (GBFS 3.x); "
        "the first one offered is used when this one is missing.",
    )
    interval: float = setting(
        60.0, "Seconds between two polls of station_status; the feed's ttl wins when longer.",
        min=1, max=86400,
    )
    info_interval: float = setting(
        3600.0, "Seconds between two reads of gbfs.json, station_information and vehicle_types "
        "(their ttl wins when longer).", min=1, max=7 * 86400,
    )
    timeout: float = setting(
        10.0, "Seconds a whole answer may take (connect and read) before the poll fails.",
        min=0.1, max=300,
    )
    user_agent: str = setting(
        f"pihub-display-bikes/{__version__} (home display; python-requests)",
        "User-Agent header sent to the feed.",
    )

    def check(self) -> None:
        if not self.stations:
            raise ConfigError("stations", "list at least one station")
        seen: set[str] = set()
        for i, station in enumerate(self.stations):
            if station.item in seen:
                raise ConfigError(f"stations[{i}].item", f"{station.item!r} is used twice")
            seen.add(station.item)


# A feed that cannot be read or does not follow GBFS; the text says where and why.
FeedError = FetchError


def fetch_json(session: requests.Session, url: str, timeout: float) -> Any:
    """GET ``url`` and decode JSON; the whole answer must come within ``timeout`` seconds."""
    body, _charset = fetch(session, url, timeout, MAX_BYTES)
    try:
        return json.loads(bytes(body))
    except ValueError as exc:
        raise FeedError(f"{url}: not JSON ({exc}): {bytes(body[:60])!r}") from None


def gbfs_data(doc: Any, url: str, key: str | None = None) -> Any:
    """The ``data`` object of a GBFS file (``data[key]`` when key is given), checked."""
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), dict):
        raise FeedError(f"{url}: expected a GBFS object with a 'data' object, got "
                        f"{type(doc).__name__} {str(doc)[:60]!r}")
    if key is None:
        return doc["data"]
    value = doc["data"].get(key)
    if not isinstance(value, list):
        raise FeedError(f"{url}: expected a list in data.{key}, got {type(value).__name__}")
    return value


def ttl_of(doc: Any) -> float:
    ttl = doc.get("ttl") if isinstance(doc, dict) else None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl < 0:
        return 0.0
    return float(ttl)


def discovery_feeds(doc: Any, url: str, language: str) -> tuple[dict[str, str], str]:
    """Feed name -> absolute URL from gbfs.json (2.x: per language, 3.x: one list)."""
    data = gbfs_data(doc, url)
    if isinstance(data.get("feeds"), list):  # 3.x
        feeds, chosen = data["feeds"], ""
    else:  # 1.x / 2.x: {"<language>": {"feeds": [...]}}
        langs = [k for k, v in data.items() if isinstance(v, dict)]
        if not langs:
            raise FeedError(f"{url}: data holds neither 'feeds' (GBFS 3) nor languages (GBFS 2)")
        chosen = pick_language(langs, language)
        feeds = data[chosen].get("feeds")
        if not isinstance(feeds, list):
            raise FeedError(f"{url}: expected a list in data.{chosen}.feeds")
    out: dict[str, str] = {}
    for feed in feeds:
        if isinstance(feed, dict) and isinstance(feed.get("name"), str) and isinstance(
                feed.get("url"), str):
            out[feed["name"]] = urljoin(url, feed["url"])
    if "station_status" not in out:
        raise FeedError(f"{url}: lists no station_status feed (feeds: "
                        f"{', '.join(sorted(out)) or 'none'})")
    return out, chosen


def pick_language(offered: list[str], wanted: str) -> str:
    for lang in offered:
        if lang.lower() == wanted.lower():
            return lang
    for lang in offered:
        if lang.lower().split("-")[0] == wanted.lower().split("-")[0]:
            return lang
    return offered[0]


def localized(value: Any, language: str) -> str | None:
    """A name: a plain string (GBFS 2.x) or [{"text", "language"}] (GBFS 3.x)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = {str(v.get("language", "")): v["text"] for v in value
                 if isinstance(v, dict) and isinstance(v.get("text"), str)}
        if texts:
            return texts[pick_language(list(texts), language)]
    return None


def all_names(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v["text"] for v in value if isinstance(v, dict) and isinstance(v.get("text"), str)]
    return []


def vehicle_kinds(types: list[Any]) -> dict[str, str]:
    """vehicle_type_id -> mechanical | electric | other, from vehicle_types' propulsion_type."""
    out = {}
    for vt in types:
        if not isinstance(vt, dict) or "vehicle_type_id" not in vt:
            continue
        propulsion = vt.get("propulsion_type")
        kind = ("mechanical" if propulsion == "human"
                else "electric" if propulsion in ("electric_assist", "electric") else "other")
        out[str(vt["vehicle_type_id"])] = kind
    return out


def count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return None
    return int(value)


def flag(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if value in (0, 1):
        return bool(value)
    return None


def timestamp(value: Any) -> float | None:
    """POSIX seconds (GBFS 2.x) or RFC 3339 text (GBFS 3.x) as UNIX seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            return None
    return None


def station_values(st: dict[str, Any], kinds: dict[str, str], url: str) -> dict[str, Any]:
    """What a display shows of one station_status entry (2.x, 3.x or Velib's)."""
    bikes = count(st.get("num_vehicles_available", st.get("num_bikes_available")))
    if bikes is None:
        raise FeedError(f"{url}: station {shown(st.get('station_id'))} has no count of bikes "
                        f"(num_bikes_available / num_vehicles_available)")
    mechanical = electric = None
    by_type = st.get("vehicle_types_available")
    velib = st.get("num_bikes_available_types")
    if isinstance(by_type, list) and kinds:
        sums = {"mechanical": 0, "electric": 0, "other": 0}
        for entry in by_type:
            if isinstance(entry, dict):
                kind = kinds.get(str(entry.get("vehicle_type_id")), "other")
                sums[kind] += count(entry.get("count")) or 0
        mechanical, electric = sums["mechanical"], sums["electric"]
    elif isinstance(velib, list | dict):  # Velib: [{"mechanical": n}, {"ebike": n}]
        merged: dict[str, Any] = {}
        for part in velib if isinstance(velib, list) else [velib]:
            if isinstance(part, dict):
                merged.update(part)
        mechanical, electric = count(merged.get("mechanical")), count(merged.get("ebike"))
    return {
        "bikes": bikes,
        "mechanical": mechanical,
        "electric": electric,
        "docks": count(st.get("num_docks_available")),
        "is_installed": flag(st.get("is_installed")),
        "is_renting": flag(st.get("is_renting")),
        "is_returning": flag(st.get("is_returning")),
        "last_reported": timestamp(st.get("last_reported")),
    }


@dataclass
class Feed:
    """One GBFS file: its last good data, and when it may be read again."""

    name: str
    url: str = ""
    doc: Any = None
    ttl: float = 0.0
    fetched_at: float = 0.0  # UNIX seconds of the last good read
    read_at: float = field(default=-1e18)  # monotonic time of the last good read


class BikesDisplay(Daemon[Config]):
    name = "display-bikes"
    config_class = Config
    description = "Publish bike-sharing station availability (GBFS) for a display."

    @classmethod
    def published_topics(cls, config: Config) -> list[str]:
        return [f"display/{config.board}/{station.item}" for station in config.stations]

    def setup(self) -> None:
        self.session = session(self.config.user_agent, "application/json")
        self.discovery = Feed("gbfs", self.config.discovery_url)
        self.feeds: dict[str, Feed] = {}
        self.last_good: dict[str, dict[str, Any]] = {}  # item -> last published good values
        self.stale: dict[str, str] = {}  # item -> reason, for stations now stale
        self.status_due = 0.0  # monotonic time of the next station_status read
        self.failures = 0
        self.every(TICK, self.tick, name="poll")

    def shutdown(self) -> None:
        self.session.close()

    def heartbeat_extra(self) -> dict[str, Any]:
        status = self.feeds.get("station_status")
        return {"stations": len(self.config.stations), "stale": len(self.stale),
                "status_ttl_s": status.ttl if status else None}

    # ------------------------------------------------------------------ polling

    def tick(self) -> None:
        now = time.monotonic()
        if now < self.status_due:
            status = self.feeds.get("station_status")
            if status and now >= status.read_at + self.config.interval:
                self.count("ttl_waits")  # the interval has passed, the feed's ttl has not
            return
        try:
            self.refresh_info(now)
            status = self.read(self.feeds["station_status"])
        except FeedError as exc:
            self.failed(str(exc))
            return
        self.failures = 0
        self.status_due = status.read_at + max(self.config.interval, status.ttl)
        self.publish_all()

    def refresh_info(self, now: float) -> None:
        """Read gbfs.json and the slow-changing files when due; old copies serve on failure."""
        every = self.config.info_interval
        if now >= self.discovery.read_at + max(every, self.discovery.ttl) or not self.feeds:
            try:
                self.read(self.discovery)
                urls, lang = discovery_feeds(self.discovery.doc, self.discovery.url,
                                             self.config.language)
            except FeedError as exc:
                if not self.feeds:
                    raise
                self.count("fetch_errors")
                self.count("errors")
                self.log.warning("%s; keeping the feed list read %.0f s ago", exc,
                                 now - self.discovery.read_at)
            else:
                if lang and lang.lower() != self.config.language.lower():
                    self.log.info("%s offers no %r feeds; using %r", self.discovery.url,
                                  self.config.language, lang)
                for name, url in urls.items():
                    if name in ("station_status", "station_information", "vehicle_types"):
                        feed = self.feeds.setdefault(name, Feed(name))
                        if feed.url != url:
                            feed.url, feed.read_at = url, -1e18
        for name in ("station_information", "vehicle_types"):
            info = self.feeds.get(name)
            if info is None or now < info.read_at + max(every, info.ttl):
                continue
            try:
                self.read(info)
            except FeedError as exc:
                self.count("fetch_errors")
                self.count("errors")
                self.log.warning("%s; %s", exc, "keeping the copy read before"
                                 if info.doc is not None else "going on without it")

    def read(self, feed: Feed) -> Feed:
        key = {"station_status": "stations", "station_information": "stations",
               "vehicle_types": "vehicle_types"}.get(feed.name)
        doc = fetch_json(self.session, feed.url, self.config.timeout)
        gbfs_data(doc, feed.url, key)  # checks the shape before it replaces a good copy
        self.count("fetches")
        feed.doc, feed.ttl = doc, ttl_of(doc)
        feed.fetched_at, feed.read_at = time.time(), time.monotonic()
        return feed

    def failed(self, reason: str) -> None:
        self.count("fetch_errors")
        self.count("errors")
        self.failures += 1
        backoff = self.config.interval * 2 ** min(self.failures - 1, 6)
        self.status_due = time.monotonic() + min(backoff, max(self.config.interval, 600.0))
        self.log.warning("poll failed (%d in a row): %s", self.failures, reason)
        for station in self.config.stations:
            self.publish_stale(station, reason)

    # ------------------------------------------------------------------ publishing

    def publish_all(self) -> None:
        status = self.feeds["station_status"]
        by_id = {str(st.get("station_id")): st
                 for st in gbfs_data(status.doc, status.url, "stations") if isinstance(st, dict)}
        info = self.feeds.get("station_information")
        info_list = (gbfs_data(info.doc, info.url, "stations")
                     if info is not None and info.doc is not None else [])
        types = self.feeds.get("vehicle_types")
        kinds = (vehicle_kinds(gbfs_data(types.doc, types.url, "vehicle_types"))
                 if types is not None and types.doc is not None else {})
        for station in self.config.stations:
            found = self.find(station, info_list, by_id)
            if isinstance(found, str):
                self.count("missing_stations")
                self.count("errors")
                self.publish_stale(station, found)
                continue
            station_id, info_entry = found
            try:
                values = station_values(by_id[station_id], kinds, status.url)
            except FeedError as exc:
                self.count("errors")
                self.log.warning("%s", exc)
                self.publish_stale(station, str(exc))
                continue
            feed_name = localized(info_entry.get("name"), self.config.language) \
                if info_entry else None
            feed_name = clip_text(feed_name) if isinstance(feed_name, str) else None
            payload = {
                "station_id": clip_text(station_id),
                "name": station.display_name or feed_name or station_id,
                "feed_name": feed_name,
                **values,
                "fetched_at": round(status.fetched_at, 3),
                "ts": round(time.time(), 3),
                "stale": False,
                "reason": None,
            }
            self.last_good[station.item] = payload
            if self.stale.pop(station.item, None) is not None:
                self.log.info("station %s is back", station.item)
            self.publish_json(self.topics.display(self.config.board, station.item), payload)

    def find(self, station: StationConfig, info: list[Any], status: dict[str, Any]
             ) -> tuple[str, dict[str, Any] | None] | str:
        """(station_id, its station_information entry) or the reason it is not there."""
        url = self.feeds["station_status"].url
        if station.id is not None:
            wanted = str(station.id)
            info_entry = next((e for e in info if isinstance(e, dict)
                               and str(e.get("station_id")) == wanted), None)
            if wanted in status:
                return wanted, info_entry
            for st in list(status.values()) + info:  # short_name / Velib's stationCode
                if isinstance(st, dict) and wanted in (*all_names(st.get("short_name")),
                                                       str(st.get("stationCode"))):
                    sid = str(st.get("station_id"))
                    if sid in status:
                        entry = next((e for e in info if isinstance(e, dict)
                                      and str(e.get("station_id")) == sid), None)
                        return sid, entry
            return f"station id {wanted!r} is not in station_status ({url})"
        assert station.name is not None
        wanted = station.name.casefold()
        if not info:
            return f"station {station.name!r}: station_information is not available"
        for entry in info:
            if isinstance(entry, dict) and wanted in (
                    n.casefold() for n in all_names(entry.get("name"))):
                sid = str(entry.get("station_id"))
                if sid in status:
                    return sid, entry
                return f"station {station.name!r} (id {sid}) is not in station_status ({url})"
        return (f"station name {station.name!r} is not in station_information "
                f"({self.feeds['station_information'].url})")

    def publish_stale(self, station: StationConfig, reason: str) -> None:
        reason = clip_text(reason)
        last = self.last_good.get(station.item)
        if last is None:
            payload: dict[str, Any] = {
                "station_id": str(station.id) if station.id is not None else None,
                "name": station.display_name or station.name or str(station.id),
                "feed_name": None, "bikes": None, "mechanical": None, "electric": None,
                "docks": None, "is_installed": None, "is_renting": None, "is_returning": None,
                "last_reported": None, "fetched_at": None,
            }
            reason = f"unknown station (no data yet): {reason}"
        else:
            payload = dict(last)
        payload.update(ts=round(time.time(), 3), stale=True, reason=reason)
        if self.stale.get(station.item) != reason:
            self.log.warning("station %s is stale: %s", station.item, reason)
            self.count("stale_stations")
        self.stale[station.item] = reason
        self.publish_json(self.topics.display(self.config.board, station.item), payload)


main = BikesDisplay.main

if __name__ == "__main__":
    sys.exit(main())
