"""pihub-display-transport: the next departures at a stop, scraped from its web page.

Every ``interval`` seconds (at least 5) each configured stop's page is read with requests and
parsed with BeautifulSoup: CSS selectors from the config find the departure rows and, in each
row, the line, the destination and the time - a countdown ("in 5 min", "5 min", "5'", "sofort",
"now") or a clock time ("23:58"; after midnight "00:05" counts on into the next day). Optional
selectors read the scheduled and the real-time (forecast) clock times, and the platform.

Publishes one retained JSON message per stop on ``<root>/display/<board>/<item>`` (never under
``data/``: nothing stores it)::

    {"stop": "S+U Alexanderplatz",
     "departures": [{"line": "U2", "destination": "S+U Pankow", "minutes": 3,
                     "time": "23:58", "departs_at": 1715032680.0, "scheduled": "23:55",
                     "realtime": "23:58", "delay_min": 3, "platform": "2", "text": "in 3 min"}],
     "fetched_at": 1715032500.12, "ts": 1715032500.15, "stale": false, "reason": null}

``minutes`` counts from ``fetched_at`` (a time already past counts as 0); ``departs_at`` is the
same moment in UNIX seconds, so a display can count down itself. ``scheduled``, ``realtime``,
``delay_min`` and ``platform`` are null where the page (or the config) does not give them.

When the page cannot be read, or its layout changed (a selector matches nothing), the error
names the URL or the selector, the last departures are published again with ``stale: true``
and the reason (recounted to now, those already gone dropped), and ``fetch_errors`` or
``layout_errors`` (and ``errors``) count it in the heartbeat.
"""

from __future__ import annotations

import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import requests
import soupsieve
from bs4 import BeautifulSoup, Tag

from pihub import __version__
from pihub.config import BaseConfig, ConfigError, setting
from pihub.daemon import Daemon
from pihub.topics import SEGMENT, clip_text
from pihub.web import FetchError, fetch, session

MAX_BYTES = 4 * 1024 * 1024
MIN_INTERVAL = 5.0
#: a clock time up to this many minutes before now is a departure just due (late), not tomorrow's
PAST_WINDOW = 60
#: departures kept on a stale board until this many seconds after they left
GONE_AFTER = 60

NOW_WORDS = frozenset({"sofort", "now", "jetzt", "due", "departing", "maintenant", "0"})
COUNTDOWN = re.compile(r"(?<![\d:.])(\d{1,3})\s*(?:min\b|min\.|minutes?\b|minuten\b|mins\b|m\b|')",
                       re.IGNORECASE)
BARE_NUMBER = re.compile(r"^(?:in\s+)?(\d{1,3})$", re.IGNORECASE)
CLOCK = re.compile(r"(?<!\d)([01]?\d|2[0-3])[:.h]([0-5]\d)(?::[0-5]\d)?(?!\d)")


@dataclass(kw_only=True)
class Selectors:
    row: str = setting(help="CSS selector of one departure row.",
                       example="table.departures tbody tr")
    line: str = setting(help="CSS selector, inside a row, of the line.", example="td.line")
    destination: str = setting(help="CSS selector, inside a row, of the destination.",
                               example="td.destination")
    time: str = setting(help="CSS selector, inside a row, of the departure time ('in 5 min', "
                             "'5 min', 'sofort', 'HH:MM').", example="td.time")
    scheduled: str | None = setting(None, "CSS selector, inside a row, of the timetable time.")
    realtime: str | None = setting(
        None, "CSS selector, inside a row, of the real-time forecast; when it holds a time, "
        "minutes count from it.")
    platform: str | None = setting(None, "CSS selector, inside a row, of the platform.")
    empty: str | None = setting(
        None, "CSS selector of the page's 'no departures' notice: when rows match nothing and "
        "this matches, the board is empty rather than broken.")

    def check(self) -> None:
        for key in ("row", "line", "destination", "time", "scheduled", "realtime", "platform",
                    "empty"):
            value = getattr(self, key)
            if value is None:
                continue
            try:
                soupsieve.compile(value)
            except (soupsieve.SelectorSyntaxError, ValueError) as exc:
                first = str(exc).splitlines()[0]
                raise ConfigError(key, f"{value!r} is not a CSS selector: {first}") from None


@dataclass(kw_only=True)
class StopConfig:
    item: str = setting(help="Topic segment of this stop: <root>/display/<board>/<item>.",
                        example="alexanderplatz", pattern=SEGMENT.pattern)
    name: str = setting(help="Stop name shown on the display.", example="S+U Alexanderplatz")
    url: str = setting(help="The stop's departures page.", pattern=r"^https?://\S+$",
                       example="https://departures.example.org/stop/900100003")
    selectors: Selectors = setting(help="Where the page keeps each part of a departure.")


