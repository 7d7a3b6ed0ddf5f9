"""The Pi image's boot test (make test-image-pi; docs/image.md): the built image boots on an
emulated arm64 machine and every daemon of inventory/image heartbeats; then the same play, over
SSH, changes nothing.

A sparse copy of the image (the built one stays as it was) is grown to a 4 GB "card", its boot
partition's pihub.txt is given a hostname, a login and a fresh SSH key (as its owner would), and
it boots in qemu-system-aarch64 (machine virt, cortex-a72, 1 GB) with the kernel and initrd read
from its own boot partition. Port 22 is forwarded to the host; everything is checked from the
host through it: the first boot's work, and every daemon's heartbeat on MQTT through an SSH
tunnel to the Pi's loopback-only broker (with monitor's login, which reads every meta).
Each wait has a deadline; the figures (emulated!) are printed and, with --save, written to
bench/results/image_pi.json.

With --power-cut the first boot is cut first: the emulator is killed (SIGKILL: the guest's
unwritten pages are lost, as in a power cut) a few seconds into pihub-firstboot's work, and the
card boots again; every check then runs on that second boot.

Usage: python images/pi/boot_test.py [IMAGE] [--keep] [--no-play] [--save] [--power-cut S]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent.parent
GROUP_VARS = REPO / "inventory" / "image" / "group_vars" / "pihub" / "main.yml"
CARD_BYTES = 4 * 1024**3
BOOT_DEADLINE_S = 1200  # qemu start to SSH (first boot included), emulated on a shared machine
HEARTBEAT_DEADLINE_S = 600  # SSH up to every daemon's heartbeat
PLAY_DEADLINE_S = 3600
HOSTNAME = "pihub-boot-test"
USER = "tester"


def log(msg: str) -> None:
    print(f"==> {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def expected_daemons() -> list[str]:
    daemons = yaml.safe_load(GROUP_VARS.read_text())["pihub_daemons"]
    return sorted(d["name"] for d in daemons if d.get("enabled", True))


class Card:
    """The image copy, its boot partition edited, and the kernel and initrd read from it."""

    def __init__(self, image: Path, work: Path) -> None:
        self.path = work / "card.img"
        self.work = work
        log(f"copying {image.name} to a {CARD_BYTES // 1024**3} GB card (sparse)")
        subprocess.run(["cp", "--sparse=always", str(image), str(self.path)], check=True)
        self.image_bytes = self.path.stat().st_size
        os.truncate(self.path, CARD_BYTES)
        self.key = work / "id_ed25519"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True
        )
        # The boot partition by its offset, with mtools (no partition nodes or vfat needed).
        table = json.loads(
            subprocess.run(
                ["sfdisk", "--json", str(self.path)], check=True, capture_output=True, text=True
            ).stdout
        )["partitiontable"]
        boot = table["partitions"][0]
        self.fat = f"{self.path}@@{boot['start'] * int(table.get('sectorsize', 512))}"
        names = self._mtools("mdir", "-b", "::").split()
        self.kernel = self._copy_newest(names, "vmlinuz-")
        self.initrd = self._copy_newest(names, "initrd.img-")
        settings = self._mtools("mtype", "::/pihub.txt")
        settings = re.sub(r"(?m)^hostname = .*$", f"hostname = {HOSTNAME}", settings)
        settings = re.sub(r"(?m)^user = .*$", f"user = {USER}", settings)
        settings += f"ssh_key = {(work / 'id_ed25519.pub').read_text().strip()}\n"
        (work / "pihub.txt").write_text(settings)
        self._mtools("mcopy", "-o", str(work / "pihub.txt"), "::/pihub.txt")

    def _mtools(self, tool: str, *args: str) -> str:
        env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
        done = subprocess.run(
            [tool, "-i", self.fat, *args], check=True, capture_output=True, text=True, env=env
        )
        return done.stdout

    def _copy_newest(self, names: list[str], prefix: str) -> Path:
        found = sorted(
            n.removeprefix("::/") for n in names if n.removeprefix("::/").startswith(prefix)
        )
        if not found:
            raise SystemExit(f"the image's boot partition has no {prefix}*")
        self._mtools("mcopy", "-o", f"::/{found[-1]}", str(self.work / found[-1]))
        return self.work / found[-1]


class Emulator:
    def __init__(self, card: Card, work: Path, console: str = "console.log") -> None:
        self.card = card
        self.port = free_port()
        self.console = work / console
        cmd = [
            "qemu-system-aarch64",
            "-M",
            "virt",
            "-cpu",
            "cortex-a72",
            "-smp",
            "2",
            "-m",
            "1024",
            "-kernel",
            str(card.kernel),
            "-initrd",
            str(card.initrd),
            "-append",
            "root=LABEL=RASPIROOT rw rootwait console=ttyAMA0 net.ifnames=0",
            "-drive",
            f"file={card.path},format=raw,if=virtio",
            "-netdev",
            f"user,id=net0,hostfwd=tcp:127.0.0.1:{self.port}-:22",
            "-device",
            "virtio-net-pci,netdev=net0,romfile=",
            "-device",
            "virtio-rng-pci",
            "-display",
            "none",
            "-serial",
            f"file:{self.console}",
            "-monitor",
            "none",
        ]
        log(f"booting: {' '.join(cmd)}")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)

    def ssh_args(self) -> list[str]:
        return [
            "ssh",
            "-i",
            str(self.card.key),
            "-p",
            str(self.port),
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=10",
            f"{USER}@127.0.0.1",
        ]

    def ssh(self, command: str, timeout: float = 120, check: bool = True) -> str:
        done = subprocess.run(
            [*self.ssh_args(), command], capture_output=True, text=True, timeout=timeout
        )
        if check and done.returncode != 0:
            raise RuntimeError(
                f"on the Pi, {command!r} exited {done.returncode}: {done.stderr.strip()}"
            )
        return done.stdout

    def wait_for_ssh(self, deadline_s: float) -> float:
        end = self.started + deadline_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise SystemExit(f"qemu exited ({self.proc.returncode}); console: {self.console}")
            try:
                if self.ssh("true", timeout=30, check=False) == "" and self._ssh_ok():
                    return time.monotonic() - self.started
            except subprocess.TimeoutExpired:
                pass
            time.sleep(5)
        raise SystemExit(
            f"no SSH login within {deadline_s} s of qemu's start; console: "
            f"{self.console}\n{tail(self.console)}"
        )

    def _ssh_ok(self) -> bool:
        return (
            subprocess.run([*self.ssh_args(), "true"], capture_output=True, timeout=30).returncode
            == 0
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_for_heartbeats(emu: Emulator, daemons: list[str], deadline_s: float) -> dict[str, dict]:
    """Every daemon's heartbeat (its `meta` with event heartbeat), read on the host through an
    SSH tunnel to the Pi's broker, with monitor's login (it may read every meta)."""
    import paho.mqtt.client as mqtt

    password = emu.ssh("sudo cat /etc/pihub/secrets/monitor.mqtt").strip()
    local = free_port()
    tunnel = subprocess.Popen(
        [*emu.ssh_args()[:-1], "-N", "-L", f"127.0.0.1:{local}:127.0.0.1:1883", emu.ssh_args()[-1]]
    )
    seen: dict[str, dict] = {}
    try:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pihub-boot-test")
        client.username_pw_set("pihub-monitor", password)

        def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
            try:
                meta = json.loads(msg.payload)
            except ValueError:
                return
            if isinstance(meta, dict) and meta.get("event") == "heartbeat":
                seen.setdefault(str(meta.get("daemon")), meta)

        client.on_message = on_message
        client.on_connect = lambda c, *_: c.subscribe("pihub/+/meta")
        end = time.monotonic() + deadline_s
        while True:
            try:
                client.connect("127.0.0.1", local, keepalive=30)
                break
            except OSError:
                if time.monotonic() > end:
                    raise
                time.sleep(2)
        client.loop_start()
        while time.monotonic() < end and not set(daemons) <= set(seen):
            time.sleep(1)
        client.loop_stop()
        client.disconnect()
    finally:
        tunnel.terminate()
        tunnel.wait(timeout=10)
    missing = sorted(set(daemons) - set(seen))
    if missing:
        raise SystemExit(
            f"no heartbeat within {deadline_s} s from: {', '.join(missing)} "
            f"(heard: {', '.join(sorted(seen)) or 'none'})"
        )
    return seen


def check_first_boot(emu: Emulator, card: Card) -> dict[str, object]:
    """What the first boot made, as seen on the Pi."""
    facts: dict[str, object] = {}
    out = emu.ssh(
        "cat /etc/machine-id; hostname; test -e /var/lib/pihub-firstboot/done && echo done; "
        "ls /etc/ssh/ssh_host_ed25519_key.pub; sudo stat -c %s /etc/pihub/secrets/mqtt.secret; "
        "df -B1 --output=size / | tail -n1; systemctl is-system-running || true"
    )
    lines = out.split()
    assert re.fullmatch(r"[0-9a-f]{32}", lines[0]), f"machine-id: {lines[0]!r}"
    assert lines[1] == HOSTNAME, f"hostname {lines[1]!r}, pihub.txt said {HOSTNAME}"
    assert lines[2] == "done", "the first boot's marker is missing"
    assert lines[3] == "/etc/ssh/ssh_host_ed25519_key.pub"
    assert int(lines[4]) >= 40, "the MQTT secret is missing or short"
    root_bytes = int(lines[5])
    assert root_bytes > card.image_bytes, (
        f"the root ({root_bytes} B) was not grown beyond the image"
    )
    facts.update(machine_id=lines[0], root_fs_bytes=root_bytes, system_state=lines[6])
    return facts


def first_boot_seconds(emu: Emulator) -> float:
    out = emu.ssh(
        "systemctl show pihub-firstboot.service -p ExecMainStartTimestampMonotonic "
        "-p ExecMainExitTimestampMonotonic"
    )
    values = dict(line.split("=", 1) for line in out.split())
    return (
        int(values["ExecMainExitTimestampMonotonic"])
        - int(values["ExecMainStartTimestampMonotonic"])
    ) / 1e6


def idle_memory(emu: Emulator) -> dict[str, int]:
    info = dict(re.findall(r"^(\w+):\s+(\d+) kB", emu.ssh("cat /proc/meminfo"), re.M))
    return {
        "total_kb": int(info["MemTotal"]),
        "used_kb": int(info["MemTotal"]) - int(info["MemAvailable"]),
    }


def play_again(emu: Emulator, work: Path) -> tuple[str, float]:
    """playbooks/site.yml over SSH with inventory/image/device.yml: the recap of its one host."""
    env = dict(os.environ, ANSIBLE_HOST_KEY_CHECKING="False", ANSIBLE_FORCE_COLOR="0")
    cmd = [
        str(REPO / ".venv" / "bin" / "ansible-playbook"),
        "-i",
        "inventory/image/device.yml",
        "playbooks/site.yml",
        "-e",
        "ansible_host=127.0.0.1",
        "-e",
        f"ansible_port={emu.port}",
        "-e",
        f"ansible_user={USER}",
        "-e",
        f"ansible_ssh_private_key_file={emu.card.key}",
        "-e",
        "ansible_ssh_common_args='-o UserKnownHostsFile=/dev/null'",
        # The apt cache's refresh is time, not state: the image ships without package lists
        # (their directory dated at the build), and base refreshes them when older than an
        # hour; any state the play manages must be as it is.
        "-e",
        "base_apt_cache_valid_time=315360000",
    ]
    log("the same play again, over SSH: " + " ".join(cmd))
    started = time.monotonic()
    done = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=PLAY_DEADLINE_S
    )
    (work / "play.log").write_text(done.stdout + done.stderr)
    recap = re.search(r"^pihub-image\s+:\s+(.*)$", done.stdout, re.M)
    if done.returncode != 0 or recap is None:
        raise SystemExit(
            f"the play failed ({done.returncode}); its log: {work / 'play.log'}\n"
            + "\n".join(done.stdout.splitlines()[-40:])
        )
    return recap.group(1).strip(), time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", nargs="?", type=Path)
    parser.add_argument("--keep", action="store_true", help="leave the emulator running at the end")
    parser.add_argument("--no-play", action="store_true", help="skip the play over SSH")
    parser.add_argument(
        "--power-cut",
        type=float,
        metavar="S",
        help="kill the emulator S seconds after the first boot's service starts, then boot again",
    )
    parser.add_argument("--save", action="store_true", help="write bench/results/image_pi.json")
    args = parser.parse_args()
    image = args.image or max(
        (REPO / "build").glob("pihub-*-arm64.img"), key=lambda p: p.stat().st_mtime
    )
    daemons = expected_daemons()
    work = Path(tempfile.mkdtemp(prefix="pihub-boot-test.", dir="/var/tmp"))
    log(f"work directory {work} (card, console.log, play.log)")
    card = Card(image, work)
    if args.power_cut is not None:
        cut = Emulator(card, work, "console-cut.log")
        end = time.monotonic() + BOOT_DEADLINE_S
        while not cut.console.exists() or "pihub-firstboot" not in cut.console.read_text(
            errors="replace"
        ):
            if time.monotonic() > end or cut.proc.poll() is not None:
                raise SystemExit(f"the first boot's service never started; {cut.console}")
            time.sleep(0.2)
        time.sleep(args.power_cut)
        cut.proc.kill()
        cut.proc.wait()
        console = cut.console.read_text(errors="replace")
        log(
            f"power cut {args.power_cut} s into the first boot's service; it had printed: "
            + " | ".join(ln.strip() for ln in console.splitlines() if "pihub-firstboot[" in ln)
        )
    emu = Emulator(card, work)
    figures: dict[str, object] = {
        "image": image.name,
        "emulated": "qemu-system-aarch64 -M virt -cpu cortex-a72 "
        "-smp 2 -m 1024, TCG on the build host (not a Pi)",
    }
    try:
        figures["ssh_s"] = round(emu.wait_for_ssh(BOOT_DEADLINE_S), 1)
        log(f"SSH after {figures['ssh_s']} s")
        figures.update(check_first_boot(emu, card))
        figures["first_boot_service_s"] = round(first_boot_seconds(emu), 1)
        seen = wait_for_heartbeats(emu, daemons, HEARTBEAT_DEADLINE_S)
        figures["all_daemons_heartbeating_s"] = round(time.monotonic() - emu.started, 1)
        names = ", ".join(sorted(seen))
        log(f"every daemon heartbeats ({names}) {figures['all_daemons_heartbeating_s']} s in")
        # Idle: a minute after the last daemon's first heartbeat (the boot's own work done).
        time.sleep(60)
        figures["idle_memory"] = idle_memory(emu)
        figures["daemon_rss_kb"] = {name: meta.get("rss_kb") for name, meta in sorted(seen.items())}
        if not args.no_play:
            recap, seconds = play_again(emu, work)
            figures["play_again"] = recap
            figures["play_again_s"] = round(seconds, 1)
            log(f"the play over SSH: {recap} ({seconds:.0f} s)")
            if not re.search(r"\bchanged=0\b", recap) or not re.search(r"\bfailed=0\b", recap):
                raise SystemExit(
                    f"the play over SSH changed something: {recap}; log: {work / 'play.log'}"
                )
            wait_for_heartbeats(emu, daemons, HEARTBEAT_DEADLINE_S)
    finally:
        print(json.dumps(figures, indent=2))
        if args.save and sys.exc_info()[0] is None:
            out = REPO / "bench" / "results" / "image_pi.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(figures, indent=2) + "\n")
        if args.keep:
            log(f"left running: ssh {' '.join(emu.ssh_args()[1:])}; stop: kill {emu.proc.pid}")
        else:
            emu.stop()
            shutil.rmtree(work / "boot", ignore_errors=True)
            (work / "card.img").unlink(missing_ok=True)
    log("image boot test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
