"""`make inventory`: a new inventory whose generated vault the play accepts for a real Pi.

The play refuses a vault that still holds the example's placeholders or short secrets (tested
in test_roles.py); here the generated one passes those same checks, run by playbooks/site.yml
itself against localhost (a tag no task has: only the checks run, nothing changes)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "new_inventory.py"


def new_inventory(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ,
                                           "PIHUB_VAULT_PASS_DIR": str(tmp_path / "pass"), **env})


def decrypted_vault(inventory: Path, password_file: Path) -> dict:
    vault = inventory / "group_vars/pihub/vault.yml"
    assert vault.read_text().startswith("$ANSIBLE_VAULT;"), "the vault is not encrypted"
    assert vault.stat().st_mode & 0o077 == 0
    shown = subprocess.run([shutil.which("ansible-vault") or "ansible-vault", "view",
                            "--vault-password-file", str(password_file), str(vault)],
                           capture_output=True, text=True, check=True)
    return yaml.safe_load(shown.stdout)


def play_checks(inventory: Path, password_file: Path) -> subprocess.CompletedProcess[str]:
    """playbooks/site.yml's checks with the new inventory's group_vars and vault, on localhost."""
    local = inventory.parent / "local"
    local.mkdir()
    (local / "hosts.yml").write_text(
        "pihub:\n  hosts:\n    localhost:\n      ansible_connection: local\n")
    (local / "group_vars").symlink_to(inventory / "group_vars")
    return subprocess.run(
        [shutil.which("ansible-playbook") or "ansible-playbook", "-i", str(local),
         str(REPO / "playbooks/site.yml"), "--tags", "no-task-has-this-tag",
         "--vault-password-file", str(password_file), "-e", "ansible_become=false"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "ANSIBLE_GATHERING": "explicit"})


def test_generated_vault_is_strong_encrypted_and_passes_the_plays_checks(tmp_path: Path) -> None:
    inventory = tmp_path / "home"
    done = new_inventory(tmp_path, str(inventory), "192.168.1.20", "--user", "admin")
    assert done.returncode == 0, done.stderr
    password_file = tmp_path / "pass" / "home.vault-pass"
    assert password_file.stat().st_mode & 0o077 == 0

    hosts = yaml.safe_load((inventory / "hosts.yml").read_text())
    assert hosts == {"pihub": {"hosts": {"home": {"ansible_host": "192.168.1.20",
                                                   "ansible_user": "admin"}}}}
    vault = decrypted_vault(inventory, password_file)
    generated = [vault["vault_pihub_mqtt_secret"], vault["vault_timeseries_http_password"],
                 vault["vault_timeseries_delete_auth_key"]]
    assert all(len(v) >= 16 for v in generated)  # pihub_secret_min_length
    assert len(set(generated)) == 3
    assert vault["vault_mosquitto_extra_users"] == []
    # the page's login: a new admin password, its hash the one the vault holds
    from pihub.daemons.web.auth import Auth
    password = vault["vault_pihub_web_admin_password"]
    assert f"admin / {password}" in done.stdout
    assert vault["vault_pihub_web_users"]["admin"].startswith("pbkdf2_sha256$")
    assert len(vault["vault_pihub_web_kiosk_token"]) >= 16
    auth = Auth({"admin": vault["vault_pihub_web_users"]["admin"]}, [], None, 60)
    assert auth.check("test", "admin", password) is not None
    # without a Pushover account the daemon that needs one is off, so its empty keys pass
    main = yaml.safe_load((inventory / "group_vars/pihub/main.yml").read_text())
    assert {"name": "notify-pushover", "enabled": False} in main["pihub_daemon_overrides"]

    checked = play_checks(inventory, password_file)
    assert checked.returncode == 0, checked.stdout[-3000:]

    # a second inventory never shares a secret with the first
    again = new_inventory(tmp_path, str(tmp_path / "shed"), "shed.local")
    assert again.returncode == 0, again.stderr
    other = decrypted_vault(tmp_path / "shed", tmp_path / "pass" / "shed.vault-pass")
    assert not set(generated) & {other["vault_pihub_mqtt_secret"],
                                 other["vault_timeseries_http_password"],
                                 other["vault_timeseries_delete_auth_key"]}


def test_pushover_keys_from_the_environment_keep_notify_pushover_on(tmp_path: Path) -> None:
    inventory = tmp_path / "home"
    done = new_inventory(tmp_path, str(inventory), "pi.local",
                         PUSHOVER_TOKEN="azGDORePK8gMaC0QOYAMyEEuzJnyUi",
                         PUSHOVER_USER_KEY="uQiRzpo4DXghDmr9QzzfQu27cmVRsG")
    assert done.returncode == 0, done.stderr
    vault = decrypted_vault(inventory, tmp_path / "pass" / "home.vault-pass")
    assert vault["vault_pushover_token"] == "azGDORePK8gMaC0QOYAMyEEuzJnyUi"
    main = yaml.safe_load((inventory / "group_vars/pihub/main.yml").read_text())
    assert "pihub_daemon_overrides" not in main
    assert play_checks(inventory, tmp_path / "pass" / "home.vault-pass").returncode == 0


@pytest.mark.parametrize("exists", ["inventory", "password"])
def test_never_overwrites_an_inventory_or_a_vault_password(tmp_path: Path, exists: str) -> None:
    inventory = tmp_path / "home"
    if exists == "inventory":
        inventory.mkdir()
    else:
        (tmp_path / "pass").mkdir()
        (tmp_path / "pass" / "home.vault-pass").write_text("keep me\n")
    done = new_inventory(tmp_path, str(inventory), "pi.local")
    assert done.returncode == 73
    assert "exists already" in done.stderr and "Traceback" not in done.stderr
    if exists == "password":
        assert (tmp_path / "pass" / "home.vault-pass").read_text() == "keep me\n"
        assert not inventory.exists()
