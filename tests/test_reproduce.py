import json
import re

import pytest

from selfy_hf.reproduce import EXPERIMENTS, ReproductionConfig, reproduce


def test_quick_reproduction_writes_tables_plots_and_reuses_finished_runs(tmp_path):
    config = ReproductionConfig(
        output_dir=str(tmp_path / "results"),
        runs_dir=str(tmp_path / "runs"),
        quick=True,
        only=["TSN", "SELFYNet {-2..2}"],
    )
    results = reproduce(config, command="python scripts/reproduce.py --quick")
    assert [r["name"] for r in results] == ["TSN", "SELFYNet {-2..2}"]
    for result in results:
        assert 0 <= result["final"]["top1"] <= 1 and 0 <= result["final"]["pair_accuracy"] <= 1
        assert result["gmacs"] > 0 and len(result["history"]) == 1
    assert "robustness" not in results[0]
    assert set(results[1]["robustness"]) == {"occlusion", "motion_blur"}
    report = (tmp_path / "results" / "results.md").read_text()
    assert "`python scripts/reproduce.py --quick`" in report and "| SELFYNet {-2..2} |" in report
    assert "| 48.4 |" in report  # the paper's number stands beside ours
    assert re.search(r"^Code: (commit [0-9a-f]{7,}(\+changes)?|unknown) ", report, re.MULTILINE)
    for name in ("learning_curves.png", "robustness.png", "stss_moving_right.png"):
        assert (tmp_path / "results" / name).stat().st_size > 1000
    assert (
        json.loads((tmp_path / "results" / "results.json").read_text())["runs"][1]["name"]
        == "SELFYNet {-2..2}"
    )

    weights = tmp_path / "runs" / "tsn" / "model.safetensors"
    written = weights.stat().st_mtime_ns
    reproduce(config)  # finished runs with the same training config are reused, not retrained
    assert weights.stat().st_mtime_ns == written


def test_unknown_experiment_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown experiments"):
        reproduce(ReproductionConfig(runs_dir=str(tmp_path), quick=True, only=["SELFYNet {9}"]))
    assert len({e.name for e in EXPERIMENTS}) == len(EXPERIMENTS)
