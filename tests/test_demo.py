"""`fsar demo` end to end, as `make demo` runs it (SPEC 8): the claims its report makes hold."""

from __future__ import annotations

import json

import pytest

from fsar.pipelines.demo import DEMO_HEADS

from .conftest import run_fsar


@pytest.mark.slow
def test_demo_report_shows_temporal_heads_ahead_of_the_frame_mean_on_reversed_pairs(tmp_path):
    printed = run_fsar("demo", "--workdir", str(tmp_path)).stdout
    report = (tmp_path / "report.md").read_text()
    assert report in printed
    for head in DEMO_HEADS:
        assert f"| {head} |" in report
    summary = json.loads((tmp_path / "results" / "demo_summary.json").read_text())
    pairs, gains = summary["reversed_pairs"], summary["reversed_pair_gain"]
    # a video and its reversal share their mean frame: the baseline can only guess
    accuracy, interval = pairs["proto_mean"]
    assert abs(accuracy - 50.0) < interval + 2.0
    for head in ("otam", "clipfsar", "clipspm"):
        gain, gain_interval = gains[head]
        assert gain - gain_interval > 0, (head, gain, gain_interval)
    for head, result in summary["five_way"].items():
        assert result["episodes"] == 4000 and result["split"] == "test", head
        assert result["protocol"]["selection_split"] == "val"
    full = (tmp_path / "report" / "report.md").read_text()
    assert (
        "learning_curves.png" in full
        and (tmp_path / "report" / "learning_curves.png").stat().st_size > 5000
    )
    # a second run resumes every finished head instead of training again
    again = run_fsar("demo", "--workdir", str(tmp_path)).stdout
    assert json.loads((tmp_path / "results" / "demo_summary.json").read_text()) == summary
    assert "| otam |" in again
