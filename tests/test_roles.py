"""The roles' checked variables (roles/*/meta/argument_specs.yml), through playbooks/site.yml.

The playbook tests run the real playbook against localhost with the example inventory's
group_vars and a tag no task has, so only what runs whatever the tags runs: the pihub role's
checks at the start of the play and each role's check of its variables. Nothing on this machine
changes. The last test keeps each spec whole: every variable of defaults/main.yml, same default.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "inventory" / "example"
VAULT = EXAMPLE / "group_vars" / "pihub" / "vault.yml.example"
STANDIN = REPO / "inventory" / "standin" / "overrides.yml"


def example_daemons() -> list[dict[str, Any]]:
    data = yaml.safe_load((EXAMPLE / "group_vars" / "pihub" / "main.yml").read_text())
    return list(data["pihub_daemons"])


# A vault as a real Pi's would hold one: long values, none of the example's placeholders.
STRONG_VAULT: dict[str, Any] = {
    "vault_pihub_mqtt_secret": "test-only-7Qm2Vh9Lx4Rk8Pz3Wn6Tc",
    "vault_pushover_token": "test-only-a1b2c3d4e5f6g7h8i9j0k",
    "vault_pushover_user_key": "test-only-u1v2w3x4y5z6u7v8w9x0y",
    "vault_timeseries_http_password": "test-only-h7J3kP9qW2eR5tY8uI1oA",
    "vault_timeseries_delete_auth_key": "test-only-d4F6gH8jK1lZ3xC5vB7nM",
    "vault_pihub_web_users": {"admin": "pbkdf2_sha256$100000$dGVzdC1vbmx5LXNhbHQ=$"
                                       "h4sh0fN0Pa55w0rdAtA11Xq8Lk2Vn5Rz7Wc9Ty1Ue3I="},
    "vault_pihub_web_kiosk_token": "test-only-k1o2s3k4t5o6k7e8n9x0",
    "vault_ntfy_token": "tk_test-only-n1t2f3y4t5o6k7e8n9",
    "vault_smtp_password": "test-only-s1m2t3p4p5a6s7s8w9d0",
    "vault_mosquitto_extra_users": [
        {"name": "tasmota-plug-1", "password": "test-only-plug-Jx4Lq9Rz2Wv7",
         "acl": [{"topic": "tasmota/plug-1/#", "access": "readwrite"}]},
    ],
}


def vault_file(tmp_path: Path, **changes: Any) -> Path:
    """STRONG_VAULT with some values changed, as a vars file."""
    path = tmp_path / "vault.yml"
    path.write_text(yaml.safe_dump({**STRONG_VAULT, **changes}))
    return path


def checks(tmp_path: Path, extra_vars: dict[str, Any] | None = None,
           *var_files: Path, vault: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run playbooks/site.yml's checks on localhost as the host of the example inventory,
    with a strong vault unless another is given."""
    if vault is None:
        vault = vault_file(tmp_path)
    playbook = shutil.which("ansible-playbook")
    assert playbook, "ansible-playbook is not installed (make dev)"
    inventory = tmp_path / "inventory"
    inventory.mkdir()
    (inventory / "hosts.yml").write_text(
        "pihub:\n  hosts:\n    localhost:\n      ansible_connection: local\n"
        f"      ansible_python_interpreter: {sys.executable}\n")
    (inventory / "group_vars").symlink_to(EXAMPLE / "group_vars")
    args = [playbook, "-i", str(inventory), str(REPO / "playbooks" / "site.yml"),
            "--tags", "no-task-has-this-tag", "-e", f"@{vault}",
            # no sudo for checks that change nothing
            "-e", "ansible_become=false"]
    for path in var_files:
        args += ["-e", f"@{path}"]
    if extra_vars is not None and extra_vars.pop("_dry_run", False):
        args.append("--check")
    if extra_vars is not None:
        path = tmp_path / "extra-vars.json"
        path.write_text(json.dumps(extra_vars))
        args += ["-e", f"@{path}"]
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "ANSIBLE_GATHERING": "explicit"})


