"""dtn-predict: predictions per sample id equal a direct forward of the checkpoint's model (and the
trainer's evaluation) on 1 and 2 ranks; bad checkpoints, configs, datasets and outputs fail with
a clear message and leave nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pyarrow.parquet as pq
import pytest
import torch
from dist_utils import run_on_ranks
from inference_utils import (
    TINY_DTN,
    make_dataset,
    run_config,
    save_checkpoint,
    train_steps,
    write_config,
)

from dtn_torchrec.atomic_files import OUTPUT_MARKER
from dtn_torchrec.data.prepare import PrepareOptions, prepare_dataset
from dtn_torchrec.data.reader import ParquetBatchReader
from dtn_torchrec.data.schema import SchemaSpec
from dtn_torchrec.distributed.launch import DistributedContext
from dtn_torchrec.models.builder import build_model
from dtn_torchrec.models.config import model_config_from_dict
from dtn_torchrec.models.model import MultiTaskModel
from dtn_torchrec.serving import scoring
from dtn_torchrec.serving.loading import (
    CheckpointMismatchError,
    SchemaMismatchError,
    load_unsharded_model,
    resolve_checkpoint,
)
from dtn_torchrec.serving.scoring import (
    METRICS_FILE,
    PREDICT_SUMMARY_FILE,
    PREDICTIONS_DIR,
    predict,
)
from dtn_torchrec.train.config import load_run_config
from dtn_torchrec.train.metrics import compute_task_metrics

VENV_BIN = Path(sys.executable).parent
TASKS = ["click", "conversion"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_rank: DistributedContext) -> Dict[str, Any]:
    """A dataset, a briefly trained tiny DTN checkpointed as dtn-train does, its config."""
    root = tmp_path_factory.mktemp("predict")
    data = make_dataset(root)
    schema = SchemaSpec.load(data)
    torch.manual_seed(0)
    model = build_model(model_config_from_dict(TINY_DTN), schema)
    train_steps(
        model, iter(ParquetBatchReader(str(data), "train", 64, prefetch_batches=0)), lr=1e-2
    )
    save_checkpoint(model, root / "run" / "checkpoints", step=7)
    config = write_config(root / "config.yaml", run_config(data, root / "run"))
    return {"root": root, "data": data, "model": model, "config": config, "run": root / "run"}


def _direct(model: MultiTaskModel, data: Path, split: str = "test") -> Dict[str, torch.Tensor]:
    """sample_id -> logits [T] and labels of a plain single-process forward of ``model``."""
    logits, labels, ids = [], [], []
    with torch.no_grad():
        for batch in ParquetBatchReader(str(data), split, 50, prefetch_batches=0):
            logits.append(model(batch.sparse_features))
            labels.append(batch.labels)
            ids.append(batch.sample_ids)
    return {"ids": torch.cat(ids), "logits": torch.cat(logits), "labels": torch.cat(labels)}


def _read_predictions(out: Path) -> Dict[int, Dict[str, float]]:
    table = pq.read_table(out / PREDICTIONS_DIR).to_pylist()
    by_id = {row["sample_id"]: row for row in table}
    assert len(by_id) == len(table), "a sample id was scored twice"
    return by_id


def _assert_matches_direct(out: Path, direct: Dict[str, torch.Tensor]) -> None:
    rows = _read_predictions(out)
    assert sorted(rows) == sorted(direct["ids"].tolist())
    probs = torch.sigmoid(direct["logits"])
    for i, sample_id in enumerate(direct["ids"].tolist()):
        row = rows[sample_id]
        for t, task in enumerate(TASKS):
            assert row[f"p_{task}"] == pytest.approx(float(probs[i, t]), abs=1e-6), (
                sample_id,
                task,
            )
            assert row[task] == float(direct["labels"][i, t])


def _assert_same_metrics(got: Dict[str, Any], expected: Dict[str, Any]) -> None:
    assert got.keys() == expected.keys()
    for task in expected:
        for name, value in expected[task].items():
            if value is None:
                assert got[task][name] is None, (task, name)
            else:
                assert got[task][name] == pytest.approx(value, abs=1e-6), (task, name)


def test_one_rank_predictions_equal_a_direct_forward(setup, one_rank, tmp_path: Path) -> None:
    cfg = load_run_config(setup["config"])
    out = tmp_path / "pred"
    summary = predict(cfg, setup["run"], setup["data"], out, one_rank, batch_size=37)
    direct = _direct(setup["model"], setup["data"])
    _assert_matches_direct(out, direct)
    expected = compute_task_metrics(direct["logits"], direct["labels"], TASKS)
    _assert_same_metrics(json.loads((out / METRICS_FILE).read_text())["test"], expected)
    written = json.loads((out / PREDICT_SUMMARY_FILE).read_text())
    rows = SchemaSpec.load(setup["data"]).splits["test"].rows
    assert written["rows"] == summary.rows == rows and written["step"] == 7
    assert written["throughput"]["rows_per_s"] > 0 and written["batch_size"] == 37
    assert sorted(p.name for p in (out / PREDICTIONS_DIR).iterdir()) == [
        "part-00000-of-00001.parquet"
    ]
    assert [p.name for p in out.parent.iterdir()] == ["pred"]  # no staging debris


def test_checkpoint_is_found_from_run_root_or_step_dir(setup, one_rank, tmp_path: Path) -> None:
    cfg = load_run_config(setup["config"])
    step_dir = setup["run"] / "checkpoints" / "step_7"
    for i, where in enumerate([setup["run"] / "checkpoints", step_dir]):
        assert predict(cfg, where, setup["data"], tmp_path / str(i), one_rank).step == 7
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        predict(cfg, setup["root"], setup["data"], tmp_path / "x", one_rank)
    assert not (tmp_path / "x").exists()


def _no_output(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_dataset_with_other_vocabulary_is_refused(setup, one_rank, tmp_path: Path) -> None:
    other = tmp_path / "other"
    prepare_dataset(
        "aliccp-raw", setup["root"] / "raw", other, PrepareOptions(progress=False, min_count=2)
    )
    cfg = load_run_config(setup["config"])
    out = tmp_path / "pred"
    # against the training dataset named by data.path
    differs = r"schema.json differs from the training dataset .*field '101' has \d+ ids"
    with pytest.raises(SchemaMismatchError, match=differs):
        predict(cfg, setup["run"], other, out, one_rank)
    _no_output(out)
    # without the training dataset: against the checkpoint's table shapes
    cfg.data.path = str(tmp_path / "moved")
    tables = (
        r"does not match the tables of checkpoint .*"
        r"field '101' has \d+ ids in the dataset, \d+ rows in the checkpoint"
    )
    with pytest.raises(SchemaMismatchError, match=tables):
        predict(cfg, setup["run"], other, out, one_rank)
    _no_output(out)


def test_config_that_does_not_match_the_checkpoint_is_refused(
    setup, one_rank, tmp_path: Path
) -> None:
    out = tmp_path / "pred"
    for overrides, key in [
        (
            ["model.tower.hidden_dims=[16]"],
            r"; shape differs: model\.dense_arch\.towers\.click\.mlp\.0\.weight is \[8, 8\] in the "
            r"checkpoint, \[16, 8\] here",
        ),
        (
            ["model.embedding.embedding_dim=8"],
            r"embedding_bags\.t_101\.weight is \[\d+, 4\] in the checkpoint, \[\d+, 8\] here",
        ),
        (
            ["model.name=mmoe", "model.dtn=null"],
            r"; missing from the checkpoint: model\.dense_arch\.experts\..*; "
            r"not in the model: model\.dense_arch\.groups\.",
        ),
    ]:
        cfg = load_run_config(setup["config"], overrides)
        with pytest.raises(CheckpointMismatchError, match=key):
            predict(cfg, setup["run"], setup["data"], out, one_rank)
        _no_output(out)


def test_corrupt_inputs_fail_clearly_and_write_nothing(setup, one_rank, tmp_path: Path) -> None:
    cfg = load_run_config(setup["config"])
    out = tmp_path / "pred"
    data = tmp_path / "data"
    shutil.copytree(setup["data"], data)
    (part,) = (data / "test").iterdir()
    part.write_bytes(part.read_bytes()[:200])
    with pytest.raises(ValueError, match=f"{part}: not a readable Parquet file"):
        predict(cfg, setup["run"], data, out, one_rank)
    _no_output(out)

    run = tmp_path / "run"
    shutil.copytree(setup["run"], run)
    step = run / "checkpoints" / "step_7"
    (distcp,) = step.glob("*.distcp")
    distcp.write_bytes(distcp.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{distcp}: 100 bytes, [0-9]+ when it was written"):
        predict(cfg, run, setup["data"], out, one_rank)
    _no_output(out)
    (step / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=f"{step / '.metadata'}: 12 bytes"):
        predict(cfg, step, setup["data"], out, one_rank)
    _no_output(out)


def test_overwrite_replaces_only_own_output(setup, one_rank, tmp_path: Path) -> None:
    cfg = load_run_config(setup["config"])
    out = tmp_path / "pred"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=f"--output {out} is not empty and has no "):
            predict(cfg, setup["run"], setup["data"], out, one_rank, overwrite=overwrite)
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    predict(cfg, setup["run"], setup["data"], out, one_rank)
    with pytest.raises(FileExistsError, match=f"--output {out} holds an earlier dtn-predict"):
        predict(cfg, setup["run"], setup["data"], out, one_rank)
    predict(cfg, setup["run"], setup["data"], out, one_rank, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        OUTPUT_MARKER,
        METRICS_FILE,
        PREDICT_SUMMARY_FILE,
        PREDICTIONS_DIR,
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["pred"]


@pytest.mark.parametrize("target", ["run", "checkpoints", "data", "root"])
def test_overwrite_never_replaces_run_input_or_their_parents(setup, one_rank, target: str) -> None:
    cfg = load_run_config(setup["config"])
    out = {
        "run": setup["run"],
        "checkpoints": setup["run"] / "checkpoints",
        "data": setup["data"],
        "root": setup["root"],
    }[target]
    before = sorted(p.relative_to(setup["root"]) for p in setup["root"].rglob("*"))
    with pytest.raises(
        FileExistsError, match=f"--output {out} is or contains this command's input"
    ):
        predict(cfg, setup["run"], setup["data"], out, one_rank, overwrite=True)
    assert sorted(p.relative_to(setup["root"]) for p in setup["root"].rglob("*")) == before


# ------------------------------------------------------------------ several ranks


def _failing_reader_rank(fail_rank: int) -> List[Any]:
    """Rank ``fail_rank``'s batch iterator raises at its third batch; every rank must stop there."""
    agreement = scoring._RankAgreement(torch.device("cpu"))

    def batches():
        for i in range(5):
            if i == 2 and torch.distributed.get_rank() == fail_rank:
                raise ValueError("part-1.parquet: row group 3: cannot read")
            yield i

    seen: List[Any] = []
    try:
        for batch in scoring._agreed_batches(batches(), agreement):
            seen.append(batch)
    except (RuntimeError, ValueError) as e:
        return seen + [type(e).__name__, str(e)]
    return seen


