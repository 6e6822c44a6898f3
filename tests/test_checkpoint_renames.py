"""Checkpoints written before a state key was renamed keep loading.

MemoNet's codebooks were sequence ``EmbeddingCollection`` tables (keys
``...codebook.embeddings.<table>...``) before they became pooled ``EmbeddingBagCollection``
tables (``...codebook.embedding_bags.<table>...``): same rows, same row-wise Adagrad state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch
from single_rank import random_batch, sharded_train_model
from torch.distributed._shard.sharded_tensor import ShardedTensor

from dtn_torchrec.distributed.checkpoint import CheckpointManager
from dtn_torchrec.distributed.config import DenseOptimizerConfig
from dtn_torchrec.distributed.optimizers import build_dense_optimizer

NOW, BEFORE = ".codebook.embedding_bags.", ".codebook.embeddings."


def _local(value: Any) -> Any:
    if isinstance(value, ShardedTensor):
        return value.local_shards()[0].tensor.detach().clone()
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def _renamed(state: Dict[str, Any]) -> Dict[str, Any]:
    return {key.replace(NOW, BEFORE): value for key, value in state.items()}


def _renamed_optimizer_state(state: Dict[str, Any]) -> Dict[str, Any]:
    groups = [
        {**g, "params": [p.replace(NOW, BEFORE) for p in g["params"]]}
        for g in state.get("param_groups", [])
    ]
    return {**state, "state": _renamed(state["state"]), "param_groups": groups}


def _codebook_state(model: Any, optimizer: Any) -> Dict[str, torch.Tensor]:
    weights = {k: _local(v) for k, v in model.state_dict().items() if NOW in k}
    moments = {
        f"{param}/{name}": _local(value)
        for param, entries in optimizer.state_dict()["state"].items()
        if NOW in param
        for name, value in entries.items()
    }
    return {**weights, **moments}


def test_a_checkpoint_with_the_sequence_codebook_keys_loads(one_rank, tmp_path: Path) -> None:
    model = sharded_train_model("dtn")
    optimizer = build_dense_optimizer(model, DenseOptimizerConfig()).optimizer
    for seed in range(2):  # non-trivial codebook rows and Adagrad state
        loss, _ = model(random_batch(seed))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    saved = _codebook_state(model, optimizer)
    assert len(saved) >= 2 and all("codebook" in k for k in saved)

    # Write it as the code before the rename did: the same tensors under the old key names.
    model_state, optimizer_state = model.state_dict, optimizer.state_dict
    model.state_dict = lambda: _renamed(model_state())  # type: ignore[method-assign]
    optimizer.state_dict = lambda: _renamed_optimizer_state(optimizer_state())  # type: ignore[method-assign]
    manager = CheckpointManager(tmp_path)
    manager.save(1, model=model, optimizer=optimizer)

    torch.manual_seed(1)
    fresh = sharded_train_model("dtn")
    fresh_optimizer = build_dense_optimizer(fresh, DenseOptimizerConfig()).optimizer
    before = _codebook_state(fresh, fresh_optimizer)
    assert any(not torch.equal(before[k], saved[k]) for k in saved)
    manager.load(fresh, fresh_optimizer)
    loaded = _codebook_state(fresh, fresh_optimizer)
    assert loaded.keys() == saved.keys()
    for key in saved:
        torch.testing.assert_close(loaded[key], saved[key], rtol=0, atol=0)
