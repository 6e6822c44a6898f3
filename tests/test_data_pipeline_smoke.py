"""Smoke run of benchmarks/data_pipeline.py at a tiny size: it runs end to end and its JSON holds the
numbers the README quotes (no timing assertions)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_data_pipeline_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "data_pipeline.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.data_pipeline",
            "--workdir",
            str(tmp_path / "w"),
            "--rows",
            "3000",
            "--test-rows",
            "500",
            "--reference-rows",
            "500",
            "--batch-size",
            "256",
            "--train-steps",
            "2",
            "--out",
            str(out),
        ],
        check=True,
        cwd=REPO,
        timeout=600,
    )
    result = json.loads(out.read_text())
    assert result["conversion"]["rows_read"] == 3500
    assert (
        result["conversion_quarter_skeleton"]["rows_read"] == 750 + 500
    )  # the test skeleton (500 rows) is shorter than the cut
    for key in ("conversion_speedup", "reader_over_training", "peak_rss_ratio_full_vs_quarter"):
        assert result[key] > 0
    assert result["reader"]["batches"] == -(-3000 // 256)
