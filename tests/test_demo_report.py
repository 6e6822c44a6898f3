"""launchers/demo_report.py: the side-by-side table `make demo` prints."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _report_module():
    spec = importlib.util.spec_from_file_location("demo_report", REPO / "launchers/demo_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TRUTH = {
    "oracle_auc": {"test": {"click": 0.80, "conversion": 0.85}},
    "oracle_auc_conversion_given_click": {"test": 0.82},
}


def _summary(click: float, conversion: float, cvr: float, rate: float, step: int) -> dict:
    return {
        "test": {"click": {"auc": click}, "conversion": {"auc": conversion, "cvr_auc": cvr}},
        "throughput": {"samples_per_s": rate},
        "world_size": 2,
        "selected": {"step": step, "epoch": 1},
        "steps": 99,
    }


def test_models_side_by_side_with_oracle_and_gaps() -> None:
    runs = {
        "dtn": _summary(0.7612, 0.8123, 0.70, 1777.4, 58),
        "mmoe": _summary(0.70, 0.75, 0.6, 11e3, 40),
    }
    lines = _report_module().report(TRUTH, runs).splitlines()
    assert lines[0].split() == ["test", "AUC", "oracle", "dtn", "mmoe"]
    assert lines[1].split() == ["click", "0.8000", "0.7612", "0.7000"]
    assert lines[2].split() == ["conversion", "0.8500", "0.8123", "0.7500"]
    assert lines[3].split() == ["conversion", "|", "click", "0.8200", "0.7000", "0.6000"]
    gaps = lines[[line.startswith("gap to oracle") for line in lines].index(True) + 1 :]
    assert gaps[0].split() == ["click", "0.0388", "0.1000"]
    assert gaps[1].split() == ["conversion", "0.0377", "0.1000"]
    assert lines[-2].split()[-2:] == ["1,777", "11,000"]
    assert lines[-1].split() == ["reported", "step", "58", "40"]


def test_summary_without_selection_reports_the_last_step_and_missing_values() -> None:
    summary = _summary(0.7, 0.8, 0.6, 0.0, 0)
    del summary["selected"]
    summary["test"]["conversion"].pop("cvr_auc")
    summary["throughput"]["samples_per_s"] = None
    text = _report_module().report({"oracle_auc": {"test": {"click": 0.8}}}, {"dtn": summary})
    assert "conversion | click" not in text
    assert text.splitlines()[2].split() == ["conversion", "n/a", "0.8000"]
    assert text.splitlines()[-2].split()[-1] == "n/a"
    assert text.splitlines()[-1].split() == ["reported", "step", "99"]
