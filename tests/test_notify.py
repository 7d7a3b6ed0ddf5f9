"""pihub.notify, what every notifier shares: routing filters, one-line headers, Retry-After, the
queue's records (the daemons' behaviour is tested through each notifier's own test module)."""

from __future__ import annotations

import json

import pytest
from pihub.config import ConfigError, build
from pihub.notify import NotifierConfig, Request, RequestQueue, one_line, retry_after


@pytest.mark.parametrize(("topics", "key"), [
    ([], "topics"),
    (["monitor", "monitor"], "topics"),
    (["#", "urgent"], "topics"),
    (["+", "#"], "topics"),
    (["urgent/#"], "topics[0]"),
    (["Urgent"], "topics[0]"),
])
def test_topics_filters_are_segments_or_one_wildcard_alone(topics, key):
    with pytest.raises(ConfigError) as info:
        build(NotifierConfig, {"topics": topics})
    assert info.value.key == key


def test_topics_default_takes_every_request():
    assert build(NotifierConfig, {}).topics == ["#"]
    assert build(NotifierConfig, {"topics": ["urgent", "monitor"]}).topics == ["urgent",
                                                                               "monitor"]


@pytest.mark.parametrize("text", ["a\r\nBcc: x", "a\nb", "a\rb", "a\u2028b", "a\x85b",
                                  "a\x0bb", "a\x0cb"])
def test_one_line_leaves_no_line_break_of_any_kind(text):
    flat = one_line(text)
    assert flat.splitlines() == [flat] and "\r" not in flat and "\n" not in flat


def test_retry_after_reads_seconds_and_http_dates():
    now = 1_700_000_000.0
    assert retry_after({"Retry-After": "30"}, now) == 30.0
    assert retry_after({"Retry-After": "Tue, 14 Nov 2023 22:14:20 GMT"}, now) == pytest.approx(
        60, abs=1)
    assert retry_after({"Retry-After": "soon"}, now) is None
    assert retry_after({}, now) is None


def test_a_queue_file_without_uid_still_loads_and_gets_a_stable_ident(tmp_path):
    old = {"seq": 4, "topic": "pihub/notify/monitor", "title": None, "message": "m",
           "priority": 0, "ts": 1718000000.5}
    (tmp_path / "000000000004.json").write_text(json.dumps(old))
    queue = RequestQueue(tmp_path)
    assert queue.load() == []
    (item,) = queue.items()
    assert item.uid == "" and item.ident == "4-1718000000.500" and item.record() == old
    new = Request(queue.next_seq(), "pihub/notify/monitor", "m", None, 0, 1.0, uid="abc")
    queue.put(new, max_items=10)
    assert json.loads((tmp_path / "000000000005.json").read_text())["uid"] == "abc"
    assert RequestQueue(tmp_path).load() == [] and new.segment == "monitor"
