"""The console scripts: every one runs a daemon through pihub.launch, and a daemon whose
optional library is missing says which extra to install and exits 78, without a traceback."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from pihub import launch

PYPROJECT = Path(__file__).resolve().parents[1] / "files/daemons/pyproject.toml"


def scripts() -> dict[str, str]:
    return tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]


def test_every_console_script_names_a_daemon_that_exists() -> None:
    for script, target in scripts().items():
        module, _, attr = target.partition(":")
        fn = getattr(importlib.import_module(module), attr)
        assert callable(fn), script
        if module == "pihub.launch":
            # pihub-display-bikes -> pihub.daemons.display_bikes, whose main is the daemon's
            daemon = script.removeprefix("pihub-").replace("-", "_")
            assert attr == daemon, f"{script} launches {attr}"
            importlib.import_module(f"pihub.daemons.{daemon}").main  # noqa: B018


def run_without(blocked: list[str], daemon: str, *args: str) -> subprocess.CompletedProcess[str]:
    """pihub-<daemon> ARGS in a Python where the modules BLOCKED cannot be imported, as in a
    venv installed without the extra that brings them."""
    code = ("import sys\n"
            f"for m in {blocked!r}: sys.modules[m] = None\n"
            "from pihub import launch\n"
            f"sys.exit(launch.launch({daemon!r}, sys.argv[1:]))\n")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=30)


@pytest.mark.parametrize(("daemon", "blocked", "extra"), [
    ("display_bikes", ["requests"], "web"),       # imported when the module is
    ("display_transport", ["bs4"], "web"),
])
def test_missing_extra_at_import_is_one_line_and_exit_78(daemon: str, blocked: list[str],
                                                         extra: str) -> None:
    done = run_without(blocked, daemon, "--print-config-example")
    assert done.returncode == launch.EX_CONFIG, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"pip install 'pihub[{extra}]'" in lines[0]
    assert lines[0].startswith(f"pihub-{daemon.replace('_', '-')}: needs ")


def test_missing_extra_at_start_is_one_line_and_exit_78(tmp_path: Path) -> None:
    # store-tsdb imports influxdb-client only when it starts (its --check-config needs none)
    config = tmp_path / "store-tsdb.yml"
    config.write_text(yaml.safe_dump({"url": "http://127.0.0.1:9", "spool_dir": str(tmp_path),
                                      "mqtt": {"port": 9}}))
    done = run_without(["influxdb_client"], "store_tsdb", "--config", str(config))
    assert done.returncode == launch.EX_CONFIG, done.stderr
    assert "Traceback" not in done.stderr
    assert "needs influxdb-client, which is not installed: pip install 'pihub[tsdb]'" \
        in done.stderr
    assert run_without(["influxdb_client"], "store_tsdb",
                       "--check-config", str(config)).returncode == 0


def test_a_missing_module_that_is_no_extra_still_fails_loudly() -> None:
    # a broken install (pihub's own dependency gone) is not dressed up as a missing extra
    done = run_without(["paho"], "sensor_system", "--print-config-example")
    assert done.returncode == 1
    assert "ModuleNotFoundError" in done.stderr
