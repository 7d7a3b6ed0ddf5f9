"""pihub-display-bikes against GBFS 2.3 (Velib-like) and 3.0 feeds served on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, DaemonProcess, Observer, Site, free_port, run_cli, wait_until
from pihub.daemons.display_bikes import discovery_feeds, localized, station_values, timestamp

FIXTURES = Path(__file__).parent / "fixtures" / "display_bikes"
STANDIN_BASE = "http://127.0.0.1:8081"  # the base the fixture files carry (the stand-in's)


#: every fixture feed, by GBFS version (the stand-in serves these files too)
FEEDS = {"v2": ("gbfs", "station_information", "station_status", "system_information"),
         "v3": ("gbfs", "station_information", "station_status", "system_information",
                "vehicle_types")}


def serve_feed(site: Site, version: str, name: str,
               patch: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Serve fixture ``<version>/<name>.json`` at /<version>/<name>.json, URLs pointing here."""
    doc = json.loads((FIXTURES / version / f"{name}.json").read_text().replace(
        STANDIN_BASE, site.base))
    if patch is not None:
        patch(doc)
    site.set(f"/{version}/{name}.json", json.dumps(doc).encode())


def serve_feeds(site: Site, version: str) -> str:
    """Serve every feed of ``version``; the URL of its discovery file."""
    for name in FEEDS[version]:
        serve_feed(site, version, name)
    return site.url(f"/{version}/gbfs.json")


def display(topic_root: str, item: str, board: str = "bikes") -> str:
    return f"{topic_root}/display/{board}/{item}"


def config(discovery_url: str, stations: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"discovery_url": discovery_url, "stations": stations, "interval": 1,
            "timeout": 2, **extra}


def heartbeat_counter(obs: Observer, topic_root: str, name: str, at_least: int) -> None:
    obs.wait_for(f"{topic_root}/display-bikes/meta",
                 lambda m: m.json()["counters"].get(name, 0) >= at_least, timeout=20)


def is_stale(m: Any) -> bool:
    return bool(m.json()["stale"])


def test_velib_v2_feed_gives_mechanical_and_electric_counts(site, start_daemon, observe,
                                                            topic_root):
    feed = serve_feeds(site, "v2")
    obs = observe(f"{topic_root}/display/#")
    start_daemon("display_bikes", config(feed, [
        {"item": "godard", "id": 213688169},
        {"item": "gare-de-lyon", "id": "12001", "display_name": "Gare de Lyon"},
        {"item": "bastille", "name": "bastille - rue de la roquette"},
    ]))
    godard = obs.wait_for(display(topic_root, "godard"), timeout=20)[0]
    assert observe(display(topic_root, "godard")).wait_for(
        display(topic_root, "godard"))[0].retain
    assert godard.json() == {
        **godard.json(),
        "station_id": "213688169", "name": "Benjamin Godard - Victor Hugo",
        "bikes": 2, "mechanical": 1, "electric": 1, "docks": 33, "is_installed": True,
        "is_renting": True, "is_returning": True, "last_reported": 1715005680.0,
        "stale": False, "reason": None,
    }
    lyon = obs.wait_for(display(topic_root, "gare-de-lyon"))[0].json()
    assert (lyon["name"], lyon["feed_name"], lyon["station_id"]) == (
        "Gare de Lyon", "Gare de Lyon - Diderot", "653222953")
    assert (lyon["bikes"], lyon["mechanical"], lyon["electric"]) == (12, 7, 5)
    bastille = obs.wait_for(display(topic_root, "bastille"))[0].json()
    assert (bastille["bikes"], bastille["is_renting"], bastille["docks"]) == (0, False, 26)
    assert isinstance(bastille["fetched_at"], float)


def test_v3_feed_splits_bikes_by_vehicle_type_and_localizes_names(site, start_daemon, observe,
                                                                  topic_root):
    feed = serve_feeds(site, "v3")
    obs = observe(f"{topic_root}/display/#")
    start_daemon("display_bikes", config(feed, [
        {"item": "hbf", "id": "st-101"},
        {"item": "rathaus", "name": "Town Hall"},
    ], language="de", board="rad"))
    hbf = obs.wait_for(display(topic_root, "hbf", "rad"), timeout=20)[0].json()
    assert hbf["name"] == "Hauptbahnhof / Europaplatz"
    # bike (human) 5; pedelec and cargo (electric_assist) 3 + 1
    assert (hbf["bikes"], hbf["mechanical"], hbf["electric"], hbf["docks"]) == (9, 5, 4, 14)
    assert hbf["last_reported"] == 1715005781.0  # 2024-05-06T16:29:41+02:00
    rathaus = obs.wait_for(display(topic_root, "rathaus", "rad"))[0].json()
    assert (rathaus["name"], rathaus["bikes"], rathaus["is_renting"]) == ("Rathaus", 0, False)


