"""Row 0 of every field table (missing / out-of-vocabulary ids) in the sharded model: zero at the
start, still zero after training on in-vocabulary ids, so an unseen id scores exactly like a
missing one before and after training; trained like any row once training ids map to it."""

from __future__ import annotations

from typing import Any, Dict, List

import pytest
import torch
from single_rank import (
    SCHEMA,
    random_batch,
    sharded_train_model,
)
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dtn_torchrec.data.batch import Batch
from dtn_torchrec.distributed.config import DenseOptimizerConfig
from dtn_torchrec.distributed.optimizers import build_dense_optimizer

Lists = Dict[str, List[List[int]]]


def row_zero_of_tables(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Field table -> its row 0 (from the shard that holds global row 0)."""
    rows = {}
    for key, value in model.state_dict().items():
        if ".embedding_bags.t_" not in key:
            continue
        if isinstance(value, ShardedTensor):
            shards = [s for s in value.local_shards() if s.metadata.shard_offsets[0] == 0]
            rows[key] = torch.cat([s.tensor[0] for s in shards])  # column shards side by side
        else:
            rows[key] = value[0]
    assert len(rows) == len(SCHEMA.fields)
    return rows


def as_lists(batch: Batch) -> Lists:
    by_key = batch.sparse_features.to_dict()
    return {
        k: [row.tolist() for row in torch.split(jt.values(), jt.lengths().tolist())]
        for k, jt in by_key.items()
    }


def from_lists(lists: Lists, template: Batch) -> Batch:
    keys = SCHEMA.field_names
    values = [v for k in keys for row in lists[k] for v in row]
    lengths = [len(row) for k in keys for row in lists[k]]
    features = KeyedJaggedTensor(
        keys=keys,
        values=torch.tensor(values, dtype=torch.long),
        lengths=torch.tensor(lengths, dtype=torch.int32),
    )
    return Batch(features, template.labels, template.sample_ids)


def unseen_and_missing(batch: Batch) -> List[Batch]:
    """The batch with rows 0-3 of "u" and "hist" holding id 0, and with them empty."""
    unseen, missing = as_lists(batch), as_lists(batch)
    for field in ("u", "hist"):
        for row in range(4):
            unseen[field][row] = [0]
            missing[field][row] = []
    return [from_lists(unseen, batch), from_lists(missing, batch)]


def scores(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        _, (_, logits, _) = model(batch)
    model.train()
    return logits


def train_steps(model: torch.nn.Module, batches: List[Batch]) -> None:
    optimizer = build_dense_optimizer(model, DenseOptimizerConfig()).optimizer
    for batch in batches:
        optimizer.zero_grad()
        loss, _ = model(batch)
        loss.backward()  # the fused sparse optimizer updates the looked-up rows here
        optimizer.step()


@pytest.mark.slow
def test_unseen_ids_score_like_missing_ones_before_and_after_training(one_rank) -> None:
    model = sharded_train_model("dtn")
    for key, row in row_zero_of_tables(model).items():
        assert torch.equal(row, torch.zeros_like(row)), key
    unseen, missing = unseen_and_missing(random_batch(100))
    torch.testing.assert_close(scores(model, unseen), scores(model, missing))

    train_steps(model, [random_batch(seed) for seed in range(3)])  # ids >= 1 only
    for key, row in row_zero_of_tables(model).items():
        assert torch.equal(row, torch.zeros_like(row)), key
    after = scores(model, unseen)
    torch.testing.assert_close(after, scores(model, missing))
    assert not torch.allclose(after, scores(sharded_train_model("dtn"), unseen))  # it trained


@pytest.mark.slow
def test_row_zero_is_trained_when_training_ids_map_to_it(one_rank) -> None:
    model = sharded_train_model("dtn")
    unseen, _ = unseen_and_missing(random_batch(100))
    train_steps(model, [unseen])
    rows = row_zero_of_tables(model)
    looked_up = [k for k in rows if ".t_u." in k or ".t_hist." in k]
    assert len(looked_up) == 2 and all(bool(rows[k].abs().sum() > 0) for k in looked_up)
    untouched = [k for k in rows if k not in looked_up]
    assert all(torch.equal(rows[k], torch.zeros_like(rows[k])) for k in untouched)


def _first_rows_of_shards(sharding_types: Dict[str, str]) -> Dict[str, List[List[Any]]]:
    """This rank's shards of every field table: [row offset, rows, first row zero, zero rows]."""
    from single_rank import sharded_train_model as build

    from dtn_torchrec.distributed.config import ShardingConfig, TableShardingConfig

    sharding = ShardingConfig(
        tables={t: TableShardingConfig(sharding_types=[s]) for t, s in sharding_types.items()}
    )
    shards: Dict[str, List[List[Any]]] = {}
    for key, value in build("mmoe", sharding).state_dict().items():
        if ".embedding_bags.t_" in key:
            table = key.split(".embedding_bags.")[1].split(".")[0]
            shards[table] = [
                [
                    int(s.metadata.shard_offsets[0]),
                    int(s.tensor.shape[0]),
                    bool((s.tensor[0] == 0).all()),
                    int((s.tensor == 0).all(dim=1).sum()),
                ]
                for s in value.local_shards()
            ]
    return shards


@pytest.mark.slow
def test_row_zero_is_zero_under_every_sharding_on_two_ranks() -> None:
    from dist_utils import run_on_ranks

    types = {"t_u": "row_wise", "t_hist": "column_wise", "t_i": "table_wise", "t_c": "row_wise"}
    per_rank = run_on_ranks(_first_rows_of_shards, 2, sharding_types=types)
    for table, sharding in types.items():
        shards = [s for rank in per_rank for s in rank.get(table, [])]
        first = [s for s in shards if s[0] == 0]
        assert first and all(s[2] for s in first), (table, shards)  # global row 0 is zero
        if sharding == "row_wise":
            # Each row-wise shard zeroes its first row: row 0, and one real id per later shard.
            rows_from = {s[0]: s[1] for s in shards}
            assert sorted(rows_from) == [0, rows_from[0]]  # two shards, split at rows_from[0]
            assert all(s[2] and s[3] == 1 for s in shards)
        else:
            assert all(s[3] == 1 for s in shards), (table, shards)
