"""The quality benchmark's pieces: seed lists, tuning seeds kept apart from reporting seeds, the
aggregation over structures (tests/test_model_quality_learning.py runs the whole benchmark)."""

from __future__ import annotations

import argparse
import statistics

import pytest

from benchmarks.model_quality import TUNE_SEED_MIN, check_seed_purpose, parse_seeds, summarise


def test_seed_lists_mix_ranges_and_single_seeds() -> None:
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("100-102,7") == [100, 101, 102, 7]
    for bad in ("4-0", "a", "1,1", "-3"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_seeds(bad)


def test_tuning_and_reporting_seeds_are_kept_apart() -> None:
    check_seed_purpose([0, 4], "report")
    check_seed_purpose([TUNE_SEED_MIN, TUNE_SEED_MIN + 4], "tune")
    with pytest.raises(SystemExit, match=r"--seeds-report: seeds must be < 100 .*\[100\]"):
        check_seed_purpose([3, TUNE_SEED_MIN], "report")
    with pytest.raises(SystemExit, match=r"--seeds-tune: seeds must be >= 100 .*\[0\]"):
        check_seed_purpose([0], "tune")


def _run(model: str, seed: int, click: float, oracle: float, rate: float) -> dict:
    return {
        "model": model,
        "seed": seed,
        "test_auc": {"click": click},
        "gap_to_oracle": {"click": oracle - click},
        "samples_per_s": rate,
        "selected": {"epoch": 1 + seed},
    }


def test_summary_is_mean_and_std_over_structures_with_paired_differences() -> None:
    oracle = {0: 0.80, 1: 0.90}
    runs = [
        _run("dtn", 0, 0.75, 0.80, 100.0),
        _run("dtn", 1, 0.85, 0.90, 300.0),
        _run("mmoe", 0, 0.70, 0.80, 1000.0),
        _run("mmoe", 1, 0.84, 0.90, 2000.0),
    ]
    structures = [{"seed": s, "oracle_test_auc": {"click": o}} for s, o in oracle.items()]
    summary = summarise(runs, structures, ["click"], "dtn")
    mmoe = summary["mmoe"]
    assert mmoe["test_auc"]["click"]["mean"] == pytest.approx(0.77)
    assert mmoe["test_auc"]["click"]["std"] == pytest.approx(statistics.stdev([0.70, 0.84]))
    assert mmoe["gap_to_oracle"]["click"]["mean"] == pytest.approx((0.10 + 0.06) / 2)
    assert mmoe["dtn_minus_this"]["click"]["mean"] == pytest.approx((0.05 + 0.01) / 2)
    assert mmoe["dtn_minus_this"]["click"]["std"] == pytest.approx(statistics.stdev([0.05, 0.01]))
    assert summary["dtn"]["dtn_minus_this"]["click"] == {"mean": 0.0, "std": 0.0}
    assert mmoe["samples_per_s"]["mean"] == 1500.0 and mmoe["selected_epochs"] == [1, 2]
