"""Benchmark scripts: smoke runs at tiny sizes (keys and aggregation of the JSON, never timings),
and the pieces they are built from (synthetic data, the reference's plain tables)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from benchmarks.common import (
    WindowSpec,
    combine_ranks,
    merge_processes,
    timed_windows,
    update_bytes_per_id,
)
from benchmarks.conditions import (
    CONTENDED_CORES,
    OtherCpuMonitor,
    _tree_cpu_seconds,
    is_contended,
    measure_gemm_peak,
)
from benchmarks.reference import ParquetRows, PlainEmbeddingBags, collate_rows
from benchmarks.synthetic import SyntheticField, log_spaced_fields, write_dataset
from dtn_torchrec.data.reader import ParquetBatchReader

REPO = Path(__file__).resolve().parent.parent


def _run(module: str, tmp_path: Path, *args: str) -> Dict[str, Any]:
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            f"benchmarks.{module}",
            "--smoke",
            "--threads",
            "1",
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(out),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def _check_measurement(record: Dict[str, Any], ranks: int, windows: int) -> None:
    """Rank records hold ``windows`` rates whose median is the rank's rate; the run's rate is the
    sum over ranks."""
    assert len(record["ranks"]) == ranks
    for rank in record["ranks"]:
        assert len(rank["windows"]) == windows and all(w > 0 for w in rank["windows"])
        assert rank["samples_per_s"] == statistics.median(rank["windows"])
        assert len(rank["other_cpu_cores"]) == windows and all(
            c >= 0 for c in rank["other_cpu_cores"]
        )
        assert rank["contended"] == is_contended(rank["other_cpu_cores"])
        assert rank["peak_rss_bytes"] > 0
    assert record["samples_per_s"] == pytest.approx(
        sum(r["samples_per_s"] for r in record["ranks"])
    )
    assert record["min_samples_per_s"] <= record["max_samples_per_s"]
    assert record["contended"] == any(r["contended"] for r in record["ranks"])
    assert record["peak_rss_bytes_per_rank"] == [r["peak_rss_bytes"] for r in record["ranks"]]


def _check_throughput(result: Dict[str, Any], ranks: int, models: List[str]) -> None:
    assert result["benchmark"] == "throughput"
    assert set(result["roofline"]["1"]) == {
        "gemm_peak_flops",
        "gemm_peak_bf16_flops",
        "copy_bandwidth",
        "threads",
        "gemm_windows",
    }
    for dtype in ("fp32", "bf16"):
        peak = result["roofline"]["1"]["gemm_windows"][dtype]
        assert peak["flops"] == max(peak["windows"]) and len(peak["other_cpu_cores"]) == 3
    assert result["contended"] == (
        any(r["contended"] for r in result["results"])
        or any(p["contended"] for p in result["roofline"]["1"]["gemm_windows"].values())
    )
    assert [r["model"] for r in result["results"]] == models
    for r in result["results"]:
        assert r["ranks"] == ranks
        _check_measurement(r["ours"], ranks, windows=3)
        _check_measurement(r["reference"], ranks, windows=3)
        assert r["ratio"] == pytest.approx(
            r["ours"]["samples_per_s"] / r["reference"]["samples_per_s"]
        )
        assert r["train_flops_per_sample"] > 0 and r["embedding_bytes_per_sample"] > 0
        per_rank = r["ours"]["samples_per_s"] / ranks
        assert r["achieved_dense_flops_per_rank"] == pytest.approx(
            r["train_flops_per_sample"] * per_rank
        )
        roofline = result["roofline"]["1"]
        assert r["fraction_of_gemm_peak"] == pytest.approx(
            r["achieved_dense_flops_per_rank"] / roofline["gemm_peak_flops"]
        )
        assert r["fraction_of_copy_bandwidth"] == pytest.approx(
            r["embedding_bytes_per_sample"] * per_rank / roofline["copy_bandwidth"]
        )


@pytest.mark.slow
def test_throughput_smoke_one_rank(tmp_path: Path) -> None:
    _check_throughput(_run("throughput", tmp_path, "--models", "mmoe", "--ranks", "1"), 1, ["mmoe"])


@pytest.mark.slow
def test_throughput_smoke_two_ranks(tmp_path: Path) -> None:
    models = ["shared_bottom", "ple", "dtn"]
    _check_throughput(
        _run("throughput", tmp_path, "--models", ",".join(models), "--ranks", "2"), 2, models
    )


def _check_vocab(result: Dict[str, Any], ranks: int) -> None:
    assert result["benchmark"] == "vocab_scaling"
    assert [(r["model"], r["scale"]) for r in result["results"]] == [("mmoe", 1), ("mmoe", 10)]
    x1, x10 = result["results"]
    assert (
        x10["table_rows"] == 10 * x1["table_rows"] - 9 * 20
    )  # 20 fields, each + the reserved id 0
    for r in result["results"]:
        _check_measurement(r["ours"], ranks, windows=3)
        _check_measurement(r["reference"], ranks, windows=3)
        assert r["ratio"] == pytest.approx(
            r["ours"]["samples_per_s"] / r["reference"]["samples_per_s"]
        )
        assert r["estimated_bytes"]["reference"] > r["estimated_bytes"]["ours"]
    assert result["reference_largest_scale"] == {"mmoe": 10}
    found = {t["target"]: t for t in result["targets"]}
    assert found["MMoE x1: ours / reference >= 1.5"]["value"] == pytest.approx(x1["ratio"])
    assert found["MMoE x1: ours / reference >= 1.5"]["met"] == (x1["ratio"] >= 1.5)
    assert found["mmoe ours x1000 trains"]["met"] is None  # no x1000 in a smoke run


@pytest.mark.slow
def test_vocab_scaling_smoke_one_rank(tmp_path: Path) -> None:
    _check_vocab(_run("vocab_scaling", tmp_path, "--models", "mmoe", "--ranks", "1"), 1)


@pytest.mark.slow
def test_vocab_scaling_smoke_dtn_crosses_the_generic_fields(tmp_path: Path) -> None:
    # dtn_demo.yaml pins MemoNet's fields by Ali-CCP names; the benchmark's fields are f00..f19.
    result = _run("vocab_scaling", tmp_path, "--models", "dtn", "--ranks", "1")
    for r in result["results"]:
        _check_measurement(r["ours"], 1, windows=3)
        assert any('"f19"' in o for o in r["overrides"]), r["overrides"]


@pytest.mark.slow
def test_vocab_scaling_smoke_two_ranks_row_wise(tmp_path: Path) -> None:
    result = _run("vocab_scaling", tmp_path, "--models", "mmoe", "--ranks", "2")
    _check_vocab(result, 2)
    for rank in result["results"][0]["ours"]["ranks"]:
        assert set(rank["sharding"].values()) == {"row_wise"}


@pytest.mark.slow
def test_vocab_scaling_refuses_the_reference_over_budget(tmp_path: Path) -> None:
    # x1 of a 1000-row schema at dim 16: the reference needs ~4 x 74 KB x 4 bytes; 1 KB is too little.
    result = _run(
        "vocab_scaling", tmp_path, "--models", "mmoe", "--ranks", "1", "--memory-budget-gb", "1e-6"
    )
    for r in result["results"]:
        assert r["ours"]["samples_per_s"] is None and r["reference"]["samples_per_s"] is None
        assert "budget" in r["reference"]["skipped"]
    assert result["reference_largest_scale"] == {}


# -- building blocks ---------------------------------------------------------------------------


def test_timed_windows_run_warmup_then_windows_of_at_least_the_given_seconds() -> None:
    clock = [0.0]
    calls: List[int] = []

    def step() -> int:  # one step = 0.3 s of a fake clock
        calls.append(1)
        clock[0] += 0.3
        return 8

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("benchmarks.common.time.perf_counter", lambda: clock[0])
        times = timed_windows(step, WindowSpec(warmup_steps=2, window_seconds=1.0, windows=4))
    # 1.0 s windows need 4 steps of 0.3 s (1.2 s): 8 samples x 4 / 1.2 s per window.
    assert len(calls) == 2 + 4 * 4 and times.steps == [4] * 4
    assert times.rates == pytest.approx([32 / 1.2] * 4)
    assert len(times.other_cpu_cores) == 4


def test_combine_ranks_sums_rates_and_flags_contention() -> None:
    ranks = [
        {
            "samples_per_s": 10.0,
            "windows": [9.0, 10.0, 12.0],
            "other_cpu_cores": [0.0, 0.0, 0.0],
            "contended": False,
            "peak_rss_bytes": 1,
        },
        {
            "samples_per_s": 20.0,
            "windows": [20.0, 25.0, 19.0],
            "other_cpu_cores": [0.0, 0.5, 0.0],
            "contended": True,
            "peak_rss_bytes": 2,
        },
    ]
    combined = combine_ranks(ranks)
    assert combined["samples_per_s"] == 30.0
    assert (combined["min_samples_per_s"], combined["max_samples_per_s"]) == (29.0, 35.0)
    assert combined["contended"] is True and combined["max_other_cpu_cores"] == 0.5


def test_other_cpu_monitor_counts_cpu_outside_the_watched_tree() -> None:
    # Watch a sleeping child's tree while this process spins: all of our CPU is "other".
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        monitor = OtherCpuMonitor(root_pid=sleeper.pid)
        monitor.start()
        spin_cpu = time.process_time()
        while time.process_time() - spin_cpu < 0.4:
            pass
        others = monitor.stop()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert others > CONTENDED_CORES
    assert is_contended([0.0, others]) and not is_contended([0.0, CONTENDED_CORES])


def test_other_cpu_monitor_counts_an_ended_child_as_ours() -> None:
    # A child that spins and exits inside the window (a dtn-train run) is this tree's CPU, so
    # the monitor does not count it as another process's. Checked on the tree's CPU seconds
    # (CPU time, not wall time): the machine's other load cannot change the result.
    root = psutil.Process(os.getpid())
    before = _tree_cpu_seconds(root)
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass"
    subprocess.run([sys.executable, "-c", spin], check=True)
    assert _tree_cpu_seconds(root) - before >= 0.6


def test_gemm_peak_is_the_best_window_of_square_matmuls() -> None:
    peak = measure_gemm_peak("bf16", size=64, window_seconds=0.05, windows=2)
    record = peak.record()
    assert peak.flops == max(peak.windows) > 0 and len(peak.windows) == 2
    assert record["dtype"] == "bf16" and record["threads"] == torch.get_num_threads()
    assert record["contended"] == is_contended(peak.other_cpu_cores)


def test_update_bytes_per_id() -> None:
    assert update_bytes_per_id("rowwise_adagrad", 16) == 4 * (2 * 16 + 2)
    assert update_bytes_per_id("adam", 16) == 4 * (2 * 16 + 4 * 16)
    assert update_bytes_per_id("sgd", 8) == 4 * 16


def test_log_spaced_fields() -> None:
    fields = log_spaced_fields(20, 10, 100_000, scale=1000)
    assert len(fields) == 20
    assert (
        fields[0].num_embeddings == 10 * 1000 + 1
        and fields[-1].num_embeddings == 100_000 * 1000 + 1
    )
    sizes = [f.num_embeddings for f in fields]
    assert sizes == sorted(sizes)


def test_synthetic_dataset_matches_its_schema_and_reads(tmp_path: Path) -> None:
    fields = [
        SyntheticField("a", 50),
        SyntheticField("b", 7, min_length=2, max_length=5, present=0.5),
    ]
    schema = write_dataset(tmp_path, fields, rows=300, seed=1, ids="zipf")
    table = pq.read_table(tmp_path / "train" / "part-00000.parquet")
    assert table.num_rows == 300 == schema.splits["train"].rows
    assert pq.ParquetFile(tmp_path / "train" / "part-00000.parquet").metadata.num_row_groups >= 8
    for f, spec in zip(fields, schema.fields):
        lists = table.column(f.name).to_pylist()
        lengths = [len(x) for x in lists]
        assert spec.mean_length == pytest.approx(np.mean(lengths))
        assert spec.max_length == max(lengths) <= f.max_length
        assert all(1 <= i < f.num_embeddings for x in lists for i in x)
    assert any(n == 0 for n in (len(x) for x in table.column("b").to_pylist()))
    reader = ParquetBatchReader(str(tmp_path), "train", 64, prefetch_batches=0)
    batch = next(iter(reader))
    assert batch.sparse_features.keys() == ["a", "b"] and batch.labels.shape == (64, 2)


def test_reference_tables_pool_like_torchrec(tmp_path: Path) -> None:
    """The plain nn.EmbeddingBag twin gives TorchRec's EBC output for the same weights and the
    per-row collate builds the reader's KJT."""
    fields = [SyntheticField("a", 30, 1, 3), SyntheticField("b", 20, 0, 4, present=0.7)]
    schema = write_dataset(tmp_path, fields, rows=64, seed=3, ids="uniform")
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name=f"t_{f.name}",
                embedding_dim=4,
                num_embeddings=f.num_embeddings,
                feature_names=[f.name],
            )
            for f in fields
        ],
    )
    plain = PlainEmbeddingBags(ebc)
    with torch.no_grad():
        for f in fields:
            plain.bags[f"t_{f.name}"].weight.copy_(ebc.embedding_bags[f"t_{f.name}"].weight)
    rows = ParquetRows(str(tmp_path), schema, "train")
    batch = collate_rows([rows[i] for i in range(16)], schema.field_names)
    read = next(iter(ParquetBatchReader(str(tmp_path), "train", 16, prefetch_batches=0)))
    kjt: KeyedJaggedTensor = batch.sparse_features
    assert torch.equal(kjt.values(), read.sparse_features.values())
    assert torch.equal(kjt.lengths(), read.sparse_features.lengths())
    assert torch.equal(batch.labels, read.labels)
    expected, got = ebc(kjt).to_dict(), plain(kjt).to_dict()
    for f in fields:
        assert torch.allclose(got[f.name], expected[f.name])


