"""TorchScript export: the saved file reproduces the trained model (fp32 exactly, int8 within the
stated tolerance) on batches it was not checked on, and refuses to publish a diverging export."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Tuple

import pytest
import torch
from inference_utils import (
    TINY_DTN,
    make_dataset,
    random_features,
    run_config,
    save_checkpoint,
    toy_schema,
    write_config,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dtn_torchrec.data.reader import ParquetBatchReader
from dtn_torchrec.data.schema import SchemaSpec
from dtn_torchrec.models.builder import build_model
from dtn_torchrec.models.config import model_config_from_dict
from dtn_torchrec.models.model import MultiTaskModel
from dtn_torchrec.serving import export as export_module
from dtn_torchrec.serving.export import TOLERANCES, export_model, flat_inputs, report_path


def _model(weighted: bool = False) -> MultiTaskModel:
    section = copy.deepcopy(TINY_DTN)
    section["embedding"]["use_weights"] = weighted
    torch.manual_seed(0)
    model = build_model(model_config_from_dict(section), toy_schema()).eval()
    with torch.no_grad():  # spread the tables so that int8 rounding is visible
        for name, param in model.named_parameters():
            if "embedding_bags" in name or "codebook" in name:
                param.normal_(0.0, 0.5)
    return model


def _table_shapes(model: MultiTaskModel) -> list:
    shapes = [
        tuple(p.shape)
        for n, p in model.named_parameters()
        if "embedding_bags" in n or "codebook" in n
    ]
    assert len(shapes) == 6 + 3  # one table per field, one MemoNet codebook per group
    return shapes


def _probs(model: MultiTaskModel, features: KeyedJaggedTensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.sigmoid(model(features))


@pytest.fixture(scope="module")
def fp32_export(tmp_path_factory) -> Tuple[MultiTaskModel, Path, Dict[str, Any]]:
    model, schema = _model(), toy_schema()
    path = tmp_path_factory.mktemp("export") / "model.pt"
    sample = random_features(schema, 32, seed=1)
    report = export_model(model, schema.field_names, path, sample, latency_repeats=5)
    return model, path, report


def test_fp32_export_reproduces_the_model_on_unseen_batches(fp32_export) -> None:
    model, path, report = fp32_export
    schema = toy_schema()
    loaded = torch.jit.load(str(path))
    for batch_size, seed in ((57, 2), (1, 3), (256, 4)):
        features = random_features(schema, batch_size, seed)
        exported = loaded(*flat_inputs(features, schema.field_names, weighted=False))
        assert exported.shape == (batch_size, 2) and not exported.requires_grad
        torch.testing.assert_close(exported, _probs(model, features), rtol=0, atol=1e-6)
    on_disk = json.loads(report_path(path).read_text())
    assert on_disk == report
    assert report["file_bytes"] == os.path.getsize(path)
    assert report["quantization"] == "none" and report["check"]["rows"] == 32
    assert report["check"]["max_abs_diff"] <= TOLERANCES["none"]
    assert report["inputs"]["keys"] == schema.field_names
    assert report["outputs"]["tasks"] == ["click", "conversion"]
    latency = report["latency_ms_per_batch"]
    assert latency["batch_size"] == 32 and 0 < latency["min"] <= latency["median"] <= latency["p90"]


def test_exported_inputs_follow_the_listed_key_order(fp32_export) -> None:
    model, path, _ = fp32_export
    schema = toy_schema()
    features = random_features(schema, 40, seed=5)
    reversed_keys = features.permute(list(range(len(schema.fields)))[::-1])
    assert reversed_keys.keys() != features.keys()
    loaded = torch.jit.load(str(path))
    exported = loaded(*flat_inputs(reversed_keys, schema.field_names, weighted=False))
    torch.testing.assert_close(exported, _probs(model, features), rtol=0, atol=1e-6)


@pytest.mark.slow  # quantises / scripts a whole model: seconds
def test_int8_export_quantises_every_table_within_tolerance(tmp_path: Path) -> None:
    model, schema = _model(), toy_schema()
    path = tmp_path / "model_int8.pt"
    report = export_model(
        model,
        schema.field_names,
        path,
        random_features(schema, 64, seed=1),
        quantization="int8",
        latency_repeats=1,
    )
    loaded = torch.jit.load(str(path))
    state = loaded.state_dict().values()
    # FBGEMM packs each collection's int8 rows (plus per-row scale and bias) into uint8 buffers.
    int8_bytes = sum(t.numel() for t in state if t.dtype == torch.uint8)
    assert int8_bytes >= sum(rows * dim for rows, dim in _table_shapes(model))
    float_shapes = {tuple(t.shape) for t in state if t.is_floating_point()}
    assert not float_shapes & set(_table_shapes(model))
    features = random_features(schema, 200, seed=7)
    diff = (
        (loaded(*flat_inputs(features, schema.field_names, False)) - _probs(model, features))
        .abs()
        .max()
    )
    assert 0 < float(diff) <= TOLERANCES["int8"]
    assert 0 < report["check"]["max_abs_diff"] <= TOLERANCES["int8"]
    assert report["quantization"] == "int8"


@pytest.mark.slow  # quantises / scripts a whole model: seconds
def test_weighted_model_exports_a_weights_input(tmp_path: Path) -> None:
    model, schema = _model(weighted=True), toy_schema()
    path = tmp_path / "weighted.pt"
    report = export_model(
        model,
        schema.field_names,
        path,
        random_features(schema, 16, seed=1, weighted=True),
        weighted=True,
        latency_repeats=1,
    )
    assert report["inputs"]["signature"] == "(values, lengths, weights)"
    loaded = torch.jit.load(str(path))
    features = random_features(schema, 48, seed=8, weighted=True)
    values, lengths, weights = flat_inputs(features, schema.field_names, weighted=True)
    torch.testing.assert_close(
        loaded(values, lengths, weights), _probs(model, features), rtol=0, atol=1e-6
    )
    assert not torch.allclose(
        loaded(values, lengths, weights * 3.0), loaded(values, lengths, weights)
    )


def test_export_beyond_tolerance_is_refused_and_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    model, schema = _model(), toy_schema()
    monkeypatch.setitem(export_module.TOLERANCES, "int8", 0.0)
    with pytest.raises(
        ValueError, match=r"export check failed: the int8 export differs .* \(tolerance 0\)"
    ):
        export_model(
            model,
            schema.field_names,
            tmp_path / "m.pt",
            random_features(schema, 32, 1),
            quantization="int8",
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_exports_a_checkpoint_and_reports_size_and_latency(tmp_path: Path, one_rank) -> None:
    data = make_dataset(tmp_path / "ds", train_rows=300, test_rows=100)
    schema = SchemaSpec.load(data)
    torch.manual_seed(0)
    model = build_model(model_config_from_dict(TINY_DTN), schema).eval()
    save_checkpoint(model, tmp_path / "run" / "checkpoints", step=5)
    config = write_config(tmp_path / "c.yaml", run_config(data, tmp_path / "run"))
    path = tmp_path / "serving" / "dtn.pt"
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "dtn-predict"),
            "--config",
            str(config),
            "--checkpoint",
            str(tmp_path / "run"),
            "--input",
            str(data),
            "--export",
            str(path),
            "--batch-size",
            "64",
            "--quantize",
            "int8",
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(report_path(path).read_text())
    assert f"[export] {path}: " in proc.stdout and "ms per batch of 64 rows" in proc.stdout
    assert report["step"] == 5 and report["file_bytes"] == os.path.getsize(path)
    assert report["quantization"] == "int8" and report["check"]["rows"] == 64
    features = next(
        iter(ParquetBatchReader(str(data), "test", 100, prefetch_batches=0))
    ).sparse_features
    exported = torch.jit.load(str(path))(*flat_inputs(features, schema.field_names, weighted=False))
    assert float((exported - _probs(model, features)).abs().max()) <= TOLERANCES["int8"]
