"""The Pi image's first boot (images/pi/firstboot/pihub-firstboot), the parts that run anywhere.

Its derivations must give exactly the files the play writes, or the play run over SSH against a
booted card would change them: they are compared with Ansible's own rendering of the mosquitto
role's template and the pihub role's password expression, on a root laid out as the image's.
The real Mosquitto's mosquitto_passwd hashes the password file. (Growing the root, the
machine-id, host keys and the login run on the booted image: make test-image-pi.)
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "images" / "pi" / "firstboot" / "pihub-firstboot"
SHIPPED_SETTINGS = REPO / "images" / "pi" / "firstboot" / "pihub.txt"
USERS_TEMPLATE = REPO / "roles" / "mosquitto" / "templates" / "pihub.users.j2"
DAEMONS = ["sensor-system", "store-rrd", "monitor"]


def load_firstboot() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("pihub_firstboot", str(SCRIPT))
    spec = importlib.util.spec_from_loader("pihub_firstboot", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["pihub_firstboot"] = module  # (dataclasses look their module up)
    loader.exec_module(module)
    return module


fb = load_firstboot()


def ansible_render(template: str, variables: dict) -> str:
    """TEMPLATE rendered by Ansible's own templating (its filters: hash, comment)."""
    from ansible.parsing.dataloader import DataLoader
    from ansible.template import Templar

    templar = Templar(
        loader=DataLoader(), variables={"ansible_managed": "Ansible managed", **variables}
    )
    return str(templar.template(template, preserve_trailing_newlines=True))


def play_password(secret: str, daemon: str) -> str:
    """roles/pihub/vars/main.yml's derivation, by Ansible."""
    return ansible_render(
        "{{ (secret ~ ':' ~ name) | hash('sha256') }}", {"secret": secret, "name": daemon}
    )


def play_users_marker(secret: str, inventory_hostname: str) -> str:
    users = [{"name": f"pihub-{d}", "password": play_password(secret, d)} for d in DAEMONS]
    return ansible_render(
        USERS_TEMPLATE.read_text(),
        {"mosquitto_all_users": users, "inventory_hostname": inventory_hostname},
    )


def image_root(tmp_path: Path, build_secret: str) -> Path:
    """A root as the image ships it: files derived from the build's secret, the secret gone."""
    root = tmp_path / "root"
    (root / "etc/pihub/secrets").mkdir(parents=True)
    (root / "etc/mosquitto").mkdir(parents=True)
    (root / "etc/pihub-image").write_text("pihub 0.1.0 2026-01-01T00:00Z inventory=pihub\n")
    (root / "etc/mosquitto/pihub.users").write_text(play_users_marker(build_secret, "pihub"))
    (root / "etc/mosquitto/pihub.passwd").write_text("stale\n")
    for d in DAEMONS:
        (root / f"etc/pihub/secrets/{d}.mqtt").write_text(play_password(build_secret, d) + "\n")
        (root / f"etc/pihub/{d}.yml").write_text(f"name: {d}\n")
        lines = [
            f"{hashlib.sha1((root / p.lstrip('/')).read_bytes()).hexdigest()}  {p}"
            for p in (f"/etc/pihub/{d}.yml", f"/etc/pihub/secrets/{d}.mqtt")
        ]
        (root / f"etc/pihub/{d}.running").write_text(
            "\n".join([*lines, "-  /opt/pihub/installed-extras"]) + "\n"
        )
    return root


needs_mosquitto_passwd = pytest.mark.skipif(
    shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd (Mosquitto) is not installed"
)


@needs_mosquitto_passwd
def test_first_boot_derives_what_the_play_derives_from_the_cards_own_secret(tmp_path: Path) -> None:
    root = image_root(tmp_path, build_secret="the-build-secret-0123456789")
    assert fb.derive_secrets(root) == sorted(DAEMONS)
    secret = (root / "etc/pihub/secrets/mqtt.secret").read_text().strip()
    assert len(secret) >= 32 and secret != "the-build-secret-0123456789"
    assert (root / "etc/mosquitto/pihub.users").read_text() == play_users_marker(secret, "pihub")
    for d in DAEMONS:
        assert (root / f"etc/pihub/secrets/{d}.mqtt").read_text() == play_password(secret, d) + "\n"
    passwd = (root / "etc/mosquitto/pihub.passwd").read_text().splitlines()
    assert sorted(line.split(":")[0] for line in passwd) == sorted(f"pihub-{d}" for d in DAEMONS)
    assert all(line.split(":", 1)[1].startswith("$7$") for line in passwd)  # hashed, no plain text
    assert oct((root / "etc/pihub/secrets/mqtt.secret").stat().st_mode & 0o777) == "0o600"


