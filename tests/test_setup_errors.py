"""The errors a newcomer can meet with `make demo` / `make test` get one sentence and an exit
code, never a traceback (issue 16): not root and no sudo, the demo's port taken. (A daemon
without its extra: test_launch.py; the whole set-up on a fresh machine: tests/fresh_machine.)"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root to run the set-up as another user (setpriv)")
def test_setup_without_root_or_sudo_says_so_and_exits_77() -> None:
    done = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
         str(REPO / "scripts/setup.sh"), "test"],
        cwd="/", capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        env={"PATH": os.environ["PATH"], "HOME": "/nonexistent"})
    assert done.returncode == 77, done.stderr
    assert done.stderr.strip() == ("setup: installing packages needs root: run this as root, "
                                   "or as a user who may use sudo")


def test_setup_refuses_an_unknown_purpose() -> None:
    done = subprocess.run([str(REPO / "scripts/setup.sh"), "everything"], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 64
    assert "usage: scripts/setup.sh pi|demo|test" in done.stderr


def test_demo_with_its_port_taken_stops_at_once_naming_the_port() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [str(REPO / "images/standin/demo.sh")], capture_output=True, text=True, timeout=60,
            env={**os.environ, "PIHUB_DEMO_PORT": str(port),
                 "PIHUB_DEMO_CONTAINER": "pihub-demo-test-that-does-not-exist"})
    assert done.returncode == 75, done.stderr
    assert f"port {port} on 127.0.0.1 is taken" in done.stderr
    assert "PIHUB_DEMO_PORT=" in done.stderr
    assert "==> starting" not in done.stderr  # stopped before any work
