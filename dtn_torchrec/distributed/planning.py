"""Sharding plans: configuration -> ``ParameterConstraints`` -> ``EmbeddingShardingPlanner``.

Every embedding table of the model (any ``EmbeddingBagCollection`` / ``EmbeddingCollection``,
wherever it sits) is matched against ``ShardingConfig``; each requested sharding type and kernel
is checked against what the sharder offers on the compute device *before* planning, so a bad
request fails on every rank with a message naming the table (the planner itself would fail on
rank 0 only and leave the other ranks hanging in the plan broadcast).

Planner inputs, the same for training, scoring and ``dtn-plan``:

* constraints: the configured sharding types / kernels (``data_parallel`` only where the
  configuration names it, see ``sharders.py``); on CUDA the kernels default to ``fused`` (HBM)
  and ``dense`` (data-parallel), plus ``fused_uvm_caching`` with ``sharding.uvm_caching``;
* pooling factors: the data's mean ids per row of each feature (a table's configured
  ``pooling_factor`` wins), so I/O buffers, traffic and costs are not estimated for one id;
  a feature with several bags per row (MemoNet's pairs: one id per bag) gets them as
  ``num_poolings`` and its ids per bag as the pooling factor;
* storage reservation: on CUDA TorchRec's ``HeuristicalStorageReservation`` (the dense model
  with its optimiser and DDP buffers, the pipelined input batches, plus
  ``sharding.storage_reservation`` of HBM); on CPU TorchRec's fixed percentage, which like
  every TorchRec reservation takes device memory only, so host memory is not reserved.

The planner's per-rank storage table (``EmbeddingStats``) goes to the ``torchrec`` logger at INFO.
"""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch.distributed as dist
import torch.nn as nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.storage_reservations import (
    FixedPercentageStorageReservation,
    HeuristicalStorageReservation,
)
from torchrec.distributed.planner.types import Stats, StorageReservation, Topology
from torchrec.distributed.types import (
    EnumerableShardingSpec,
    ModuleSharder,
    ParameterSharding,
    ShardingPlan,
    ShardingType,
)
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection

from dtn_torchrec.distributed.config import ShardingConfig, TableShardingConfig
from dtn_torchrec.distributed.sharders import embedding_sharders
from dtn_torchrec.models.managed_collision import set_mch_buckets


@dataclass(frozen=True)
class EmbeddingTableInfo:
    """One embedding table of the model and the sharder responsible for it.

    Args:
        name: table name (unique across the model).
        module_path: FQN of the owning EmbeddingBagCollection / EmbeddingCollection.
        module_type: the owning module's class name.
        num_embeddings: rows.
        embedding_dim: columns.
        feature_names: KJT keys looked up in the table.
        sharder: the sharder of the owning module type.
    """

    name: str
    module_path: str
    module_type: str
    num_embeddings: int
    embedding_dim: int
    feature_names: Sequence[str]
    sharder: ModuleSharder[nn.Module]


def find_embedding_tables(
    module: nn.Module, sharders: List[ModuleSharder[nn.Module]]
) -> List[EmbeddingTableInfo]:
    """Lists every table of every module a sharder handles (matched by exact type, as DMP does)."""
    by_type = {sharder.module_type: sharder for sharder in sharders}
    tables: List[EmbeddingTableInfo] = []
    seen: Dict[str, str] = {}
    sharded_paths: List[str] = []
    for path, sub in module.named_modules():
        sharder = by_type.get(type(sub))
        if sharder is None or any(path.startswith(f"{p}.") for p in sharded_paths):
            continue  # the EBC inside an MC-EBC is sharded with it
        sharded_paths.append(path)
        if isinstance(sub, ManagedCollisionEmbeddingBagCollection):
            configs = sub._embedding_module.embedding_bag_configs()
        elif isinstance(sub, EmbeddingBagCollection):
            configs = sub.embedding_bag_configs()
        elif isinstance(sub, EmbeddingCollection):
            configs = sub.embedding_configs()
        else:
            raise TypeError(f"no table listing for {type(sub).__name__} at {path!r}")
        for config in configs:
            if config.name in seen:
                raise ValueError(
                    f"embedding table name {config.name!r} appears in {seen[config.name]!r} and"
                    f" {path!r}; sharding constraints are keyed by table name, so names must be"
                    " unique across the model"
                )
            seen[config.name] = path
            tables.append(
                EmbeddingTableInfo(
                    name=config.name,
                    module_path=path,
                    module_type=type(sub).__name__,
                    num_embeddings=config.num_embeddings,
                    embedding_dim=config.embedding_dim,
                    feature_names=tuple(config.feature_names),
                    sharder=sharder,
                )
            )
    return tables


