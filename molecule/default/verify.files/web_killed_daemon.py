#!/usr/bin/env python3
"""verify.d/90's probe, run on the stand-in: kill a daemon with SIGKILL and time how soon
pihub-web's API says it is offline.

Logs in to pihub-web (login from the environment: VERIFY_WEB_USER, VERIFY_WEB_PASSWORD),
listens to the daemon's status with mosquitto_sub (the operator's login from VERIFY_MQTT_ARGS,
a JSON list), runs `systemctl kill -s KILL pihub-<daemon>`, and polls /api/state every 10 ms
until the daemon's status there is offline (at most --deadline seconds). Prints one JSON
object: the daemon's status in the API at the end, and the milliseconds from the kill to the
Last Will on the broker and to offline in the API.
"""

from __future__ import annotations

import argparse
import http.cookiejar
import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--daemon", required=True)
    parser.add_argument("--root", default="pihub")
    parser.add_argument("--deadline", type=float, default=30.0)
    args = parser.parse_args()
    base = f"http://127.0.0.1:{args.port}"
    opener = urllib.request.build_opener(
        urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    form = urllib.parse.urlencode({"user": os.environ["VERIFY_WEB_USER"], "next": "/",
                                   "password": os.environ["VERIFY_WEB_PASSWORD"]}).encode()
    opener.open(f"{base}/login", data=form, timeout=10).read()

    def status() -> str | None:
        with opener.open(f"{base}/api/state", timeout=5) as answer:
            daemon = json.load(answer)["daemons"].get(args.daemon) or {}
        return daemon.get("status")

    if status() != "online":
        print(json.dumps({"error": f"{args.daemon} is not online in the API before the kill"}))
        return 1
    topic = f"{args.root}/{args.daemon}/status"
    listener = subprocess.Popen(
        ["mosquitto_sub", *json.loads(os.environ["VERIFY_MQTT_ARGS"]), "-t", topic, "-R"],
        stdout=subprocess.PIPE, text=True)
    will: dict[str, float] = {}

    def listen() -> None:
        assert listener.stdout is not None
        for line in listener.stdout:
            if line.strip() == "offline" and "at" not in will:
                will["at"] = time.monotonic()

    threading.Thread(target=listen, daemon=True).start()
    time.sleep(1.0)  # the listener's subscription is up (no retained message: -R)
    killed = time.monotonic()
    subprocess.run(["systemctl", "kill", "-s", "KILL", f"pihub-{args.daemon}.service"],
                   check=True)
    seen = None
    while time.monotonic() - killed < args.deadline:
        seen = status()
        if seen == "offline":
            break
        time.sleep(0.01)
    offline = time.monotonic()
    time.sleep(0.2)
    listener.terminate()
    result = {"daemon": args.daemon, "status": seen,
              "kill_to_api_offline_ms": (round(1000 * (offline - killed)) if seen == "offline"
                                         else None),
              "kill_to_last_will_ms": round(1000 * (will["at"] - killed)) if will else None}
    if will and seen == "offline":
        result["last_will_to_api_offline_ms"] = round(1000 * (offline - will["at"]))
    print(json.dumps(result))
    return 0 if seen == "offline" else 1


if __name__ == "__main__":
    sys.exit(main())
