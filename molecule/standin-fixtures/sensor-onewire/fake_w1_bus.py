#!/usr/bin/env python3
"""A fake kernel w1 bus for the Molecule stand-in Pi (which has no 1-wire hardware).

Keeps ``<root>/devices/<id>/w1_slave`` files in the w1_therm driver's format, beside a
``w1_bus_master1`` entry, for three DS18B20s whose temperatures drift slowly (a sine over an
hour, in the sensor's 1/16 °C steps, with the scratchpad's real CRC8)::

    72 01 4b 46 7f ff 0e 10 57 : crc=57 YES
    72 01 4b 46 7f ff 0e 10 57 t=23125

pihub-sensor-onewire reads it with ``w1_root: <root>``. Stdlib only:
``python3 fake_w1_bus.py /var/lib/pihub-fixtures/w1 [--period 10] [--once]``.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

# id: (mean °C, swing °C); the last one is not in the example inventory (publish_unknown)
SENSORS = {
    "28-0316a2795eff": (21.5, 1.5),
    "28-01144f8ac1aa": (8.0, 4.0),
    "28-00000a1b2c3d": (45.0, 5.0),
}


def crc8(data: bytes) -> int:
    """Dallas/Maxim 1-wire CRC8 (polynomial x^8 + x^5 + x^4 + 1, reflected)."""
    crc = 0
    for byte in data:
        for _ in range(8):
            mix = (crc ^ byte) & 1
            crc >>= 1
            if mix:
                crc ^= 0x8C
            byte >>= 1
    return crc


def w1_slave(celsius: float) -> str:
    """The two lines w1_therm writes for a DS18B20 at ``celsius`` (12-bit resolution)."""
    raw = round(celsius * 16) & 0xFFFF
    pad = bytes([raw & 0xFF, raw >> 8, 0x4B, 0x46, 0x7F, 0xFF, 0x0C, 0x10])
    scratch = pad + bytes([crc8(pad)])
    text = " ".join(f"{b:02x}" for b in scratch)
    millideg = (raw - 0x10000 if raw & 0x8000 else raw) * 1000 // 16
    return f"{text} : crc={crc8(pad):02x} YES\n{text} t={millideg}\n"


def write_all(root: Path, now: float) -> None:
    (root / "devices" / "w1_bus_master1").mkdir(parents=True, exist_ok=True)
    for n, (sensor_id, (mean, swing)) in enumerate(SENSORS.items()):
        celsius = mean + swing * math.sin(2 * math.pi * (now / 3600.0 + n / 3))
        folder = root / "devices" / sensor_id
        folder.mkdir(exist_ok=True)
        tmp = folder / ".w1_slave.tmp"
        tmp.write_text(w1_slave(celsius), encoding="ascii")
        os.replace(tmp, folder / "w1_slave")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the fake w1 root (w1_root of the daemon)")
    parser.add_argument("--period", type=float, default=10.0, help="seconds between updates")
    parser.add_argument("--once", action="store_true", help="write the files once and exit")
    args = parser.parse_args()
    os.umask(0o022)  # readable by the daemon's own user
    while True:
        write_all(args.root, time.time())
        if args.once:
            return
        time.sleep(args.period)


if __name__ == "__main__":
    main()
