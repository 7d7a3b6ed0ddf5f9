#!/usr/bin/env python3
"""Make docs/screenshots/*.png: every pihub-web page with realistic data, in headless chromium.

The hub runs for real here: Mosquitto, VictoriaMetrics, sensor-system (this machine's /proc),
sensor-onewire (a w1 tree with one DS18B20), sensor-gpio (simulated backend: a door contact,
a motion sensor, three outputs), the monitor (a humidity rule), store-tsdb (into the
VictoriaMetrics) and pihub-web. What needs the outside world is published as the daemons would
publish it: two more rooms' measurements, the boards of display-bikes and display-transport
(payloads in their documented shapes), and a day of history written into VictoriaMetrics.
sensor-onewire is killed before the Daemons shot, so one row is red.

    python3 bench/web/screenshots.py [--out docs/screenshots]
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stack import (
    REPO,
    Daemons,
    VictoriaMetrics,
    browser_login,
    chromium,
    free_port,
    hash_password,
    mqtt_client,
    publish,
    start_mosquitto,
    wait_until,
    write_points,
)

ROOMS = {  # location -> quantity -> (base, swing, unit)
    "living-room": {"temperature": (21.2, 1.2, "°C"), "humidity": (46, 5, "%"),
                    "co2": (620, 180, "ppm")},
    "cellar": {"temperature": (13.1, 0.6, "°C"), "humidity": (74.5, 3, "%")},
    "garden": {"temperature": (8.4, 4.5, "°C"), "pressure": (1016.2, 3, "hPa"),
               "light": (1800, 1700, "lx")},
    "kitchen": {"power": (310, 250, "W"), "freezer_temp": (-19.2, 0.8, "°C")},
}


def wave(base: float, swing: float, t: float, phase: float) -> float:
    day = 2 * math.pi * ((t / 86400) + phase)
    return round(base + swing * math.sin(day) + random.uniform(-swing, swing) * 0.08, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "screenshots"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(15)
    work = Path(tempfile.mkdtemp(prefix="pihub-shots-"))
    broker, port = start_mosquitto(work)
    (work / "vm").mkdir()
    vm = VictoriaMetrics(work / "vm")
    vm.start()
    daemons = Daemons(work, port)
    driver = None
    try:
        now = time.time()
        # a day of history, one point a minute, for every room series
        lines = []
        for phase, (location, quantities) in enumerate(ROOMS.items()):
            for quantity, (base, swing, _unit) in quantities.items():
                for k in range(0, 7 * 1440, 5 if k_long(quantity) else 1):
                    t = now - 60 * k
                    lines.append(f"{quantity},location={location},host=pihub "
                                 f"value={wave(base, swing, t, phase / 5)} {int(t * 1000)}")
        for start in range(0, len(lines), 20000):
            write_points(vm.url, lines[start:start + 20000])

        w1 = work / "w1" / "devices" / "28-0316a2794cff"
        w1.mkdir(parents=True)
        shutil.copy(REPO / "tests/fixtures/sensor_onewire/ok_23125.w1_slave", w1 / "w1_slave")
        common = {"heartbeat_interval": 5}
        daemons.start("store-tsdb", {**common, "url": vm.url, "spool_dir": str(work / "spool")})
        daemons.start("sensor-system", {**common, "interval": 10, "location": "pi"})
        onewire = daemons.start("sensor-onewire", {**common, "interval": 10, "w1_root":
                                                   str(work / "w1"), "sensors": [
            {"id": "28-0316a2794cff", "location": "bedroom"}]})
        daemons.start("sensor-gpio", {**common, "backend": "simulated", "interval": 30,
                                      "inputs": [
            {"name": "front_door", "pin": 17, "location": "hall", "kind": "contact"},
            {"name": "motion", "pin": 23, "location": "hall", "kind": "motion"}],
            "outputs": [{"name": "heater", "pin": 27, "location": "cellar"},
                        {"name": "garden_pump", "pin": 22, "location": "garden",
                         "initial": True},
                        {"name": "fan", "pin": 24, "location": "attic"}]})
        daemons.start("monitor", {**common, "startup_grace": 1, "rules": [
            {"name": "cellar_humidity", "topic": "cellar/humidity", "above": 70,
             "hysteresis": 3},
            {"name": "freezer_warm", "topic": "+/freezer_temp", "above": -12}]})
        web_port = free_port()
        kiosk = work / "kiosk.token"
        kiosk.write_text("demo-kiosk-token-0123456789\n")
        daemons.start("web", {**common, "listen_address": "127.0.0.1", "port": web_port,
                              "users": {"admin": hash_password("demo", iterations=2000)},
                              "kiosk_token_file": str(kiosk), "tsdb": {"url": vm.url}})
        client = mqtt_client(port)
        for phase, (location, quantities) in enumerate(ROOMS.items()):
            for quantity, (base, swing, unit) in quantities.items():
                for back in (120, 60, 0):  # three values: the page learns the interval
                    t = now - back
                    publish(client, f"pihub/data/{location}/{quantity}",
                            {"value": wave(base, swing, t, phase / 5), "unit": unit,
                             "ts": round(t, 3)})
        publish(client, "pihub/sim/sensor-gpio/front_door", "0")
        publish(client, "pihub/display/bikes/gare-de-lyon", {
            "station_id": "12001", "name": "Gare de Lyon", "feed_name": "Gare de Lyon - Diderot",
            "bikes": 12, "mechanical": 7, "electric": 5, "docks": 36, "is_installed": True,
            "is_renting": True, "is_returning": True, "last_reported": now - 40,
            "fetched_at": now - 5, "ts": now - 5, "stale": False, "reason": None})
        publish(client, "pihub/display/bikes/bastille", {
            "station_id": "11104", "name": "Bastille", "bikes": 3, "mechanical": 1,
            "electric": 2, "docks": 19, "stale": False, "reason": None, "ts": now})
        publish(client, "pihub/display/bikes/republique", {
            "station_id": "10029", "name": "République", "bikes": 0, "mechanical": 0,
            "electric": 0, "docks": 41, "stale": True, "ts": now,
            "reason": "http://gbfs.example/station_status.json: HTTP 503 SERVICE UNAVAILABLE"})
        deps = [("S 5", "Westkreuz", 2, "8", 0), ("RE 1", "Frankfurt (Oder)", 6, "3", 6),
                ("S 7", "Potsdam Hbf", 9, "7", 0), ("RB 23", "Flughafen BER", 14, "2", 2),
                ("S 75", "Wartenberg", 21, "6", 0)]
        publish(client, "pihub/display/transport/ostbahnhof", {
            "stop": "Berlin Ostbahnhof", "fetched_at": now, "ts": now, "stale": False,
            "reason": None, "departures": [
                {"line": line, "destination": dest, "minutes": m,
                 "time": time.strftime("%H:%M", time.localtime(now + 60 * m)),
                 "departs_at": now + 60 * m + 30, "delay_min": delay or None,
                 "platform": plat} for line, dest, m, plat, delay in deps]})

        driver = chromium()
        browser_login(driver, web_port)
        wait_until(lambda: driver.execute_script("return window.pihub.snapshots > 0"), 10,
                   "live")
        wait_until(lambda: driver.execute_script(
            "return Object.keys(pihub.state.values).length >= 20"), 30, "the values")
        driver.save_screenshot(str(out / "overview.png"))

        onewire.send_signal(signal.SIGKILL)
        driver.get(f"http://127.0.0.1:{web_port}/daemons")
        wait_until(lambda: driver.execute_script(
            "var r = document.getElementById('d:sensor-onewire');"
            "return r && r.className === 'down' && "
            "pihub.state.daemons['sensor-onewire'].monitor &&"
            "pihub.state.daemons['sensor-onewire'].monitor.state === 'down'"), 30,
            "sensor-onewire red, and the monitor's verdict")
        time.sleep(1)
        driver.save_screenshot(str(out / "daemons.png"))

        driver.get(f"http://127.0.0.1:{web_port}/boards")
        wait_until(lambda: driver.execute_script("return window.pihub.snapshots > 0"), 10, "")
        driver.save_screenshot(str(out / "boards.png"))

        driver.get(f"http://127.0.0.1:{web_port}/history?series=living-room/temperature&"
                   "series=garden/temperature&series=cellar/temperature&range=24h")
        wait_until(lambda: driver.execute_script("return window.pihub.plotted > 0"), 20, "plot")
        driver.save_screenshot(str(out / "history.png"))
        driver.get(f"http://127.0.0.1:{web_port}/history?series=garden/temperature&range=7d")
        wait_until(lambda: driver.execute_script("return window.pihub.plotted > 0"), 20, "plot")
        driver.save_screenshot(str(out / "history-7d-band.png"))

        driver.get(f"http://127.0.0.1:{web_port}/alerts")
        wait_until(lambda: driver.execute_script(
            "return pihub.state.notifications.length >= 2"), 30, "notifications")
        driver.save_screenshot(str(out / "alerts.png"))

        driver.get(f"http://127.0.0.1:{web_port}/outputs")
        wait_until(lambda: driver.execute_script(
            "return !!document.getElementById('o:fan')"), 10, "outputs")
        driver.save_screenshot(str(out / "outputs.png"))

        # History without a timeseries DB: a second pihub-web draws store-rrd's files
        rrd = work / "rrd" / "cellar"
        rrd.mkdir(parents=True)
        path = rrd / "temperature.rrd"
        end = int(now) // 60 * 60
        subprocess.run(["rrdtool", "create", str(path), "--start", str(end - 90000), "--step",
                        "60", "DS:value:GAUGE:120:U:U", *(f"RRA:{cf}:0.5:1:2880" for cf in (
                            "AVERAGE", "MIN", "MAX"))], check=True)
        subprocess.run(["rrdtool", "update", str(path), *(
            f"{end - 86400 + 60 * k}:{wave(13.1, 0.6, end - 86400 + 60 * k, 0.2)}"
            for k in range(1440))], check=True)
        (rrd / "temperature.json").write_text('{"unit": "°C"}')
        rrd_port = free_port()
        daemons.start("web", {**common, "listen_address": "127.0.0.1", "port": rrd_port,
                              "mqtt": {"host": "127.0.0.1", "port": port,
                                       "client_id": "pihub-web-rrd"},
                              "users": {"admin": hash_password("demo", iterations=2000)},
                              "rrd": {"dir": str(work / "rrd")}}, tag="web-rrd")
        driver.delete_all_cookies()
        browser_login(driver, rrd_port, "/history?series=cellar/temperature&range=24h")
        wait_until(lambda: driver.execute_script(
            "var i = document.querySelector('figure.rrd img');"
            "return i && i.complete && i.naturalWidth > 0"), 20, "the RRD graph")
        driver.save_screenshot(str(out / "history-rrd.png"))

        driver.delete_all_cookies()
        driver.get(f"http://127.0.0.1:{web_port}/boards?kiosk=1&theme=dark&"
                   "token=demo-kiosk-token-0123456789")
        wait_until(lambda: driver.execute_script("return window.pihub.snapshots > 0"), 10, "")
        driver.save_screenshot(str(out / "boards-kiosk.png"))
        driver.set_window_size(412, 915)  # a phone
        driver.get(f"http://127.0.0.1:{web_port}/boards?kiosk=1&theme=dark&"
                   "token=demo-kiosk-token-0123456789")
        wait_until(lambda: driver.execute_script("return window.pihub.snapshots > 0"), 10, "")
        driver.save_screenshot(str(out / "boards-kiosk-phone.png"))
        for png in sorted(out.glob("*.png")):
            print(f"{png}: {png.stat().st_size // 1024} KB")
    finally:
        if driver is not None:
            driver.quit()
        daemons.stop_all()
        vm.stop()
        broker.terminate()
        broker.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    return 0


def k_long(quantity: str) -> bool:
    """Slow series get a point every 5 minutes in the written history."""
    return quantity in ("pressure", "co2")


if __name__ == "__main__":
    sys.exit(main())
