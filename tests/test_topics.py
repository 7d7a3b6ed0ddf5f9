"""The limits of pihub.topics (contract §6): what any MQTT client can send is rejected in one
short line, never decoded without bound, never a RecursionError."""

from __future__ import annotations

import json

import pytest
from pihub.topics import (
    MAX_DEPTH,
    MAX_EXTRA_KEYS,
    MAX_MEASUREMENT_BYTES,
    MAX_SEGMENT,
    MAX_SHOWN,
    MAX_TEXT,
    MAX_UNIT,
    Reject,
    Topics,
    clip_text,
    decode_json,
    measurement_payload,
    parse_measurement,
    shown,
)

BIG = "x" * 1_000_000
GOOD = {"value": 1, "unit": "C", "ts": 1}


@pytest.mark.parametrize("topic, payload, why", [
    ("pihub/data/lab/temp", json.dumps({**GOOD, "unit": "u" * (MAX_UNIT + 1)}).encode(),
     f"'unit' must be a non-empty string of at most {MAX_UNIT} characters"),
    ("pihub/data/lab/temp", json.dumps({**GOOD, "unit": BIG}).encode(),
     f"a measurement is at most {MAX_MEASUREMENT_BYTES} bytes, got"),
    ("pihub/data/lab/temp",
     json.dumps({**GOOD, **{f"k{i}": i for i in range(MAX_EXTRA_KEYS + 1)}}).encode(),
     f"at most {MAX_EXTRA_KEYS} keys besides value, unit and ts"),
    ("pihub/data/lab/temp", b"[" * 1000, f"deeper than {MAX_DEPTH} levels"),
    ("pihub/data/lab/temp", b'{"value": 1, "unit": "C", "ts": 1, "x": ' + b"[" * 40
     + b"]" * 40 + b"}", f"deeper than {MAX_DEPTH} levels"),
    ("pihub/data/" + "a" * (MAX_SEGMENT + 1) + "/temp", json.dumps(GOOD).encode(),
     f"segments of at most {MAX_SEGMENT} characters"),
    ("pihub/data/lab/" + "q" * 65_000, json.dumps(GOOD).encode(),
     f"segments of at most {MAX_SEGMENT} characters"),
    ("pihub/data/lab/temp", json.dumps({**GOOD, "ts": [BIG[:900]]}).encode(),
     "'ts' must be UNIX seconds"),
], ids=["long-unit", "1MB-unit", "extra-keys", "deep-list", "deep-extra", "long-segment",
        "64k-segment", "long-ts"])
def test_a_measurement_beyond_the_limits_is_rejected_in_a_short_line(topic, payload, why):
    with pytest.raises(Reject) as err:
        parse_measurement(Topics(), topic, payload)
    assert why in str(err.value)
    assert len(str(err.value)) < 500, str(err.value)[:600]


def test_a_measurement_at_the_limits_is_accepted():
    data = {"value": 1, "unit": "u" * MAX_UNIT, "ts": 1,
            **{f"k{i}": i for i in range(MAX_EXTRA_KEYS)}}
    m = parse_measurement(Topics(), "pihub/data/" + "a" * MAX_SEGMENT + "/temp",
                          json.dumps(data).encode())
    assert m.unit == "u" * MAX_UNIT and len(m.extra) == MAX_EXTRA_KEYS


@pytest.mark.parametrize("payload", [
    b"[" * 1_000_000,
    b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    b'[{"a": [' * 20 + b"1" + b"]}]" * 20,
], ids=["1M-lists", "100k-objects", "mixed-60"])
def test_deep_nesting_is_a_clean_reject_not_a_recursion_error(payload):
    with pytest.raises(Reject) as err:
        decode_json(payload, "t/x")
    assert f"deeper than {MAX_DEPTH} levels" in str(err.value)
    assert len(str(err.value)) < 3 * MAX_SHOWN + 120


def test_nesting_up_to_the_limit_and_brackets_inside_strings_are_fine():
    assert decode_json(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH, "t/x") is not None
    text = ["[" * 1000 + '\\"{', "{" * 100]
    assert decode_json(json.dumps(text).encode(), "t/x") == text


def test_rejects_for_bad_json_quote_a_bounded_part_of_it():
    with pytest.raises(Reject) as err:
        decode_json(b'{"a": "' + BIG.encode(), "t/x")
    assert len(str(err.value)) < 3 * MAX_SHOWN + 120


def test_shown_cuts_long_strings_and_big_containers():
    assert len(shown(BIG)) < MAX_SHOWN + 40 and "1000000 in all" in shown(BIG)
    assert len(shown([[1] * 10_000] * 10_000)) <= 2 * MAX_SHOWN + 1
    assert shown("short") == "'short'"


def test_clip_text_cuts_with_an_ellipsis():
    assert clip_text("a" * 1000) == "a" * (MAX_TEXT - 1) + "…"
    assert clip_text("abc") == "abc"


def test_a_daemon_cannot_publish_a_unit_beyond_the_limit():
    with pytest.raises(ValueError, match="at most"):
        measurement_payload(1, "u" * (MAX_UNIT + 1))
    with pytest.raises(ValueError):
        Topics().data("a" * (MAX_SEGMENT + 1), "temp")
