"""Sharded checkpoints: resharding across world sizes, per-rank state, atomicity, pruning."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
from dist_utils import run_on_ranks
from toy_model import rank_batch

from dtn_torchrec.distributed.checkpoint import CheckpointManager

RANK_LOCAL = ("reader", "rng")
# Every sharding type the CPU supports for the model, and a data_parallel table whose state
# lives in the dense optimiser.
TABLE_TYPES = {
    "t_f0": ["row_wise"],
    "t_f1": ["column_wise"],
    "t_f2": ["table_wise"],
    "t_f3": ["data_parallel"],
    "c0": ["row_wise"],
}


# -- helpers run inside the ranks --------------------------------------------------------------


def _build(sparse: str) -> Any:
    """A sharded toy model with fused ``sparse`` optimiser and dense Adam with warm-up."""
    from toy_model import sharded_toy_train

    from dtn_torchrec.distributed.config import DenseOptimizerConfig

    dense = DenseOptimizerConfig(name="adam", lr=0.01, warmup_steps=4, grad_clip_norm=1.0)
    return sharded_toy_train(TABLE_TYPES, sparse, dense)


def _train(dmp: Any, optimizers: Any, steps: range) -> None:
    for step in steps:
        loss, _ = dmp(rank_batch(1000 + step))
        loss.backward()
        optimizers.optimizer.step()
        optimizers.scheduler.step()
        optimizers.optimizer.zero_grad()


def _eval_logits(dmp: Any) -> torch.Tensor:
    with torch.no_grad():
        _, (_, logits, _) = dmp(rank_batch(5000))
    return logits


def _save_then_continue(directory: str, sparse: str) -> Dict[str, Any]:
    """Trains 2 steps, saves at step 2, then (a) continues 1 step and (b) reloads the checkpoint
    into a fresh model at the same world size and continues the same step."""
    import torch.distributed as dist

    from dtn_torchrec.distributed.checkpoint import capture_rng_state

    rank = dist.get_rank()
    dmp, optimizers = _build(sparse)
    _train(dmp, optimizers, range(2))
    manager = CheckpointManager(directory, keep_last=2, rank_local_keys=RANK_LOCAL)
    torch.manual_seed(40 + rank)
    extra = {"epoch": 1, "reader": {"position": 10 + rank}, "rng": capture_rng_state()}
    manager.save(
        2, model=dmp, optimizer=optimizers.optimizer, extra=extra, scheduler=optimizers.scheduler
    )
    saved_logits = _eval_logits(dmp)
    _train(dmp, optimizers, range(2, 3))
    next_logits = _eval_logits(dmp)

    fresh, fresh_optimizers = _build(sparse)
    restored = manager.load(fresh, fresh_optimizers.optimizer, scheduler=fresh_optimizers.scheduler)
    reloaded_logits = _eval_logits(fresh)
    _train(fresh, fresh_optimizers, range(2, 3))
    return {
        "saved_logits": saved_logits,
        "next_logits": next_logits,
        "reloaded_logits": reloaded_logits,
        "reloaded_next_logits": _eval_logits(fresh),
        "restored_reader": restored["reader"],
        "restored_rng_matches": torch.equal(restored["rng"]["torch"], extra["rng"]["torch"]),
        "lr_after_load": fresh_optimizers.dense.param_groups[0]["lr"],
        "lr_expected": optimizers.dense.param_groups[0]["lr"],
        "files": sorted(p.name for p in Path(directory, "step_2").iterdir()),
    }


def _load_then_continue(directory: str, sparse: str) -> Dict[str, Any]:
    """Loads the latest checkpoint into a fresh model at this world size and trains 1 step."""
    dmp, optimizers = _build(sparse)
    manager = CheckpointManager(directory, rank_local_keys=RANK_LOCAL)
    extra = manager.load(dmp, optimizers.optimizer, scheduler=optimizers.scheduler)
    logits = _eval_logits(dmp)
    _train(dmp, optimizers, range(2, 3))
    return {"extra": extra, "logits": logits, "next_logits": _eval_logits(dmp)}


def _by_rows(results: List[Dict[str, Any]], key: str) -> torch.Tensor:
    """Logits of the whole global batch, ranks' parts concatenated in rank order."""
    return torch.cat([result[key] for result in results])


def _assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


# -- tests -------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "sparse, save_ranks, load_ranks",
    [("rowwise_adagrad", 2, 1), ("adagrad", 1, 2)],
)
def test_checkpoint_reshards_across_world_sizes(
    tmp_path: Path, sparse: str, save_ranks: int, load_ranks: int
) -> None:
    directory = str(tmp_path / "ckpt")
    saved = run_on_ranks(
        _save_then_continue, world_size=save_ranks, directory=directory, sparse=sparse
    )
    for result in saved:
        # Same world size: exact resume, own per-rank state, the schedule's lr restored.
        _assert_same(result["reloaded_logits"], result["saved_logits"])
        _assert_same(result["reloaded_next_logits"], result["next_logits"])
        assert result["lr_after_load"] == pytest.approx(result["lr_expected"])
        assert result["restored_rng_matches"]
        assert {f"extra_rank{r}.json" for r in range(save_ranks)} <= set(result["files"])
        assert ".metadata" in result["files"] and "meta.json" in result["files"]
    assert [r["restored_reader"]["position"] for r in saved] == [10 + r for r in range(save_ranks)]
    # The step before saving really changed the model, so equal logits below are not trivial.
    assert not torch.allclose(_by_rows(saved, "saved_logits"), _by_rows(saved, "next_logits"))

    loaded = run_on_ranks(
        _load_then_continue, world_size=load_ranks, directory=directory, sparse=sparse
    )
    _assert_same(_by_rows(loaded, "logits"), _by_rows(saved, "saved_logits"))
    # One more step after the restore matches too: fused sparse states, dense Adam moments and
    # the warm-up position were restored and resharded.
    _assert_same(_by_rows(loaded, "next_logits"), _by_rows(saved, "next_logits"))
    for result in loaded:
        # Another world size: global state kept, rank-local state dropped.
        assert result["extra"] == {"epoch": 1}


