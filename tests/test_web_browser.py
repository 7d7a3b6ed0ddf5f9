"""pihub-web in a real browser: Debian's headless chromium driven by selenium, against a real
Mosquitto, real daemons (sensor-system, sensor-gpio with its simulated backend) and a real
VictoriaMetrics. Skipped, with the reason, only where chromium or chromedriver is missing.

Each test saves a screenshot (1280x800) of the page it looked at into $PIHUB_SCREENSHOTS (else
the test's tmp directory); docs/screenshots/ are made by docs/screenshots/make.py instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import wait_until
from web_helpers import KIOSK_TOKEN, PASSWORD, start_web

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    HAVE_SELENIUM = True
except ImportError:  # pragma: no cover - CI installs it
    HAVE_SELENIUM = False

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER and HAVE_SELENIUM),
    reason="needs Debian's chromium and chromium-driver and the selenium package "
           f"(chromium: {CHROMIUM}, chromedriver: {CHROMEDRIVER}, selenium: {HAVE_SELENIUM})")

SENSOR_SYSTEM = Path(__file__).parent / "fixtures" / "sensor_system"


def make_driver() -> Any:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,800", "--force-device-scale-factor=1",
                "--hide-scrollbars", "--lang=en-GB"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    driver = make_driver()
    yield driver
    driver.quit()


@pytest.fixture
def page(browser: Any) -> Any:
    browser.delete_all_cookies()
    browser.set_window_size(1280, 800)
    return browser


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    given = os.environ.get("PIHUB_SCREENSHOTS")
    where = Path(given) if given else tmp_path / "screenshots"
    where.mkdir(parents=True, exist_ok=True)
    return where


def login(driver: Any, port: int, user: str = "admin", password: str = PASSWORD,
          path: str = "/") -> None:
    driver.get(f"http://127.0.0.1:{port}/login?" + urllib.parse.urlencode({"next": path}))
    driver.find_element(By.NAME, "user").send_keys(user)
    driver.find_element(By.NAME, "password").send_keys(password)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait_until(lambda: "/login" not in driver.current_url, 10, "the login to go through")
    if not path.startswith("/history"):  # History draws once, it has no live stream
        live(driver)


def live(driver: Any) -> None:
    """Wait until the page's stream delivered its snapshot."""
    wait_until(lambda: driver.execute_script("return window.pihub && pihub.snapshots > 0"), 10,
               "the page's live snapshot")


def text_of(driver: Any, css: str) -> str | None:
    """The text of the first element matching ``css`` now (rows are replaced as they change,
    so the page is asked afresh each time)."""
    return driver.execute_script(  # type: ignore[no-any-return]
        "var e = document.querySelector(arguments[0]); return e ? e.textContent : null;", css)


def class_of(driver: Any, css: str) -> str | None:
    return driver.execute_script(  # type: ignore[no-any-return]
        "var e = document.querySelector(arguments[0]); return e ? e.className : null;", css)


def data(value: float, unit: str = "°C", **extra: Any) -> dict[str, Any]:
    return {"value": value, "unit": unit, "ts": round(time.time(), 3), **extra}


def test_a_published_value_appears_on_the_overview_without_reload(page, start_daemon, observe,
                                                                  topic_root, shots):
    obs = observe()
    _proc, web = start_web(start_daemon)
    for q, v, u in (("temperature", 21.4, "°C"), ("humidity", 48, "%")):
        obs.publish(f"{topic_root}/data/living-room/{q}", data(v, u), retain=True)
    login(page, web.port)
    row = 'tr[id="v:living-room/temperature"] .val'
    wait_until(lambda: text_of(page, row) == "21.4", 10, "the retained value on the page")
    page.execute_script("window.notReloaded = true")
    sent = time.monotonic()
    obs.publish(f"{topic_root}/data/living-room/temperature", data(22.75), retain=True)
    wait_until(lambda: text_of(page, row) == "22.75", 10, "the new value on the open page")
    print(f"publish -> DOM: {1000 * (time.monotonic() - sent):.0f} ms (polled)")
    obs.publish(f"{topic_root}/data/garden/temperature", data(9.5), retain=True)  # a new card
    wait_until(lambda: text_of(page, 'tr[id="v:garden/temperature"] .val') == "9.5", 10,
               "a new location's card")
    assert page.execute_script("return window.notReloaded") is True
    page.save_screenshot(str(shots / "overview.png"))