def _table_config(cfg: ShardingConfig, name: str) -> Optional[TableShardingConfig]:
    if name in cfg.tables:
        return cfg.tables[name]
    for pattern, table_cfg in cfg.tables.items():
        if fnmatch.fnmatchcase(name, pattern):
            return table_cfg
    return None


def _supported_pairs(sharder: ModuleSharder[nn.Module], device: str) -> List[str]:
    return [
        f"{sharding_type}/{kernel}"
        for sharding_type in sharder.sharding_types(device)
        for kernel in sharder.compute_kernels(sharding_type, device)
    ]


# Column-wise shard width without ``min_partition`` (torchrec.distributed.planner.constants).
_MIN_COLUMN_SHARD_DIM = 128
# Types that split a table by columns; with one column shard each is a costlier duplicate of
# table_wise / table_row_wise.
_COLUMN_SPLITTING_TYPES = (
    ShardingType.COLUMN_WISE.value,
    ShardingType.TABLE_COLUMN_WISE.value,
    ShardingType.GRID_SHARD.value,
)


def column_shards(embedding_dim: int, min_partition: Optional[int]) -> int:
    """Column shards TorchRec cuts a table into (``sharding_plan._get_block_size_for_cw_shard``):
    blocks of the smallest multiple of 4 at least ``min_partition`` (default 128) that divides
    the dimension, else one block."""
    lower = min_partition or _MIN_COLUMN_SHARD_DIM
    block = next(
        (i for i in range(lower, embedding_dim) if embedding_dim % i == 0 and i % 4 == 0),
        embedding_dim,
    )
    return embedding_dim // block


def table_constraints(
    tables: List[EmbeddingTableInfo], cfg: ShardingConfig, compute_device: str
) -> Dict[str, ParameterConstraints]:
    """Planner constraints for every table, after checking each request is feasible.

    A table without requested sharding types is limited to the sharder's default offer
    (TorchRec's stock offer without ``data_parallel``, see ``sharders.py``); requesting only the
    ``dense`` kernel asks for ``data_parallel``, the one type that runs it. Column-splitting
    types are left out of the default offer where the table would get one column shard: the
    planner rates them equal to table_wise and picks either, not reproducibly between
    processes, so the plan (and the checkpoint layout) would change from run to run.

    Raises:
        ValueError: a pattern that matches no table, or a sharding type / compute kernel the
            table's sharder does not offer on ``compute_device`` (the message names the table).
    """
    cfg.validate()
    names = [table.name for table in tables]
    for pattern in cfg.tables:
        if pattern not in names and not fnmatch.filter(names, pattern):
            raise ValueError(
                f"sharding.tables[{pattern!r}] matches no embedding table; tables: {names}"
            )
    constraints: Dict[str, ParameterConstraints] = {}
    for table in tables:
        table_cfg = _table_config(cfg, table.name) or TableShardingConfig()
        sharder = table.sharder
        requested = table_cfg.sharding_types or cfg.sharding_types
        kernels = table_cfg.compute_kernels
        where = f"table {table.name!r} ({table.module_type} at {table.module_path!r})"
        if requested is None:
            default_types = getattr(sharder, "default_sharding_types", sharder.sharding_types)
            candidates = default_types(compute_device)
            data_parallel = ShardingType.DATA_PARALLEL.value
            if (
                kernels is not None
                and EmbeddingComputeKernel.DENSE.value in kernels
                and data_parallel in sharder.sharding_types(compute_device)
            ):
                candidates = [data_parallel, *candidates]
            if column_shards(table.embedding_dim, table_cfg.min_partition) == 1:
                candidates = [t for t in candidates if t not in _COLUMN_SPLITTING_TYPES]
            # Unrequested types that cannot use the requested kernels simply drop out.
            sharding_types = [
                sharding_type
                for sharding_type in candidates
                if kernels is None
                or set(kernels) & set(sharder.compute_kernels(sharding_type, compute_device))
            ]
            if not sharding_types:
                raise ValueError(
                    f"sharding: {where} cannot use compute kernel(s) {kernels} on compute device"
                    f" {compute_device!r}; supported there (type/kernel):"
                    f" {_supported_pairs(sharder, compute_device)}"
                )
        else:
            sharding_types = list(requested)
        offered = sharder.sharding_types(compute_device)
        for sharding_type in sharding_types:
            if sharding_type not in offered:
                raise ValueError(
                    f"sharding: {where} cannot be sharded {sharding_type!r} on compute device"
                    f" {compute_device!r}; supported there (type/kernel):"
                    f" {_supported_pairs(sharder, compute_device)}"
                )
            type_kernels = sharder.compute_kernels(sharding_type, compute_device)
            if kernels is not None and not set(kernels) & set(type_kernels):
                raise ValueError(
                    f"sharding: {where} with sharding type {sharding_type!r} cannot use compute"
                    f" kernel(s) {kernels} on compute device {compute_device!r}; that type offers"
                    f" {type_kernels}"
                )
        constraint = ParameterConstraints(
            sharding_types=sharding_types,
            compute_kernels=kernels,
            min_partition=table_cfg.min_partition,
        )
        if table_cfg.pooling_factor is not None:
            constraint.pooling_factors = [table_cfg.pooling_factor] * len(table.feature_names)
        constraints[table.name] = constraint
    return constraints