def test_status_is_not_read_again_before_its_ttl_runs_out(site, start_daemon, observe,
                                                          topic_root):
    feed = serve_feeds(site, "v3")
    serve_feed(site, "v3", "station_status", lambda d: d.update(ttl=300))
    obs = observe(f"{topic_root}/#")
    start_daemon("display_bikes", config(feed, [{"item": "hbf", "id": "st-101"}]))
    obs.wait_for(display(topic_root, "hbf"), timeout=20)
    heartbeat_counter(obs, topic_root, "ttl_waits", 3)  # three intervals passed, ttl held
    assert site.hits["/v3/station_status.json"] == 1
    assert obs.wait_for(f"{topic_root}/display-bikes/meta")[-1].json()["status_ttl_s"] == 300


def test_status_is_read_every_interval_when_ttl_is_zero(site, start_daemon, observe,
                                                        topic_root):
    feed = serve_feeds(site, "v3")
    observe(f"{topic_root}/#")
    start_daemon("display_bikes", config(feed, [{"item": "hbf", "id": "st-101"}]))
    wait_until(lambda: site.hits["/v3/station_status.json"] >= 3, 20, "three status reads")
    assert site.hits["/v3/station_information.json"] == 1  # info_interval is an hour


def test_server_error_keeps_last_values_marked_stale_then_recovers(site, start_daemon, observe,
                                                                   topic_root):
    feed = serve_feeds(site, "v2")
    obs = observe(f"{topic_root}/#")
    start_daemon("display_bikes", config(feed, [{"item": "lyon", "id": "12001"}]))
    fresh = obs.wait_for(display(topic_root, "lyon"), timeout=20)[0].json()
    site.set("/v2/station_status.json", b"upstream down", status=503)
    stale = obs.wait_for(display(topic_root, "lyon"), is_stale, timeout=20)[0].json()
    assert "HTTP 503" in stale["reason"] and "/v2/station_status.json" in stale["reason"]
    assert (stale["bikes"], stale["electric"], stale["fetched_at"]) == (
        fresh["bikes"], fresh["electric"], fresh["fetched_at"])
    heartbeat_counter(obs, topic_root, "fetch_errors", 1)
    heartbeat_counter(obs, topic_root, "errors", 1)
    serve_feed(site, "v2", "station_status")
    n = len(obs.messages(display(topic_root, "lyon")))
    back = wait_until(lambda: [m for m in obs.messages(display(topic_root, "lyon"))[n:]
                               if not is_stale(m)], 20, "a fresh message again")[0].json()
    assert back["reason"] is None and back["fetched_at"] > fresh["fetched_at"]


def test_status_that_is_not_json_is_reported_as_such(site, start_daemon, observe, topic_root):
    feed = serve_feeds(site, "v2")
    obs = observe(f"{topic_root}/display/#")
    start_daemon("display_bikes", config(feed, [{"item": "lyon", "id": "12001"}]))
    obs.wait_for(display(topic_root, "lyon"), timeout=20)
    site.set("/v2/station_status.json", b"<html><body>Maintenance</body></html>")
    stale = obs.wait_for(display(topic_root, "lyon"), is_stale, timeout=20)[0].json()
    assert "not JSON" in stale["reason"]
    assert stale["bikes"] == 12


def test_status_without_a_stations_list_is_reported_as_malformed(site, start_daemon, observe,
                                                                 topic_root):
    feed = serve_feeds(site, "v3")
    obs = observe(f"{topic_root}/display/#")
    start_daemon("display_bikes", config(feed, [{"item": "hbf", "id": "st-101"}]))
    obs.wait_for(display(topic_root, "hbf"), timeout=20)
    serve_feed(site, "v3", "station_status", lambda d: d["data"].pop("stations"))
    stale = obs.wait_for(display(topic_root, "hbf"), is_stale, timeout=20)[0].json()
    assert "expected a list in data.stations" in stale["reason"]
    assert stale["bikes"] == 9


def test_station_entry_without_bike_count_is_stale_and_others_stay_fresh(
        site, start_daemon, observe, topic_root):
    feed = serve_feeds(site, "v3")
    obs = observe(f"{topic_root}/display/#")
    start_daemon("display_bikes", config(feed, [
        {"item": "hbf", "id": "st-101"}, {"item": "park", "id": "st-103"}]))
    obs.wait_for(display(topic_root, "park"), timeout=20)
    serve_feed(site, "v3", "station_status",
                 lambda d: d["data"]["stations"][2].pop("num_vehicles_available"))
    stale = obs.wait_for(display(topic_root, "park"), is_stale, timeout=20)[0].json()
    assert "no count of bikes" in stale["reason"] and stale["bikes"] == 4
    assert not any(is_stale(m) for m in obs.messages(display(topic_root, "hbf")))


def test_station_gone_from_the_feed_is_stale_and_others_stay_fresh(site, start_daemon, observe,
                                                                   topic_root):
    feed = serve_feeds(site, "v3")
    obs = observe(f"{topic_root}/#")
    start_daemon("display_bikes", config(feed, [
        {"item": "hbf", "id": "st-101"}, {"item": "rathaus", "id": "st-102"}]))
    obs.wait_for(display(topic_root, "rathaus"), timeout=20)
    serve_feed(site, "v3", "station_status", lambda d: d["data"]["stations"].pop(1))
    stale = obs.wait_for(display(topic_root, "rathaus"), is_stale, timeout=20)[0].json()
    assert "'st-102' is not in station_status" in stale["reason"]
    assert stale["docks"] == 16  # the last good values stay
    heartbeat_counter(obs, topic_root, "missing_stations", 1)
    assert not any(is_stale(m) for m in obs.messages(display(topic_root, "hbf")))


