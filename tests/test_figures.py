"""Figures in README.md and docs/ are the benchmarks' own results, rendered (bench/figures.py):
a number typed by hand, or a result saved but not rendered, fails here."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import figures


def test_every_figures_block_is_rendered_from_its_results(capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    assert figures.main(["--check"]) == 0, capsys.readouterr().err


def test_readme_shows_the_daemon_footprint_block() -> None:
    text = (figures.REPO / "README.md").read_text()
    assert "<!-- figures: daemon_footprint -->" in text


def test_a_figure_edited_by_hand_is_found() -> None:
    text = "a\n<!-- figures: daemon_footprint -->\n| sensor-system | 1 ms |\n<!-- /figures -->\n"
    assert figures.update(text) != text


def test_the_budget_sentence_counts_what_the_table_shows() -> None:
    data = {"date": "2026-12-05", "python": "Python 3.11.2", "machine": "2-core x86_64",
            "runs": 3, "daemons": {
                "a": {"ready_s": 0.1, "rss_kb": 24 * 1024, "pss_kb": 20 * 1024},
                "b": {"ready_s": 0.3, "rss_kb": 26 * 1024, "pss_kb": 22 * 1024},
                "web": {"ready_s": 0.2, "rss_kb": 29 * 1024, "pss_kb": 25 * 1024}}}
    text = figures.daemon_footprint(data)
    assert "2 of 3 are within their idle RSS budget (25 MB, web 30 MB): a, web; over it: b." \
        in text
    assert "READY within 300 ms (the slowest: b)" in text
    assert text.index("| a |") < text.index("| b |") < text.index("| web |")  # by RSS


def test_readme_shows_the_stack_memory_block() -> None:
    text = (figures.REPO / "README.md").read_text()
    assert "<!-- figures: stack_memory -->" in text


def _stack_run(pss_mb: dict[str, float]) -> dict[str, object]:
    parts = {}
    for name, mb in pss_mb.items():
        kind = "service" if name in ("mosquitto", "victoria-metrics") else "daemon"
        row: dict[str, object] = {"stack_pss_kb": int(mb * 1024), "pss_kb": int(mb * 1024),
                                  "rss_kb": int(mb * 1024) + 9 * 1024, "anon_kb": 0,
                                  "threads": 2, "kind": kind}
        if kind == "daemon":
            row["example_enabled"] = name != "notify-email"
        parts[name] = row
    return {"date": "2026-12-05", "python": "Python 3.11.2", "machine": "2-core x86_64",
            "packages": {"victoria-metrics": "1.79.5"}, "idle_s": 60, "samples": 3, "runs": 3,
            "parts": parts}


def test_the_stack_table_sums_every_process_and_the_example_default_set() -> None:
    before = _stack_run({"mosquitto": 3, "victoria-metrics": 20, "store-rrd": 20,
                         "notify-email": 17})
    after = _stack_run({"mosquitto": 3, "victoria-metrics": 20, "store-rrd": 15,
                        "notify-email": 17})
    text = figures.stack_memory({"runs": {"before": before, "deployed": after}})
    assert "| before: PSS in the stack | deployed: PSS in the stack |" in text
    assert "| store-rrd | 20.0 MB | 15.0 MB |" in text
    assert "| notify-email (off in the example) |" in text
    assert "| **whole stack: 2 daemons and 2 services** | 60.0 MB | 55.0 MB |" in text
    assert "| the example's default set (1 daemons on) | 43.0 MB | 38.0 MB |" in text


def test_which_pi_the_stack_fits_follows_from_the_figures() -> None:
    small = figures.stack_memory({"runs": {"deployed": _stack_run({"mosquitto": 100})}})
    ram = figures.PI_MODELS[0][1]  # the smallest Pi
    left = ram - figures.OS_IDLE_MB - 100
    assert f"| {figures.PI_MODELS[0][0]} | {ram} MB | {left:.0f} MB: fits |" in small
    huge = figures.stack_memory({"runs": {"deployed": _stack_run({"mosquitto": 2000})}})
    assert "does not fit" in huge.splitlines()[-1]  # the largest Pi listed, too
    tight = ram - figures.OS_IDLE_MB - (figures.HEADROOM * ram) / 2
    mid = figures.stack_memory({"runs": {"deployed": _stack_run({"mosquitto": tight})}})
    assert "fits, headroom under" in mid


def test_readme_shows_the_sd_writes_block() -> None:
    text = (figures.REPO / "README.md").read_text()
    assert "<!-- figures: sd_writes -->" in text


def _sd_run(write_kb: dict[str, int], log_lines: int, series: int) -> dict[str, object]:
    parts = {name: {"kind": "daemon", "write_bytes_h": kb * 1000, "wchar_h": 0, "writes_h": 0,
                    "log_bytes_h": 0, "log_lines_h": 0} for name, kb in write_kb.items()}
    next(iter(parts.values()))["log_lines_h"] = log_lines
    disk = sum(kb * 1000 for kb in write_kb.values())
    journal = log_lines * 500
    return {"date": "2026-12-05", "python": "Python 3.11.2", "machine": "2-core x86_64",
            "packages": {}, "filesystem": "ext4", "minutes": 10, "warmup_s": 120,
            "journal_line_bytes": 500, "series": series, "parts": parts,
            "totals": {"write_bytes_h": disk, "journal_bytes_h": journal,
                       "total_bytes_h": disk + journal,
                       "per_series_bytes_h": (disk + journal) // series}}


def test_the_sd_table_sums_every_process_and_divides_by_the_series() -> None:
    before = _sd_run({"victoria-metrics": 9000, "rrdcached": 3000}, 2000, 10)
    after = _sd_run({"victoria-metrics": 5000, "rrdcached": 1000}, 0, 10)
    text = figures.sd_writes({"runs": {"after": after, "before": before}})
    assert "| process | before | after |" in text  # before first, whatever the file's order
    assert "| victoria-metrics | 9,000 KB | 5,000 KB |" in text
    assert "| **in all** | 13,000 KB | 6,000 KB |" in text
    assert "| **per sensor series** | 1,300 KB (10 series) | 600 KB (10 series) |" in text
    assert "600 KB/h per sensor series: within the goal" in text
    over = figures.sd_writes({"runs": {"before": before}})
    assert "1300 KB/h per sensor series: over the goal" in over
