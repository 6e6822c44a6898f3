"""dtn-train returns its best valid epoch: default dtn-prepare flags (a valid split is carved
from train), ``train.epochs=3`` on planted dtn-synth data (the DTN demo config overfits from
the second epoch on there), and the summary reports the test metrics of the evaluation with the
best valid AUC."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

from dtn_torchrec.train.selection import metrics_at

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
TASKS = ("click", "conversion")


def _run(args: List[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stderr[-5000:]}"


def _mean_auc(metrics: Dict[str, Dict[str, float]]) -> float:
    return sum(metrics[task]["auc"] for task in TASKS) / len(TASKS)


@pytest.mark.slow
def test_three_epochs_report_the_test_metrics_of_the_best_valid_epoch(tmp_path: Path) -> None:
    raw, data, out = tmp_path / "raw", tmp_path / "data", tmp_path / "run"
    _run(
        [
            str(VENV_BIN / "dtn-synth"),
            "--output",
            str(raw),
            "--train-rows",
            "20000",
            "--test-rows",
            "5000",
            "--seed",
            "3",
        ]
    )
    _run(
        [
            str(VENV_BIN / "dtn-prepare"),
            "--format",
            "aliccp-raw",
            "--input",
            str(raw),
            "--output",
            str(data),
        ]
    )
    _run(
        [
            str(VENV_BIN / "dtn-train"),
            "--config",
            str(REPO / "configs" / "dtn_demo.yaml"),
            f"data.path={data}",
            f"output.dir={out}",
            "train.epochs=3",
            "output.tensorboard=false",
        ]
    )
    summary = json.loads((out / "summary.json").read_text())
    history = summary["history"]
    valid = {h["step"]: _mean_auc(h["metrics"]) for h in history if h["split"] == "valid"}
    test = {h["step"]: h["metrics"] for h in history if h["split"] == "test"}
    # one evaluation per epoch; the config's select.patience may stop after the second
    assert valid.keys() == test.keys() and len(valid) == summary["epochs"]
    assert len(valid) == 3 or (len(valid) == 2 and summary["selected"]["stopped_early"])

    best = max(valid, key=lambda step: (valid[step], -step))
    selected = summary["selected"]
    assert selected["step"] == best and selected["epoch"] == sorted(valid).index(best) + 1
    assert summary["test"] == metrics_at(history, best)["test"] == test[best]
    assert summary["valid"] == selected["valid"]
    assert (out / "checkpoints" / f"step_{best}").is_dir()
    # never more than 0.005 below the test AUC of the best epoch (by test), on both tasks
    for task in TASKS:
        best_test = max(metrics[task]["auc"] for metrics in test.values())
        assert summary["test"][task]["auc"] >= best_test - 0.005, (task, test)
