from conftest import DaemonProcess, Observer


def test_sensor_system_publishes_health_and_heartbeats(start_daemon, observe, topic_root):
    obs: Observer = observe(f"{topic_root}/#")
    d: DaemonProcess = start_daemon("sensor_system", {"interval": 1, "location": "pi"})
    obs.wait_for(f"{topic_root}/sensor-system/meta", lambda m: m.json()["event"] == "heartbeat")
    load = obs.wait_for(f"{topic_root}/data/pi/load_1m")[0]
    assert load.json()["unit"] == "count"
    assert d.stop() == 0
