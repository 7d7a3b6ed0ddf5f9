"""What the pihub-web benchmarks and the screenshot script need: a Mosquitto and a
VictoriaMetrics of their own, pihub daemons as processes from this source tree, a logged-in HTTP
session, headless chromium. Nothing here comes from tests/ (what both share is in testkit/)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "files" / "daemons" / "src"
sys.path.insert(0, str(REPO))  # testkit, shared with the tests
sys.path.insert(0, str(SRC))

from pihub.daemons.web.auth import hash_password  # noqa: E402

from testkit import loopback  # noqa: E402
from testkit.loopback import VictoriaMetrics, free_port, wait_until  # noqa: E402

__all__ = ["VictoriaMetrics", "free_port", "hash_password", "wait_until"]

CLK_TCK = os.sysconf("SC_CLK_TCK")
PASSWORD = "demo"


def start_mosquitto(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    return loopback.start_mosquitto(workdir, "max_queued_messages 100000",
                                    *(["user root"] if os.geteuid() == 0 else []))


class Daemons:
    """pihub daemons started from this tree against one broker; stopped together."""

    def __init__(self, work: Path, broker_port: int, root: str = "pihub") -> None:
        self.work = work
        self.broker_port = broker_port
        self.root = root
        self.procs: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []

    def start(self, name: str, config: dict[str, Any], python: str = sys.executable,
              wait: bool = True, tag: str | None = None) -> subprocess.Popen[bytes]:
        """``pihub-<name>``; ``tag`` names its config and log files (a second instance)."""
        cfg = {"mqtt": {"host": "127.0.0.1", "port": self.broker_port}, "topic_root": self.root,
               **config}
        conf = self.work / f"{tag or name}.yml"
        conf.write_text(yaml.safe_dump(cfg, allow_unicode=True))
        log_path = self.work / f"{tag or name}.log"
        log = open(log_path, "wb")  # noqa: SIM115 (open for the daemon's life)
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        proc = subprocess.Popen([python, "-m", "pihub.daemons." + name.replace("-", "_"),
                                 "--config", str(conf)], stdout=log, stderr=subprocess.STDOUT,
                                env=env)
        self.procs.append((proc, log))
        if wait:
            wait_until(lambda: b"ready:" in log_path.read_bytes() or proc.poll() is not None,
                       30, f"{name} to be ready")
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited: {log_path.read_text()[-2000:]}")
        return proc

    def stop_all(self) -> None:
        for proc, log in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.close()
        self.procs = []


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def mqtt_client(port: int) -> mqtt.Client:
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                         client_id=f"bench-{os.getpid()}-{time.monotonic_ns()}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    wait_until(client.is_connected, 10, "the MQTT client connected")
    return client


def publish(client: mqtt.Client, topic: str, payload: Any, retain: bool = True,
            qos: int = 1) -> None:
    data = payload if isinstance(payload, bytes | str) else json.dumps(payload,
                                                                       ensure_ascii=False)
    client.publish(topic, data, qos=qos, retain=retain).wait_for_publish(10)


def login(port: int, user: str = "admin", password: str = PASSWORD) -> str:
    """The session cookie of a login (``pihub_session=...``)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/login", urllib.parse.urlencode({"user": user, "password": password}),
                 {"Content-Type": "application/x-www-form-urlencoded"})
    resp = conn.getresponse()
    resp.read()
    cookie = (resp.getheader("Set-Cookie") or "").split(";")[0]
    conn.close()
    if resp.status != 303 or not cookie:
        raise RuntimeError(f"login failed: HTTP {resp.status}")
    return cookie


def write_points(url: str, lines: Iterable[str]) -> None:
    body = "\n".join(lines).encode()
    req = urllib.request.Request(f"{url}/api/v2/write?precision=ms", data=body, method="POST")
    urllib.request.urlopen(req, timeout=30).close()
    urllib.request.urlopen(f"{url}/internal/force_flush", timeout=10).close()


def chromium(width: int = 1280, height: int = 800) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--force-device-scale-factor=1",
                "--hide-scrollbars", "--lang=en-GB"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver") or
                                            "/usr/bin/chromedriver"), options=options)


def browser_login(driver: Any, port: int, path: str = "/", user: str = "admin",
                  password: str = PASSWORD) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"http://127.0.0.1:{port}/login?" + urllib.parse.urlencode({"next": path}))
    driver.find_element(By.NAME, "user").send_keys(user)
    driver.find_element(By.NAME, "password").send_keys(password)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait_until(lambda: "/login" not in driver.current_url, 10, "the login")
