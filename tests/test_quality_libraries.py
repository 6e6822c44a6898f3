"""The planted libraries-style data (``benchmarks.synthetic``) and ``benchmarks.quality_libraries``."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from benchmarks.common import memonet_overrides
from benchmarks.quality_libraries import DEFAULT_CONFIGS, ordering_checks
from benchmarks.synthetic import (
    PlantedLabels,
    PlantedModel,
    draw_cross_pairs,
    log_spaced_fields,
    write_planted_dataset,
)
from dtn_torchrec.data.prepare import valid_mask
from dtn_torchrec.train.config import load_run_config

TASKS = ["click", "conversion"]


def _digest(root: Path, splits: list[str]) -> str:
    """sha256 over every column (ids, labels, sample ids) of the splits' Parquet files."""
    h = hashlib.sha256()
    for split in splits:
        table = pq.read_table(root / split / "part-00000.parquet")
        for name in table.column_names:
            column = table.column(name).combine_chunks()
            values = column.values if hasattr(column, "values") else column
            h.update(name.encode())
            h.update(np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.int64).tobytes())
    return h.hexdigest()


def test_one_cross_per_task_keeps_the_speed_benchmarks_data(tmp_path: Path) -> None:
    # Digest and oracle of this dataset written before crosses_per_task existed: the default
    # (one fixed cross per task) must keep benchmarks.mmoe_libraries' data bit for bit.
    fields = log_spaced_fields(20, 10, 1000, scale=1)
    write_planted_dataset(tmp_path, fields, {"train": 600, "test": 400}, seed=3)
    assert _digest(tmp_path, ["train", "test"]) == (
        "9fd8bb9ec8a38d7d22d2a354c37bb5434363157d4cd7ba44b55c9ca075d2b827"
    )
    truth = json.loads((tmp_path / "truth.json").read_text())
    assert truth["oracle_auc"]["test"] == pytest.approx(
        {"click": 0.9168447735970973, "conversion": 0.9174685418208735}, abs=1e-12
    )
    assert truth["crossed_fields"] == {"click": [["f18", "f16"]], "conversion": [["f17", "f16"]]}


def test_cross_pairs_are_drawn_per_seed() -> None:
    pairs = draw_cross_pairs(20, 8, TASKS, seed=5)
    for task in TASKS:
        assert len(set(pairs[task])) == 8
        assert all(0 <= a < b < 20 for a, b in pairs[task])
    assert pairs == draw_cross_pairs(20, 8, TASKS, seed=5)
    assert pairs != draw_cross_pairs(20, 8, TASKS, seed=6)
    # Independent draws of 8 of 190 pairs share 8 * 8 / 190 = 0.34 pairs on average.
    shared = [
        len(set(p["click"]) & set(p["conversion"]))
        for p in (draw_cross_pairs(20, 8, TASKS, seed=s) for s in range(20))
    ]
    assert max(shared) <= 3 and sum(shared) / len(shared) < 1.0
    with pytest.raises(ValueError, match="crosses_per_task must lie in 1..3"):
        draw_cross_pairs(3, 4, TASKS, seed=0)


