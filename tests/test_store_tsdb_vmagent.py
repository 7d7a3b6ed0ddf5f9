"""pihub-store-tsdb writing to vmagent in front of a VictoriaMetrics (issue 19: central storage
at scale). store-tsdb takes any InfluxDB-compatible URL; vmagent accepts the InfluxDB v2 write
API, keeps what its remote storage cannot take yet in its own on-disk buffer
(``-remoteWrite.tmpDataPath``), and sends it on once the storage is back."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_until
from store_tsdb_helpers import HOST, Vmagent, counter, heartbeat, publish_series, stored

from testkit.loopback import VictoriaMetrics


@pytest.fixture
def vmagent(vm: VictoriaMetrics, tmp_path: Path) -> Iterator[Vmagent]:
    agent = Vmagent(f"{vm.url}/api/v1/write", tmp_path / "vmagent-buffer",
                    tmp_path / "vmagent.log")
    agent.start()
    yield agent
    agent.stop()


def test_points_written_through_vmagent_while_victoriametrics_is_down_all_arrive_once_it_is_back(
        vm, vmagent, start_daemon, observe, topic_root, tmp_path):
    obs = observe(f"{topic_root}/store-tsdb/#")
    start_daemon("store_tsdb", {"url": vmagent.url, "spool_dir": str(tmp_path / "state"),
                                "flush_interval": 0.2, "retry_interval": 0.2,
                                "retry_max": 0.5})
    heartbeat(obs, topic_root, lambda m: m["event"] == "heartbeat")
    start = time.time() - 3600
    before = publish_series(obs, topic_root, "shed", "temperature", 10, start)
    assert stored(vm, "temperature", "shed", 10) == before

    vm.stop()
    during = publish_series(obs, topic_root, "shed", "temperature", 50, start + 10)
    # vmagent took them: store-tsdb wrote them (its own spool stays empty) ...
    meta = heartbeat(obs, topic_root, counter("written", 60))
    assert meta["counters"]["spooled"] == 0 and meta["spool_bytes"] == 0
    # ... and vmagent holds them, unsent, while VictoriaMetrics is away
    wait_until(lambda: vmagent.metric("vmagent_remotewrite_retries_count_total") > 0, 30,
               "vmagent to retry sending to the stopped VictoriaMetrics", interval=0.5)
    # vmagent itself restarts meanwhile: what it held goes to its buffer on disk and comes back
    vmagent.stop()
    vmagent.start()
    time.sleep(3)  # VictoriaMetrics stays away a while longer
    vm.start()
    assert stored(vm, "temperature", "shed", 60, timeout=90) == before + during
    assert len(vm.export("temperature_value")[("shed", HOST)]) == 60  # none twice