def refused(result: subprocess.CompletedProcess[str], *words: str) -> None:
    """The play failed, and its output names every word."""
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    for word in words:
        assert word in out, f"{word!r} not in:\n{out}"


def test_example_inventory_passes_every_roles_checks(tmp_path: Path) -> None:
    result = checks(tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    # every role's variables were checked, the pihub role's before anything else
    for role in ("pihub", "base", "mosquitto", "timeseries", "rrd", "raspberrypi"):
        assert f"TASK [{role} : Validating arguments against arg spec" in out, out
    assert out.index("arg spec 'checks'") < out.index("TASK [base"), out


def test_standin_overrides_pass_the_checks(tmp_path: Path) -> None:
    result = checks(tmp_path, None, STANDIN)
    assert result.returncode == 0, result.stdout + result.stderr


def test_example_vault_is_refused_naming_each_placeholder_before_anything_changes(
        tmp_path: Path) -> None:
    result = checks(tmp_path, vault=VAULT)
    refused(result, "pihub_mqtt_secret still holds the example vault's value",
            "the secrets.token of daemon notify-pushover still holds the example vault's value",
            "timeseries_delete_auth_key still holds the example vault's value",
            "the secrets.http_password of daemon store-tsdb still holds the example vault's value",
            "pihub_allow_demo_secrets: true")
    assert "TASK [base" not in result.stdout, result.stdout


def test_example_vault_passes_when_a_stand_in_opts_in(tmp_path: Path) -> None:
    result = checks(tmp_path, {"pihub_allow_demo_secrets": True}, STANDIN, vault=VAULT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_example_pages_login_is_refused_for_a_real_pi(tmp_path: Path) -> None:
    """The example vault's admin hash (make demo's login) is no login for a Pi."""
    example = yaml.safe_load(VAULT.read_text())["vault_pihub_web_users"]
    result = checks(tmp_path, vault=vault_file(tmp_path, vault_pihub_web_users=example))
    refused(result, "the password hash of user admin in config.users of daemon web still holds "
                    "the example vault's value")
    assert "TASK [base" not in result.stdout, result.stdout


def test_short_secret_is_refused_with_its_variable_and_never_printed(tmp_path: Path) -> None:
    result = checks(tmp_path, vault=vault_file(tmp_path, vault_pushover_user_key="Zq81shortkey"))
    refused(result, "the secrets.user of daemon notify-pushover is shorter than 16 characters")
    assert "Zq81shortkey" not in result.stdout + result.stderr


def test_short_derivation_secret_is_refused_with_its_variable(tmp_path: Path) -> None:
    result = checks(tmp_path, vault=vault_file(tmp_path, vault_pihub_mqtt_secret="Zq81short"))
    refused(result, "pihub_mqtt_secret is shorter than 16 characters")
    assert "Zq81short" not in result.stdout + result.stderr


def test_placeholder_password_of_an_outside_device_is_refused_with_its_name(tmp_path: Path) -> None:
    users = [{**STRONG_VAULT["vault_mosquitto_extra_users"][0], "password": "change-me-too"}]
    result = checks(tmp_path, vault=vault_file(tmp_path, vault_mosquitto_extra_users=users))
    refused(result, "mosquitto_extra_users tasmota-plug-1: the password is shorter than 16")
    assert "TASK [base" not in result.stdout, result.stdout


def test_misspelled_daemon_field_stops_the_play_at_its_start_with_its_name(tmp_path: Path) -> None:
    daemons = example_daemons()
    daemons[0]["enabeld"] = True
    result = checks(tmp_path, {"pihub_daemons": daemons})
    refused(result, "pihub_daemons.enabeld", "Validation of arguments failed")
    assert "TASK [base" not in result.stdout, result.stdout


@pytest.mark.parametrize(("change", "words"), [
    ({"mqtt_acl": [{"topic": "data/#", "acess": "write"}]}, ["pihub_daemons.mqtt_acl.acess"]),
    ({"enabled": "perhaps"}, ["enabled", "perhaps"]),
    ({"state": "gone"}, ["state", "gone"]),
    ({"supplementary_groups": {"gpio": True}}, ["supplementary_groups"]),
    ({"umask": 23}, ["sensor-system: umask 23 is not an octal string", "quote it"]),
], ids=["acl-field", "enabled-not-bool", "state-not-a-choice", "groups-not-a-list",
        "umask-unquoted"])
def test_wrong_daemon_field_stops_the_play_with_its_name(tmp_path: Path, change: dict[str, Any],
                                                         words: list[str]) -> None:
    daemons = example_daemons()
    daemons[0].update(change)
    refused(checks(tmp_path, {"pihub_daemons": daemons}), *words)


def test_misspelled_field_of_an_override_stops_the_play_with_its_name(tmp_path: Path) -> None:
    overrides = [{"name": "sensor-gpio", "config": {"backend": "simulated"}, "enabeld": False}]
    refused(checks(tmp_path, {"pihub_daemon_overrides": overrides}),
            "pihub_daemon_overrides.enabeld")


def test_override_naming_no_daemon_stops_the_play_with_its_name(tmp_path: Path) -> None:
    overrides = [{"name": "sensor-gpoi", "config": {"backend": "simulated"}}]
    result = checks(tmp_path, {"pihub_daemon_overrides": overrides})
    refused(result, "pihub_daemon_overrides names sensor-gpoi, which is no daemon")
    assert "TASK [base" not in result.stdout, result.stdout


@pytest.mark.parametrize(("role", "extra_vars", "word"), [
    ("base", {"base_journald_storage": "disk"}, "base_journald_storage"),
    ("mosquitto", {"mosquitto_listeners": [{"port": 1883, "adress": "127.0.0.1"}]},
     "mosquitto_listeners.adress"),
    ("timeseries", {"timeseries_enabled": "perhaps"}, "timeseries_enabled"),
    ("rrd", {"rrd_cached_flush_interval": "soon"}, "rrd_cached_flush_interval"),
    ("raspberrypi", {"raspberrypi_gpio_library": "wiringpi"}, "raspberrypi_gpio_library"),
])
def test_every_role_checks_its_variables(tmp_path: Path, role: str, extra_vars: dict[str, Any],
                                         word: str) -> None:
    result = checks(tmp_path, extra_vars)
    refused(result, word, f"TASK [{role} : Validating arguments against arg spec")


@pytest.mark.parametrize("role", ["base", "mosquitto", "timeseries", "rrd", "raspberrypi", "pihub"])
def test_argument_spec_lists_every_default_with_its_value(role: str) -> None:
    defaults = yaml.safe_load((REPO / "roles" / role / "defaults" / "main.yml").read_text())
    spec = yaml.safe_load((REPO / "roles" / role / "meta" / "argument_specs.yml").read_text())
    options = spec["argument_specs"]["main"]["options"]
    assert sorted(set(defaults) - set(options)) == []
    for name, value in defaults.items():
        assert options[name]["description"], name
        assert options[name].get("default") == value, name


def test_dry_run_of_a_host_never_provisioned_says_so_and_ends_green(tmp_path: Path) -> None:
    """`make pi-check` on a fresh Pi: nothing to compare yet, one message, success."""
    result = checks(tmp_path, {"pihub_venv": str(tmp_path / "no-venv"), "_dry_run": True})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "was never provisioned by pihub" in result.stdout
    assert "A dry run compares against an installed hub, so it stops here" in result.stdout


def test_dry_run_of_a_provisioned_host_goes_on(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    result = checks(tmp_path, {"pihub_venv": str(venv), "_dry_run": True})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "was never provisioned by pihub" not in result.stdout