def test_planted_dataset_labels_follow_the_oracle(tmp_path: Path) -> None:
    from benchmarks.synthetic import write_planted_dataset

    fields = log_spaced_fields(5, 10, 300, scale=1)
    schema = write_planted_dataset(tmp_path, fields, {"train": 4000, "test": 2000}, seed=2)
    assert sorted(schema.splits) == ["test", "train"] and schema.splits["test"].rows == 2000
    truth = json.loads((tmp_path / "truth.json").read_text())["oracle_auc"]
    for split in ("train", "test"):
        table = pq.read_table(tmp_path / split / "part-00000.parquet")
        click, conversion = (table.column(c).to_numpy() for c in ("click", "conversion"))
        assert not np.any(conversion > click)  # conversions only on clicked rows
        assert 0.6 < truth[split]["click"] < 1.0 and 0.6 < truth[split]["conversion"] < 1.0
    batch = next(iter(ParquetBatchReader(str(tmp_path), "test", 64, prefetch_batches=0)))
    assert batch.sparse_features.keys() == [f.name for f in fields]


@pytest.mark.slow
def test_mmoe_libraries_smoke_runs_dtn_train(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.mmoe_libraries",
            "--smoke",
            "--data",
            str(tmp_path / "data"),
            "--runs",
            str(tmp_path / "runs"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    (run,) = list((tmp_path / "runs").iterdir())
    summary = json.loads((run / "summary.json").read_text())
    ours = result["ours"]
    assert ours["test_auc"] == {t: summary["test"][t]["auc"] for t in ("click", "conversion")}
    assert ours["samples_per_s"] == statistics.median(ours["windows"])
    assert summary["config"]["model"]["mmoe"]["num_experts"] == 4
    assert result["contended"] == (
        result["other_cpu_cores_during_run"] > CONTENDED_CORES
        or any(p["contended"] for p in result["roofline"]["gemm_windows"].values())
    )


@pytest.mark.slow
def test_ab_step_smoke_interleaves_variants_in_one_rank(tmp_path: Path) -> None:
    from benchmarks.ab_step import main as ab_step_main

    out = tmp_path / "ab.json"
    ab_step_main(
        [
            "--model",
            "mmoe",
            "--size",
            "demo",
            "--variant",
            "base:",
            "--variant",
            "fp32:train.precision=fp32,train.pipeline=sparse_dist",
            "--rows",
            "2048",
            "--batch-size",
            "64",
            "--warmup",
            "1",
            "--window-seconds",
            "0.05",
            "--rounds",
            "2",
            "--threads",
            "1",
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert set(result["samples_per_s"]) == {"base", "fp32"}
    assert all(len(w) == 2 and min(w) > 0 for w in result["samples_per_s"].values())
    assert result["ratios"]["base"] == [1.0, 1.0]
    fp32 = [f / b for f, b in zip(result["samples_per_s"]["fp32"], result["samples_per_s"]["base"])]
    assert result["ratios"]["fp32"] == pytest.approx(fp32)


@pytest.mark.slow
def test_dense_step_smoke_times_every_variant(tmp_path: Path) -> None:
    from benchmarks.dense_step import main as dense_step_main

    out = tmp_path / "dense.json"
    variants = ["fp32-loop", "fp32-fused", "bf16-fused"]
    dense_step_main(
        [
            "--config",
            str(REPO / "configs" / "mmoe_demo.yaml"),
            "--smoke",
            "--batch-size",
            "64",
            "--threads",
            "1",
            "--windows",
            "2",
            "--variants",
            ",".join(variants),
            "--out",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert [r["variant"] for r in result["results"]] == variants
    for r in result["results"]:
        assert len(r["windows"]) == 2 and r["samples_per_s"] > 0
        assert r["dense_flops_per_s"] == pytest.approx(
            3 * result["forward_flops_per_sample"] * r["samples_per_s"]
        )


@pytest.mark.slow
def test_quality_libraries_smoke_trains_dtn_with_its_memonet_fields(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    command = [sys.executable, "-m", "benchmarks.quality_libraries", "--workdir", str(tmp_path)]
    command += ["--train-rows", "3000", "--test-rows", "1000", "--largest-vocab", "200"]
    command += ["--configs", str(REPO / "configs" / "dtn_demo.yaml"), "--nproc", "1"]
    command += ["--gemm-window-seconds", "0.05", "--out", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert [r["model"] for r in result["runs"]] == ["dtn_demo", "mlp_baseline"]
    splits = result["structures"][0]["splits"]
    assert splits["train"] + splits["valid"] == 3000 and splits["test"] == 1000
    assert [c["check"] for c in result["ordering"]] == [
        "dtn_demo > mlp_baseline (click)",
        "dtn_demo > mlp_baseline (conversion)",
    ]
    summary = json.loads((tmp_path / "s0" / "runs" / "dtn_demo" / "summary.json").read_text())
    memonet = [m for m in summary["config"]["model"]["dtn"]["methods"] if m["kind"] == "memonet"]
    assert memonet[0]["fields"] == [f"f{i:02d}" for i in range(20)]
    assert set(result["oracle_test_auc"]) == {"click", "conversion"}


def test_merge_processes_pools_the_windows_of_each_rank() -> None:
    def rec(windows: List[float], contended: bool, peak: int) -> Dict[str, Any]:
        return {
            "samples_per_s": windows[0],
            "windows": windows,
            "window_steps": [10] * len(windows),
            "other_cpu_cores": [0.0] * len(windows),
            "contended": contended,
            "setup_s": 1.0,
            "peak_rss_bytes": peak,
            "sharding": {"t": "row_wise"},
        }

    runs = [
        [rec([3.0], False, 5), rec([30.0], False, 7)],
        [rec([1.0, 2.0], True, 6), rec([10.0], False, 4)],
    ]
    rank0, rank1 = merge_processes(runs)
    assert rank0["windows"] == [3.0, 1.0, 2.0] and rank0["samples_per_s"] == 2.0
    assert rank0["contended"] and rank0["peak_rss_bytes"] == 6 and rank0["setup_s"] == [1.0, 1.0]
    assert rank1["windows"] == [30.0, 10.0] and rank1["samples_per_s"] == 20.0
    assert not rank1["contended"] and rank1["peak_rss_bytes"] == 7
    assert rank1["sharding"] == {"t": "row_wise"}