def test_a_killed_daemon_turns_red_on_the_open_daemons_page(page, start_daemon, observe,
                                                            topic_root, shots):
    obs = observe(f"{topic_root}/sensor-system/status")
    _proc, web = start_web(start_daemon)
    sensor = start_daemon("sensor_system", {
        "interval": 60, "location": "pi", "proc_root": str(SENSOR_SYSTEM / "proc"),
        "thermal_root": str(SENSOR_SYSTEM / "thermal")})
    login(page, web.port, path="/daemons")
    row = 'tr[id="d:sensor-system"]'
    wait_until(lambda: class_of(page, row) == "up", 10, "sensor-system online on the page")
    page.execute_script("window.notReloaded = true")
    sensor.signal(signal.SIGKILL)
    obs.wait_for(f"{topic_root}/sensor-system/status", lambda m: m.text == "offline")
    will = time.monotonic()
    wait_until(lambda: class_of(page, row) == "down", 10, "sensor-system red on the open page")
    print(f"Last Will -> red row: {1000 * (time.monotonic() - will):.0f} ms (polled)")
    assert text_of(page, f"{row} .badge") == "offline"
    assert page.execute_script("return window.notReloaded") is True
    page.save_screenshot(str(shots / "daemons.png"))


def test_history_draws_the_points_written_to_victoriametrics(page, start_daemon, vm, shots):
    import urllib.request

    now = int(time.time()) // 60 * 60
    lines = [f"temperature,location=cellar,host=pi value={12 + (k % 7) * 0.5} "
             f"{(now - 60 * k - 30) * 1000}" for k in range(30)]
    req = urllib.request.Request(f"{vm.url}/api/v2/write?precision=ms",
                                 data="\n".join(lines).encode(), method="POST")
    urllib.request.urlopen(req, timeout=10).close()
    urllib.request.urlopen(f"{vm.url}/internal/force_flush", timeout=10).close()
    _proc, web = start_web(start_daemon, tsdb={"url": vm.url})
    login(page, web.port, path="/history?series=cellar/temperature&range=1h&step=60")

    def plotted() -> int:
        return int(page.execute_script(
            "return window.pihub && pihub.plot ? "
            "pihub.plot.data[1].filter(function (v) { return v !== null; }).length : 0"))

    try:
        wait_until(lambda: plotted() == 30, 20, "30 points drawn by uPlot")
    except AssertionError:
        print(text_of(page, "#hstatus"), page.get_log("browser"), page.current_url)
        raise
    assert page.find_elements(By.CSS_SELECTOR, "#chart canvas")
    page.save_screenshot(str(shots / "history.png"))


def test_switching_an_output_shows_the_state_sensor_gpio_reports(page, start_daemon, observe,
                                                                 topic_root, shots):
    obs = observe(f"{topic_root}/data/hall/heater")
    _proc, web = start_web(start_daemon)
    start_daemon("sensor_gpio", {"backend": "simulated", "interval": 60, "outputs": [
        {"name": "heater", "pin": 27, "location": "hall"},
        {"name": "fan", "pin": 22, "location": "attic"}]})
    login(page, web.port, path="/outputs")
    badge = 'tr[id="o:heater"] .badge'
    wait_until(lambda: text_of(page, badge) == "off", 10, "the heater's reported state")
    page.find_element(By.CSS_SELECTOR, 'tr[id="o:heater"] button').click()
    wait_until(lambda: text_of(page, badge) == "on", 10, "the state sensor-gpio reports")
    reported = obs.wait_for(f"{topic_root}/data/hall/heater", lambda m: m.json()["value"] == 1)
    assert reported[-1].json()["kind"] == "output"
    assert text_of(page, 'tr[id="o:heater"] button') == "Switch off"
    page.save_screenshot(str(shots / "outputs.png"))


def test_a_script_board_item_shows_as_text_and_the_kiosk_is_read_only(
        page, start_daemon, observe, topic_root, shots, tmp_path):
    evil = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">'
    token_file = tmp_path / "kiosk.token"
    token_file.write_text(KIOSK_TOKEN)
    obs = observe()
    _proc, web = start_web(start_daemon, kiosk_token_file=str(token_file))
    obs.publish(f"{topic_root}/display/bikes/evil", {"name": evil, "bikes": 4, "docks": 7},
                retain=True)
    page.get(f"http://127.0.0.1:{web.port}/boards?kiosk=1&theme=dark&token={KIOSK_TOKEN}")
    live(page)
    title = 'article[id="b:bikes/evil"] h3'
    wait_until(lambda: text_of(page, title) == evil, 10, "the board item, as text")
    obs.publish(f"{topic_root}/display/transport/stop", {"stop": evil, "departures": [
        {"line": evil, "destination": evil, "departs_at": time.time() + 300, "time": "12:00"}]},
        retain=True)
    wait_until(lambda: text_of(page, 'article[id="b:transport/stop"] .dest') == evil, 10,
               "a live board item, as text")
    assert page.execute_script("return window.pwned === undefined")
    assert not page.find_elements(By.CSS_SELECTOR, "main img, main script")
    assert page.execute_script("return document.body.dataset.role") == "viewer"
    assert not page.find_elements(By.CSS_SELECTOR, "header")  # kiosk: no chrome
    page.save_screenshot(str(shots / "boards-kiosk.png"))


