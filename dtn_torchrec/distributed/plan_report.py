"""Plans a described cluster with TorchRec's planner and reports memory and traffic per rank.

``dtn-plan`` sizes a job before the hardware exists: the model is built on the ``meta`` device,
``EmbeddingShardingPlanner.plan`` runs in this process for any ``Topology`` (no process group,
no GPU), and the planner's own per-shard storage estimates (``ShardingOption.shards[i].storage``,
what its partitioner packed against each rank's capacity) are summed per rank.

Each shard's estimate splits into

* ``weights``: ``rows x cols x bytes`` of the shard (a ``data_parallel`` table: the whole table
  on every rank);
* ``optimizer``: the fused optimiser state, weights times TorchRec's multiplier (Adam 2,
  Adagrad 1, row-wise Adagrad ``1 / dim``, SGD 0);
* ``cache``: the device-memory part of a ``fused_uvm_caching`` table (cache lines, their state,
  the cache bookkeeping and its I/O buffers) whose weights live in host memory;
* ``io``: the rest of the estimate: the planner's input (ids) and output (pooled embedding)
  buffers of one batch.

All-to-all traffic is estimated per rank and batch from the plan (see :func:`estimate_comms`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, NamedTuple, Optional

import torch.nn as nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner import ParameterConstraints
from torchrec.distributed.planner.constants import UVM_CACHING_RATIO
from torchrec.distributed.planner.stats import EmbeddingStats
from torchrec.distributed.planner.types import (
    Enumerator,
    PlanDebugStats,
    PlannerError,
    PlannerErrorType,
    ShardingOption,
    Stats,
    StorageReservation,
    Topology,
)
from torchrec.distributed.planner.utils import get_num_poolings
from torchrec.distributed.types import ModuleSharder, ShardingPlan, ShardingType

from dtn_torchrec.data.schema import SchemaSpec
from dtn_torchrec.distributed.build import plan_for
from dtn_torchrec.distributed.config import ShardingConfig
from dtn_torchrec.distributed.sharders import embedding_sharders
from dtn_torchrec.distributed.topology import GIB, ClusterSpec

# Fused optimiser state per weight element, as TorchRec's storage estimator counts it
# (shard_estimators._get_optimizer_multipler); row-wise Adagrad keeps one value per row.
_STATE_PER_WEIGHT = {"sgd": 0.0, "adam": 2.0, "adagrad": 1.0}
ROWWISE_ADAGRAD = "rowwise_adagrad"

_ID_BYTES = 8  # TBE converts ids to int64
_LENGTH_BYTES = 4  # KJT lengths/offsets per row and feature
_PER_ID_WEIGHT_BYTES = 4  # float32 per-id weight of a weighted KJT
_OUTPUT_BYTES = 4  # float32 pooled embeddings and their gradients (no quantised comms)

_HOST_MEMORY_KERNELS = {
    EmbeddingComputeKernel.FUSED_UVM.value,
    EmbeddingComputeKernel.FUSED_UVM_CACHING.value,
}


def optimizer_state_multiplier(optimizer: str, embedding_dim: int) -> float:
    """Optimiser state bytes per weight byte of a table (TorchRec's storage estimate)."""
    if optimizer == ROWWISE_ADAGRAD:
        return 1.0 / embedding_dim
    if optimizer not in _STATE_PER_WEIGHT:
        raise ValueError(
            f"unknown sparse optimizer {optimizer!r}; known:"
            f" {sorted(_STATE_PER_WEIGHT) + [ROWWISE_ADAGRAD]}"
        )
    return _STATE_PER_WEIGHT[optimizer]


# ---------------------------------------------------------------------------------------------
# planning
# ---------------------------------------------------------------------------------------------


class PlanDoesNotFit(RuntimeError):
    """The planner found no plan; the message says what to add."""


class _BestPlanCapture(Stats):
    """Planner stats hook that keeps the chosen sharding options (with their estimates)."""

    def __init__(self) -> None:
        self.best_plan: List[ShardingOption] = []
        self.usable_bytes = 0

    def log(
        self,
        sharding_plan: ShardingPlan,
        topology: Topology,
        batch_size: int,
        storage_reservation: StorageReservation,
        num_proposals: int,
        num_plans: int,
        run_time: float,
        best_plan: List[ShardingOption],
        constraints: Optional[Dict[str, ParameterConstraints]] = None,
        sharders: Optional[List[ModuleSharder[nn.Module]]] = None,
        enumerator: Optional[Enumerator] = None,
        debug: bool = False,
        debug_stats: Optional[PlanDebugStats] = None,
    ) -> None:
        # The planner also logs its last failed proposal (an empty plan); keep only real plans.
        if sharding_plan.plan:
            for option in best_plan:  # bags per row, as the planner's estimators read them
                option.num_poolings = get_num_poolings(constraints, option)
            self.best_plan = list(best_plan)
            reserved = storage_reservation.last_reserved_topology
            if reserved is not None:
                storages = [d.storage for d in reserved.devices]
                on_gpu = reserved.compute_device == "cuda"
                self.usable_bytes = min(s.hbm if on_gpu else s.ddr for s in storages)


class PlannedSharding(NamedTuple):
    """A plan with the planner's estimates.

    Args:
        plan: the plan DMP takes.
        options: the chosen sharding options (each shard with rank and storage estimate).
        usable_bytes: memory per rank the planner could fill with tables (capacity less its
            storage reservation: on CUDA the dense model, input batches and the reserve).
    """

    plan: ShardingPlan
    options: List[ShardingOption]
    usable_bytes: int


def plan_sharding(
    module: nn.Module,
    cfg: ShardingConfig,
    schema: Optional[SchemaSpec],
    *,
    topology: Topology,
    batch_size: int,
    optimizer: str,
) -> PlannedSharding:
    """Plans as training does (``build.plan_for``, in this process) and keeps the planner's
    estimates.

    Args:
        module: the model, tables on ``meta``, sparse optimiser applied (so the planner counts
            its state).
        cfg: sharding configuration.
        schema: the dataset's schema (pooling factors); None = one id per row.
        topology: from :meth:`ClusterSpec.topology`.
        batch_size: per-rank batch size.
        optimizer: sparse optimiser name, for the advice when nothing fits.

    Raises:
        PlanDoesNotFit: no plan; the message says how much memory is needed and what to add.
    """
    capture = _BestPlanCapture()
    try:
        plan = plan_for(
            module,
            cfg,
            schema,
            topology=topology,
            batch_size=batch_size,
            stats=[EmbeddingStats(), capture],
        )
    except PlannerError as e:
        raise PlanDoesNotFit(
            _advice(e, module, embedding_sharders(), topology, cfg, optimizer)
        ) from e
    return PlannedSharding(plan, capture.best_plan, capture.usable_bytes)


def _advice(
    error: PlannerError,
    module: nn.Module,
    sharders: List[ModuleSharder[nn.Module]],
    topology: Topology,
    cfg: ShardingConfig,
    optimizer: str,
) -> str:
    """One line: what the tables need, what the topology holds, what to add."""
    # TorchRec's reservations take device memory only.
    on_gpu = topology.compute_device == "cuda"
    storage_reservation = cfg.storage_reservation if on_gpu else 0.0
    if error.error_type != PlannerErrorType.INSUFFICIENT_STORAGE:
        first = str(error).strip().splitlines()[0]
        return (
            f"the planner found no plan under the sharding constraints ({first});"
            " relax sharding.tables"
        )
    need = _table_bytes(module, sharders, optimizer)
    world = topology.world_size
    device = topology.devices[0].storage
    per_rank = (device.hbm if on_gpu else device.ddr) * (1.0 - storage_reservation)
    memory = "HBM" if on_gpu else "host memory"
    min_ranks = math.ceil(need / per_rank)
    min_per_rank = need / world / (1.0 - storage_reservation)
    advice = (
        f"the embedding tables do not fit: weights + {optimizer} state need {need / GIB:,.1f} GiB,"
        f" {world} ranks x {per_rank / GIB:,.1f} GiB usable {memory} hold"
        f" {world * per_rank / GIB:,.1f} GiB;"
        f" add ranks (at least {min_ranks:,} of this size) or {memory} (at least"
        f" {min_per_rank / GIB:,.1f} GiB per rank on {world})"
    )
    uvm_allowed = cfg.uvm_caching or any(
        t.compute_kernels and EmbeddingComputeKernel.FUSED_UVM_CACHING.value in t.compute_kernels
        for t in cfg.tables.values()
    )
    if on_gpu and uvm_allowed:
        advice += (
            f"; UVM caching is allowed, but each cached table still keeps a cache of"
            f" {UVM_CACHING_RATIO:.0%} of its rows in HBM"
        )
    elif on_gpu:
        host = world * device.ddr
        fits = "enough" if need <= host else "not enough either"
        advice += (
            f", or use UVM caching (--uvm-caching: tables in host memory, {world} x"
            f" {device.ddr / GIB:,.0f} GiB = {host / GIB:,.1f} GiB usable, {fits})"
        )
    return advice


def _table_bytes(
    module: nn.Module, sharders: List[ModuleSharder[nn.Module]], optimizer: str
) -> int:
    """Weights plus fused optimiser state of every table the sharders handle, whatever the plan."""
    types = {sharder.module_type for sharder in sharders}
    total = 0
    for sub in module.modules():
        if type(sub) not in types:
            continue
        for param in sub.parameters():
            weights = param.numel() * param.element_size()
            total += weights + math.ceil(
                weights * optimizer_state_multiplier(optimizer, int(param.shape[1]))
            )
    return total


# ---------------------------------------------------------------------------------------------
# memory per rank
# ---------------------------------------------------------------------------------------------


@dataclass
class RankMemory:
    """Planner storage estimate of one rank, in bytes.

    ``hbm + ddr == weights + optimizer + cache + io``.
    """

    rank: int
    hbm: int = 0
    ddr: int = 0
    weights: int = 0
    optimizer: int = 0
    cache: int = 0
    io: int = 0
    hbm_capacity: int = 0
    ddr_capacity: int = 0
    tables: List[str] = field(default_factory=list)


def _weights_in_host_memory(option: ShardingOption, compute_device: str) -> bool:
    return compute_device == "cpu" or option.compute_kernel in _HOST_MEMORY_KERNELS


def rank_memory(
    options: List[ShardingOption], topology: Topology, optimizer: str
) -> List[RankMemory]:
    """Sums the planner's shard storage estimates per rank and splits them (module docstring)."""
    ranks = [
        RankMemory(rank=r, hbm_capacity=d.storage.hbm, ddr_capacity=d.storage.ddr)
        for r, d in enumerate(topology.devices)
    ]
    for option in options:
        rows, dim = option.tensor.shape
        multiplier = optimizer_state_multiplier(optimizer, int(dim))
        in_host = _weights_in_host_memory(option, topology.compute_device)
        cached = option.compute_kernel == EmbeddingComputeKernel.FUSED_UVM_CACHING.value
        for shard in option.shards:
            if shard.rank is None or shard.storage is None:
                raise ValueError(
                    f"table {option.name}: the planner left a shard without rank or storage"
                )
            memory = ranks[shard.rank]
            weights = math.prod(shard.size) * option.tensor.element_size()
            state = math.ceil(weights * multiplier)
            memory.hbm += shard.storage.hbm
            memory.ddr += shard.storage.ddr
            memory.weights += weights
            memory.optimizer += state
            if in_host:
                # Weights and state in DDR; the device part (if any) is cache or I/O buffers.
                memory.io += shard.storage.ddr - weights - state
                if cached:
                    memory.cache += shard.storage.hbm
                else:
                    memory.io += shard.storage.hbm
            else:
                memory.io += shard.storage.hbm - weights - state + shard.storage.ddr
            if option.name not in memory.tables:
                memory.tables.append(option.name)
    return ranks


# ---------------------------------------------------------------------------------------------
# all-to-all traffic per batch
# ---------------------------------------------------------------------------------------------


@dataclass
class CommsEstimate:
    """Bytes one rank sends per training batch, averaged over ranks, and their time.

    Args:
        input_ids: sparse input all-to-all (ids, lengths, per-id weights).
        embeddings_fwd: pooled (or per-id, for sequence tables) embeddings, forward.
        gradients_bwd: their gradients in backward (same size as forward).
        dense_allreduce: ring all-reduce of the dense parameters and data-parallel tables.
        intra_host, inter_host: the total split by where it travels.
        seconds: ``intra_host / intra_bw + inter_host / inter_bw`` (bandwidth-bound, no overlap).
        planner_comms_ms_max: the planner's own comms estimate (fwd + bwd + input dist) of the
            busiest rank, milliseconds.
    """

    input_ids: float = 0.0
    embeddings_fwd: float = 0.0
    gradients_bwd: float = 0.0
    dense_allreduce: float = 0.0
    intra_host: float = 0.0
    inter_host: float = 0.0
    seconds: float = 0.0
    planner_comms_ms_max: float = 0.0

    @property
    def total(self) -> float:
        return self.input_ids + self.embeddings_fwd + self.gradients_bwd + self.dense_allreduce


def _off_host_share(world_size: int, local_world_size: int) -> float:
    """Share of a rank's traffic to the other ranks that leaves its host (uniform peers)."""
    if world_size <= 1:
        return 0.0
    return (world_size - local_world_size) / (world_size - 1)


class _Traffic(NamedTuple):
    """Bytes one rank sends for one table per batch, and how many of them stay on the host."""

    ids: float
    out: float
    ids_intra: float
    out_intra: float


def _bags_per_row(option: ShardingOption) -> List[float]:
    """Bags per row of each of the table's features (``num_poolings``; 1 unless set)."""
    return list(option.num_poolings or [1.0] * len(option.input_lengths))


def _ids_per_row(option: ShardingOption) -> float:
    """Ids per row over the table's features: ids per bag (``input_lengths``) x bags."""
    return float(sum(n * b for n, b in zip(option.input_lengths, _bags_per_row(option))))


def _option_traffic(option: ShardingOption, batch_size: int, world: int, local: int) -> _Traffic:
    """Input-id and forward-embedding bytes per rank for one table (backward = forward).

    Formulas (``B`` per-rank batch, ``W`` ranks, ``L`` ranks per host, ``n`` ids per row of the
    table, ``k`` bags per row (one per feature; MemoNet's pairs one per id), ``D`` dim, ``S``
    shards; ``(W-1)/W`` of an all-to-all leaves a rank,
    ``(W-L)/(W-1)`` of that leaves the host):

    * table_wise: ids ``B (8n + 4k) (W-1)/W``; output ``B D' (W-1)/W``
    * column_wise / table_column_wise: ids ``S`` times (every column shard gets every id);
      output as table_wise (the shards' columns add up to ``D``)
    * row_wise: ids ``B 8n (W-1)/W`` plus lengths ``B 4k`` to every other rank; pooled output
      is a reduce-scatter of ``[W B, D]`` partial sums: ``(W-1) B D'``; a sequence table's
      looked-up rows travel once: ``B D' (W-1)/W``
    * table_row_wise: row_wise among the ``L`` ranks of the table's host (lengths to ``L``
      ranks, reduce-scatter ``(L-1) B D'`` inside the host), then ``B D' (W-L)/W`` across hosts
    * grid_shard: table_row_wise per column group (ids go to every column group)
    * data_parallel: nothing (its gradients join the dense all-reduce)

    with ``D' = 4 D k`` bytes per row for pooled tables and ``4 D n`` for sequence tables.
    """
    if option.sharding_type == ShardingType.DATA_PARALLEL.value:
        return _Traffic(0.0, 0.0, 0.0, 0.0)
    ids_per_row = _ids_per_row(option)
    bags = float(sum(_bags_per_row(option)))  # one length and (pooled) one output row per bag
    dim = int(option.tensor.shape[1])
    id_bytes = _ID_BYTES + (_PER_ID_WEIGHT_BYTES if option.is_weighted else 0)
    out_per_row = _OUTPUT_BYTES * dim * (bags if option.is_pooled else ids_per_row)
    off_rank = (world - 1) / world
    intra = 1.0 - _off_host_share(world, local)
    sharding = option.sharding_type
    if sharding in (
        ShardingType.TABLE_WISE.value,
        ShardingType.COLUMN_WISE.value,
        ShardingType.TABLE_COLUMN_WISE.value,
    ):
        copies = 1 if sharding == ShardingType.TABLE_WISE.value else len(option.shards)
        ids = copies * batch_size * (id_bytes * ids_per_row + _LENGTH_BYTES * bags) * off_rank
        out = batch_size * out_per_row * off_rank
        return _Traffic(ids, out, ids * intra, out * intra)
    if sharding == ShardingType.ROW_WISE.value:
        ids = batch_size * (id_bytes * ids_per_row * off_rank + _LENGTH_BYTES * bags * (world - 1))
        out = (
            (world - 1) * batch_size * out_per_row
            if option.is_pooled
            else batch_size * out_per_row * off_rank
        )
        return _Traffic(ids, out, ids * intra, out * intra)
    if sharding in (ShardingType.TABLE_ROW_WISE.value, ShardingType.GRID_SHARD.value):
        column_groups = len({tuple(s.offset[1:]) for s in option.shards})
        ids = (
            column_groups
            * batch_size
            * (id_bytes * ids_per_row + _LENGTH_BYTES * bags * local)
            * off_rank
        )
        out_intra = (local - 1) * batch_size * out_per_row
        out = out_intra + batch_size * out_per_row * (world - local) / world
        return _Traffic(ids, out, ids * intra, out_intra)
    raise ValueError(f"table {option.name}: no traffic model for sharding type {sharding!r}")


def estimate_comms(
    options: List[ShardingOption],
    topology: Topology,
    batch_size: int,
    dense_params: int,
) -> CommsEstimate:
    """All-to-all and all-reduce bytes per rank and batch (see :func:`_option_traffic`).

    Args:
        options: the chosen sharding options.
        topology: the cluster (world size, ranks per host, bandwidths).
        batch_size: per-rank batch size.
        dense_params: parameters outside the sharded tables (all-reduced by DDP).
    """
    world, local = topology.world_size, topology.local_world_size
    estimate = CommsEstimate()
    dp_params = 0
    for option in options:
        if option.sharding_type == ShardingType.DATA_PARALLEL.value:
            dp_params += math.prod(option.tensor.shape)
            continue
        traffic = _option_traffic(option, batch_size, world, local)
        estimate.input_ids += traffic.ids
        estimate.embeddings_fwd += traffic.out
        estimate.gradients_bwd += traffic.out
        estimate.intra_host += traffic.ids_intra + 2 * traffic.out_intra
        estimate.inter_host += (
            traffic.ids - traffic.ids_intra + 2 * (traffic.out - traffic.out_intra)
        )
    # Ring all-reduce: each rank sends 2 (W-1)/W of the gradient bytes; the ring crosses hosts
    # when there is more than one, so its slowest link sets the pace.
    allreduce = (
        2.0 * (world - 1) / world * (dense_params + dp_params) * _OUTPUT_BYTES if world > 1 else 0.0
    )
    estimate.dense_allreduce = allreduce
    if world > local:
        estimate.inter_host += allreduce
    else:
        estimate.intra_host += allreduce
    # Bandwidths are bytes/ms.
    estimate.seconds = (
        estimate.intra_host / topology.intra_host_bw + estimate.inter_host / topology.inter_host_bw
    ) / 1000.0
    per_rank_ms = [0.0] * world
    for option in options:
        for shard in option.shards:
            if shard.perf is not None and shard.rank is not None:
                per_rank_ms[shard.rank] += (
                    shard.perf.fwd_comms + shard.perf.bwd_comms + shard.perf.input_dist_comms
                )
    estimate.planner_comms_ms_max = max(per_rank_ms) if per_rank_ms else 0.0
    return estimate


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------


@dataclass
class TablePlacement:
    """How one table was sharded."""

    name: str
    rows: int
    dim: int
    bytes_per_value: int
    sharding_type: str
    compute_kernel: str
    ids_per_row: float
    shards: List[Dict[str, Any]]


@dataclass
class PlanReport:
    """Everything ``dtn-plan`` prints and writes as JSON."""

    cluster: Dict[str, Any]
    batch_size: int
    optimizer: str
    storage_reservation: float
    usable_bytes: int
    tables: List[TablePlacement]
    ranks: List[RankMemory]
    comms: CommsEstimate
    dense_params: int

    @property
    def table_bytes(self) -> int:
        """Weights of every table once (data-parallel tables counted once)."""
        return sum(t.rows * t.dim * t.bytes_per_value for t in self.tables)

    def to_json(self) -> Dict[str, Any]:
        comms = asdict(self.comms)
        comms["total"] = self.comms.total
        return {
            "fits": True,
            "cluster": self.cluster,
            "batch_size": self.batch_size,
            "optimizer": self.optimizer,
            "storage_reservation": self.storage_reservation,
            "usable_bytes_per_rank": self.usable_bytes,
            "dense_params": self.dense_params,
            "table_bytes": self.table_bytes,
            "tables": [asdict(t) for t in self.tables],
            "ranks": [asdict(r) for r in self.ranks],
            "comms_per_batch": comms,
        }


def build_report(
    options: List[ShardingOption],
    *,
    cluster: ClusterSpec,
    topology: Topology,
    batch_size: int,
    optimizer: str,
    storage_reservation: float,
    usable_bytes: int,
    dense_params: int,
) -> PlanReport:
    """Per-table placement, per-rank memory and traffic of a plan."""
    tables = [
        TablePlacement(
            name=o.name,
            rows=int(o.tensor.shape[0]),
            dim=int(o.tensor.shape[1]),
            bytes_per_value=o.tensor.element_size(),
            sharding_type=o.sharding_type,
            compute_kernel=o.compute_kernel,
            ids_per_row=_ids_per_row(o),
            shards=[
                {"rank": s.rank, "offsets": list(s.offset), "sizes": list(s.size)} for s in o.shards
            ],
        )
        for o in options
    ]
    return PlanReport(
        cluster=asdict(cluster),
        batch_size=batch_size,
        optimizer=optimizer,
        storage_reservation=storage_reservation,
        usable_bytes=usable_bytes,
        tables=tables,
        ranks=rank_memory(options, topology, optimizer),
        comms=estimate_comms(options, topology, batch_size, dense_params),
        dense_params=dense_params,
    )