@pytest.mark.slow
def test_a_rank_that_cannot_read_stops_every_rank_with_its_message() -> None:
    results = run_on_ranks(_failing_reader_rank, 2, fail_rank=1)
    assert results == [
        [0, 1, "RuntimeError", "rank 1: part-1.parquet: row group 3: cannot read"],
        [0, 1, "ValueError", "part-1.parquet: row group 3: cannot read"],
    ]


def _predict_on_rank(config: str, checkpoint: str, data: str, out: str) -> int:
    ctx = DistributedContext(
        torch.distributed.get_rank(),
        torch.distributed.get_world_size(),
        0,
        torch.device("cpu"),
        "gloo",
    )
    return predict(load_run_config(config), checkpoint, data, out, ctx, batch_size=29).rows


@pytest.mark.slow
def test_two_ranks_predict_what_one_rank_does(setup, tmp_path: Path) -> None:
    out = tmp_path / "two"
    rows = run_on_ranks(
        _predict_on_rank,
        2,
        config=str(setup["config"]),
        checkpoint=str(setup["run"]),
        data=str(setup["data"]),
        out=str(out),
    )
    assert rows == [SchemaSpec.load(setup["data"]).splits["test"].rows] * 2
    assert sorted(p.name for p in (out / PREDICTIONS_DIR).iterdir()) == [
        "part-00000-of-00002.parquet",
        "part-00001-of-00002.parquet",
    ]
    direct = _direct(setup["model"], setup["data"])
    _assert_matches_direct(out, direct)
    expected = compute_task_metrics(direct["logits"], direct["labels"], TASKS)
    _assert_same_metrics(json.loads((out / METRICS_FILE).read_text())["test"], expected)


