"""The trainer in-process on one rank (a gloo group on an in-memory store, as dtn-train without
torchrun): steps, evaluation, checkpoints, exact resume, best-checkpoint selection and early
stopping, through ``run_training`` on a tiny synthetic Ali-CCP set."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from dtn_torchrec.data.prepare import PrepareOptions, prepare_dataset
from dtn_torchrec.data.schema import SchemaSpec
from dtn_torchrec.data.synth import SynthConfig, generate
from dtn_torchrec.distributed.checkpoint import CheckpointManager
from dtn_torchrec.distributed.launch import DistributedContext, init_distributed
from dtn_torchrec.serving.loading import resolve_checkpoint
from dtn_torchrec.train.config import run_config_from_dict
from dtn_torchrec.train.evaluation import Evaluator
from dtn_torchrec.train.selection import metrics_at
from dtn_torchrec.train.session import run_training

BATCH = 64
# 900 train rows, 15 % of them moved to valid: 11 batches of 64 per epoch.
STEPS_PER_EPOCH = 11
REAL_EVALUATE = Evaluator.evaluate


def _config(data: Path, out: Path, train: Dict[str, Any], data_extra: Dict[str, Any]) -> Dict:
    return {
        "seed": 5,
        "data": {
            "path": str(data),
            "batch_size": BATCH,
            "eval_batch_size": 128,
            "shuffle_buffer_rows": 256,
            **data_extra,
        },
        "model": {
            "name": "mmoe",
            "tasks": ["click", "conversion"],
            "embedding": {"embedding_dim": 8, "pooling": "mean"},
            "tower": {"hidden_dims": [16]},
            "mmoe": {
                "num_experts": 2,
                "expert": {"kind": "mlp", "hidden_dims": [16], "output_dim": 16},
            },
        },
        "train": {
            "epochs": 2,
            "log_every_steps": 2,
            "dense_optimizer": {
                "name": "adam",
                "lr": 3.0e-3,
                "warmup_steps": 2,
                "decay": "linear",
                "decay_steps": 10,
            },
            "sparse_optimizer": {"name": "rowwise_adagrad", "lr": 0.05},
            **train,
        },
        "output": {"dir": str(out), "tensorboard": False},
    }


@pytest.fixture(scope="module")
def rank() -> Iterator[DistributedContext]:
    """This process as a one-rank job."""
    started = not dist.is_initialized()
    ctx = init_distributed() if started else None
    yield ctx or DistributedContext(0, 1, 0, torch.device("cpu"), "gloo")
    if started:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trainer")
    generate(
        SynthConfig(
            train_rows=900,
            test_rows=301,
            seed=20240,
            id_scale=0.001,
            history_scale=0.05,
            rows_per_user=5,
        ),
        root / "raw",
    )
    prepare_dataset(
        "aliccp-raw",
        root / "raw",
        root / "data",
        PrepareOptions(valid_fraction=0.15, seed=1, progress=False),
    )
    return root / "data"


def _train(
    rank: DistributedContext,
    dataset: Path,
    out: Path,
    resume: bool = False,
    data: Optional[Dict[str, Any]] = None,
    **train: Any,
) -> Dict[str, Any]:
    cfg = run_config_from_dict(_config(dataset, out, train, data or {}))
    return run_training(cfg, rank, resume=resume)


def _evaluated_steps(summary: Dict[str, Any], split: str) -> List[int]:
    return [h["step"] for h in summary["history"] if h["split"] == split]


def _checkpoint_tensors(out: Path, step: int, tmp: Path) -> Dict[str, torch.Tensor]:
    """Model and optimiser tensors of checkpoint ``step``, flattened by dotted name."""
    target = tmp / f"{out.name}_step{step}.pt"
    dcp_to_torch_save(out / "checkpoints" / f"step_{step}", target)
    flat: Dict[str, torch.Tensor] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                visit(f"{prefix}.{key}", item)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value

    visit("", torch.load(target, weights_only=False))
    return flat


def _scripted_valid_auc(aucs: List[float]) -> Callable[[Evaluator, str], Dict]:
    """An ``Evaluator.evaluate`` whose valid AUCs (every task) are ``aucs`` in turn."""
    scores = iter(aucs)

    def evaluate(self: Evaluator, split: str) -> Dict:
        metrics = REAL_EVALUATE(self, split)
        if split == "valid":
            auc = next(scores)
            metrics = {task: {**values, "auc": auc} for task, values in metrics.items()}
        return metrics

    return evaluate


def test_steps_evaluations_and_checkpoints(rank, dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = _train(rank, dataset, out, max_steps=4, eval_every_steps=2)
    schema = SchemaSpec.load(dataset)
    assert summary["steps"] == 4 and summary["epochs"] == 0 and summary["world_size"] == 1
    assert summary["throughput"]["train_samples"] == 4 * BATCH
    assert _evaluated_steps(summary, "valid") == _evaluated_steps(summary, "test") == [2, 4]
    for split in ("valid", "test"):
        for task in ("click", "conversion"):
            assert summary[split][task]["rows"] == schema.splits[split].rows
    # the run returns the better of its two valid evaluations, with every split at that step
    scores = {
        h["step"]: (h["metrics"]["click"]["auc"] + h["metrics"]["conversion"]["auc"]) / 2
        for h in summary["history"]
        if h["split"] == "valid"
    }
    best = max(scores, key=lambda step: (scores[step], -step))
    assert summary["selected"]["step"] == best
    assert summary["selected"]["score"] == pytest.approx(scores[best])
    assert {s: summary[s] for s in ("valid", "test")} == metrics_at(summary["history"], best)
    assert CheckpointManager(out / "checkpoints").complete_steps() == [2, 4]


def test_resume_mid_epoch_is_exact(rank, dataset: Path, tmp_path: Path) -> None:
    reference = _train(rank, dataset, tmp_path / "ref", max_steps=14)
    out = tmp_path / "resumed"
    _train(rank, dataset, out, max_steps=6)  # stops mid-epoch 0, checkpoint at step 6
    resumed = _train(rank, dataset, out, resume=True, max_steps=14)
    assert resumed["resumed_from_step"] == 6 and resumed["steps"] == 14
    assert _evaluated_steps(reference, "valid") == [STEPS_PER_EPOCH, 14]
    assert _evaluated_steps(resumed, "valid") == [6, STEPS_PER_EPOCH, 14]
    for step in (STEPS_PER_EPOCH, 14):  # evaluations after the resume match bit for bit
        assert metrics_at(resumed["history"], step) == metrics_at(reference["history"], step)
    ref_state = _checkpoint_tensors(tmp_path / "ref", 14, tmp_path)
    new_state = _checkpoint_tensors(out, 14, tmp_path)
    assert ref_state.keys() == new_state.keys() and len(ref_state) > 10
    for name, value in ref_state.items():
        assert torch.equal(new_state[name], value), name


def test_early_stopping_keeps_the_best_and_a_resume_continues_it(
    rank, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    common = dict(eval_every_steps=2, keep_checkpoints=1, select={"patience": 2})
    # valid AUC at steps 2, 4, 6, 8: the best is step 4; two evaluations later training stops
    monkeypatch.setattr(Evaluator, "evaluate", _scripted_valid_auc([0.6, 0.7, 0.65, 0.66]))
    reference = _train(rank, dataset, tmp_path / "ref", **common)
    assert reference["steps"] == 8 and reference["epochs"] == 0
    selected = reference["selected"]
    assert (selected["step"], selected["score"], selected["stopped_early"]) == (4, 0.7, True)
    assert reference["test"] == metrics_at(reference["history"], 4)["test"]
    assert reference["valid"]["click"]["auc"] == 0.7 == selected["valid"]["conversion"]["auc"]
    # keep_checkpoints=1 keeps the latest; the best survives pruning, and is what a run
    # directory hands to dtn-predict / dtn-analyze
    assert CheckpointManager(tmp_path / "ref" / "checkpoints").complete_steps() == [4, 8]
    assert resolve_checkpoint(tmp_path / "ref").step == 4
    assert resolve_checkpoint(tmp_path / "ref" / "checkpoints").step == 8

    out = tmp_path / "resumed"
    monkeypatch.setattr(Evaluator, "evaluate", _scripted_valid_auc([0.6, 0.7, 0.65]))
    first = _train(rank, dataset, out, max_steps=6, **common)
    assert first["selected"]["step"] == 4 and not first["selected"]["stopped_early"]
    assert CheckpointManager(out / "checkpoints").complete_steps() == [4, 6]
    # the resumed run knows step 4 is the best and that one evaluation since did not improve
    monkeypatch.setattr(Evaluator, "evaluate", _scripted_valid_auc([0.66]))
    resumed = _train(rank, dataset, out, resume=True, **common)
    assert resumed["steps"] == 8 and resumed["selected"] == reference["selected"]
    assert resumed["test"] == reference["test"]
    assert resumed["history"] == reference["history"]
    assert CheckpointManager(out / "checkpoints").complete_steps() == [4, 8]


def test_without_valid_split_the_last_evaluation_is_reported(
    rank, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    summary = _train(
        rank,
        dataset,
        tmp_path / "run",
        data={"valid_split": None},
        max_steps=4,
        eval_every_steps=2,
    )
    assert _evaluated_steps(summary, "test") == [2, 4] and "valid" not in summary
    assert summary["test"] == metrics_at(summary["history"], 4)["test"]
    assert summary["selected"] == {
        "step": 4,
        "epoch": 0,
        "valid": None,
        "score": None,
        "rule": "last evaluation (no valid split)",
        "stopped_early": False,
    }
    assert capsys.readouterr().err.count("no valid split to select on") == 1


def test_plain_loop_matches_the_pipeline(rank, dataset: Path, tmp_path: Path) -> None:
    # TrainPipelineSparseDist only reorders when the input all-to-all runs, not what is computed
    pipelined = _train(rank, dataset, tmp_path / "pipelined", max_steps=3)
    plain = _train(rank, dataset, tmp_path / "plain", max_steps=3, pipeline="plain")
    for split in ("valid", "test"):
        for task, values in pipelined[split].items():
            for name, value in values.items():
                assert plain[split][task][name] == pytest.approx(value, abs=1e-6), (task, name)
