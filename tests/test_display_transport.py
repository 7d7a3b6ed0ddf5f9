"""pihub-display-transport against departure pages served on 127.0.0.1."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from conftest import REPO, Site, free_port, run_cli
from pihub.daemons.display_transport import (
    LayoutError,
    Selectors,
    parse_board,
    parse_minutes,
    recount,
)

FIXTURES = Path(__file__).parent / "fixtures" / "display_transport"
BERLIN = ZoneInfo("Europe/Berlin")

COUNTDOWN = {"row": "table.departures tbody tr", "line": "td.line",
             "destination": "td.destination", "time": "td.time", "platform": "td.platform",
             "empty": "p.no-departures"}
CLOCK = {"row": "#abfahrten tr.journey", "line": "td.train", "destination": "td.route",
         "time": "td.time", "scheduled": "td.time", "realtime": "td.ris",
         "platform": "td.platform"}


#: every fixture page (the stand-in serves these files too)
PAGES = ("clock.html", "countdown.html", "empty.html", "redesigned.html")


def page(site: Site, path: str, fixture: str, delay: float = 0.0) -> str:
    """Serve fixture page ``fixture`` at ``path``; its URL."""
    return site.serve_file(path, FIXTURES / fixture, delay=delay)


def stop(url: str, item: str = "alex", selectors: dict[str, str] | None = None
         ) -> dict[str, Any]:
    return {"item": item, "name": "S+U Alexanderplatz", "url": url,
            "selectors": selectors or COUNTDOWN}


def config(*stops: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"stops": list(stops), "interval": 5, "timeout": 2, "max_departures": 5, **extra}


def board(topic_root: str, item: str = "alex") -> str:
    return f"{topic_root}/display/transport/{item}"


def is_stale(m: Any) -> bool:
    return bool(m.json()["stale"])


def sel(spec: dict[str, str]) -> Selectors:
    return Selectors(**spec)


# --------------------------------------------------------------------------- the daemon


def test_countdown_page_gives_the_next_n_departures(site, start_daemon, observe, topic_root):
    url = page(site, "/stop/alex", "countdown.html")
    obs = observe(f"{topic_root}/display/#")
    start_daemon("display_transport", config(stop(url), user_agent="test-board/1.0"))
    msg = obs.wait_for(board(topic_root), timeout=20)[0].json()
    deps = msg["departures"]
    assert [(d["line"], d["destination"], d["minutes"]) for d in deps] == [
        ("U2", "S+U Pankow", 0), ("M4", "Zingster Str.", 3), ("S5", "Strausberg Nord", 5),
        ("U8", "S+U Wittenau", 7), ("200", "Michelangelostr.", 12)]
    assert deps[1]["text"] == "in 3 min" and deps[1]["platform"] == "D"
    assert deps[0]["scheduled"] is None and deps[0]["realtime"] is None
    assert abs(deps[2]["departs_at"] - (msg["fetched_at"] + 300)) < 1
    assert (msg["stop"], msg["stale"], msg["reason"]) == ("S+U Alexanderplatz", False, None)
    assert observe(board(topic_root)).wait_for(board(topic_root))[0].retain
    assert site.agents[0] == "test-board/1.0"


def test_clock_page_gives_scheduled_realtime_and_delay(site, start_daemon, observe, topic_root):
    url = page(site, "/ostbahnhof", "clock.html")
    obs = observe(f"{topic_root}/display/#")
    start_daemon("display_transport", config(stop(url, "ost", CLOCK), max_departures=10))
    deps = obs.wait_for(board(topic_root, "ost"), timeout=20)[0].json()["departures"]
    assert len(deps) == 5
    by_line = {d["line"]: d for d in deps}
    assert (by_line["RE 1"]["scheduled"], by_line["RE 1"]["realtime"]) == ("23:52", "23:58")
    assert by_line["RE 1"]["delay_min"] == 6
    assert by_line["S 5"]["realtime"] is None and by_line["S 5"]["delay_min"] is None
    assert all(0 <= d["minutes"] < 24 * 60 for d in deps)
    assert deps == sorted(deps, key=lambda d: d["departs_at"])


def test_changed_layout_names_the_selector_and_keeps_departures_stale(
        site, start_daemon, observe, topic_root):
    url = page(site, "/stop/alex", "countdown.html")
    obs = observe(f"{topic_root}/#")
    d = start_daemon("display_transport", config(stop(url)))
    fresh = obs.wait_for(board(topic_root), timeout=20)[0].json()
    page(site, "/stop/alex", "redesigned.html")
    stale = obs.wait_for(board(topic_root), is_stale, timeout=20)[0].json()
    assert "selector row 'table.departures tbody tr' matched nothing" in stale["reason"]
    assert url in stale["reason"]
    assert [x["line"] for x in stale["departures"]] == [x["line"] for x in fresh["departures"]]
    obs.wait_for(f"{topic_root}/display-transport/meta",
                 lambda m: m.json()["counters"].get("layout_errors", 0) >= 1, timeout=20)
    assert "matched nothing" in d.output()


def test_server_error_keeps_departures_stale_and_counts_it(site, start_daemon, observe,
                                                           topic_root):
    url = page(site, "/stop/alex", "countdown.html")
    obs = observe(f"{topic_root}/#")
    start_daemon("display_transport", config(stop(url)))
    obs.wait_for(board(topic_root), timeout=20)
    site.set("/stop/alex", b"<h1>502 Bad Gateway</h1>", status=502,
             content_type="text/html; charset=utf-8")
    stale = obs.wait_for(board(topic_root), is_stale, timeout=20)[0].json()
    assert f"{url}: HTTP 502" in stale["reason"]
    assert len(stale["departures"]) == 5
    obs.wait_for(f"{topic_root}/display-transport/meta",
                 lambda m: m.json()["counters"].get("fetch_errors", 0) >= 1, timeout=20)


def test_slow_page_times_out_and_the_board_says_why(site, start_daemon, observe, topic_root):
    url = page(site, "/stop/alex", "countdown.html", delay=30)
    obs = observe(f"{topic_root}/#")
    d = start_daemon("display_transport", config(stop(url), timeout=0.5))
    msg = obs.wait_for(board(topic_root), timeout=20)[0].json()
    assert msg["stale"] and msg["departures"] == []
    assert msg["reason"].startswith("no departures read yet") and "within 0.5 s" in msg["reason"]
    obs.wait_for(f"{topic_root}/display-transport/meta",
                 lambda m: m.json()["event"] == "heartbeat", timeout=20)
    assert d.stop() == 0


def test_one_broken_stop_leaves_the_other_fresh(site, start_daemon, observe, topic_root):
    good = page(site, "/stop/alex", "countdown.html")
    refused = f"http://127.0.0.1:{free_port()}/stop/gone"
    obs = observe(f"{topic_root}/display/#")
    start_daemon("display_transport", config(stop(good), stop(refused, "gone")))
    gone = obs.wait_for(board(topic_root, "gone"), timeout=20)[0].json()
    assert gone["stale"] and "Connection refused" in gone["reason"]
    assert not obs.wait_for(board(topic_root), timeout=20)[0].json()["stale"]


def test_bad_selector_and_short_interval_are_config_errors(tmp_path):
    path = tmp_path / "transport.yml"
    path.write_text("stops:\n  - item: a\n    name: A\n    url: http://127.0.0.1/a\n"
                    "    selectors: {row: 'tr[', line: td, destination: td, time: td}\n")
    checked = run_cli("display_transport", "--check-config", str(path))
    assert checked.returncode == 78 and "stops[0].selectors.row: 'tr[' is not a CSS selector" \
        in checked.stderr
    path.write_text("interval: 1\nstops:\n  - item: a\n    name: A\n    url: http://127.0.0.1/a\n"
                    "    selectors: {row: tr, line: td, destination: td, time: td}\n")
    checked = run_cli("display_transport", "--check-config", str(path))
    assert checked.returncode == 78 and "interval: expected a number between 5" in checked.stderr


def test_the_fixtures_are_the_listed_pages():
    assert sorted(p.name for p in FIXTURES.glob("*.html")) == sorted(PAGES)


@pytest.mark.parametrize("name", PAGES)
def test_the_standin_serves_this_test_fixture_not_a_copy(name):
    served = REPO / "molecule" / "standin-fixtures" / "display-transport" / name
    assert (FIXTURES / name).is_file()
    assert served.is_symlink() and served.resolve() == (FIXTURES / name).resolve(), served


# --------------------------------------------------------------------------- parsing, now given


@pytest.mark.parametrize(("text", "now", "minutes"), [
    ("in 5 min", (12, 0), 5),
    ("5 min", (12, 0), 5),
    ("5min", (12, 0), 5),
    ("in\xa012\xa0Min.", (12, 0), 12),
    ("7'", (12, 0), 7),
    ("3 Minuten", (12, 0), 3),
    ("sofort", (12, 0), 0),
    ("Now", (12, 0), 0),
    ("12:34", (12, 0), 34),
    ("23:58", (23, 50), 8),
    ("00:05", (23, 58), 7),
    ("00:05 Uhr", (23, 58), 7),
    ("23:58", (0, 2), -4),
    ("11:59", (12, 0), -1),
    ("11:00", (12, 0), 1380),
    ("ab 0.15", (23, 59), 16),
])
def test_time_texts_count_minutes_from_the_given_now(text, now, minutes):
    assert parse_minutes(text, datetime(2024, 5, 6, *now, 30, tzinfo=BERLIN)) == minutes


def test_text_that_is_not_a_time_is_refused():
    with pytest.raises(ValueError, match="neither 'in N min' nor 'HH:MM'"):
        parse_minutes("fällt aus", datetime(2024, 5, 6, 12, 0, tzinfo=BERLIN))


def test_clock_times_after_midnight_count_on_into_the_next_day():
    now = datetime(2024, 5, 6, 23, 55, 20, tzinfo=BERLIN)
    deps, skipped = parse_board((FIXTURES / "clock.html").read_bytes(), sel(CLOCK), now, 10)
    assert skipped == 0
    assert [(d["line"], d["minutes"], d["time"]) for d in deps] == [
        ("RE 1", 3, "23:58"), ("S 5", 4, "23:59"), ("RB 23", 12, "00:07"),
        ("S 7", 19, "00:14"), ("ICE 1008", 36, "00:31")]
    rb = deps[2]
    assert (rb["scheduled"], rb["realtime"], rb["delay_min"]) == ("00:05", "00:07", 2)
    assert rb["departs_at"] == datetime(2024, 5, 7, 0, 7, tzinfo=BERLIN).timestamp()


def test_time_just_passed_counts_as_due_now():
    now = datetime(2024, 5, 7, 0, 3, tzinfo=BERLIN)
    deps, _ = parse_board((FIXTURES / "clock.html").read_bytes(), sel(CLOCK), now, 2)
    assert [(d["line"], d["minutes"]) for d in deps] == [("RE 1", 0), ("S 5", 0)]
    assert deps[0]["departs_at"] == datetime(2024, 5, 6, 23, 58, tzinfo=BERLIN).timestamp()


def test_header_and_notice_rows_are_skipped():
    now = datetime(2024, 5, 6, 14, 2, tzinfo=BERLIN)
    deps, skipped = parse_board((FIXTURES / "countdown.html").read_bytes(), sel(COUNTDOWN),
                                now, 50)
    assert skipped == 1 and len(deps) == 7


def test_empty_board_with_its_notice_is_not_a_layout_error():
    now = datetime(2024, 5, 7, 2, 41, tzinfo=BERLIN)
    assert parse_board((FIXTURES / "empty.html").read_bytes(), sel(COUNTDOWN), now, 5) == ([], 0)
    without_notice = {**COUNTDOWN}
    del without_notice["empty"]
    with pytest.raises(LayoutError, match=re.escape("selector row 'table.departures tbody tr'")):
        parse_board((FIXTURES / "empty.html").read_bytes(), sel(without_notice), now, 5)


def test_renamed_cell_names_the_line_selector():
    page = (FIXTURES / "countdown.html").read_text().replace('class="line"', 'class="linie"')
    now = datetime(2024, 5, 6, 14, 2, tzinfo=BERLIN)
    with pytest.raises(LayoutError, match=r"selector line 'td.line' matched nothing in any of "
                                          r"the 8 rows of 'table.departures tbody tr' on http://x"):
        parse_board(page, sel(COUNTDOWN), now, 5, "http://x")


def test_unreadable_times_name_the_time_selector():
    page = (FIXTURES / "countdown.html").read_text()
    page = re.sub(r'<span class="countdown">[^<]*</span>', "<span>Bus</span>", page)
    now = datetime(2024, 5, 6, 14, 2, tzinfo=BERLIN)
    with pytest.raises(LayoutError, match=re.escape("selector time 'td.time' gave 'Bus'")):
        parse_board(page, sel(COUNTDOWN), now, 5)


def test_stale_departures_are_recounted_and_gone_ones_dropped():
    deps = [{"line": "U2", "minutes": 3, "departs_at": 1000.0},
            {"line": "M4", "minutes": 9, "departs_at": 1360.0}]
    assert recount(deps, 1040.0) == [{"line": "U2", "minutes": 0, "departs_at": 1000.0},
                                      {"line": "M4", "minutes": 5, "departs_at": 1360.0}]
    assert [d["line"] for d in recount(deps, 1061.0)] == ["M4"]  # U2 left over a minute ago


@pytest.mark.parametrize("hour", range(24))
def test_delay_is_the_same_whatever_the_hour(hour):
    now = datetime(2024, 5, 6, hour, 53, tzinfo=BERLIN)
    deps, _ = parse_board((FIXTURES / "clock.html").read_bytes(), sel(CLOCK), now, 10)
    assert {d["line"]: d["delay_min"] for d in deps} == {
        "RE 1": 6, "S 5": None, "RB 23": 2, "S 7": 0, "ICE 1008": None}


def test_text_from_a_hostile_page_is_cut_to_max_text():
    from pihub.topics import MAX_TEXT

    long = "X" * 100_000
    html = (f"<table><tr><td class='line'>{long}</td><td class='destination'>{long}</td>"
            f"<td class='time'>in 5 min</td><td class='platform'>{long}</td></tr></table>")
    spec = {"row": "tr", "line": "td.line", "destination": "td.destination", "time": "td.time",
            "platform": "td.platform"}
    now = datetime(2024, 6, 1, 12, 0, tzinfo=ZoneInfo("Europe/Berlin"))
    deps, _ = parse_board(html, sel(spec), now, 5)
    assert [len(deps[0][k]) for k in ("line", "destination", "platform")] == [MAX_TEXT] * 3
    assert deps[0]["destination"].endswith("…")
