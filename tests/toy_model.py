"""A small multi-task model for the distributed tests, independent of ``dtn_torchrec.models``.

Four bag features ``f0..f3`` (tables ``t_f0..t_f3`` of different sizes, dim 16) in one
EmbeddingBagCollection, one sequence feature ``p0`` (table ``c0``, dim 8) in an
EmbeddingCollection whose rows are sum-pooled, a dense tower and two task logits. The train
wrapper follows DLRMTrain: ``forward(batch) -> (loss, (loss.detach(), logits.detach(), labels))``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dtn_torchrec.data.batch import Batch

BAG_FEATURES: List[str] = ["f0", "f1", "f2", "f3"]
BAG_ROWS: List[int] = [40, 64, 96, 24]
BAG_DIM = 16
SEQ_FEATURE = "p0"
SEQ_ROWS = 50
SEQ_DIM = 8
NUM_TASKS = 2
MAX_IDS_PER_BAG = 3
# Rows of one global batch in the checkpoint tests: 2 halves of 8, one per rank (or both on 1).
GLOBAL_BATCH = 16


def bag_table(feature: str) -> str:
    return f"t_{feature}"


class ToyModel(nn.Module):
    """``forward(kjt) -> logits [B, 2]``; ``kjt`` has keys ``f0..f3, p0`` in that order."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name=bag_table(feature),
                    embedding_dim=BAG_DIM,
                    num_embeddings=rows,
                    feature_names=[feature],
                )
                for feature, rows in zip(BAG_FEATURES, BAG_ROWS)
            ],
            device=device,
        )
        self.ec = EmbeddingCollection(
            tables=[
                EmbeddingConfig(
                    name="c0",
                    embedding_dim=SEQ_DIM,
                    num_embeddings=SEQ_ROWS,
                    feature_names=[SEQ_FEATURE],
                )
            ],
            device=device,
        )
        self.tower = nn.Sequential(
            nn.Linear(len(BAG_FEATURES) * BAG_DIM + SEQ_DIM, 16, device=device),
            nn.ReLU(),
            nn.Linear(16, NUM_TASKS, device=device),
        )

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        bags, seq = kjt.split([len(BAG_FEATURES), 1])
        pooled = self.ebc(bags).to_dict()  # by name: the key order depends on the plan
        rows = self.ec(seq)[SEQ_FEATURE]
        batch_size = kjt.stride()
        owner = torch.repeat_interleave(torch.arange(batch_size), rows.lengths())
        seq_sum = torch.zeros(batch_size, SEQ_DIM).index_add(0, owner, rows.values())
        return self.tower(torch.cat([pooled[f] for f in BAG_FEATURES] + [seq_sum], dim=1))


class ToyTrain(nn.Module):
    """DLRMTrain-style wrapper: mean BCE over batch and tasks."""

    def __init__(self, model: ToyModel) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = nn.BCEWithLogitsLoss()

    def forward(
        self, batch: Batch
    ) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        logits = self.model(batch.sparse_features)
        loss = self.loss_fn(logits, batch.labels)
        return loss, (loss.detach(), logits.detach(), batch.labels)


def make_batch(seed: int, batch_size: int = 8) -> Batch:
    """A random batch with 0..3 ids per bag (empty bags included)."""
    gen = torch.Generator().manual_seed(seed)
    lengths: List[torch.Tensor] = []
    values: List[torch.Tensor] = []
    for rows in BAG_ROWS + [SEQ_ROWS]:
        key_lengths = torch.randint(0, MAX_IDS_PER_BAG + 1, (batch_size,), generator=gen)
        lengths.append(key_lengths)
        values.append(torch.randint(0, rows, (int(key_lengths.sum()),), generator=gen))
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=BAG_FEATURES + [SEQ_FEATURE],
        values=torch.cat(values),
        lengths=torch.cat(lengths),
    )
    labels = torch.randint(0, 2, (batch_size, NUM_TASKS), generator=gen).float()
    return Batch(sparse_features=kjt, labels=labels, sample_ids=torch.arange(batch_size))


def concat_batches(batches: List[Batch]) -> Batch:
    """One batch holding the rows of ``batches`` in order (what one rank sees for N ranks)."""
    keys = batches[0].sparse_features.keys()
    per_key = [b.sparse_features.to_dict() for b in batches]
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=torch.cat([torch.cat([d[k].values() for d in per_key]) for k in keys]),
        lengths=torch.cat([torch.cat([d[k].lengths() for d in per_key]) for k in keys]),
    )
    return Batch(
        sparse_features=kjt,
        labels=torch.cat([b.labels for b in batches]),
        sample_ids=torch.cat([b.sample_ids for b in batches]),
    )


