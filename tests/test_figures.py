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
