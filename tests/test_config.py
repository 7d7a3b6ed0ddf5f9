"""pihub.config: one declaration gives validation, messages naming the key, and the example."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from typing import Literal

import pytest
import yaml
from conftest import REPO, run_cli
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


# --------------------------------------------------------------------------- every daemon

def _daemon_modules() -> list[tuple[str, str]]:
    """(console script, module under pihub.daemons) for every ``[project.scripts]`` entry."""
    scripts = tomllib.loads((REPO / "files/daemons/pyproject.toml").read_text())
    out = []
    for script, target in scripts["project"]["scripts"].items():
        module, _, attr = target.partition(":")
        if module == "pihub.launch":  # pihub.launch:<module> runs pihub.daemons.<module>
            module = f"pihub.daemons.{attr}"
        assert module.startswith("pihub.daemons."), f"{script}: {target} is not a daemon module"
        out.append((script, module.removeprefix("pihub.daemons.")))
    return out


# What each daemon's example must show besides the shared keys (every key is commented).
EXAMPLE_KEYS = {
    "sensor_system": ["interval:", "filesystems:"],
    "monitor": ["rules:", "flap_window_s:"],
    "store_tsdb": ["url: http://127.0.0.2:8428"],
}


@pytest.mark.parametrize(("script", "module"), _daemon_modules(), ids=lambda v: v)
def test_printed_example_config_passes_check_config(tmp_path, script, module):
    example = run_cli(module, "--print-config-example")
    assert example.returncode == 0, example.stderr
    assert example.stdout.startswith(f"# /etc/pihub/{script.removeprefix('pihub-')}.yml")
    for key in ("mqtt:", "password_file:", "heartbeat_interval:", "# ",
                *EXAMPLE_KEYS.get(module, [])):
        assert key in example.stdout, f"{key!r} missing from {script}'s example"
    path = tmp_path / "example.yml"
    path.write_text(example.stdout)
    check = run_cli(module, "--check-config", str(path))
    assert check.returncode == 0, check.stderr
    assert "OK" in check.stdout


def test_every_daemon_module_has_a_console_script():
    """A daemon module without an entry in [project.scripts] is never installed on the Pi."""
    package = REPO / "files/daemons/src/pihub/daemons"
    found = {p.stem if p.is_file() else p.name for p in package.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}
    assert found == {module for _, module in _daemon_modules()}


def test_a_configured_topic_segment_longer_than_the_contract_allows_is_a_config_error(tmp_path):
    """A location that would make every publish fail is refused at start, naming the key."""
    path = tmp_path / "system.yml"
    path.write_text(yaml.safe_dump({"location": "a" * 65}))
    check = run_cli("sensor_system", "--check-config", str(path))
    assert check.returncode == 78, check.stdout
    assert "location:" in check.stderr
    path.write_text(yaml.safe_dump({"location": "a" * 64}))
    assert run_cli("sensor_system", "--check-config", str(path)).returncode == 0