def test_station_never_seen_is_published_as_unknown(site, start_daemon, observe, topic_root):
    feed = serve_feeds(site, "v2")
    obs = observe(f"{topic_root}/display/#")
    start_daemon("display_bikes", config(feed, [
        {"item": "typo", "id": "99999", "display_name": "My station"},
        {"item": "byname", "name": "No Such Place"}]))
    typo = obs.wait_for(display(topic_root, "typo"), timeout=20)[0].json()
    assert typo["stale"] and typo["bikes"] is None and typo["name"] == "My station"
    assert typo["reason"].startswith("unknown station") and "'99999'" in typo["reason"]
    byname = obs.wait_for(display(topic_root, "byname"))[0].json()
    assert "'No Such Place' is not in station_information" in byname["reason"]


def test_feed_down_from_start_publishes_every_station_with_the_reason(start_daemon, observe,
                                                                      topic_root):
    obs = observe(f"{topic_root}/#")
    url = f"http://127.0.0.1:{free_port()}/gbfs.json"
    d: DaemonProcess = start_daemon("display_bikes", config(url, [
        {"item": "a", "id": "1"}, {"item": "b", "name": "Somewhere"}]))
    for item in ("a", "b"):
        msg = obs.wait_for(display(topic_root, item), timeout=20)[0].json()
        assert msg["stale"] and msg["bikes"] is None
        assert url in msg["reason"] and "Connection refused" in msg["reason"]
    heartbeat_counter(obs, topic_root, "fetch_errors", 2)
    assert d.proc.poll() is None


def test_slow_server_times_out_and_keeps_last_values(site, start_daemon, observe, topic_root):
    feed = serve_feeds(site, "v2")
    obs = observe(f"{topic_root}/#")
    d = start_daemon("display_bikes", config(feed, [{"item": "lyon", "id": "12001"}],
                                             timeout=0.5))
    obs.wait_for(display(topic_root, "lyon"), timeout=20)
    body = (FIXTURES / "v2" / "station_status.json").read_bytes()
    site.set("/v2/station_status.json", body, delay=30)
    stale = obs.wait_for(display(topic_root, "lyon"), is_stale, timeout=20)[0].json()
    assert "within 0.5 s" in stale["reason"] and stale["bikes"] == 12
    heartbeat_counter(obs, topic_root, "fetch_errors", 1)
    assert d.stop() == 0


def test_station_with_neither_id_nor_name_is_a_config_error(tmp_path):
    path = tmp_path / "bikes.yml"
    path.write_text("discovery_url: http://127.0.0.1/gbfs.json\nstations:\n  - item: x\n")
    checked = run_cli("display_bikes", "--check-config", str(path))
    assert checked.returncode == 78
    assert "stations[0].id: give exactly one of id or name" in checked.stderr


def test_gbfs2_discovery_falls_back_to_the_first_language():
    doc = json.loads((FIXTURES / "v2" / "gbfs.json").read_text())
    feeds, lang = discovery_feeds(doc, "http://x/gbfs.json", "de")
    assert lang == "en" and feeds["station_status"] == f"{STANDIN_BASE}/v2/station_status.json"


def test_gbfs3_timestamps_and_names_are_read():
    assert timestamp("2024-05-06T16:29:41+02:00") == 1715005781.0
    assert timestamp("2024-05-06T14:29:41Z") == 1715005781.0
    assert timestamp(1715005781) == 1715005781.0
    assert timestamp("yesterday") is None
    name = [{"text": "Rathaus", "language": "de"}, {"text": "Town Hall", "language": "en"}]
    assert localized(name, "en-GB") == "Town Hall"
    assert localized(name, "fr") == "Rathaus"


def test_velib_types_given_as_one_object_are_read_too():
    st = {"station_id": 1, "num_bikes_available": 3,
          "num_bikes_available_types": {"mechanical": 1, "ebike": 2}}
    values = station_values(st, {}, "http://x")
    assert (values["mechanical"], values["electric"], values["docks"]) == (1, 2, None)


def test_the_fixtures_are_the_listed_feeds():
    listed = sorted(f"{version}/{name}.json" for version, names in FEEDS.items()
                    for name in names)
    assert sorted(p.relative_to(FIXTURES).as_posix() for p in FIXTURES.glob("*/*.json")) == listed


@pytest.mark.parametrize(("version", "name"), [(v, n) for v, names in FEEDS.items()
                                               for n in names])
def test_the_standin_serves_this_test_fixture_not_a_copy(version, name):
    served = REPO / "molecule" / "standin-fixtures" / "display-bikes" / version / f"{name}.json"
    fixture = FIXTURES / version / f"{name}.json"
    assert fixture.is_file()
    assert served.is_symlink() and served.resolve() == fixture.resolve(), served