# ------------------------------------------------------------------ command line, torchrun


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    for key in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "TORCHELASTIC_RESTART_COUNT",
    ):
        env.pop(key, None)
    return env


def _run(cmd: List[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)


def _torchrun(nproc: int, module: str, args: List[str]) -> subprocess.CompletedProcess:
    return _run(
        [
            str(VENV_BIN / "torchrun"),
            "--nproc_per_node",
            str(nproc),
            "--rdzv_backend",
            "c10d",
            "--rdzv_endpoint",
            "localhost:0",
            "-m",
            module,
            *args,
        ]
    )


@pytest.mark.slow
def test_cli_reports_one_line_errors(setup, tmp_path: Path) -> None:
    base = [
        str(VENV_BIN / "dtn-predict"),
        "--config",
        str(setup["config"]),
        "--checkpoint",
        str(setup["run"]),
        "--input",
        str(setup["data"]),
    ]
    bad = _run([*base, "--output", str(tmp_path / "o"), "model.tower.hidden_dims=[16]"])
    assert bad.returncode == 1
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("dtn-predict: error: checkpoint ")
    assert "does not hold the model the config describes" in last
    assert not (tmp_path / "o").exists()
    usage = _run(base)
    assert usage.returncode == 2
    assert usage.stderr.strip().splitlines()[-1] == (
        "dtn-predict: error: give exactly one of --output (score) and --export (export for serving)"
    )


@pytest.mark.slow
def test_cli_on_a_two_rank_dtn_train_checkpoint_matches_training_evaluation(
    setup, tmp_path: Path
) -> None:
    """dtn-train on 2 ranks (sharded tables); dtn-predict on 1 and 2 ranks reshards the checkpoint
    and reproduces the trainer's final test metrics and a direct forward per sample id."""
    config = write_config(tmp_path / "train.yaml", run_config(setup["data"], tmp_path / "run"))
    train = _torchrun(2, "dtn_torchrec.cli.train", ["--config", str(config), "train.max_steps=4"])
    assert train.returncode == 0, train.stderr[-4000:]
    trained = json.loads((tmp_path / "run" / "summary.json").read_text())
    cfg = load_run_config(config)
    schema = SchemaSpec.load(setup["data"])
    model = load_unsharded_model(cfg, schema, resolve_checkpoint(tmp_path / "run"), setup["data"])
    direct = _direct(model, setup["data"])
    for nproc in (1, 2):
        out = tmp_path / f"pred{nproc}"
        proc = _torchrun(
            nproc,
            "dtn_torchrec.cli.predict",
            [
                "--config",
                str(config),
                "--checkpoint",
                str(tmp_path / "run"),
                "--input",
                str(setup["data"]),
                "--output",
                str(out),
            ],
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert f"scored on {nproc} rank(s)" in proc.stdout
        _assert_matches_direct(out, direct)
        _assert_same_metrics(json.loads((out / METRICS_FILE).read_text())["test"], trained["test"])