def _crash_mid_save(directory: str) -> Dict[str, Any]:
    import os

    import torch.distributed as dist
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    rank = dist.get_rank()
    # Fused SGD has no optimiser state per table: the case DCP cannot load unless empty entries
    # are left out.
    dmp, optimizers = _build("sgd")
    manager = CheckpointManager(directory, keep_last=2)
    _train(dmp, optimizers, range(1))
    manager.save(1, model=dmp, optimizer=optimizers.optimizer, extra={"step": 1})
    logits_at_1 = _eval_logits(dmp)
    _train(dmp, optimizers, range(1, 2))

    written_before_crash: List[str] = []
    original_write = FileSystemWriter.write_data

    def write_then_crash(self: FileSystemWriter, plan: Any, planner: Any) -> Any:
        original_write(self, plan, planner).wait()
        written_before_crash.extend(sorted(os.listdir(self.path)))
        raise OSError("simulated crash after a partial write")

    if rank == 1:
        FileSystemWriter.write_data = write_then_crash
    error = ""
    try:
        manager.save(2, model=dmp, optimizer=optimizers.optimizer, extra={"step": 2})
    except RuntimeError as exc:
        error = str(exc)
    FileSystemWriter.write_data = original_write
    after_crash = {
        "error": error,
        "latest": manager.latest_step(),
        "entries": sorted(os.listdir(directory)),
        "written_before_crash": written_before_crash,
    }

    # A job killed mid-save leaves a .tmp directory behind: it is never taken for a checkpoint.
    dist.barrier()  # every rank has looked at the directory
    if rank == 0:
        Path(directory, "step_3.tmp").mkdir()
        Path(directory, "step_3.tmp", "__0_0.distcp").write_bytes(b"partial")
    dist.barrier()
    latest_with_leftover = manager.latest_step()
    restored = manager.load(dmp, optimizers.optimizer)
    logits_restored = _eval_logits(dmp)

    for step in (3, 4, 5):
        _train(dmp, optimizers, range(step - 1, step))
        manager.save(step, model=dmp, optimizer=optimizers.optimizer, extra={"step": step})
    return {
        "after_crash": after_crash,
        "latest_with_leftover": latest_with_leftover,
        "restored": restored,
        "logits_at_1": logits_at_1,
        "logits_restored": logits_restored,
        "final_entries": sorted(os.listdir(directory)),
        "final_latest": manager.latest_step(),
        "marker": Path(directory, "latest").read_text().strip(),
    }


@pytest.mark.slow
def test_crash_mid_save_keeps_previous_checkpoint(tmp_path: Path) -> None:
    directory = str(tmp_path / "ckpt")
    results = run_on_ranks(_crash_mid_save, world_size=2, directory=directory)
    for rank, result in enumerate(results):
        crash = result["after_crash"]
        assert "checkpoint step 2 failed" in crash["error"]
        assert crash["latest"] == 1
        # Only the complete step 1 and its marker: no step_2, no half-written step_2.tmp.
        assert crash["entries"] == ["latest", "step_1"]
        assert result["latest_with_leftover"] == 1
        assert result["restored"] == {"step": 1}
        _assert_same(result["logits_restored"], result["logits_at_1"])
        # keep_last=2 pruned steps 1 and 3; the leftover .tmp was removed by the next save.
        assert result["final_entries"] == ["latest", "step_4", "step_5"]
        assert result["final_latest"] == 5 and result["marker"] == "5"
    # Rank 1 crashed after writing its data file (the partial state the test is about).
    assert "__1_0.distcp" in results[1]["after_crash"]["written_before_crash"]


# -- local logic, no process group -------------------------------------------------------------


def _complete(directory: Path, step: int, world_size: int = 2) -> None:
    """An (empty) complete checkpoint: DCP metadata, run state per rank, meta.json last."""
    import pickle

    from torch.distributed.checkpoint.metadata import Metadata

    from dtn_torchrec.distributed.checkpoint_files import dumps_state, file_manifest

    path = directory / f"step_{step}"
    path.mkdir(parents=True)
    (path / ".metadata").write_bytes(pickle.dumps(Metadata(state_dict_metadata={})))
    for rank in range(world_size):
        (path / f"extra_rank{rank}.json").write_bytes(dumps_state({"extra": {}, "scheduler": None}))
    files = file_manifest(path, skip="meta.json")
    (path / "meta.json").write_text(
        json.dumps({"step": step, "world_size": world_size, "format": 2, "files": files})
    )


def test_latest_step_trusts_only_complete_checkpoints(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    assert manager.latest_step() is None
    _complete(tmp_path, 3)
    _complete(tmp_path, 7)
    (tmp_path / "step_9").mkdir()  # no meta.json: incomplete
    (tmp_path / "step_11.tmp").mkdir()
    (tmp_path / "latest").write_text("3\n")
    assert manager.latest_step() == 3  # the marker wins while its checkpoint is complete
    (tmp_path / "latest").write_text("9\n")
    assert manager.latest_step() == 7  # marker names an incomplete one: newest complete
    (tmp_path / "latest").unlink()
    assert manager.latest_step() == 7
    assert manager.complete_steps() == [3, 7]
    assert manager.saved_world_size(7) == 2
    with pytest.raises(FileNotFoundError, match="step_9 is not a complete checkpoint"):
        manager.saved_world_size(9)
