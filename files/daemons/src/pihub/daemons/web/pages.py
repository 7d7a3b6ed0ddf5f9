"""The pages, rendered on the server for the first paint (they work without JavaScript).

Templates are Python string formatting; every value that came from MQTT, a scraped page or the
request goes through :func:`esc` (``html.escape``), so a board item named ``<script>`` shows as
text. ``static/app.js`` builds the same markup (with ``textContent``) for live updates: a change
here needs the same change there.
"""

from __future__ import annotations

import html
import json
import math
import re
import time
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pihub.topics import MAX_SEGMENT

from .auth import ADMIN

PAGES = (("overview", "/", "Overview"), ("daemons", "/daemons", "Daemons"),
         ("boards", "/boards", "Boards"), ("history", "/history", "History"),
         ("alerts", "/alerts", "Alerts"), ("outputs", "/outputs", "Outputs"))
RANGES = ("1h", "24h", "7d", "30d", "1y")
#: a series of the History page: <location>/<quantity> (one stored only, not seen live, too)
SERIES = re.compile(rf"^[a-z0-9_-]{{1,{MAX_SEGMENT}}}/[a-z0-9_-]{{1,{MAX_SEGMENT}}}$")
#: what an empty cell shows (an en dash)
NONE = "\u2013"


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def fmt_num(value: Any) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return NONE
    if isinstance(value, float) and not math.isfinite(value):
        return NONE
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    digits = 1 if abs(value) >= 100 else 2
    return f"{value:.{digits}f}".rstrip("0").rstrip(".")


def fmt_age(seconds: float | None) -> str:
    if seconds is None:
        return NONE
    s = max(0, int(seconds))
    if s < 90:
        return f"{s} s"
    if s < 5400:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h"
    return f"{s // 86400} d"


def fmt_kb(kb: Any) -> str:
    return f"{kb / 1024:.1f} MB" if isinstance(kb, int) else NONE


def fmt_time(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return NONE
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


@dataclass
class View:
    """What every page needs besides the state: who looks, and how."""

    user: str
    role: str
    csrf: str
    kiosk: bool
    dark: bool
    assets: dict[str, str]  # file name -> versioned URL
    stale_factor: float
    tsdb: bool
    rrd: bool = False
    query: str = ""  # the kiosk token part of links, already URL-encoded ("" or "&token=...")


def layout(view: View, page: str, title: str, body: str, scripts: Iterable[str] = ()) -> str:
    classes = " ".join(c for c in ("kiosk" if view.kiosk else "",
                                   "dark" if view.dark else "") if c)
    keep = ("?kiosk=1" + ("&theme=dark" if view.dark else "") + view.query) if view.kiosk else ""
    nav = "".join(
        f'<a href="{esc(url + keep)}"{" aria-current=page" if name == page else ""}>'
        f'{esc(label)}</a>' for name, url, label in PAGES)
    header = "" if view.kiosk else (
        f'<header><span class="brand">pihub</span><nav>{nav}</nav>'
        f'<form method="post" action="/logout" class="who"><span>{esc(view.user)}'
        f'{" (view only)" if view.role != ADMIN else ""}</span>'
        f'<input type="hidden" name="csrf" value="{esc(view.csrf)}">'
        f'<button type="submit">Log out</button></form></header>')
    kiosk_bar = (f'<div class="kbar"><span id="clock">{esc(time.strftime("%H:%M"))}</span>'
                 f'<span id="live" class="live">connecting</span></div>') if view.kiosk else ""
    footer = "" if view.kiosk else (
        '<footer><span id="live" class="live">live updates need JavaScript</span></footer>')
    extra = "".join(f'<script src="{esc(view.assets[s])}"></script>' for s in scripts)
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f'<title>{esc(title)} · pihub</title>'
        f'<link rel="stylesheet" href="{esc(view.assets["app.css"])}">'
        + (f'<link rel="stylesheet" href="{esc(view.assets["uPlot.min.css"])}">'
           if "uPlot.iife.min.js" in scripts else "")
        + f'<meta name="csrf" content="{esc(view.csrf)}"></head>'
        f'<body class="{classes}" data-page="{esc(page)}" data-role="{esc(view.role)}" '
        f'data-stale-factor="{view.stale_factor:g}">{header}{kiosk_bar}<main>{body}</main>'
        f'{footer}{extra}<script src="{esc(view.assets["app.js"])}"></script></body></html>'
    )