def planner_constraints(
    tables: List[EmbeddingTableInfo],
    cfg: ShardingConfig,
    compute_device: str,
    ids_per_row: Optional[Mapping[str, float]] = None,
    bags_per_row: Optional[Mapping[str, int]] = None,
) -> Dict[str, ParameterConstraints]:
    """:func:`table_constraints` completed with the defaults every planning run shares.

    Args:
        tables: from :func:`find_embedding_tables`.
        cfg: sharding configuration.
        compute_device: ``"cpu"`` or ``"cuda"``.
        ids_per_row: feature -> mean ids per row (from the dataset schema); sets the pooling
            factors of every table without a configured ``pooling_factor``. None = 1 id.
        bags_per_row: feature -> bags per row where more than one (``num_poolings``); the
            pooling factor is then ids per bag.
    """
    constraints = table_constraints(tables, cfg, compute_device)
    if compute_device == "cuda":
        # Not UVM / SSD / key-value unless asked: those trade HBM for host traffic.
        kernels = [EmbeddingComputeKernel.FUSED.value, EmbeddingComputeKernel.DENSE.value]
        if cfg.uvm_caching:
            kernels.append(EmbeddingComputeKernel.FUSED_UVM_CACHING.value)
        for constraint in constraints.values():
            if constraint.compute_kernels is None:
                constraint.compute_kernels = list(kernels)
    bags = bags_per_row or {}
    for table in tables:
        if any(f in bags for f in table.feature_names):
            constraints[table.name].num_poolings = [
                float(bags.get(f, 1)) for f in table.feature_names
            ]
        table_cfg = _table_config(cfg, table.name)
        if ids_per_row is None or (table_cfg is not None and table_cfg.pooling_factor is not None):
            continue
        constraints[table.name].pooling_factors = [
            max(1.0, float(ids_per_row.get(feature, 1.0)) / bags.get(feature, 1))
            for feature in table.feature_names
        ]
    return constraints


# TorchRec's heuristic: parameters + Adam's two moments + DDP's gradient buckets.
_DENSE_BYTES_PER_PARAMETER_BYTE = 6


def dense_tensor_bytes(module: nn.Module, tables: List[EmbeddingTableInfo]) -> int:
    """Bytes of every parameter and buffer outside the sharded tables' modules (works on
    ``meta``), times TorchRec's multiplier for optimiser state and DDP buffers."""
    table_modules = {table.module_path for table in tables}
    table_tensors = set()
    for path, sub in module.named_modules():
        if path in table_modules:
            table_tensors.update(id(t) for t in sub.parameters())
            table_tensors.update(id(t) for t in sub.buffers())
    total = sum(
        t.numel() * t.element_size()
        for t in [*module.parameters(), *module.buffers()]
        if id(t) not in table_tensors
    )
    return total * _DENSE_BYTES_PER_PARAMETER_BYTE