def _direct_auc(score: np.ndarray, label: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting half, over all pairs."""
    pos, neg = score[label == 1], score[label == 0]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def test_oracle_and_valid_carve_follow_the_planted_formula(tmp_path: Path) -> None:
    fields = log_spaced_fields(6, 10, 200, scale=1)
    labels = PlantedLabels(crosses_per_task=3, rank=2)
    seed = 4
    schema = write_planted_dataset(
        tmp_path, fields, {"train": 1500, "test": 800}, seed=seed, labels=labels, valid_fraction=0.2
    )
    assert list(schema.splits) == ["train", "valid", "test"]
    train, valid, test = (
        pq.read_table(tmp_path / s / "part-00000.parquet") for s in ("train", "valid", "test")
    )
    train_ids, valid_ids = (t.column("sample_id").to_numpy() for t in (train, valid))
    assert schema.splits["train"].rows + schema.splits["valid"].rows == 1500
    assert np.array_equal(np.sort(np.concatenate([train_ids, valid_ids])), np.arange(1500))
    assert valid_mask(valid_ids, 0.2, seed=0).all() and not valid_mask(train_ids, 0.2, 0).any()

    # The model is the first thing drawn from the seed's generator.
    model = PlantedModel.draw(np.random.default_rng(seed), fields, labels, seed)
    ids = [np.concatenate(test.column(f.name).to_pylist()) for f in fields]
    logits = model.logits(ids)
    for row in (0, 7, 500):
        for task in TASKS:
            direct = model.bias[task] + sum(
                model.mains[task][f][ids[f][row]] for f in range(len(fields))
            )
            for a, b, u, v in model.crosses[task]:
                direct += sum(u[ids[a][row], r] * v[ids[b][row], r] for r in range(labels.rank))
            assert logits[task][row] == pytest.approx(direct, rel=1e-9, abs=1e-9)
    p_click, p_conv = (1.0 / (1.0 + np.exp(-logits[t])) for t in TASKS)
    truth = json.loads((tmp_path / "truth.json").read_text())
    oracle = truth["oracle_auc"]["test"]
    click, conversion = (test.column(t).to_numpy() for t in TASKS)
    assert oracle["click"] == pytest.approx(_direct_auc(p_click, click), abs=1e-6)
    assert oracle["conversion"] == pytest.approx(
        _direct_auc(p_click * p_conv, conversion), abs=1e-6
    )
    names = {t: [[fields[a].name, fields[b].name] for a, b in p] for t, p in model.pairs().items()}
    assert truth["crossed_fields"] == names
    assert names == {
        t: [[fields[a].name, fields[b].name] for a, b in p]
        for t, p in draw_cross_pairs(len(fields), 3, TASKS, seed).items()
    }


def test_memonet_override_names_the_data_fields_only_for_dtn() -> None:
    dtn, mmoe = DEFAULT_CONFIGS[0], DEFAULT_CONFIGS[1]
    names = [f"f{i:02d}" for i in range(20)]
    overrides = memonet_overrides(dtn, names)
    assert len(overrides) == 1
    methods = load_run_config(str(dtn), overrides).model.architecture.methods
    memonet = [m for m in methods if m.kind == "memonet"]
    assert len(memonet) == 1 and memonet[0].fields == names
    assert memonet_overrides(mmoe, names) == []


def test_ordering_checks_compare_means_with_the_margin() -> None:
    def model(click: float, conversion: float, lead_minus: tuple[float, float]) -> dict:
        return {
            "test_auc": {"click": {"mean": click}, "conversion": {"mean": conversion}},
            "dtn_minus_this": {
                "click": {"mean": lead_minus[0]},
                "conversion": {"mean": lead_minus[1]},
            },
        }

    summary = {
        "dtn": model(0.83, 0.85, (0.0, 0.0)),
        "mmoe": model(0.826, 0.84, (0.004, 0.01)),
        "mlp": model(0.80, 0.845, (0.03, 0.005)),
    }
    checks = {c["check"]: c["met"] for c in ordering_checks(summary, "dtn", ["mmoe"], "mlp")}
    assert checks == {
        "dtn >= mmoe + 0.005 (click)": False,
        "dtn >= mmoe + 0.005 (conversion)": True,
        "dtn > mlp (click)": True,
        "dtn > mlp (conversion)": True,
        "mmoe > mlp (click)": True,
        "mmoe > mlp (conversion)": False,
    }


def test_run_logged_reports_the_monitors_other_cpu_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # OtherCpuMonitor already counts a finished child's CPU as ours (children_* times):
    # run_logged must not subtract it a second time.
    import benchmarks.model_quality as model_quality

    class FixedMonitor:
        def start(self) -> None:
            pass

        def stop(self) -> float:
            return 0.5

    monkeypatch.setattr(model_quality, "OtherCpuMonitor", FixedMonitor)
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    record = model_quality.run_logged([sys.executable, "-c", burn], tmp_path / "burn.log")
    assert record["other_cpu_cores"] == 0.5