# --------------------------------------------------------------------------- overview


def value_row(item: dict[str, Any], now: float, stale_factor: float) -> str:
    age = now - item["ts"]
    interval = item.get("interval_s")
    stale = interval is not None and age > stale_factor * interval
    key = f'{item["location"]}/{item["quantity"]}'
    return (f'<tr id="v:{esc(key)}" class="{"stale" if stale else ""}" '
            f'data-ts="{item["ts"]}" data-interval="{"" if interval is None else interval}">'
            f'<th>{esc(item["quantity"])}</th>'
            f'<td class="num"><span class="val">{esc(fmt_num(item["value"]))}</span> '
            f'<span class="unit">{esc(item["unit"])}</span></td>'
            f'<td class="age">{esc(fmt_age(age))}</td></tr>')


def overview(values: dict[str, dict[str, Any]], now: float, stale_factor: float) -> str:
    by_location: dict[str, list[dict[str, Any]]] = {}
    for item in values.values():
        by_location.setdefault(item["location"], []).append(item)
    cards = []
    for location in sorted(by_location):
        rows = "".join(value_row(i, now, stale_factor)
                       for i in sorted(by_location[location], key=lambda i: i["quantity"]))
        cards.append(f'<article class="card" id="l:{esc(location)}"><h2>{esc(location)}</h2>'
                     f'<table class="values"><tbody>{rows}</tbody></table></article>')
    empty = '' if cards else '<p class="empty">No measurements yet.</p>'
    return f'<h1>Overview</h1><section id="values" class="cards">{"".join(cards)}{empty}</section>'


# --------------------------------------------------------------------------- daemons


def daemon_state(item: dict[str, Any], now: float) -> tuple[str, str]:
    """(css class, label) of a daemon: what the page shows in its badge."""
    meta = item.get("meta") or {}
    verdict = (item.get("monitor") or {}).get("state")
    if item.get("status") == "offline":
        return "down", "offline"
    if verdict == "down":
        return "down", "down (monitor)"
    ts, interval = meta.get("ts"), meta.get("interval_s")
    if isinstance(ts, int | float) and isinstance(interval, int | float) and (
            now - ts > 2.5 * interval):
        return "down", "silent"
    if item.get("status") == "online":
        return "up", "online"
    return "unknown", "unknown"


COUNTERS = ("published", "received", "rejected", "errors")


def daemon_row(item: dict[str, Any], now: float) -> str:
    meta = item.get("meta") or {}
    css, label = daemon_state(item, now)
    verdict = item.get("monitor") or {}
    counters = meta.get("counters") or {}
    ts = meta.get("ts")
    uptime = meta.get("uptime_s")
    if isinstance(uptime, int | float) and isinstance(ts, int | float) and css == "up":
        uptime += now - ts
    others = ", ".join(f"{k} {v}" for k, v in sorted(counters.items())
                       if k not in COUNTERS and v)
    cells = "".join(f'<td class="num">{esc(counters.get(c, NONE))}</td>' for c in COUNTERS)
    return (f'<tr id="d:{esc(item["daemon"])}" class="{css}">'
            f'<th>{esc(item.get("name") or item["daemon"])}</th>'
            f'<td><span class="badge {css}">{esc(label)}</span></td>'
            f'<td>{esc(verdict.get("state") or NONE)}'
            f'{" · " + esc(verdict.get("reason")) if verdict.get("reason") else ""}</td>'
            f'<td>{esc(meta.get("host") or NONE)}</td><td>{esc(meta.get("version") or NONE)}</td>'
            f'<td class="num">{esc(fmt_age(uptime) if uptime is not None else NONE)}</td>'
            f'<td class="num age" data-ts="{ts if isinstance(ts, int | float) else ""}">'
            f'{esc(fmt_age(now - ts) if isinstance(ts, int | float) else NONE)}</td>'
            f'<td class="num">{esc(fmt_kb(meta.get("rss_kb")))}</td>{cells}'
            f'<td class="more">{esc(others)}</td></tr>')


