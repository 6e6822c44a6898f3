"""dtn-analyze: KJT-level field permutation, permutation importance against hand-computed values,
DTN gate usage against the gates' own outputs, the report files, and on dtn-synth data the
planted cross fields of each task ranking first for that task."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from inference_utils import (
    TINY_DTN,
    make_dataset,
    random_features,
    run_config,
    save_checkpoint,
    toy_schema,
    train_steps,
    write_config,
)
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dtn_torchrec.analysis.analyze import analyze
from dtn_torchrec.analysis.gates import gate_usage
from dtn_torchrec.analysis.importance import (
    ImportanceConfig,
    permutation_importance,
    permutation_seed,
)
from dtn_torchrec.analysis.report import ANALYSIS_JSON, DIVERGENCE_CSV, GATES_CSV, IMPORTANCE_CSV
from dtn_torchrec.analysis.rows import EvalRows, FieldBags
from dtn_torchrec.atomic_files import OUTPUT_MARKER
from dtn_torchrec.data.batch import Batch
from dtn_torchrec.data.reader import ParquetBatchReader
from dtn_torchrec.data.schema import SchemaSpec
from dtn_torchrec.models.builder import build_model
from dtn_torchrec.models.config import model_config_from_dict
from dtn_torchrec.train.config import load_run_config
from dtn_torchrec.train.metrics import binary_auc

VENV_BIN = Path(sys.executable).parent


# ------------------------------------------------------------------ rows and permutation


def _bags(lists: List[List[int]], weighted: bool) -> FieldBags:
    values = [v for row in lists for v in row]
    return FieldBags(
        lengths=torch.tensor([len(r) for r in lists], dtype=torch.int32),
        values=torch.tensor(values, dtype=torch.int64),
        weights=torch.tensor([v / 10 for v in values], dtype=torch.float32) if weighted else None,
    )


def _lists(bags: FieldBags) -> List[List[int]]:
    out, offsets = [], bags.offsets.tolist()
    for i in range(len(bags.lengths)):
        out.append(bags.values[offsets[i] : offsets[i + 1]].tolist())
    return out


def test_permuting_a_field_moves_whole_bags_and_nothing_else() -> None:
    a = [[1], [2, 3], [], [4, 5, 6], [7]]
    b = [[10, 11], [], [12], [13], [14, 15, 16]]
    rows = EvalRows(
        fields={"a": _bags(a, True), "b": _bags(b, True)},
        labels=torch.arange(10, dtype=torch.float32).view(5, 2),
        sample_ids=torch.arange(100, 105),
    )
    perm = torch.tensor([3, 0, 4, 1, 2])
    permuted = rows.with_field_permuted("b", perm)
    assert _lists(permuted.fields["b"]) == [b[i] for i in perm.tolist()]
    assert _lists(permuted.fields["a"]) == a and torch.equal(permuted.labels, rows.labels)
    # weights travel with their ids
    torch.testing.assert_close(
        permuted.fields["b"].weights, permuted.fields["b"].values.float() / 10
    )
    kjt = permuted.features(1, 4)
    assert kjt.keys() == ["a", "b"] and kjt.stride() == 3
    assert [jt.tolist() for jt in kjt["a"].to_dense()] == a[1:4]
    assert [jt.tolist() for jt in kjt["b"].to_dense()] == [b[i] for i in perm.tolist()[1:4]]
    torch.testing.assert_close(kjt.weights(), kjt.values().float() / 10)


def test_rows_from_batches_concatenate_and_stop_at_max_rows() -> None:
    schema = toy_schema()
    batches = [
        Batch(
            random_features(schema, n, seed=n),
            torch.full((n, 2), float(n)),
            torch.arange(n) + 10 * n,
        )
        for n in (4, 0, 5, 3)
    ]
    rows = EvalRows.from_batches(batches, max_rows=7)
    assert rows.num_rows == 7 and rows.sample_ids.tolist() == [40, 41, 42, 43, 50, 51, 52]
    for name in schema.field_names:
        expected = [r.tolist() for r in batches[0].sparse_features[name].to_dense()]
        expected += [r.tolist() for r in batches[2].sparse_features[name].to_dense()][:3]
        assert _lists(rows.fields[name]) == expected


# ------------------------------------------------------------------ importance on a known model


class _TwoFieldModel(nn.Module):
    """Task 0's logit is a function of field ``a``'s first id, task 1's of field ``b``'s; ``c``
    is ignored."""

    def __init__(self) -> None:
        super().__init__()
        self.effect = nn.Parameter(torch.linspace(-2, 2, 10))

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        first = {k: features[k].values()[features[k].offsets()[:-1]] for k in ("a", "b")}
        return torch.stack([self.effect[first["a"]], -self.effect[first["b"]]], dim=1)


def _known_rows(n: int = 600) -> EvalRows:
    g = torch.Generator().manual_seed(3)
    ids = {k: torch.randint(0, 10, (n,), generator=g) for k in ("a", "b", "c")}
    fields = {k: FieldBags(torch.ones(n, dtype=torch.int32), v) for k, v in ids.items()}
    logits = _TwoFieldModel()(EvalRows(fields, torch.zeros(n, 2), torch.arange(n)).features(0, n))
    labels = torch.bernoulli(torch.sigmoid(logits).detach(), generator=g)
    return EvalRows(fields, labels, torch.arange(n))


def test_importance_matches_a_hand_computation_and_ignored_fields_score_zero() -> None:
    rows, model = _known_rows(), _TwoFieldModel()
    config = ImportanceConfig(repeats=3, seed=5, batch_size=128)
    result = permutation_importance(model, rows, ["t0", "t1"], [0, 1], config)
    # an ignored field changes no logit: every importance is exactly zero
    for task in ("t0", "t1"):
        assert result.importance["c"][task] == {
            "auc_drop": 0.0,
            "auc_drop_std": 0.0,
            "logloss_increase": 0.0,
            "logloss_increase_std": 0.0,
        }
    assert (
        result.importance["b"]["t0"]["auc_drop"] == 0.0
        and result.importance["a"]["t1"]["auc_drop"] == 0.0
    )
    # field a for task 0, recomputed from the definition with the same permutations
    base = binary_auc(model(rows.features(0, rows.num_rows))[:, 0].detach(), rows.labels[:, 0])
    drops = []
    for repeat in range(3):
        g = torch.Generator().manual_seed(permutation_seed(5, 0, repeat))
        permuted = rows.with_field_permuted("a", torch.randperm(rows.num_rows, generator=g))
        logits = model(permuted.features(0, rows.num_rows))[:, 0].detach()
        drops.append(base - binary_auc(logits, rows.labels[:, 0]))
    assert result.importance["a"]["t0"]["auc_drop"] == pytest.approx(
        float(np.mean(drops)), abs=1e-12
    )
    assert result.importance["a"]["t0"]["auc_drop_std"] == pytest.approx(
        float(np.std(drops)), abs=1e-12
    )
    assert result.importance["a"]["t0"]["auc_drop"] > 0.1
    assert result.ranking("t0")[0] == "a" and result.ranking("t1")[0] == "b"
    assert result.share["t0"] == {"a": 1.0, "b": 0.0, "c": 0.0}
    assert result.divergence["a"] == {"share_spread": 1.0, "rank_spread": 1.0}
    assert result.divergence["c"] == {"share_spread": 0.0, "rank_spread": 0.0}


def test_permutations_do_not_depend_on_which_fields_are_analysed() -> None:
    rows, model = _known_rows(), _TwoFieldModel()
    config = ImportanceConfig(repeats=2, seed=1)
    all_fields = permutation_importance(model, rows, ["t0", "t1"], [0, 1], config)
    only_b = permutation_importance(model, rows, ["t0", "t1"], [0, 1], config, fields=["b"])
    assert only_b.fields == ["b"] and only_b.importance["b"] == all_fields.importance["b"]


# ------------------------------------------------------------------ DTN gates


def test_gate_usage_is_the_mean_of_each_gates_softmax() -> None:
    schema = toy_schema()
    torch.manual_seed(2)
    model = build_model(model_config_from_dict(TINY_DTN), schema).eval()
    features = random_features(schema, 300, seed=9)
    rows = EvalRows.from_batches([Batch(features, torch.zeros(300, 2), torch.arange(300))])
    found = gate_usage(model, model_config_from_dict(TINY_DTN).architecture, rows, 64)
    usages = {(u.task, u.gate): u for u in found}
    assert list(usages) == [
        ("click", "own"),
        ("click", "other_shared"),
        ("conversion", "own"),
        ("conversion", "other_shared"),
    ]
    dtn = model.dense_arch
    with torch.no_grad():
        inputs = model.sparse_arch(features)
        groups = dtn._group_outputs(inputs)  # group -> [B, K, H], fused positions included
        p_click = torch.sigmoid(dtn(inputs)[:, 0]).view(-1, 1, 1)  # TSN: conversion sees click x p
        expected = {
            ("click", "own"): dtn.own_gates["click"](groups["click"]),
            ("click", "other_shared"): dtn.other_gates["click"](
                torch.cat([groups["conversion"], groups["shared"]], 1)
            ),
            ("conversion", "own"): dtn.own_gates["conversion"](groups["conversion"]),
            ("conversion", "other_shared"): dtn.other_gates["conversion"](
                torch.cat([groups["click"] * p_click, groups["shared"]], 1)
            ),
        }
    for key, weights in expected.items():
        assert usages[key].mean == pytest.approx(weights.double().mean(0).tolist(), abs=1e-6)
        assert usages[key].std == pytest.approx(
            weights.double().std(0, unbiased=False).tolist(), abs=1e-6
        )
        assert sum(usages[key].mean) == pytest.approx(1.0)
    assert usages[("conversion", "other_shared")].experts == [
        "click/masknet",
        "click/memonet",
        "click/gdcn",
        "shared/masknet",
        "shared/memonet",
        "shared/gdcn",
    ]
    mmoe = build_model(model_config_from_dict({"name": "mmoe"}), schema)
    assert gate_usage(mmoe, model_config_from_dict({"name": "mmoe"}).architecture, rows, 64) is None


# ------------------------------------------------------------------ report files


def test_analyze_writes_consistent_tables_and_plots(tmp_path: Path, one_rank) -> None:
    data = make_dataset(tmp_path / "ds", train_rows=300, test_rows=200)
    torch.manual_seed(0)
    model = build_model(model_config_from_dict(TINY_DTN), SchemaSpec.load(data))
    save_checkpoint(model, tmp_path / "run" / "checkpoints", step=3)
    config = write_config(tmp_path / "c.yaml", run_config(data, tmp_path / "run"))
    out = tmp_path / "analysis"
    fields = ["121", "125", "206", "301"]
    outcome = analyze(
        load_run_config(config),
        tmp_path / "run",
        data,
        out,
        max_rows=150,
        importance=ImportanceConfig(repeats=2, batch_size=64),
        fields=fields,
    )
    assert sorted(os.listdir(out)) == sorted([OUTPUT_MARKER, *outcome.files])
    for png in ("importance_heatmap.png", "importance_divergence.png", "gate_usage.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / IMPORTANCE_CSV) as f:
        table = list(csv.DictReader(f))
    assert [(r["field"], r["task"]) for r in table] == [
        (f, t) for f in fields for t in ("click", "conversion")
    ]
    report = json.loads((out / ANALYSIS_JSON).read_text())
    assert report["rows"] == 150 and report["step"] == 3 and report["model"] == "dtn"
    for r in table:
        assert float(r["auc_drop"]) == pytest.approx(
            report["importance"][r["field"]][r["task"]]["auc_drop"]
        )
        assert int(r["rank"]) == report["ranking"][r["task"]].index(r["field"]) + 1
    with open(out / DIVERGENCE_CSV) as f:
        assert [r["field"] for r in csv.DictReader(f)] == fields
    with open(out / GATES_CSV) as f:
        gates = list(csv.DictReader(f))
    assert len(gates) == 2 * (3 + 6)
    for task in ("click", "conversion"):
        for gate in ("own", "other_shared"):
            weights = [
                float(g["mean_weight"]) for g in gates if (g["task"], g["gate"]) == (task, gate)
            ]
            assert sum(weights) == pytest.approx(1.0)
    with pytest.raises(
        FileExistsError, match="holds an earlier dtn-analyze output; pass --overwrite"
    ):
        analyze(load_run_config(config), tmp_path / "run", data, out, max_rows=10)
    for foreign in (tmp_path / "run", data, tmp_path):
        with pytest.raises(FileExistsError, match="is or contains this command's input"):
            analyze(load_run_config(config), tmp_path / "run", data, foreign, overwrite=True)


@pytest.mark.slow
def test_cli_prints_rankings_and_fails_in_one_line(tmp_path: Path, one_rank) -> None:
    data = make_dataset(tmp_path / "ds", train_rows=300, test_rows=200)
    torch.manual_seed(0)
    model = build_model(model_config_from_dict(TINY_DTN), SchemaSpec.load(data))
    save_checkpoint(model, tmp_path / "run" / "checkpoints")
    config = write_config(tmp_path / "c.yaml", run_config(data, tmp_path / "run"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [
        str(VENV_BIN / "dtn-analyze"),
        "--config",
        str(config),
        "--checkpoint",
        str(tmp_path / "run"),
        "--input",
        str(data),
        "--output",
        str(tmp_path / "a"),
        "--max-rows",
        "100",
        "--repeats",
        "1",
    ]
    ok = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (
        "[importance] click: " in ok.stdout
        and "[gates] conversion other_shared: click/masknet=" in ok.stdout
    )
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 1
    assert again.stderr.strip().splitlines()[-1] == (
        f"dtn-analyze: error: --output {tmp_path / 'a'} holds an earlier dtn-analyze output; "
        "pass --overwrite to replace it"
    )


# ------------------------------------------------------------------ planted signal


@pytest.mark.slow
def test_planted_cross_fields_rank_first_for_their_task(tmp_path: Path) -> None:
    """dtn-synth plants click = f(121 x 206) and conversion | click = f(125 x 206) (truth.json).
    A DTN trained for one epoch must rank those fields first for those tasks; conversion is
    checked on its post-click AUC, as its entire-space label also carries the click signal."""
    data = make_dataset(tmp_path, train_rows=12000, test_rows=3000, seed=11)
    truth = json.loads((tmp_path / "raw" / "truth.json").read_text())["planted_crosses"]
    assert truth == {"click": ["121", "206"], "conversion": ["125", "206"]}
    section: Dict = {
        "name": "dtn",
        "tasks": ["click", "conversion"],
        "embedding": {"embedding_dim": 8, "pooling": "mean"},
        "tower": {"hidden_dims": [16]},
        "dtn": {
            "methods": [
                {
                    "kind": "masknet",
                    "output_dim": 16,
                    "num_mask_blocks": 1,
                    "mask_hidden_dim": 16,
                    "mask_block_dim": 16,
                    "mlp_dims": [16],
                },
                {"kind": "gdcn", "output_dim": 16, "num_cross_layers": 1},
            ]
        },
    }
    torch.manual_seed(0)
    model = build_model(model_config_from_dict(section), SchemaSpec.load(data))
    train = ParquetBatchReader(
        str(data), "train", 256, shuffle=True, shuffle_buffer_rows=4096, seed=1
    )
    train_steps(model, iter(train), lr=5e-3)
    rows = EvalRows.from_batches(ParquetBatchReader(str(data), "test", 4096))
    result = permutation_importance(
        model, rows, ["click", "conversion"], [0, 1], ImportanceConfig(repeats=1, batch_size=4096)
    )
    assert set(result.ranking("click")[:2]) == set(truth["click"])
    post_click = sorted(
        result.fields, key=lambda f: -result.importance[f]["conversion"]["cvr_auc_drop"]
    )
    assert set(post_click[:2]) == set(truth["conversion"])
    # the divergence DTN is built for: 125 matters to conversion only, 121 more to click
    assert result.share["conversion"]["125"] > result.share["click"]["125"]
    assert result.share["click"]["121"] > result.share["conversion"]["121"]
