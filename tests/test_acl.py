"""Least-privilege MQTT: what each daemon declares it publishes (``--print-acl``), and the ACL the
roles write from it, enforced by a real Mosquitto (Debian's 2.0 here, as on the Pi).

That a daemon publishes nothing beyond its declaration is checked for every daemon a test runs
(the ``start_daemon`` fixture reads the broker's log: tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import Broker, run_cli, write_config

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("module", "config", "declared"), [
    ("sensor_system", {"location": "hall"}, ["data/hall/+"]),
    ("sensor_gpio", {"backend": "simulated",
                     "inputs": [{"name": "front_door", "pin": 17, "location": "hall"}],
                     "outputs": [{"name": "heater", "pin": 27, "location": "hall"}]},
     ["data/hall/front_door", "data/hall/heater"]),
    ("sensor_onewire", {"sensors": [{"id": "28-0316a2795eff", "location": "cellar"}]},
     ["data/cellar/temperature", "data/onewire/+"]),
    ("sensor_onewire", {"sensors": [{"id": "28-0316a2795eff", "location": "cellar"}],
                        "publish_unknown": False}, ["data/cellar/temperature"]),
    ("display_bikes", {"discovery_url": "http://127.0.0.1:1/gbfs.json", "board": "velib",
                       "stations": [{"item": "godard", "id": "213688169"}]},
     ["display/velib/godard"]),
    ("monitor", {"rules": [{"name": "hot", "topic": "+/cpu_temp", "above": 80,
                            "notify_topic": "alarms"}]}, ["notify/alarms", "notify/monitor"]),
    ("notify_pushover", {"token_file": "/nonexistent", "user_key_file": "/nonexistent"}, []),
    ("store_rrd", {"rrd_dir": "/nonexistent"}, []),
    ("store_tsdb", {"url": "http://127.0.0.2:8428"}, []),
], ids=["system", "gpio", "onewire", "onewire-no-unknown", "bikes", "monitor", "pushover", "rrd",
        "tsdb"])
def test_print_acl_declares_the_topics_the_config_publishes_on(
        tmp_path: Path, module: str, config: dict[str, Any], declared: list[str]) -> None:
    path = write_config(tmp_path / "config.yml", {"topic_root": "home", **config})
    result = run_cli(module, "--print-acl", str(path))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"topic_root": "home", "write": declared}


def test_print_acl_declares_home_assistants_topics_outside_the_root(tmp_path: Path) -> None:
    path = write_config(tmp_path / "config.yml", {"topic_root": "home/hub",
                                                  "discovery_prefix": "ha"})
    result = run_cli("homeassistant", "--print-acl", str(path))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"topic_root": "home/hub", "write": [], "outside_root": [
        {"topic": "ha/binary_sensor/home_hub/#", "access": "readwrite"},
        {"topic": "ha/sensor/home_hub/#", "access": "readwrite"},
        {"topic": "ha/status", "access": "read"},
        {"topic": "ha/switch/home_hub/#", "access": "readwrite"}]}


def test_print_acl_refuses_a_bad_config_like_check_config(tmp_path: Path) -> None:
    path = write_config(tmp_path / "config.yml", {"location": "Hall Way"})
    result = run_cli("sensor_system", "--print-acl", str(path))
    assert result.returncode == 78
    assert "location" in result.stderr and result.stdout == ""


# --------------------------------------------------------------------------- the roles' ACL

# An inventory as the roles see it: sensor-system and sensor-gpio share the location hall.
DAEMONS = [
    {"name": "sensor-system", "config": {"location": "hall"}},
    {"name": "sensor-gpio", "config": {"backend": "simulated", "outputs": [
        {"name": "heater", "pin": 27, "location": "hall"}]},
     "mqtt_acl": [{"topic": "cmd/sensor-gpio/#", "access": "read"}]},
    {"name": "store-tsdb", "config": {"url": "http://127.0.0.2:8428"},
     "mqtt_acl": [{"topic": "data/#", "access": "read"}], "timeseries_client": True},
    {"name": "homeassistant", "config": {}},
]
# Outside devices, each its own user: one with a wide grant of its own, one that lists the
# heater's topic as it is (its ACL says so), and an operator that reads everything.
EXTRA_USERS = [
    {"name": "plug", "password": "test-only-plug-password",
     "acl": [{"topic": "pihub/data/#", "access": "write"}]},
    {"name": "panel", "password": "test-only-panel-password",
     "acl": [{"topic": "pihub/data/hall/heater", "access": "write"}]},
    {"name": "reader", "password": "test-only-reader-password",
     "acl": [{"topic": "pihub/#", "access": "read"},
             {"topic": "homeassistant/#", "access": "read"}]},
]
PLAYBOOK = """
- name: The mosquitto role's ACL, written from the pihub role's users and their declarations
  hosts: localhost
  connection: local
  gather_facts: false
  roles:
    - {role: base, tags: [never]}
    - {role: mosquitto, tags: [never]}
    - {role: pihub, tags: [never]}
  tasks:
    - name: The daemons' declarations are known, as tasks/declared.yml reads them
      ansible.builtin.set_fact:
        pihub_declared_topics: "{{ lookup('file', out ~ '/declared.json') | from_json }}"
    - name: The ACL is rendered
      ansible.builtin.template:
        src: "{{ repo }}/roles/mosquitto/templates/pihub.acl.j2"
        dest: "{{ out }}/pihub.acl"
        mode: "0600"
      vars:
        mosquitto_users: "{{ pihub_mqtt_users }}"
    - name: The logins are listed
      ansible.builtin.copy:
        content: |
          {% for u in pihub_mqtt_users + mosquitto_bridge_users + mosquitto_extra_users %}
          {{ u.name }}:{{ u.password }}
          {% endfor %}
        dest: "{{ out }}/pihub.passwd"
        mode: "0600"
