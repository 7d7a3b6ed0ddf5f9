"""pihub.config: one declaration gives validation, messages naming the key, and the example."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest
import yaml
from pihub.config import BaseConfig, ConfigError, build, example_text, load_text, setting


@dataclass(kw_only=True)
class Item:
    name: str = setting(help="Item name.", pattern=r"^[a-z]+$", example="door")
    pin: int = setting(help="BCM pin.", min=0, max=27, example=17)
    mode: Literal["in", "out"] = setting("in", "Direction.")


@dataclass(kw_only=True)
class Sample(BaseConfig):
    url: str = setting(help="Where to fetch.", example="http://127.0.0.1:8080/")
    items: list[Item] = setting(default_factory=list, help="Things.",
                                example=[{"name": "door", "pin": 17}])
    limits: dict[str, float] = setting({"max": 1.5}, "Named limits.")
    ratio: float | None = setting(None, "Optional ratio.", min=0, max=1)

    def check(self) -> None:
        names = [i.name for i in self.items]
        if len(names) != len(set(names)):
            raise ConfigError("items", "names must be unique")


def err(data: dict) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        build(Sample, data)
    return info.value


def test_defaults_fill_every_key_not_given():
    cfg = build(Sample, {"url": "http://x/"})
    assert cfg.mqtt.port == 1883 and cfg.topic_root == "pihub" and cfg.limits == {"max": 1.5}
    assert cfg.items == [] and cfg.ratio is None


def test_missing_required_key_is_named_with_its_help():
    e = err({})
    assert e.key == "url" and "required" in e.message and "Where to fetch" in e.message


def test_errors_in_lists_name_the_index_and_key():
    e = err({"url": "u", "items": [{"name": "door", "pin": 17}, {"name": "win", "pin": 40}]})
    assert str(e) == "items[1].pin: expected an integer between 0 and 27, got 40"


def test_wrong_literal_lists_the_choices():
    e = err({"url": "u", "items": [{"name": "a", "pin": 1, "mode": "both"}]})
    assert e.key == "items[0].mode" and "expected one of in, out" in e.message


def test_unknown_nested_key_lists_known_keys():
    e = err({"url": "u", "mqtt": {"tls": {"enable": True}}})
    assert e.key == "mqtt.tls.enable" and "known keys here: enabled" in e.message


def test_cross_field_check_reports_the_key_under_its_section():
    e = err({"url": "u", "mqtt": {"password_file": "/x"}})
    assert e.key == "mqtt.username"
    e = err({"url": "u", "items": [{"name": "a", "pin": 1}, {"name": "a", "pin": 2}]})
    assert e.key == "items" and "unique" in e.message


def test_bools_are_not_numbers_and_numbers_are_not_bools():
    assert "expected an integer" in err({"url": "u", "mqtt": {"port": True}}).message
    assert "expected true or false" in err({"url": "u", "mqtt": {"tls": {"enabled": 1}}}).message


def test_optional_values_accept_null_and_check_range_otherwise():
    assert build(Sample, {"url": "u", "ratio": None}).ratio is None
    assert err({"url": "u", "ratio": 2}).key == "ratio"


def test_non_finite_numbers_are_refused():
    assert "expected a number" in err({"url": "u", "heartbeat_interval": float("nan")}).message


def test_top_level_must_be_a_mapping():
    with pytest.raises(ConfigError) as info:
        load_text(Sample, "- a\n- b\n")
    assert "expected a mapping" in str(info.value)


def test_example_text_is_valid_yaml_that_loads_back():
    text = example_text(Sample, "sample")
    assert "# Where to fetch. (required)" in text
    data = yaml.safe_load(text)
    cfg = build(Sample, data)
    assert cfg.items[0].name == "door" and cfg.url == "http://127.0.0.1:8080/"


def test_required_key_without_example_is_a_programming_error():
    @dataclass(kw_only=True)
    class Bad(BaseConfig):
        needed: str = setting(help="no example")

    with pytest.raises(TypeError):
        example_text(Bad, "bad")


def test_mutable_defaults_are_not_shared_between_instances():
    a, b = build(Sample, {"url": "u"}), build(Sample, {"url": "u"})
    a.limits["max"] = 9
    assert b.limits["max"] == 1.5




def test_example_text_comments_every_key_of_list_items():
    text = example_text(Sample, "sample")
    block = text[text.index("items:"):text.index("limits:")]
    assert "# Item name. (required)" in block and "# BCM pin. (required)" in block
    assert "- name: door" in block and "mode: in" in block
    assert build(Sample, yaml.safe_load(text)).items[0].mode == "in"
