"""Configuration of the distributed layer: sharding, sparse (fused) and dense optimisers.

Plain dataclasses; the trainer's YAML loader builds them from dicts. Names of sharding types and
compute kernels are TorchRec's own (``torchrec.distributed.types.ShardingType`` and
``torchrec.distributed.embedding_types.EmbeddingComputeKernel`` values).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.types import ShardingType

SHARDING_TYPES: Tuple[str, ...] = tuple(t.value for t in ShardingType)
COMPUTE_KERNELS: Tuple[str, ...] = tuple(k.value for k in EmbeddingComputeKernel)
SPARSE_OPTIMIZERS: Tuple[str, ...] = ("rowwise_adagrad", "adagrad", "adam", "sgd")
DENSE_OPTIMIZERS: Tuple[str, ...] = ("adam", "adamw", "sgd", "adagrad")
LR_DECAYS: Tuple[str, ...] = ("none", "linear", "cosine")


def _check_names(values: Optional[List[str]], allowed: Tuple[str, ...], what: str) -> None:
    if values is None:
        return
    if len(values) == 0:
        raise ValueError(f"{what}: empty list (use null for the planner's choice)")
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise ValueError(f"{what}: unknown value(s) {unknown}; known: {list(allowed)}")


@dataclass
class TableShardingConfig:
    """Constraints for one embedding table (or every table matching a glob pattern).

    Args:
        sharding_types: allowed sharding types, e.g. ``["row_wise"]``; None = the default.
        compute_kernels: allowed kernels, e.g. ``["fused"]``; None = any the sharder offers.
        min_partition: smallest column-wise shard width (column_wise / table_column_wise).
        pooling_factor: mean ids per bag of the table's features; feeds the planner's cost
            model (``ParameterConstraints.pooling_factors``).
    """

    sharding_types: Optional[List[str]] = None
    compute_kernels: Optional[List[str]] = None
    min_partition: Optional[int] = None
    pooling_factor: Optional[float] = None

    def validate(self, where: str) -> None:
        _check_names(self.sharding_types, SHARDING_TYPES, f"{where}.sharding_types")
        _check_names(self.compute_kernels, COMPUTE_KERNELS, f"{where}.compute_kernels")
        if self.min_partition is not None and self.min_partition <= 0:
            raise ValueError(f"{where}.min_partition: must be positive, got {self.min_partition}")
        if self.pooling_factor is not None and self.pooling_factor <= 0:
            raise ValueError(f"{where}.pooling_factor: must be positive, got {self.pooling_factor}")


@dataclass
class ShardingConfig:
    """How embedding tables are sharded and what the planner may assume about the hardware.

    Args:
        sharding_types: default allowed sharding types for every table without its own entry;
            None = the planner's choice among the types TorchRec offers for the device.
        tables: per-table constraints keyed by table name or glob pattern (``"memonet_*"``).
            An exact name wins over patterns; among patterns the first listed match wins.
        hbm_cap_gb: device memory per rank (GiB); None = detected (CUDA) / TorchRec default.
        ddr_cap_gb: host memory per rank (GiB); None = host RAM / local world size.
        intra_host_bw_gbps: bandwidth between ranks of one host (GB/s); None = TorchRec default.
        inter_host_bw_gbps: bandwidth between hosts (GB/s); None = TorchRec default.
        storage_reservation: fraction of each rank's device memory (HBM) the planner keeps free,
            on top of the dense model and input batches it counts (TorchRec's heuristic);
            TorchRec reserves no host memory, so it does nothing on CPU.
        uvm_caching: on CUDA, let tables without configured kernels live in host memory with an
            HBM cache (``fused_uvm_caching``).
    """

    sharding_types: Optional[List[str]] = None
    tables: Dict[str, TableShardingConfig] = field(default_factory=dict)
    hbm_cap_gb: Optional[float] = None
    ddr_cap_gb: Optional[float] = None
    intra_host_bw_gbps: Optional[float] = None
    inter_host_bw_gbps: Optional[float] = None
    storage_reservation: float = 0.15
    uvm_caching: bool = False

    def validate(self) -> None:
        _check_names(self.sharding_types, SHARDING_TYPES, "sharding.sharding_types")
        for pattern, table_cfg in self.tables.items():
            table_cfg.validate(f"sharding.tables[{pattern!r}]")
        for name in ("hbm_cap_gb", "ddr_cap_gb", "intra_host_bw_gbps", "inter_host_bw_gbps"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"sharding.{name}: must be positive, got {value}")
        if not 0.0 <= self.storage_reservation < 1.0:
            raise ValueError(
                f"sharding.storage_reservation: must lie in [0, 1), got {self.storage_reservation}"
            )


@dataclass
class SparseOptimizerConfig:
    """The optimiser fused into the embedding backward (FBGEMM TBE), for sharded tables.

    ``data_parallel`` tables are not sharded, so they are updated by the dense optimiser.
    FBGEMM's CPU kernels run only ``rowwise_adagrad`` / ``adagrad`` / ``sgd`` and no weight decay
    (``shard_model`` refuses the rest on CPU); ``adam`` and weight decay need CUDA.

    Args:
        name: ``rowwise_adagrad`` | ``adagrad`` | ``adam`` (CUDA) | ``sgd``.
        lr: learning rate.
        eps: epsilon of the Adagrad / Adam denominators.
        weight_decay: L2 penalty (``rowwise_adagrad``) or decoupled decay (``adam``), CUDA only;
            FBGEMM's exact ``adagrad`` and ``sgd`` have none, so a non-zero value is an error.
        betas: Adam's (beta1, beta2).
    """

    name: str = "rowwise_adagrad"
    lr: float = 0.01
    eps: float = 1e-8
    weight_decay: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.999)

    def validate(self) -> None:
        if self.name not in SPARSE_OPTIMIZERS:
            raise ValueError(
                f"sparse_optimizer.name: unknown {self.name!r}; known: {list(SPARSE_OPTIMIZERS)}"
            )
        if self.lr <= 0:
            raise ValueError(f"sparse_optimizer.lr: must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"sparse_optimizer.weight_decay: negative ({self.weight_decay})")
        if self.weight_decay > 0 and self.name in ("adagrad", "sgd"):
            raise ValueError(
                f"sparse_optimizer.weight_decay: FBGEMM's fused {self.name!r} has no weight decay;"
                " use rowwise_adagrad or adam, or set it to 0"
            )
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"sparse_optimizer.betas: need two values in [0, 1), got {self.betas}")


@dataclass
class DenseOptimizerConfig:
    """The optimiser of every parameter not updated in backward (dense part, DP tables).

    The learning rate of step ``s`` (0-based) is ``lr * multiplier(s)``: linear warm-up
    ``(s + 1) / warmup_steps`` for ``s < warmup_steps``, then ``decay`` over ``decay_steps``
    steps from 1 down to ``min_lr_ratio`` (and flat afterwards); see ``optimizers.lr_multiplier``.

    Args:
        name: ``adam`` | ``adamw`` | ``sgd`` | ``adagrad``.
        lr: peak learning rate.
        weight_decay: torch's ``weight_decay`` of the chosen optimiser.
        betas: Adam/AdamW betas.
        eps: Adam/AdamW/Adagrad epsilon.
        grad_clip_norm: clip the total 2-norm of the dense gradients to this value; None = off.
        warmup_steps: linear warm-up steps (0 = none).
        decay: ``none`` | ``linear`` | ``cosine``.
        decay_steps: length of the decay after warm-up (required when decay is not ``none``).
        min_lr_ratio: final multiplier of the decay.
    """

    name: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip_norm: Optional[float] = None
    warmup_steps: int = 0
    decay: str = "none"
    decay_steps: int = 0
    min_lr_ratio: float = 0.0

    def validate(self) -> None:
        if self.name not in DENSE_OPTIMIZERS:
            raise ValueError(
                f"dense_optimizer.name: unknown {self.name!r}; known: {list(DENSE_OPTIMIZERS)}"
            )
        if self.lr <= 0:
            raise ValueError(f"dense_optimizer.lr: must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"dense_optimizer.weight_decay: negative ({self.weight_decay})")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"dense_optimizer.betas: need two values in [0, 1), got {self.betas}")
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            raise ValueError(
                f"dense_optimizer.grad_clip_norm: must be positive, got {self.grad_clip_norm}"
            )
        if self.warmup_steps < 0:
            raise ValueError(f"dense_optimizer.warmup_steps: negative ({self.warmup_steps})")
        if self.decay not in LR_DECAYS:
            raise ValueError(
                f"dense_optimizer.decay: unknown {self.decay!r}; known: {list(LR_DECAYS)}"
            )
        if self.decay != "none" and self.decay_steps <= 0:
            raise ValueError(
                f"dense_optimizer.decay_steps: must be positive with decay={self.decay!r}"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(
                f"dense_optimizer.min_lr_ratio: must lie in [0, 1], got {self.min_lr_ratio}"
            )
