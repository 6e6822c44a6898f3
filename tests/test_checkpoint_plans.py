"""A checkpoint written under one sharding plan loads under another (issue 13): tables moved
between row-wise, column-wise and table-wise keep their fused optimiser state (DCP reshards it;
row-wise Adagrad's per-column-shard accumulators are converted); a table moved between a fused
optimiser and data-parallel (dense optimiser) keeps its weights and restarts its optimiser state,
with a warning naming the table."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
from dist_utils import run_on_ranks
from toy_model import rank_batch

# Every table moves: RW <-> TW, CW <-> TW, TW <-> DP, DP <-> RW, and the sequence table RW <-> TW.
PLAN_A = {
    "t_f0": ["row_wise"],
    "t_f1": ["column_wise"],
    "t_f2": ["table_wise"],
    "t_f3": ["data_parallel"],
    "c0": ["row_wise"],
}
PLAN_B = {
    "t_f0": ["table_wise"],
    "t_f1": ["table_wise"],
    "t_f2": ["data_parallel"],
    "t_f3": ["row_wise"],
    "c0": ["table_wise"],
}
# Tables whose state cannot be carried over: fused <-> dense.
RESET_TABLES = {"t_f2", "t_f3"}
# Row-wise Adagrad keeps one accumulator per row and column shard: t_f1 leaving column-wise is
# converted (the column-width-weighted mean over its shards).
CW_PARAM = "model.ebc.embedding_bags.t_f1.weight"


def _build(table_types: Dict[str, List[str]], sparse: str) -> Any:
    from toy_model import sharded_toy_train

    from dtn_torchrec.distributed.config import DenseOptimizerConfig

    return sharded_toy_train(table_types, sparse, DenseOptimizerConfig(name="adam", lr=0.01))


def _logits(dmp: Any) -> torch.Tensor:
    with torch.no_grad():
        _, (_, logits, _) = dmp(rank_batch(5000))
    return logits


def _local_optimizer_state(optimizer: Any) -> Dict[str, Dict[str, Any]]:
    """``{param: {entry: [(offsets, tensor), ...]}}`` of this rank's optimiser state."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    result: Dict[str, Dict[str, Any]] = {}
    for param, entries in optimizer.state_dict()["state"].items():
        for entry, value in entries.items():
            if isinstance(value, ShardedTensor):
                pieces = [
                    (list(s.metadata.shard_offsets), s.tensor.clone()) for s in value.local_shards()
                ]
            elif isinstance(value, torch.Tensor):
                pieces = [([0] * value.dim(), value.clone())]
            else:
                continue
            result.setdefault(param, {})[entry] = pieces
    return result


def _save(directory: str, plan: Dict[str, List[str]], sparse: str) -> Dict[str, Any]:
    from dtn_torchrec.distributed.checkpoint import CheckpointManager

    dmp, optimizers = _build(plan, sparse)
    for step in range(2):
        loss, _ = dmp(rank_batch(1000 + step))
        loss.backward()
        optimizers.optimizer.step()
        optimizers.optimizer.zero_grad()
    CheckpointManager(directory).save(2, model=dmp, optimizer=optimizers.optimizer)
    # t_f1's column shards on this rank: (column offset, width, optimiser state).
    weight = dmp.state_dict()[CW_PARAM]
    columns = []
    if weight.local_shards():  # this rank holds column shards of t_f1
        (entry,) = optimizers.optimizer.state_dict()["state"][CW_PARAM].values()
        by_offset = lambda shards: sorted(shards, key=lambda s: s.metadata.shard_offsets)  # noqa
        columns = [
            (w.metadata.shard_offsets[1], w.metadata.shard_sizes[1], m.tensor.clone())
            for w, m in zip(by_offset(weight.local_shards()), by_offset(entry.local_shards()))
        ]
    return {"logits": _logits(dmp), "t_f1_columns": columns}


def _load(directory: str, plan: Dict[str, List[str]], sparse: str) -> Dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    from dtn_torchrec.distributed.checkpoint import CheckpointManager

    records: List[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Capture(level=logging.WARNING)
    logging.getLogger("dtn_torchrec.distributed.checkpoint").addHandler(handler)
    dmp, optimizers = _build(plan, sparse)
    CheckpointManager(directory).load(dmp, optimizers.optimizer)
    logging.getLogger("dtn_torchrec.distributed.checkpoint").removeHandler(handler)
    logits = _logits(dmp)
    loaded = _local_optimizer_state(optimizers.optimizer)
    # The saved optimiser state of every table, whole, read directly (plain tensors).
    from dtn_torchrec.distributed.checkpoint_files import read_metadata_file

    metadata = read_metadata_file(Path(directory, "step_2", ".metadata"))
    saved = {
        key: torch.zeros(md.size, dtype=md.properties.dtype)
        for key, md in metadata.state_dict_metadata.items()
        if key.startswith("optim.state.") and hasattr(md, "size")
    }
    dcp.load(saved, checkpoint_id=Path(directory, "step_2"))
    # One more step trains the restored tables (their optimiser state is usable).
    loss, _ = dmp(rank_batch(1002))
    loss.backward()
    optimizers.optimizer.step()
    return {
        "logits": logits,
        "warnings": records,
        "loaded": loaded,
        "saved": saved,
        "finite": all(bool(torch.isfinite(p).all()) for p in dmp.parameters() if p.numel()),
    }


def _by_rows(results: List[Dict[str, Any]]) -> torch.Tensor:
    return torch.cat([r["logits"] for r in results])


@pytest.mark.slow
@pytest.mark.parametrize(
    "sparse, save_ranks, load_ranks", [("rowwise_adagrad", 2, 1), ("adagrad", 1, 2)]
)
def test_checkpoint_loads_under_another_plan(
    tmp_path: Path, sparse: str, save_ranks: int, load_ranks: int
) -> None:
    directory = str(tmp_path / "ckpt")
    saved = run_on_ranks(
        _save, world_size=save_ranks, directory=directory, plan=PLAN_A, sparse=sparse
    )
    loaded = run_on_ranks(
        _load, world_size=load_ranks, directory=directory, plan=PLAN_B, sparse=sparse
    )
    # Same weights: the same global batch gives the same logits.
    torch.testing.assert_close(_by_rows(loaded), _by_rows(saved), atol=2e-6, rtol=1e-5)
    for result in loaded:
        warned = {
            table
            for table in ("t_f0", "t_f1", "t_f2", "t_f3", "c0")
            for message in result["warnings"]
            if f"table {table} " in message
        }
        assert warned == RESET_TABLES, result["warnings"]
        assert result["finite"]
        # Moved between sharded types: the fused state is the saved one, resharded.
        for param, entries in result["loaded"].items():
            table = param.split(".")[-2]
            if table in RESET_TABLES:
                continue
            for entry, pieces in entries.items():
                full = result["saved"][f"optim.state.{param}.{entry}"]
                if param == CW_PARAM and sparse == "rowwise_adagrad":
                    columns = [c for r in saved for c in r["t_f1_columns"]]
                    assert len(columns) == 2 and full.shape == (2 * 64,)
                    width = sum(w for _, w, _ in columns)
                    full = sum(w * m for _, w, m in columns) / width
                for offsets, tensor in pieces:
                    index = tuple(slice(o, o + n) for o, n in zip(offsets, tensor.shape))
                    torch.testing.assert_close(tensor, full[index], rtol=0, atol=0)