@dataclass(kw_only=True)
class Config(BaseConfig):
    stops: list[StopConfig] = setting(
        help="The stops to show: topic item, display name, page URL and CSS selectors.",
        example=[{
            "item": "alexanderplatz", "name": "S+U Alexanderplatz",
            "url": "http://127.0.0.1:8082/countdown.html",
            "selectors": {"row": "table.departures tbody tr", "line": "td.line",
                          "destination": "td.destination", "time": "td.time",
                          "platform": "td.platform", "empty": "p.no-departures"},
        }],
    )
    board: str = setting("transport", "Board segment of the topics.", pattern=SEGMENT.pattern)
    max_departures: int = setting(5, "Departures published per stop (the soonest).",
                                  min=1, max=50)
    interval: float = setting(60.0, f"Seconds between two reads of each page (at least "
                                    f"{MIN_INTERVAL:g}: be kind to the site).",
                              min=MIN_INTERVAL, max=86400)
    timeout: float = setting(10.0, "Seconds a whole page may take before the read fails.",
                             min=0.1, max=120)
    user_agent: str = setting(
        f"pihub-display-transport/{__version__} (home departure display; python-requests)",
        "User-Agent header sent to the site.",
    )
    timezone: str | None = setting(
        None, "IANA time zone of the pages' clock times (Europe/Berlin); null = this host's.")

    def check(self) -> None:
        if not self.stops:
            raise ConfigError("stops", "list at least one stop")
        seen: set[str] = set()
        for i, stop in enumerate(self.stops):
            if stop.item in seen:
                raise ConfigError(f"stops[{i}].item", f"{stop.item!r} is used twice")
            seen.add(stop.item)
        if self.timezone is not None:
            try:
                ZoneInfo(self.timezone)
            except (ZoneInfoNotFoundError, ValueError):
                raise ConfigError("timezone", f"unknown time zone {self.timezone!r}") from None


class LayoutError(Exception):
    """The page does not look as the selectors expect; the text names the selector."""


# --------------------------------------------------------------------------- parsing


def clean(text: str) -> str:
    return " ".join(text.replace("\xa0", " ").split())


def clock_of(text: str) -> tuple[int, int] | None:
    found = CLOCK.search(text)
    return (int(found.group(1)), int(found.group(2))) if found else None


def minutes_until(hour: int, minute: int, now: datetime) -> int:
    """Minutes from ``now`` to the next HH:MM; a time up to PAST_WINDOW ago gives a negative."""
    delta = (hour * 60 + minute - (now.hour * 60 + now.minute)) % 1440
    return delta - 1440 if delta > 1440 - PAST_WINDOW else delta


def parse_minutes(text: str, now: datetime) -> int:
    """Minutes until a departure shown as ``text``; ValueError when it is not a time."""
    t = clean(text)
    low = t.lower().rstrip(".!")
    if low in NOW_WORDS or low.startswith(("sofort", "now ")):
        return 0
    found = COUNTDOWN.search(t)
    if found:
        return int(found.group(1))
    clock = clock_of(t)
    if clock:
        return minutes_until(*clock, now)
    found = BARE_NUMBER.match(t)
    if found:
        return int(found.group(1))
    raise ValueError(f"{t!r} is neither 'in N min' nor 'HH:MM'")


def hhmm(clock: tuple[int, int] | None) -> str | None:
    return f"{clock[0]:02d}:{clock[1]:02d}" if clock else None


def select_text(row: Tag, selector: str | None) -> str | None:
    if selector is None:
        return None
    el = row.select_one(selector)
    return clean(el.get_text(" ")) if el is not None else None


def parse_board(html: bytes | str, sel: Selectors, now: datetime, limit: int, url: str = "",
                encoding: str | None = None) -> tuple[list[dict[str, Any]], int]:
    """The soonest ``limit`` departures on a page, and how many rows were skipped.

    Raises LayoutError naming the selector when the page does not match the selectors.
    ``now`` is an aware datetime in the stop's time zone.
    """
    where = f" on {url}" if url else ""
    soup = BeautifulSoup(html, "html.parser", from_encoding=encoding) \
        if isinstance(html, bytes) else BeautifulSoup(html, "html.parser")
    rows = soup.select(sel.row)
    if not rows:
        if sel.empty and soup.select_one(sel.empty) is not None:
            return [], 0
        raise LayoutError(f"selector row {sel.row!r} matched nothing{where}")
    base = now.replace(second=0, microsecond=0)
    departures: list[dict[str, Any]] = []
    missing: Counter[str] = Counter()
    unreadable: list[str] = []
    for row in rows:
        parts = {key: select_text(row, getattr(sel, key))
                 for key in ("line", "destination", "time")}
        absent = [key for key, value in parts.items() if value is None]
        if absent:  # a header or notice row, or a changed layout
            missing.update(absent)
            continue
        line, destination, shown = parts["line"], parts["destination"], parts["time"]
        assert line is not None and destination is not None and shown is not None
        scheduled = clock_of(select_text(row, sel.scheduled) or "")
        realtime_text = select_text(row, sel.realtime) or ""
        realtime = clock_of(realtime_text)
        try:
            minutes = parse_minutes(realtime_text, now) if realtime else parse_minutes(shown, now)
        except ValueError:
            unreadable.append(clip_text(shown, 80))
            continue
        is_clock = realtime is not None or clock_of(shown) is not None
        departs = base + timedelta(minutes=minutes) if is_clock else now + timedelta(
            minutes=minutes)
        delay = None
        if scheduled and realtime:
            delay = (realtime[0] * 60 + realtime[1] - scheduled[0] * 60 - scheduled[1]) % 1440
            if delay > 720:  # early rather than a day late
                delay -= 1440
        platform = select_text(row, sel.platform)
        departures.append({
            "line": clip_text(line),
            "destination": clip_text(destination),
            "minutes": max(0, minutes),
            "time": departs.strftime("%H:%M"),
            "departs_at": round(departs.timestamp(), 3),
            "scheduled": hhmm(scheduled),
            "realtime": hhmm(realtime),
            "delay_min": delay,
            "platform": clip_text(platform) if platform else None,
            "text": clip_text(shown),
        })
    if not departures:
        if unreadable:
            raise LayoutError(f"selector time {sel.time!r} gave {unreadable[0]!r}, which is "
                              f"neither 'in N min' nor 'HH:MM' (in all {len(rows)} rows){where}")
        key = missing.most_common(1)[0][0]
        raise LayoutError(f"selector {key} {getattr(sel, key)!r} matched nothing in any of the "
                          f"{len(rows)} rows of {sel.row!r}{where}")
    departures.sort(key=lambda d: d["departs_at"])
    return departures[:limit], len(rows) - len(departures)


