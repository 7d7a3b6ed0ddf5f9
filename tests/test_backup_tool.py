"""roles/backup/files/pihub-backup against a real VictoriaMetrics (with its HTTP login), vmbackup,
vmrestore, rrdcached and Mosquitto on loopback: what a backup holds comes back point for point,
the RRDs only after rrdcached's flush, and an archive that does not match is refused.
molecule/backup proves the same through the playbooks on two stand-ins."""

from __future__ import annotations

import base64
import io
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.loopback import free_port, start_mosquitto, wait_until

TOOL = Path(__file__).resolve().parents[1] / "roles" / "backup" / "files" / "pihub-backup"
USER, PASSWORD = "pihub", "backup-test-password"

pytestmark = pytest.mark.skipif(
    not all(shutil.which(p) for p in ("victoria-metrics", "vmbackup", "vmrestore", "rrdcached",
                                      "rrdtool", "mosquitto", "mosquitto_pub", "mosquitto_sub")),
    reason="needs Debian's victoria-metrics (vmbackup, vmrestore), rrdtool, rrdcached, mosquitto")


class Vm:
    """victoria-metrics with basic auth, its flags in an environment file as the role writes."""

    def __init__(self, workdir: Path, auth: bool = True) -> None:
        self.port = free_port()
        self.data = workdir / "vm"
        self.url = f"http://127.0.0.1:{self.port}"
        self.env_file = workdir / "victoria-metrics.env"
        lines = [f'ARGS="-storageDataPath={self.data} -httpListenAddr=127.0.0.1:{self.port}"']
        if auth:
            lines += [f'httpAuth_username="{USER}"', f'httpAuth_password="{PASSWORD}"']
        self.env_file.write_text("\n".join(lines) + "\n")
        self.auth = auth
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "vm.log"

    def start(self) -> None:
        env = dict(os.environ, httpAuth_username=USER, httpAuth_password=PASSWORD)
        args = ["victoria-metrics", f"-storageDataPath={self.data}",
                f"-httpListenAddr=127.0.0.1:{self.port}", "-retentionPeriod=100y",
                "-search.latencyOffset=0", "-search.disableCache", "-loggerLevel=WARN",
                "-dedup.minScrapeInterval=1ms"]
        if self.auth:
            args.append("-envflag.enable")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: self.get("/health", raw=True) == b"OK", 20, "victoria-metrics")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)

    def get(self, path: str, raw: bool = False, data: bytes | None = None) -> object:
        request = urllib.request.Request(self.url + path, data=data)
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                body = response.read()
        except OSError:
            return None
        return body if raw else json.loads(body)

    def export(self) -> list[str]:
        self.get("/internal/force_flush", raw=True)
        query = urllib.parse.urlencode({"match[]": '{__name__=~".+"}'})
        body = self.get(f"/api/v1/export?{query}", raw=True)
        assert isinstance(body, bytes)
        return sorted(body.decode().splitlines())