def test_a_kiosk_page_catches_up_by_itself_after_the_daemon_restarts(
        page, start_daemon, observe, topic_root, tmp_path):
    """A restart ends every session; the wall display reconnects, logs in again with its
    token and starts from a fresh snapshot, with what changed while the daemon was away."""
    token_file = tmp_path / "kiosk.token"
    token_file.write_text(KIOSK_TOKEN)
    obs = observe()
    proc, web = start_web(start_daemon, kiosk_token_file=str(token_file))
    obs.publish(f"{topic_root}/data/hall/temperature", data(19.5), retain=True)
    page.get(f"http://127.0.0.1:{web.port}/?kiosk=1&token={KIOSK_TOKEN}")
    live(page)
    row = 'tr[id="v:hall/temperature"] .val'
    wait_until(lambda: text_of(page, row) == "19.5", 10, "the value")
    assert proc.stop() == 0
    wait_until(lambda: not page.execute_script("return pihub.connected"), 10,
               "the page to see the stream gone")
    obs.publish(f"{topic_root}/data/hall/temperature", data(23.5), retain=True)  # while away
    again = start_daemon("web", yaml.safe_load(proc.config_file.read_text()))
    again.wait_log("ready: connected and subscribed", 15)
    wait_until(lambda: text_of(page, row) == "23.5", 30, "the page caught up by itself")
    assert page.execute_script("return document.body.dataset.role") == "viewer"


def test_alerts_show_rules_and_notifications_live(page, start_daemon, observe, topic_root,
                                                  shots):
    obs = observe()
    _proc, web = start_web(start_daemon)
    obs.publish(f"{topic_root}/monitor/rules/cellar_humidity", {
        "rule": "cellar_humidity", "firing": 1, "series": {
            f"{topic_root}/data/cellar/humidity": {"state": "firing", "value": 74.5,
                                                   "unit": "%", "since": time.time()}}},
        retain=True)
    login(page, web.port, path="/alerts")
    wait_until(lambda: text_of(page, 'tr[id="r:cellar_humidity"] .badge') == "1 firing", 10,
               "the firing rule")
    obs.publish(f"{topic_root}/notify/monitor", {"title": "sensor-system DOWN on pi",
                                                 "message": "connection lost", "priority": 1})
    wait_until(lambda: "sensor-system DOWN on pi" in (text_of(page, "#notes li") or ""), 10,
               "the notification on the open page")
    page.save_screenshot(str(shots / "alerts.png"))


def test_the_page_memory_stays_flat_over_many_updates(page, start_daemon, observe, topic_root):
    """A wall display runs for weeks: the JS heap after 3000 updates is no bigger than after
    1000 (with some slack for the engine's own caches), garbage collected both times."""
    obs = observe()
    _proc, web = start_web(start_daemon)
    login(page, web.port)

    def burst(start: int, n: int) -> None:
        for i in range(start, start + n):
            obs.client.publish(f"{topic_root}/data/room{i % 50}/temperature",
                               f'{{"value": {i}, "unit": "°C", "ts": {time.time():.3f}}}', qos=0)
        last = start + n - 1
        wait_until(lambda: text_of(page, f'tr[id="v:room{last % 50}/temperature"] .val')
                   == str(last), 20, f"update {last} on the page")

    def heap() -> int:
        page.execute_cdp_cmd("HeapProfiler.collectGarbage", {})
        return int(page.execute_cdp_cmd("Runtime.getHeapUsage", {})["usedSize"])

    burst(0, 1000)
    first = heap()
    burst(1000, 2000)
    second = heap()
    print(f"JS heap after 1000 updates {first / 1e6:.2f} MB, after 3000 {second / 1e6:.2f} MB")
    assert second < first * 1.3 + 512 * 1024
    assert len(page.find_elements(By.CSS_SELECTOR, "#values tr")) == 50