def recount(departures: list[dict[str, Any]], now: float) -> list[dict[str, Any]]:
    """Old departures counted to ``now``; those gone more than GONE_AFTER seconds dropped."""
    out = []
    for dep in departures:
        if dep["departs_at"] < now - GONE_AFTER:
            continue
        out.append({**dep, "minutes": max(0, int((dep["departs_at"] - now) // 60))})
    return out


def fetch_page(session: requests.Session, url: str, timeout: float) -> tuple[bytes, str | None]:
    """The page's bytes and its charset (when the server names one); FetchError on failure."""
    return fetch(session, url, timeout, MAX_BYTES)


# --------------------------------------------------------------------------- the daemon


class TransportDisplay(Daemon[Config]):
    name = "display-transport"
    config_class = Config
    description = "Publish the next departures at public-transport stops, scraped from pages."

    @classmethod
    def published_topics(cls, config: Config) -> list[str]:
        return [f"display/{config.board}/{stop.item}" for stop in config.stops]

    def setup(self) -> None:
        self.session = session(self.config.user_agent, "text/html,application/xhtml+xml")
        self.tz: tzinfo | None = ZoneInfo(self.config.timezone) if self.config.timezone else None
        self.last: dict[str, dict[str, Any]] = {}  # item -> last good payload
        self.reasons: dict[str, str] = {}  # item -> why it is stale now
        self.every(self.config.interval, self.poll)

    def shutdown(self) -> None:
        self.session.close()

    def heartbeat_extra(self) -> dict[str, Any]:
        return {"stops": len(self.config.stops), "stale": len(self.reasons)}

    def poll(self) -> None:
        for stop in self.config.stops:
            if self.stopping.is_set():
                return
            self.poll_stop(stop)

    def poll_stop(self, stop: StopConfig) -> None:
        try:
            page, charset = fetch_page(self.session, stop.url, self.config.timeout)
            self.count("fetches")
            now = datetime.now(self.tz).astimezone(self.tz)
            departures, skipped = parse_board(page, stop.selectors, now,
                                              self.config.max_departures, stop.url, charset)
        except FetchError as exc:
            self.count("fetch_errors")
            self.stale(stop, str(exc))
            return
        except LayoutError as exc:
            self.count("layout_errors")
            self.stale(stop, f"page layout changed? {exc}")
            return
        if skipped:
            self.log.debug("%s: %d rows were not departures", stop.item, skipped)
        payload = {
            "stop": stop.name,
            "departures": departures,
            "fetched_at": round(now.timestamp(), 3),
            "ts": round(time.time(), 3),
            "stale": False,
            "reason": None,
        }
        self.last[stop.item] = payload
        if self.reasons.pop(stop.item, None) is not None:
            self.log.info("%s: departures read again", stop.item)
        self.publish_json(self.topics.display(self.config.board, stop.item), payload)

    def stale(self, stop: StopConfig, reason: str) -> None:
        reason = clip_text(reason)
        self.count("errors")
        if self.reasons.get(stop.item) != reason:
            self.log.warning("%s: %s", stop.item, reason)
        self.reasons[stop.item] = reason
        last = self.last.get(stop.item)
        now = time.time()
        if last is None:
            payload: dict[str, Any] = {"stop": stop.name, "departures": [], "fetched_at": None}
            reason = f"no departures read yet: {reason}"
        else:
            payload = {**last, "departures": recount(last["departures"], now)}
        payload.update(ts=round(now, 3), stale=True, reason=reason)
        self.publish_json(self.topics.display(self.config.board, stop.item), payload)


main = TransportDisplay.main

if __name__ == "__main__":
    sys.exit(main())