class Hub:
    """What one Pi keeps: VictoriaMetrics, an RRD directory behind rrdcached, state
    directories, Mosquitto's persistence file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        self.vm = Vm(root)
        self.rrd = root / "rrd"
        self.rrd.mkdir()
        self.journal = root / "journal"
        self.journal.mkdir()
        self.socket = root / "rrdcached.sock"
        self.state = root / "state"
        self.state.mkdir()
        self.broker_dir = root / "mosquitto"
        self.broker_dir.mkdir()
        self.rrdcached: subprocess.Popen[bytes] | None = None
        self.broker: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start_rrdcached(self) -> None:
        self.rrdcached = subprocess.Popen(
            ["rrdcached", "-g", "-B", "-b", str(self.rrd), "-w", "3600", "-z", "1",
             "-j", str(self.journal), "-p", str(self.root / "rrdcached.pid"),
             "-l", f"unix:{self.socket}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self.socket.exists, 10, "rrdcached's socket")

    def start_broker(self) -> None:
        me = pwd.getpwuid(os.getuid()).pw_name
        self.broker, self.port = start_mosquitto(
            self.root, "persistence true", f"persistence_location {self.broker_dir}/",
            "autosave_interval 3600", f"user {me}")

    def args(self) -> list[str]:
        return ["--vm-env-file", str(self.vm.env_file), "--rrd-dir", str(self.rrd),
                "--rrdcached-socket", str(self.socket), "--rrd-journal-dir", str(self.journal),
                "--state-root", str(self.state),
                "--broker-db", str(self.broker_dir / "mosquitto.db"),
                "--venv", str(Path(sys.executable).parent.parent),
                "--work-dir", str(self.root)]

    def stop(self) -> None:
        self.vm.stop()
        for proc in (self.rrdcached, self.broker):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(30)


@pytest.fixture
def hubs(tmp_path: Path) -> Iterator[tuple[Hub, Hub]]:
    a, b = Hub(tmp_path / "a"), Hub(tmp_path / "b")
    yield a, b
    a.stop()
    b.stop()


def tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True,
                          timeout=120)


def rrd_fetch(path: Path, start: int, end: int, daemon: Path | None = None) -> str:
    extra = ["--daemon", f"unix:{daemon}"] if daemon else []
    return subprocess.run(["rrdtool", "fetch", str(path), "AVERAGE", "-r", "60", "-s", str(start),
                           "-e", str(end), *extra], check=True, capture_output=True,
                          text=True).stdout


def fill(a: Hub, t0: int) -> None:
    """120 points a minute apart in two series into VictoriaMetrics, the same into an RRD
    through rrdcached (they stay in its RAM: -w 3600), a retained message, a state file."""
    lines = []
    for i in range(120):
        ts = t0 + 60 * i
        lines.append(f"temperature,location=kitchen,host=a value={20 + i % 13}.{i % 10} "
                     f"{ts * 1000}")
        lines.append(f"humidity,location=kitchen,host=a value={40 + i % 7} {ts * 1000}")
    assert a.vm.get("/write?precision=ms", raw=True, data="\n".join(lines).encode()) == b""
    (a.rrd / "kitchen").mkdir()
    rrd = a.rrd / "kitchen" / "temperature.rrd"
    subprocess.run(["rrdtool", "create", str(rrd), "--start", str(t0 - 1), "--step", "60",
                    "DS:value:GAUGE:300:U:U", "RRA:AVERAGE:0.5:1:2880"], check=True)
    (a.rrd / "kitchen" / "temperature.json").write_text('{"unit": "°C"}')
    for i in range(120):
        subprocess.run(["rrdtool", "update", str(rrd), "--daemon", f"unix:{a.socket}",
                        f"{t0 + 60 * i}:{20 + i % 13}.{i % 10}"], check=True)
    subprocess.run(["mosquitto_pub", "-p", str(a.port), "-t", "pihub/monitor/daemons/store-tsdb",
                    "-m", '{"state": "up"}', "-r", "-q", "1"], check=True)
    spool = a.state / "pihub-store-tsdb" / "points"
    spool.mkdir(parents=True)
    (spool / "00000001.log").write_bytes(b"a spooled point\n")
    (a.state / "pihub-store-tsdb" / "last_ts.json").write_text('{"pihub/data/x/y": 1.0}')


def restore_into(b: Hub, archive: str, *extra: str) -> dict:
    """As restore.yml: the services under the data stopped first (Mosquitto would write its
    own file over the restored one when it stops)."""
    b.vm.stop()
    if b.broker is not None:
        b.broker.terminate()
        b.broker.wait(10)
    result = tool("restore", archive, *b.args(), *extra)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_backup_restores_every_point_rrd_row_and_retained_message(
        hubs: tuple[Hub, Hub]) -> None:
    a, b = hubs
    a.start_rrdcached()
    for hub in hubs:
        hub.start_broker()
    a.vm.start()
    t0 = int(time.time()) // 60 * 60 - 7200
    fill(a, t0)
    assert len(a.vm.export()) == 2

    made = tool("create", "--out-dir", str(a.root / "out"), "--host", "hub-a", "--keep", "3",
                "--broker-pid", str(a.broker.pid if a.broker else 0), *a.args())
    assert made.returncode == 0, made.stderr
    result = json.loads(made.stdout)
    manifest = result["manifest"]
    assert manifest["format"] == "pihub-backup/1" and manifest["host"] == "hub-a"
    assert manifest["victoria_metrics"]["series"] == 2
    assert manifest["rrd"]["flush"].startswith("0 ") and manifest["rrd"]["flushed_files"] == 1
    assert manifest["parts"] == ["victoria-metrics", "rrd", "state", "broker"]
    assert manifest["state"]["directories"] == ["pihub-store-tsdb"]
    assert "configs and secrets" in manifest["not_included"]
    assert set(manifest["seconds"]) == {"victoria-metrics", "rrd", "state", "broker"}
    # the snapshot is gone again
    assert not list((a.vm.data / "snapshots").iterdir())

    assert tool("check", result["archive"], *a.args()).returncode == 0
    report = restore_into(b, result["archive"])
    assert report["host"] == "hub-a" and report["state"] == [] and report["skipped"]
    b.vm.start()
    assert b.vm.export() == a.vm.export()
    end = t0 + 60 * 119
    rrd = Path("kitchen") / "temperature.rrd"
    fetched = rrd_fetch(b.rrd / rrd, t0 - 60, end)
    assert fetched == rrd_fetch(a.rrd / rrd, t0 - 60, end, daemon=a.socket)
    assert sum(1 for line in fetched.splitlines() if ": " in line and "nan" not in line) >= 118
    assert (b.rrd / "kitchen" / "temperature.json").read_text() == '{"unit": "°C"}'

    # the broker's file: a Mosquitto started on it has A's retained record
    b.start_broker()
    retained = subprocess.run(["mosquitto_sub", "-p", str(b.port), "-t", "pihub/monitor/#",
                               "-C", "1", "-W", "5", "--retained-only", "-v"],
                              capture_output=True, text=True, check=True).stdout
    assert retained.strip() == 'pihub/monitor/daemons/store-tsdb {"state": "up"}'


def test_without_the_rrdcached_flush_the_rrd_misses_what_rrdcached_held(
        hubs: tuple[Hub, Hub]) -> None:
    """The check above, broken on purpose: no FLUSHALL, and B's RRD lacks A's updates."""
    a, b = hubs
    a.start_rrdcached()
    a.start_broker()
    a.vm.start()
    t0 = int(time.time()) // 60 * 60 - 7200
    fill(a, t0)
    made = tool("create", "--out-dir", str(a.root / "out"), "--host", "hub-a",
                *a.args(), "--rrdcached-socket", "", "--skip", "broker")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["manifest"]["rrd"]["flush"] == "no rrdcached"
    restore_into(b, json.loads(made.stdout)["archive"], "--skip", "victoria-metrics")
    rrd = Path("kitchen") / "temperature.rrd"
    end = t0 + 60 * 119
    assert rrd_fetch(b.rrd / rrd, t0 - 60, end) != rrd_fetch(a.rrd / rrd, t0 - 60, end,
                                                               daemon=a.socket)


def rewrite(archive: str, target: Path, change: dict) -> str:
    """A copy of ``archive`` whose manifest has ``change`` applied."""
    with tarfile.open(archive) as src, tarfile.open(target, "w:gz") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isfile() else None  # type: ignore[union-attr]
            if member.name.endswith("/manifest.json") and data is not None:
                manifest = json.loads(data)
                manifest.update(change)
                data = json.dumps(manifest).encode()
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    return str(target)


def test_an_archive_that_does_not_match_is_refused(hubs: tuple[Hub, Hub],
                                                    tmp_path: Path) -> None:
    a, b = hubs
    a.start_rrdcached()
    a.vm.start()
    fill_t0 = int(time.time()) // 60 * 60 - 7200
    a.start_broker()
    fill(a, fill_t0)
    made = tool("create", "--out-dir", str(a.root / "out"), "--host", "hub-a", *a.args())
    archive = json.loads(made.stdout)["archive"]
    cases = {
        "newer pihub": (rewrite(archive, tmp_path / "v.tar.gz", {"pihub_version": "99.0.0"}),
                        "newer than this host's"),
        "other format": (rewrite(archive, tmp_path / "f.tar.gz", {"format": "pihub-backup/9"}),
                         "this restore reads 'pihub-backup/1' only"),
        "files changed": (rewrite(archive, tmp_path / "s.tar.gz", {"sha256sums": "0" * 64}),
                          "SHA256SUMS does not match"),
    }
    for name, (path, reason) in cases.items():
        result = tool("restore", path, *b.args())
        assert result.returncode == 65, name
        assert reason in result.stderr, (name, result.stderr)
        assert result.stderr.startswith("pihub-backup: refused: "), name
    # nothing was put anywhere
    assert not list(b.rrd.iterdir()) and not b.vm.data.exists()
    other = tool("check", archive, *b.args(), "--expect-host", "hub-b")
    assert other.returncode == 65 and "not of 'hub-b'" in other.stderr
    # a backup that would take the free space VictoriaMetrics keeps is not started
    full = tool("create", "--out-dir", str(a.root / "out"), "--host", "hub-a", *a.args(),
                "--min-free", "1000000TB")
    assert full.returncode == 1 and "put --out-dir (backup_local_dir) on a bigger disk" in \
        full.stderr, full.stderr
    assert not list((a.vm.data / "snapshots").iterdir())
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not an archive")
    assert "not a readable .tar.gz" in tool("check", str(junk)).stderr


def test_rotation_keeps_the_newest(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    names = [f"pihub-hub-a-2026120{d}T033000Z.tar.gz" for d in range(1, 6)]
    for name in [*names, "pihub-hub-b-20261201T033000Z.tar.gz"]:
        (out / name).write_bytes(b"")
    sys.path.insert(0, str(TOOL.parent))
    try:
        import importlib.machinery
        import importlib.util
        loader = importlib.machinery.SourceFileLoader("pihub_backup_tool", str(TOOL))
        spec = importlib.util.spec_from_loader("pihub_backup_tool", loader)
        assert spec is not None
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
    finally:
        sys.path.remove(str(TOOL.parent))
    removed = module.rotate(out, "hub-a", 2)
    assert sorted(Path(p).name for p in removed) == names[:3]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*names[3:], "pihub-hub-b-20261201T033000Z.tar.gz"])
