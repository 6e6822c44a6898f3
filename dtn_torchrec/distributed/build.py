"""The one build path: model on ``meta`` -> fused sparse optimiser -> planner inputs -> plan -> DMP.

``dtn-train`` (``train.session``), ``dtn-predict`` / ``dtn-analyze`` (``serving.loading``),
``dtn-plan`` and the benchmarks all go through :func:`plan_for`, so the plan ``dtn-plan``
reports is the plan training uses for the same config, dataset schema and topology.

Usage (every rank of the job)::

    model = build_meta_train_model(cfg.model, schema, cfg.train.sparse_optimizer)
    sharded = build_sharded_model(model, cfg.sharding, schema, device=ctx.device,
                                  batch_size=cfg.data.batch_size)
    sharded.model(batch)  # DistributedModelParallel; sharded.plan is the ShardingPlan
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner.types import Stats, Topology
from torchrec.distributed.types import ShardingPlan

from dtn_torchrec.data.schema import SchemaSpec
from dtn_torchrec.distributed.config import ShardingConfig, SparseOptimizerConfig
from dtn_torchrec.distributed.optimizers import apply_sparse_optimizer
from dtn_torchrec.distributed.parallel import shard_model
from dtn_torchrec.distributed.planning import plan_model
from dtn_torchrec.distributed.topology import topology_from_env
from dtn_torchrec.models.builder import build_train_model
from dtn_torchrec.models.config import ModelConfig
from dtn_torchrec.models.embedding import SparseArch
from dtn_torchrec.models.model import MultiTaskTrainWrapper
from dtn_torchrec.models.pair_hash import MEMONET_PAIRS_KEY


def feature_ids_per_row(schema: SchemaSpec, model: nn.Module) -> Dict[str, float]:
    """Mean ids per row of every KJT feature the model's tables read (the pooling factors).

    A field's ``mean_length`` from the schema; where the schema only knows the longest list
    (the Ali-CCP reference sizes) the midpoint ``(1 + max_length) / 2``. MemoNet's pair feature
    carries ``F (F - 1) / 2 x num_hash`` ids per row (every pair of its ``F`` fields, hashed
    ``num_hash`` times), not one, in as many bags (:func:`feature_bags_per_row`).
    """
    result = {
        f.name: f.mean_length if f.mean_length > 0 else (1 + max(f.max_length, 1)) / 2
        for f in schema.fields
    }
    result.update(feature_bags_per_row(model))  # one id per bag
    return result


def feature_bags_per_row(model: nn.Module) -> Dict[str, int]:
    """Bags per row of the KJT features that have more than one (TorchRec's ``num_poolings``):
    MemoNet's pair feature, one bag per pair id (``PairHasher``)."""
    result: Dict[str, int] = {}
    for sub in model.modules():
        if isinstance(sub, SparseArch) and sub.pair_hash is not None:
            if sub.pair_hash.fields is not None:
                n = len(sub.pair_hash.fields)
                result[MEMONET_PAIRS_KEY] = n * (n - 1) // 2 * sub.pair_hash.num_hash
    return result


def build_meta_train_model(
    cfg: ModelConfig, schema: SchemaSpec, sparse_optimizer: SparseOptimizerConfig
) -> MultiTaskTrainWrapper:
    """The train model (loss included) on ``meta``, its tables tagged with the fused optimiser
    so the planner counts the optimiser state and DMP fuses it into the backward."""
    model = build_train_model(cfg, schema, device=torch.device("meta"))
    apply_sparse_optimizer(model, sparse_optimizer)
    return model


def plan_for(
    module: nn.Module,
    sharding: ShardingConfig,
    schema: Optional[SchemaSpec],
    *,
    topology: Topology,
    batch_size: int,
    pg: Optional[dist.ProcessGroup] = None,
    stats: Optional[List[Stats]] = None,
) -> ShardingPlan:
    """The sharding plan of ``module``'s tables, with the planner inputs every caller shares.

    Args:
        module: the model on ``meta`` (sparse optimiser applied for training).
        sharding: sharding configuration.
        schema: the dataset's schema (pooling factors); None = one id per row.
        topology: ``topology.topology_from_env`` (a job) or ``ClusterSpec.topology`` (dtn-plan).
        batch_size: per-rank batch size.
        pg: plan on rank 0 and broadcast over this group; None = plan in this process.
        stats: planner stats hooks (dtn-plan keeps the estimates); None = TorchRec's table.
    """
    ids_per_row = feature_ids_per_row(schema, module) if schema is not None else None
    return plan_model(
        module,
        sharding,
        topology=topology,
        batch_size=batch_size,
        ids_per_row=ids_per_row,
        bags_per_row=feature_bags_per_row(module),
        pg=pg,
        stats=stats,
    )


class ShardedModel(NamedTuple):
    """A model wrapped in DMP and the plan it was sharded by."""

    model: DistributedModelParallel
    plan: ShardingPlan


def build_sharded_model(
    module: nn.Module,
    sharding: ShardingConfig,
    schema: Optional[SchemaSpec],
    *,
    device: torch.device,
    batch_size: int,
    pg: Optional[dist.ProcessGroup] = None,
) -> ShardedModel:
    """Plans ``module`` for the running job (collectively) and shards it; every rank calls it.

    Args:
        module: the model on ``meta`` (:func:`build_meta_train_model`, or an inference model).
        sharding: sharding configuration.
        schema: the dataset's schema (pooling factors).
        device: this rank's device.
        batch_size: per-rank batch size (the planner's cost model).
        pg: the job's group; None = the default group.
    """
    group = pg if pg is not None else dist.group.WORLD
    plan = plan_for(
        module,
        sharding,
        schema,
        topology=topology_from_env(device.type, sharding),
        batch_size=batch_size,
        pg=group,
    )
    return ShardedModel(shard_model(module, device=device, plan=plan, pg=group), plan)