def storage_reservation(
    module: nn.Module, tables: List[EmbeddingTableInfo], cfg: ShardingConfig, compute_device: str
) -> StorageReservation:
    """What the planner keeps free per rank (module docstring)."""
    if compute_device != "cuda":
        return FixedPercentageStorageReservation(percentage=cfg.storage_reservation)
    with warnings.catch_warnings():
        # It warns that its own dense estimate is unreliable on meta models; we pass ours.
        warnings.filterwarnings("ignore", "HeuristicalStorageReservation", FutureWarning)
        return HeuristicalStorageReservation(
            percentage=cfg.storage_reservation,
            dense_tensor_estimate=dense_tensor_bytes(module, tables),
        )


def plan_model(
    module: nn.Module,
    cfg: ShardingConfig,
    *,
    topology: Topology,
    batch_size: int,
    ids_per_row: Optional[Mapping[str, float]] = None,
    bags_per_row: Optional[Mapping[str, int]] = None,
    pg: Optional[dist.ProcessGroup] = None,
    sharders: Optional[List[ModuleSharder[nn.Module]]] = None,
    stats: Optional[List[Stats]] = None,
) -> ShardingPlan:
    """Plans the sharding of every embedding table of ``module``.

    Args:
        module: the unsharded model (tables may sit on the ``meta`` device), sparse optimiser
            applied (the planner counts its state).
        cfg: sharding configuration.
        topology: see ``topology.topology_from_env`` / ``topology.ClusterSpec``.
        batch_size: per-rank batch size (the planner's cost model).
        ids_per_row: feature -> mean ids per row (see :func:`planner_constraints`).
        bags_per_row: feature -> bags per row where more than one (idem).
        pg: process group; rank 0 plans and broadcasts (``collective_plan``). None plans in
            this process alone (dtn-plan, or a single-process run).
        sharders: defaults to ``sharders.embedding_sharders()``; give DMP the same list.
        stats: the planner's stats hooks; None = TorchRec's ``EmbeddingStats`` table.

    Returns:
        The plan for ``DistributedModelParallel``.

    Raises:
        PlannerError: no plan fits (``pg`` None; with a group every rank fails in the broadcast).
    """
    sharders = sharders if sharders is not None else embedding_sharders()
    set_mch_buckets(module, topology.world_size)
    tables = find_embedding_tables(module, sharders)
    compute_device = topology.compute_device
    planner = EmbeddingShardingPlanner(
        topology=topology,
        batch_size=batch_size,
        constraints=planner_constraints(tables, cfg, compute_device, ids_per_row, bags_per_row),
        storage_reservation=storage_reservation(module, tables, cfg, compute_device),
        stats=stats,
    )
    if pg is None:
        return planner.plan(module, sharders)
    return planner.collective_plan(module, sharders, pg)


def _shards(sharding: ParameterSharding) -> List[Dict[str, Any]]:
    spec = sharding.sharding_spec
    if not isinstance(spec, EnumerableShardingSpec):
        return []
    return [
        {
            "rank": shard.placement.rank(),
            "offsets": list(shard.shard_offsets),
            "sizes": list(shard.shard_sizes),
        }
        for shard in spec.shards
    ]


def plan_to_json(plan: ShardingPlan) -> Dict[str, Any]:
    """The plan as plain data: ``{module_path: {table: {sharding_type, compute_kernel, ranks,
    shards: [{rank, offsets, sizes}]}}}``; data_parallel tables have no shards (replicated)."""
    result: Dict[str, Any] = {}
    for module_path, module_plan in plan.plan.items():
        result[module_path] = {
            table: {
                "sharding_type": sharding.sharding_type,
                "compute_kernel": sharding.compute_kernel,
                "ranks": list(sharding.ranks) if sharding.ranks is not None else None,
                "shards": _shards(sharding),
            }
            for table, sharding in module_plan.items()
        }
    return result


def format_plan(plan: ShardingPlan) -> str:
    """A human-readable table of the plan, one line per embedding table."""
    header = (
        f"{'module':<24} {'table':<28} {'sharding':<18} {'kernel':<18} shards (rows x cols @ rank)"
    )
    lines = [header, "-" * len(header)]
    for module_path, tables in plan_to_json(plan).items():
        for table, info in tables.items():
            shards = info["shards"]
            layout = (
                ", ".join(f"{s['sizes'][0]}x{s['sizes'][1]}@{s['rank']}" for s in shards)
                if shards
                else "replicated on every rank"
            )
            lines.append(
                f"{module_path:<24} {table:<28} {info['sharding_type']:<18}"
                f" {info['compute_kernel']:<18} {layout}"
            )
    return "\n".join(lines)
