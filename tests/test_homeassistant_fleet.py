"""pihub-homeassistant on a central hub with a satellite (contract §2, "Fleet"): the satellite's
daemons, mirrored as ``<root>/host/<host>/<daemon>/...`` by its bridge (hand-published here; the
real bridge is in test_fleet_bridge.py), get a device per host and unique ids with the host; the
central's own daemons' configs stay as they were.
"""

from __future__ import annotations

from test_homeassistant import (
    PREFIX,
    config_topic,
    fake_meta,
    ha_config,
    measurement,
    wait_config,
)

SITE = "shed"


def test_a_satellites_entities_are_in_a_device_of_its_host_with_the_host_in_their_ids(
        start_daemon, observe, topic_root):
    root = topic_root
    obs = observe(f"{PREFIX}/#")
    # this hub's sensor-gpio and the satellite's, both named sensor-gpio
    obs.publish(f"{root}/sensor-gpio/status", "online", retain=True)
    obs.publish(f"{root}/sensor-gpio/meta", fake_meta("sensor-gpio", [f"{root}/data/hall/motion"]),
                retain=True)
    obs.publish(f"{root}/host/{SITE}/sensor-gpio/status", "online", retain=True)
    obs.publish(f"{root}/host/{SITE}/sensor-gpio/meta",
                fake_meta("sensor-gpio", [f"{root}/data/{SITE}/pump"]), retain=True)
    obs.publish(f"{root}/data/hall/motion", measurement(0, "bool", kind="motion"), retain=True)
    obs.publish(f"{root}/data/{SITE}/pump", measurement(0, "bool", kind="output"), retain=True)
    start_daemon("homeassistant", ha_config())

    own = wait_config(obs, config_topic("binary_sensor", root, "status_sensor-gpio"))
    theirs = wait_config(obs, config_topic("binary_sensor", root,
                                           f"host_{SITE}_status_sensor-gpio"))
    # this hub's: as before (the device of its meta's host)
    assert own["state_topic"] == f"{root}/sensor-gpio/status"
    assert own["unique_id"] == f"{root}_status_sensor-gpio"
    assert own["device"]["identifiers"] == [f"{root}_pi-far"]
    # the satellite's: its mirror, its own device, the host in its unique id
    assert theirs["state_topic"] == f"{root}/host/{SITE}/sensor-gpio/status"
    assert theirs["unique_id"] == f"{root}_host_{SITE}_status_sensor-gpio"
    assert theirs["name"] == "pihub-sensor-gpio"
    assert theirs["device"]["identifiers"] == [f"{root}_{SITE}"]
    assert theirs["device"]["name"] == f"pihub {SITE}"

    pump = wait_config(obs, config_topic("switch", root, f"data_{SITE}_pump"),
                       lambda c: "availability" in c)
    assert pump["command_topic"] == f"{root}/host/{SITE}/cmd/sensor-gpio/pump"
    assert pump["availability"][0]["topic"] == f"{root}/host/{SITE}/sensor-gpio/status"
    assert pump["device"]["identifiers"] == [f"{root}_{SITE}"]
    motion = wait_config(obs, config_topic("binary_sensor", root, "data_hall_motion"),
                         lambda c: "availability" in c)
    assert motion["availability"][0]["topic"] == f"{root}/sensor-gpio/status"
    assert motion["device"]["identifiers"] == [f"{root}_pi-far"]