def host_row(host: dict[str, Any]) -> str:
    """The heading of one host's daemons (only when there are satellites)."""
    if not host["satellite"]:
        what = "this hub"
        css = ""
    else:
        link = (host.get("monitor") or {}).get("state") or {
            "1": "reachable", "0": "unreachable"}.get(host.get("bridge") or "", "link unknown")
        what = f"satellite · {link}"
        css = " down" if link == "unreachable" else ""
    return (f'<tr id="h:{esc(host["host"])}" class="hostrow{css}"><th colspan="13">'
            f'{esc(host["host"] or NONE)} <small>{esc(what)}</small></th></tr>')


def daemons(items: dict[str, dict[str, Any]], now: float,
            hosts: list[dict[str, Any]] | None = None) -> str:
    """The daemons' table; with satellites, grouped by host (this hub's first), each group
    under a heading row."""
    if hosts is None or len(hosts) < 2:
        rows = "".join(daemon_row(items[k], now) for k in sorted(items))
    else:
        rows = "".join(host_row(h) + "".join(daemon_row(items[k], now) for k in h["daemons"]
                                             if k in items) for h in hosts)
    head = "".join(f"<th>{h}</th>" for h in (
        "daemon", "state", "monitor", "host", "version", "uptime", "heartbeat", "RSS",
        "published", "received", "rejected", "errors", "other counters"))
    return (f'<h1>Daemons</h1><div class="scroll"><table class="grid" id="daemons">'
            f'<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>'
            + ('' if rows else '<p class="empty">No daemon seen yet.</p>'))


# --------------------------------------------------------------------------- boards