def known_values(name: str, offsets: List[int], sizes: List[int]) -> torch.Tensor:
    """Deterministic values of parameter ``name`` at ``offsets`` (any 1-D or 2-D block)."""
    phase = sum(ord(c) for c in name) * 0.01
    if len(sizes) == 1:
        index = torch.arange(offsets[0], offsets[0] + sizes[0], dtype=torch.float64)
        return (0.1 * torch.sin(0.37 * index + phase)).float()
    rows = torch.arange(offsets[0], offsets[0] + sizes[0], dtype=torch.float64)[:, None]
    cols = torch.arange(offsets[1], offsets[1] + sizes[1], dtype=torch.float64)[None, :]
    return (0.1 * torch.sin(0.37 * rows + 1.3 * cols + phase)).float()


@torch.no_grad()
def write_known_values(module: nn.Module) -> None:
    """Writes ``known_values`` into every parameter of ``module`` through its state_dict,
    honouring the offsets of each local shard, so sharded and unsharded copies agree."""
    for name, value in module.state_dict().items():
        if isinstance(value, ShardedTensor):
            for shard in value.local_shards():
                meta = shard.metadata
                shard.tensor.copy_(
                    known_values(name, list(meta.shard_offsets), list(meta.shard_sizes))
                )
        elif isinstance(value, torch.Tensor) and value.is_floating_point():
            value.copy_(known_values(name, [0] * value.dim(), list(value.shape)))
        else:
            raise TypeError(f"{name}: unexpected state of type {type(value).__name__}")


def local_state(module: nn.Module) -> Dict[str, torch.Tensor]:
    """Copies of this rank's state: each local shard of a sharded tensor under
    ``"<name>@<row offset>,<col offset>"``, every other tensor under its name."""
    out: Dict[str, torch.Tensor] = {}
    for name, value in module.state_dict().items():
        if isinstance(value, ShardedTensor):
            for shard in value.local_shards():
                offsets = ",".join(str(o) for o in shard.metadata.shard_offsets)
                out[f"{name}@{offsets}"] = shard.tensor.detach().clone()
        else:
            out[name] = value.detach().clone()
    return out


def slice_of(full: torch.Tensor, offsets: List[int], sizes: List[int]) -> torch.Tensor:
    index = tuple(slice(o, o + s) for o, s in zip(offsets, sizes))
    return full[index]


def reference_sgd_step(
    reference: ToyTrain, batches: List[Batch], lrs: Dict[str, float]
) -> List[torch.Tensor]:
    """Unsharded reference of one distributed step: per-rank logits before the step, then an
    SGD step on the mean of the per-rank losses (TorchRec divides embedding gradients by the
    world size and DDP averages dense ones, so every parameter sees that mean).

    Args:
        reference: the unsharded model.
        batches: one batch per rank.
        lrs: learning rate of every parameter, by name.

    Returns:
        Logits of each batch before the step.
    """
    reference.zero_grad()
    losses, logits = [], []
    for batch in batches:
        loss, (_, batch_logits, _) = reference(batch)
        losses.append(loss)
        logits.append(batch_logits)
    torch.stack(losses).mean().backward()
    with torch.no_grad():
        for name, param in reference.named_parameters():
            param -= lrs[name] * param.grad
    return logits


def sharded_toy_train(
    table_types: Dict[str, List[str]], sparse: str, dense: Any
) -> Tuple[Any, Any]:
    """Inside a rank: the toy model with fused ``sparse`` optimiser, planned with the per-table
    sharding types ``table_types`` on the default group, sharded, given known values, and the
    ``dense`` optimiser (``DenseOptimizerConfig``). Returns ``(dmp, dense optimizers)``."""
    import torch.distributed as dist

    from dtn_torchrec.distributed.config import (
        ShardingConfig,
        SparseOptimizerConfig,
        TableShardingConfig,
    )
    from dtn_torchrec.distributed.optimizers import apply_sparse_optimizer, build_dense_optimizer
    from dtn_torchrec.distributed.parallel import shard_model
    from dtn_torchrec.distributed.planning import plan_model
    from dtn_torchrec.distributed.topology import topology_from_env

    cfg = ShardingConfig(
        tables={
            name: TableShardingConfig(sharding_types=types, min_partition=8 if name != "c0" else 4)
            for name, types in table_types.items()
        }
    )
    model = ToyTrain(ToyModel(torch.device("meta")))
    apply_sparse_optimizer(model, SparseOptimizerConfig(name=sparse, lr=0.05))
    batch_size = GLOBAL_BATCH // dist.get_world_size()
    topology = topology_from_env("cpu", cfg)
    plan = plan_model(model, cfg, topology=topology, batch_size=batch_size, pg=dist.group.WORLD)
    dmp = shard_model(model, device=torch.device("cpu"), plan=plan)
    write_known_values(dmp)
    return dmp, build_dense_optimizer(dmp, dense)


def rank_batch(seed: int) -> Batch:
    """Inside a rank: its part of global batch ``seed`` (2 x 8 rows; one rank takes both)."""
    import torch.distributed as dist

    halves = [make_batch(seed=2 * seed + i, batch_size=GLOBAL_BATCH // 2) for i in range(2)]
    if dist.get_world_size() == 1:
        return concat_batches(halves)
    return halves[dist.get_rank()]