@needs_mosquitto_passwd
def test_running_records_the_files_as_the_first_boot_left_them(tmp_path: Path) -> None:
    root = image_root(tmp_path, build_secret="the-build-secret-0123456789")
    fb.derive_secrets(root)
    for d in DAEMONS:
        lines = (root / f"etc/pihub/{d}.running").read_text().splitlines()
        mqtt = root / f"etc/pihub/secrets/{d}.mqtt"
        assert (
            f"{hashlib.sha1(mqtt.read_bytes()).hexdigest()}  /etc/pihub/secrets/{d}.mqtt" in lines
        )
        assert "-  /opt/pihub/installed-extras" in lines


@needs_mosquitto_passwd
def test_first_boot_run_again_after_a_power_cut_keeps_the_cards_secret(tmp_path: Path) -> None:
    root = image_root(tmp_path, build_secret="the-build-secret-0123456789")
    fb.derive_secrets(root)
    first = {p: p.read_bytes() for p in (root / "etc/pihub").rglob("*") if p.is_file()}
    fb.derive_secrets(root)
    assert {p: p.read_bytes() for p in (root / "etc/pihub").rglob("*") if p.is_file()} == first


@needs_mosquitto_passwd
def test_two_cards_of_one_image_never_share_a_secret(tmp_path: Path) -> None:
    a = image_root(tmp_path / "a", build_secret="the-build-secret-0123456789")
    b = image_root(tmp_path / "b", build_secret="the-build-secret-0123456789")
    fb.derive_secrets(a)
    fb.derive_secrets(b)
    assert (a / "etc/pihub/secrets/mqtt.secret").read_text() != (
        b / "etc/pihub/secrets/mqtt.secret"
    ).read_text()
    assert (a / "etc/pihub/secrets/monitor.mqtt").read_text() != (
        b / "etc/pihub/secrets/monitor.mqtt"
    ).read_text()


def test_a_login_the_image_cannot_know_stops_the_first_boot(tmp_path: Path) -> None:
    marker = "# Ansible managed\npihub-monitor:abc\ntasmota-plug:def\n"
    with pytest.raises(ValueError, match="tasmota-plug"):
        fb.rewrite_users_marker(marker, "pihub", "secret")


def test_the_shipped_settings_file_gives_the_defaults() -> None:
    settings = fb.parse_settings(SHIPPED_SETTINGS.read_text())
    assert (settings.hostname, settings.user, settings.ssh_keys, settings.wifi_ssid) == (
        "pihub",
        "pi",
        [],
        "",
    )


def test_settings_are_read_with_keys_wifi_and_comments() -> None:
    settings = fb.parse_settings(
        "# mine\nhostname = kitchen-hub\nuser = alice\n"
        "ssh_key = ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB alice@laptop\n"
        "ssh_key = ssh-rsa AAAAB3NzaC1yc2E= other\n"
        "wifi_country = DE\nwifi_ssid = My net = home\nwifi_password = pass word 123\n"
    )
    assert settings.hostname == "kitchen-hub" and settings.user == "alice"
    assert len(settings.ssh_keys) == 2
    assert (settings.wifi_country, settings.wifi_ssid, settings.wifi_password) == (
        "DE",
        "My net = home",
        "pass word 123",
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("hostname = Kitchen_Hub\n", "line 1: hostname 'Kitchen_Hub'"),
        ("\nusr = alice\n", "line 2: unknown key 'usr'"),
        ("user = root\n", "line 1: user 'root'"),
        ("ssh_key = AAAA only the key\n", "line 1: ssh_key is not an OpenSSH public key"),
        ("just words\n", "line 1: expected 'key = value'"),
        ("wifi_ssid = home\n", "wifi_ssid needs wifi_password and wifi_country"),
        ("wifi_password = short\n", "wifi_password must be 8 to 63"),
    ],
)
def test_a_bad_settings_line_is_named(text: str, message: str) -> None:
    with pytest.raises(fb.SettingsError, match=message.replace("(", r"\(")):
        fb.parse_settings(text)


def test_wifi_settings_become_wpa_supplicants_file_with_quotes_escaped(tmp_path: Path) -> None:
    root = image_root(tmp_path, build_secret="the-build-secret-0123456789")
    settings = fb.parse_settings(
        'wifi_country = FR\nwifi_ssid = say "hi"\nwifi_password = back\\slash99\n'
    )
    fb.write_wifi(root, settings)
    conf = (root / "etc/wpa_supplicant/wpa_supplicant-wlan0.conf").read_text()
    assert (
        'ssid="say \\"hi\\""' in conf and 'psk="back\\\\slash99"' in conf and "country=FR" in conf
    )
