"""The reference for store-tsdb's CPU per message: a bare paho + influxdb-client consumer.

What store-tsdb does, with nothing else: one paho client (MQTT 3.1.1, persistent session,
QoS 1, manual acknowledgement), each message's JSON decoded and turned into the same line
protocol, batches of ``--batch-size`` written with influxdb-client's synchronous write API, and
every message of a batch acknowledged once the write returned (ack after store). No spool, no
checks beyond json.loads, no counters, no heartbeats, no second thread: all of it runs in paho's
network loop, which is the least CPU such a consumer can spend.

    python3 bare_consumer.py --port 1883 --root bare --url http://127.0.0.1:8428 --host bare

Run by bench/store_throughput/tsdb.py beside the real daemon; prints "ready" once subscribed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

sys.modules.setdefault("numpy", None)  # type: ignore[arg-type]  # as store-tsdb: never used

import paho.mqtt.client as mqtt  # noqa: E402
from influxdb_client import InfluxDBClient  # noqa: E402
from influxdb_client.client.write_api import SYNCHRONOUS  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--url", required=True)
    ap.add_argument("--host", default="bare", help="the points' host tag")
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--flush-idle", type=float, default=0.1)
    args = ap.parse_args()

    db = InfluxDBClient(url=args.url, token="", org="pihub", retries=False, enable_gzip=False)
    write_api = db.write_api(write_options=SYNCHRONOUS)
    prefix_len = len(args.root) + len("/data/")
    batch: list[str] = []
    mids: list[int] = []
    last = [0.0]

    def flush(client: mqtt.Client) -> None:
        write_api.write("pihub", "pihub", "\n".join(batch).encode(), write_precision="ms")
        for mid in mids:
            client.ack(mid, 1)
        batch.clear()
        mids.clear()

    def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        location, quantity = msg.topic[prefix_len:].split("/")
        data = json.loads(msg.payload)
        batch.append(f"{quantity},location={location},host={args.host} "
                     f"value={float(data['value'])!r} {round(data['ts'] * 1000)}")
        mids.append(msg.mid)
        last[0] = time.monotonic()
        if len(batch) >= args.batch_size:
            flush(client)

    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                         client_id=f"bare-{args.root}", clean_session=False,
                         protocol=mqtt.MQTTv311, manual_ack=True)
    client.max_inflight_messages_set(100)
    client.on_message = on_message
    subscribed = []
    client.on_connect = lambda c, *a: c.subscribe(f"{args.root}/data/#", 1)
    client.on_subscribe = lambda *a: subscribed.append(True)
    client.connect("127.0.0.1", args.port, keepalive=60)
    ready = False
    while True:  # until SIGTERM
        client.loop(timeout=args.flush_idle / 2)
        if not ready and subscribed:
            print("ready", flush=True)
            ready = True
        if batch and time.monotonic() - last[0] >= args.flush_idle:
            flush(client)


if __name__ == "__main__":
    sys.exit(main())