"""


@pytest.fixture
def acl_broker(tmp_path: Path) -> Any:
    """A real Mosquitto with the ACL and logins the roles write for DAEMONS and EXTRA_USERS;
    yields (broker, ACL text, {user: password})."""
    broker, acl, passwords = start_acl_broker(tmp_path, [])
    yield broker, acl, passwords
    broker.stop()


def start_acl_broker(tmp_path: Path, bridge_clients: list[dict[str, Any]],
                     ) -> tuple[Broker, str, dict[str, str]]:
    """The broker of acl_broker, with the bridge logins of a fleet central (the mosquitto
    role's mosquitto_bridge_clients, as playbooks/site.yml makes them) too."""
    declared = {}
    for entry in DAEMONS:
        path = write_config(tmp_path / f"{entry['name']}.yml", entry["config"])
        result = run_cli(entry["name"].replace("-", "_"), "--print-acl", str(path))
        assert result.returncode == 0, result.stderr
        declared[entry["name"]] = [json.loads(result.stdout)]
    (tmp_path / "declared.json").write_text(json.dumps(declared))
    (tmp_path / "play.yml").write_text(PLAYBOOK)
    extra = tmp_path / "vars.yml"
    extra.write_text(yaml.safe_dump({
        "repo": str(REPO), "out": str(tmp_path), "pihub_daemons": DAEMONS,
        "mosquitto_extra_users": EXTRA_USERS, "pihub_mqtt_secret": "test-only-7Qm2Vh9Lx4Rk8Pz3",
        "mosquitto_bridge_clients": bridge_clients,
        "ansible_python_interpreter": shutil.which("python3")}))
    playbook = shutil.which("ansible-playbook")
    assert playbook, "ansible-playbook is not installed (make dev)"
    result = subprocess.run(
        [playbook, "-i", "localhost,", str(tmp_path / "play.yml"), "-e", f"@{extra}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "ANSIBLE_ROLES_PATH": str(REPO / "roles")})
    assert result.returncode == 0, result.stdout + result.stderr
    passwords = dict(line.split(":", 1)
                     for line in (tmp_path / "pihub.passwd").read_text().splitlines())
    subprocess.run(["mosquitto_passwd", "-U", str(tmp_path / "pihub.passwd")], check=True)
    workdir = tmp_path / "mosquitto"
    workdir.mkdir()
    broker = Broker(workdir)
    broker.conf.write_text(broker.conf.read_text().replace("allow_anonymous true", "")
                           + "allow_anonymous false\n"
                           f"password_file {tmp_path / 'pihub.passwd'}\n"
                           f"acl_file {tmp_path / 'pihub.acl'}\n")
    broker.start()
    return broker, (tmp_path / "pihub.acl").read_text(), passwords


def publish(broker: Broker, passwords: dict[str, str], user: str, topic: str,
            payload: str) -> None:
    """One retained QoS 1 message; Mosquitto acknowledges a denied one too (MQTT 3.1.1)."""
    subprocess.run(["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-u", user,
                    "-P", passwords[user], "-t", topic, "-m", payload, "-r", "-q", "1"],
                   check=True, timeout=10)


def retained(broker: Broker, passwords: dict[str, str], *topics: str) -> dict[str, str]:
    """The retained message of each topic, as the reader gets them (all of them, or a timeout)."""
    args = ["mosquitto_sub", "-h", broker.host, "-p", str(broker.port), "-u", "reader", "-P",
            passwords["reader"], "-v", "-C", str(len(topics)), "-W", "5"]
    for topic in topics:
        args += ["-t", topic]
    out = subprocess.run(args, capture_output=True, text=True, timeout=10).stdout
    return dict(line.split(" ", 1) for line in out.splitlines())


def test_acl_denies_other_users_wide_grants_the_topics_a_daemon_declares(acl_broker) -> None:
    _, acl, _ = acl_broker
    users: dict[str, list[str]] = {}
    for block in acl.split("\nuser ")[1:]:
        name, *lines = block.strip().splitlines()
        users[name] = lines
    assert users["pihub-sensor-system"] == [
        "topic readwrite pihub/sensor-system/#", "topic write pihub/data/hall/+",
        "topic read pihub/#", "topic deny pihub/data/hall/heater"]
    assert users["pihub-sensor-gpio"] == [
        "topic readwrite pihub/sensor-gpio/#", "topic write pihub/data/hall/heater",
        "topic read pihub/#", "topic read pihub/cmd/sensor-gpio/#"]
    # a reader of data/# needs no deny (a deny would also keep the heater's series from it)
    assert not [line for line in users["pihub-store-tsdb"] if "deny" in line]
    assert users["plug"] == ["topic write pihub/data/#", "topic deny pihub/data/hall/heater"]
    assert users["panel"] == ["topic write pihub/data/hall/heater"]


def test_mosquitto_drops_a_forged_reading_and_keeps_the_owners(acl_broker) -> None:
    broker, _, passwords = acl_broker
    heater, cpu, plug = "pihub/data/hall/heater", "pihub/data/hall/cpu_temp", "pihub/data/k/power"
    publish(broker, passwords, "pihub-sensor-gpio", heater, "gpio")
    # sensor-system and the plug may write data/hall/+ and data/#, but not sensor-gpio's topic
    publish(broker, passwords, "pihub-sensor-system", heater, "forged-by-system")
    publish(broker, passwords, "pihub-sensor-system", cpu, "system")
    publish(broker, passwords, "plug", heater, "forged-by-plug")
    publish(broker, passwords, "plug", plug, "plug")
    assert retained(broker, passwords, heater, cpu, plug) == {
        heater: "gpio", cpu: "system", plug: "plug"}
    # an outside device whose ACL lists the topic itself may write it
    publish(broker, passwords, "panel", heater, "panel")
    assert retained(broker, passwords, heater) == {heater: "panel"}
    assert "Denied PUBLISH" in broker.log.read_text()


def test_acl_grants_declared_topics_outside_the_root_as_they_are(acl_broker) -> None:
    broker, acl, passwords = acl_broker
    block = acl.split("\nuser pihub-homeassistant\n", 1)[1].split("\n\n", 1)[0]
    # outside_root topics as declared: no topic_root in front, no deny for anyone
    assert block.splitlines() == [
        "topic readwrite pihub/homeassistant/#",
        "topic readwrite homeassistant/binary_sensor/pihub/#",
        "topic readwrite homeassistant/sensor/pihub/#",
        "topic read homeassistant/status",
        "topic readwrite homeassistant/switch/pihub/#",
        "topic read pihub/#"]
    assert "pihub/homeassistant/sensor" not in acl and "deny homeassistant" not in acl
    # the broker lets it write its discovery configs there, and nothing else outside the root
    mine, other, birth = ("homeassistant/sensor/pihub/data_hall_cpu_temp/config",
                          "homeassistant/sensor/other/data_hall_cpu_temp/config",
                          "homeassistant/status")
    publish(broker, passwords, "pihub-homeassistant", mine, "config")
    publish(broker, passwords, "pihub-homeassistant", other, "forged")
    publish(broker, passwords, "pihub-homeassistant", birth, "forged")
    publish(broker, passwords, "pihub-sensor-system", mine, "forged")
    publish(broker, passwords, "pihub-homeassistant", "homeassistant/switch/pihub/x/config",
            "switch")
    assert retained(broker, passwords, mine, "homeassistant/switch/pihub/x/config") == {
        mine: "config", "homeassistant/switch/pihub/x/config": "switch"}
    assert retained(broker, passwords, other, birth) == {}


# A fleet's central (docs/provisioning.md, "Fleet"): satellite a's bridge may write its mirror,
# what its daemons declare and, here, all of data/ (as an outside device of a's with data/# would
# give it); satellite b's declares one exact topic, its sensor-gpio's front door.
BRIDGE_CLIENTS = [
    {"host": "sat-a", "password": "test-only-bridge-a-password",
     "write": [{"topic": "pihub/data/sat-a/+", "exclusive": False},
               {"topic": "pihub/data/#", "exclusive": False}]},
    {"host": "sat-b", "password": "test-only-bridge-b-password",
     "write": [{"topic": "pihub/data/sat-b-hall/front_door", "exclusive": True}]},
]


def test_a_satellites_bridge_cannot_publish_as_another(tmp_path: Path) -> None:
    broker, acl, passwords = start_acl_broker(tmp_path, BRIDGE_CLIENTS)
    try:
        block = acl.split("\nuser bridge-sat-a\n", 1)[1].split("\n\n", 1)[0]
        assert block.splitlines() == [
            "topic write pihub/host/sat-a/#", "topic read pihub/host/sat-a/cmd/#",
            "topic write pihub/data/sat-a/+", "topic write pihub/data/#",
            "topic deny pihub/data/hall/heater", "topic deny pihub/data/sat-b-hall/front_door"]
        door, mirror = "pihub/data/sat-b-hall/front_door", "pihub/host/sat-b/sensor-system/status"
        publish(broker, passwords, "bridge-sat-b", door, "b")
        publish(broker, passwords, "bridge-sat-b", mirror, "online")
        # a's wide data/# reaches b's exact topic only through a deny; b's mirror not at all
        publish(broker, passwords, "bridge-sat-a", door, "forged-by-a")
        publish(broker, passwords, "bridge-sat-a", mirror, "forged-by-a")
        own = "pihub/host/sat-a/sensor-system/status"
        publish(broker, passwords, "bridge-sat-a", own, "a")
        assert retained(broker, passwords, door, mirror, own) == {
            door: "b", mirror: "online", own: "a"}
        # nor can the central's outside device with data/#: b's exact topic is denied to it too
        plug = acl.split("\nuser plug\n", 1)[1].split("\n\n", 1)[0]
        assert "topic deny pihub/data/sat-b-hall/front_door" in plug.splitlines()
    finally:
        broker.stop()