def minutes_to(departure: dict[str, Any], now: float) -> int | None:
    at = departure.get("departs_at")
    if isinstance(at, int | float):
        return max(0, int((at - now) // 60))
    m = departure.get("minutes")
    return m if isinstance(m, int) else None


def board_item(item: dict[str, Any], now: float) -> str:
    data = item["data"]
    key = f'{item["board"]}/{item["item"]}'
    stale = bool(data.get("stale"))
    reason = (f'<p class="reason">{esc(data.get("reason"))}</p>'
              if stale and data.get("reason") else "")
    if "departures" in data and isinstance(data["departures"], list):
        rows = []
        for d in data["departures"]:
            if not isinstance(d, dict):
                continue
            minutes = minutes_to(d, now)
            at = d.get("departs_at")
            if isinstance(at, int | float) and at < now - 60:
                continue
            delay = d.get("delay_min")
            rows.append(
                f'<tr data-at="{at if isinstance(at, int | float) else ""}">'
                f'<td class="line"><span>{esc(d.get("line"))}</span></td>'
                f'<td class="dest">{esc(d.get("destination"))}</td>'
                f'<td class="min">{esc(NONE if minutes is None else minutes)}'
                f'<small> min</small></td>'
                f'<td class="time">{esc(d.get("time"))}'
                f'{f" <small class=late>+{esc(delay)}</small>" if delay else ""}</td>'
                f'<td class="plat">{esc(d.get("platform") or "")}</td></tr>')
        body = (f'<table class="departures"><tbody>{"".join(rows)}</tbody></table>' if rows
                else '<p class="empty">No departures.</p>')
        title = data.get("stop") or item["item"]
        kind = "transport"
    elif "bikes" in data:
        parts = []
        if data.get("mechanical") is not None or data.get("electric") is not None:
            parts.append(f'{esc(fmt_num(data.get("mechanical")))} mechanical · '
                         f'{esc(fmt_num(data.get("electric")))} electric')
        body = (f'<div class="bikes"><span class="big">{esc(fmt_num(data.get("bikes")))}'
                f'</span><span class="lbl">bikes</span>'
                f'<span class="big docks">{esc(fmt_num(data.get("docks")))}</span>'
                f'<span class="lbl">docks</span></div>'
                f'<p class="kinds">{"".join(parts)}</p>')
        title = data.get("name") or item["item"]
        kind = "bikes"
    else:
        fields = "".join(f"<dt>{esc(k)}</dt><dd>{esc(json.dumps(v, ensure_ascii=False))}</dd>"
                         for k, v in list(data.items())[:20])
        body = f"<dl>{fields}</dl>"
        title = item["item"]
        kind = "other"
    return (f'<article class="board board-{kind}{" stale" if stale else ""}" id="b:{esc(key)}">'
            f'<h3>{esc(title)}</h3>{body}{reason}</article>')


def boards(items: dict[str, dict[str, Any]], now: float) -> str:
    by_board: dict[str, list[dict[str, Any]]] = {}
    for item in items.values():
        by_board.setdefault(item["board"], []).append(item)
    out = []
    for board in sorted(by_board):
        inner = "".join(board_item(i, now) for i in sorted(by_board[board],
                                                            key=lambda i: i["item"]))
        out.append(f'<section class="boardset"><h2>{esc(board)}</h2>'
                   f'<div class="boards">{inner}</div></section>')
    empty = "" if out else '<p class="empty">No board published yet.</p>'
    return f'<h1>Boards</h1><div id="boards">{"".join(out)}{empty}</div>'


# --------------------------------------------------------------------------- alerts


def rule_row(item: dict[str, Any]) -> str:
    given = item.get("series")
    series: dict[str, Any] = given if isinstance(given, dict) else {}
    lines = []
    for topic, s in sorted(series.items())[:50]:
        if not isinstance(s, dict):
            continue
        lines.append(f'<li class="{esc(s.get("state"))}">{esc(topic)}: {esc(s.get("state"))}'
                     f' · {esc(fmt_num(s.get("value")))} {esc(s.get("unit") or "")}'
                     f' · since {esc(fmt_time(s.get("since")))}</li>')
    firing = item.get("firing")
    return (f'<tr id="r:{esc(item["rule"])}" class="{"firing" if firing else ""}">'
            f'<th>{esc(item["rule"])}</th>'
            f'<td><span class="badge {"down" if firing else "up"}">'
            f'{esc(f"{firing} firing" if firing else "ok")}</span></td>'
            f'<td><ul class="series">{"".join(lines)}</ul></td></tr>')


def notification(item: dict[str, Any]) -> str:
    prio = item.get("priority")
    return (f'<li class="note p{esc(prio if prio is not None else 0)}">'
            f'<time>{esc(fmt_time(item.get("ts")))}</time> '
            f'<b>{esc(item.get("title") or item.get("topic"))}</b> '
            f'<span>{esc(item.get("message"))}</span></li>')


def alerts(rules: dict[str, dict[str, Any]], notes: list[dict[str, Any]]) -> str:
    rows = "".join(rule_row(rules[k]) for k in sorted(rules))
    items = "".join(notification(n) for n in reversed(notes))
    return ('<h1>Alerts</h1><h2>Rules</h2>'
            f'<table class="grid" id="rules"><thead><tr><th>rule</th><th>state</th>'
            f'<th>series</th></tr></thead><tbody>{rows}</tbody></table>'
            + ('' if rows else '<p class="empty" id="no-rules">No monitor rules seen.</p>')
            + '<h2>Notifications since start</h2>'
            f'<ul id="notes" class="notes">{items}</ul>'
            + ('' if items else '<p class="empty" id="no-notes">None yet.</p>'))


# --------------------------------------------------------------------------- outputs


def output_row(item: dict[str, Any], view: View) -> str:
    on = bool(item["value"])
    name = item.get("target") or item["quantity"]  # <output>@<host>: a satellite's
    switch = (
        f'<form method="post" action="/outputs/{esc(name)}" class="switch">'
        f'<input type="hidden" name="csrf" value="{esc(view.csrf)}">'
        f'<button type="submit" name="state" value="{"off" if on else "on"}">'
        f'Switch {"off" if on else "on"}</button></form>'
    ) if view.role == ADMIN else '<span class="muted">view only</span>'
    return (f'<tr id="o:{esc(name)}" class="{"on" if on else "off"}">'
            f'<th>{esc(name)}</th><td>{esc(item["location"])}'
            f'{" · " + esc(item["host"]) if item.get("host") else ""}</td>'
            f'<td><span class="badge {"on" if on else "off"}">{"on" if on else "off"}</span></td>'
            f'<td>{esc(fmt_time(item["ts"]))}</td><td>{switch}</td></tr>')


def outputs(values: dict[str, dict[str, Any]], view: View) -> str:
    items = sorted((v for v in values.values() if v.get("kind") == "output"),
                   key=lambda v: (v.get("host") or "", v["quantity"]))
    rows = "".join(output_row(i, view) for i in items)
    return ('<h1>Outputs</h1><table class="grid" id="outputs"><thead><tr><th>output</th>'
            '<th>location</th><th>state</th><th>since</th><th></th></tr></thead>'
            f'<tbody>{rows}</tbody></table>'
            + ('' if rows else '<p class="empty">No output reported by sensor-gpio.</p>')
            + '<p class="muted">The state shown is the one sensor-gpio reports after a '
            'switch, not the one asked for.</p>')


# --------------------------------------------------------------------------- history


def history(values: dict[str, dict[str, Any]], chosen: list[str], span: str, step: str,
            view: View) -> str:
    if not view.tsdb and not view.rrd:
        return ('<h1>History</h1><p class="notice" id="no-tsdb">No timeseries database is '
                'configured for pihub-web (<code>tsdb.url</code>), nor store-rrd\'s files '
                '(<code>rrd.dir</code>), so there is no history to draw. Configure the '
                'VictoriaMetrics that store-tsdb writes to.</p>')
    boxes = "".join(
        f'<label><input type="checkbox" name="series" value="{esc(k)}"'
        f'{" checked" if k in chosen else ""}> {esc(k)}</label>'
        for k in sorted(set(values) | {c for c in chosen if SERIES.match(c)}))
    spans = "".join(
        f'<label><input type="radio" name="range" value="{r}"{" checked" if r == span else ""}>'
        f' {r}</label>' for r in RANGES)
    if not view.tsdb:  # store-rrd's graphs, drawn by the daemon: no script needed
        images = "".join(
            f'<figure class="rrd"><img alt="{esc(c)}, {esc(span)}" '
            f'src="/api/rrd?{esc(urllib.parse.urlencode({"series": c, "range": span}))}">'
            f'</figure>' for c in chosen if SERIES.match(c))
        return ('<h1>History</h1><form method="get" action="/history" id="rform">'
                f'<fieldset class="spans"><legend>range</legend>{spans}</fieldset>'
                f'<fieldset class="pick"><legend>series</legend>{boxes or "none yet"}'
                '</fieldset><button type="submit">Draw</button></form>'
                f'<div id="rrd">{images or "<p class=muted>Pick one or more series.</p>"}</div>'
                '<p class="muted">Drawn by rrdtool from store-rrd\'s files (no timeseries '
                'database configured).</p>')
    return ('<h1>History</h1><form method="get" action="/history" id="hform">'
            f'<fieldset class="spans"><legend>range</legend>{spans}</fieldset>'
            f'<fieldset class="pick"><legend>series</legend>{boxes or "none yet"}</fieldset>'
            f'<input type="hidden" name="step" value="{esc(step)}">'
            '<button type="submit">Draw</button></form>'
            '<div id="chart" class="chart"><noscript>The graph is drawn by JavaScript.'
            '</noscript></div><p id="hstatus" class="muted"></p>')
