"""Managed-collision (MCH) field tables: raw 64-bit ids remapped to a fixed number of rows.

A field configured with ``collision: mch`` gets a TorchRec ``MCHManagedCollisionModule`` in
front of its table: every ``eviction_interval`` training steps the ids seen since the last
interval compete with the ids holding rows (LRU: most recent use; LFU: most uses); winners get
rows of their own, losers and ids not yet admitted share the table's last row. Two ids admitted
at once never share a row: a row changes owner only by eviction. The remapping state
(admitted ids, their rows, the policy's metadata) is a set of module buffers, so it is part of
the model's ``state_dict`` and of every checkpoint.

Row-wise sharding splits the (mixed) id space into ``buckets`` equal blocks, each owned by the
rank that holds the matching block of rows; :func:`set_mch_buckets` makes the number of
buckets the job's world size before planning.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from torchrec.modules.mc_modules import (
    LFU_EvictionPolicy,
    LRU_EvictionPolicy,
    ManagedCollisionCollection,
    MCHEvictionPolicy,
    MCHManagedCollisionModule,
)

from dtn_torchrec.dataclass_config import check_one_of

COLLISIONS = ("none", "mch")
EVICTIONS = ("lru", "lfu")

# MCH marks an empty slot with the largest int64, so mixed ids stay below it.
MCH_INPUT_HASH_SIZE = (1 << 63) - 1
_MASK_63 = (1 << 63) - 1
# splitmix64-style odd multipliers (below 2^63, so they are int64 constants).
_MIX_1 = 0x3C79AC492BA7B653
_MIX_2 = 0x1C69B3F74AC4AE35


@dataclass
class FieldTableConfig:
    """How one field's table maps ids to rows.

    Args:
        collision (str): ``"none"``: the dataset's ids index the table directly (``vocab`` /
            ``hash`` datasets); ``"mch"``: a managed-collision table of ``size`` rows that
            remaps any id (needed for ``--id-mapping raw`` datasets).
        size (int): rows of an ``mch`` table (its last row is shared by ids without a row).
        eviction (str): ``"lfu"`` (default; keeps the popular head, best in
            ``benchmarks.id_mapping``) or ``"lru"``: which ids keep their rows at an eviction.
        eviction_interval (int): training steps between evictions (new ids are admitted only
            then; until the first one every id uses the shared row).
    """

    collision: str = "none"
    size: int = 0
    eviction: str = "lfu"
    eviction_interval: int = 100

    def __post_init__(self) -> None:
        check_one_of("collision", self.collision, COLLISIONS)
        check_one_of("eviction", self.eviction, EVICTIONS)
        if self.collision == "mch" and self.size < 2:
            raise ValueError(f"size: an mch table needs >= 2 rows, got {self.size}")
        if self.eviction_interval < 1:
            raise ValueError(f"eviction_interval: must be >= 1, got {self.eviction_interval}")


def resolve_field_tables(
    tables: Mapping[str, FieldTableConfig], field_names: Sequence[str]
) -> Dict[str, FieldTableConfig]:
    """Each field's table config: its exact name first, else the first matching glob pattern
    (as ``sharding.tables``), else the default (``collision: none``).

    Raises:
        ValueError: a key that names no field and matches none.
    """
    for pattern in tables:
        if pattern not in field_names and not fnmatch.filter(field_names, pattern):
            raise ValueError(f"tables[{pattern!r}]: matches no field; fields: {list(field_names)}")
    resolved: Dict[str, FieldTableConfig] = {}
    for name in field_names:
        match = tables.get(name)
        if match is None:
            match = next(
                (cfg for pattern, cfg in tables.items() if fnmatch.fnmatchcase(name, pattern)),
                FieldTableConfig(),
            )
        resolved[name] = match
    return resolved


def mix_ids(ids: torch.Tensor, input_hash_size: int) -> torch.Tensor:
    """A bijection of ``[0, 2^63)`` that spreads ids evenly over the row-wise buckets.

    Raw ids are often small or clustered; bucketing them unmixed would send all of them to one
    rank's rows. Xor-shifts and odd multiplications modulo ``2^63`` are invertible, so distinct
    ids stay distinct; the final ``mod input_hash_size`` folds the one id mixed to ``2^63 - 1``
    (MCH's empty-slot marker) onto the id mixed to 0.

    Args:
        ids: int64 ids ``[N]``, non-negative.
        input_hash_size: the MCH module's input range.
    Returns:
        int64 ``[N]`` in ``[0, input_hash_size)``.
    """
    x = ids & _MASK_63
    x = x ^ (x >> 31)
    x = (x * _MIX_1) & _MASK_63
    x = x ^ (x >> 29)
    x = (x * _MIX_2) & _MASK_63
    x = x ^ (x >> 32)
    return x % input_hash_size


def _eviction_policy(name: str) -> MCHEvictionPolicy:
    return LRU_EvictionPolicy() if name == "lru" else LFU_EvictionPolicy()


def build_mch_bags(
    tables: Sequence[EmbeddingBagConfig],
    field_tables: Mapping[str, FieldTableConfig],
    *,
    is_weighted: bool,
    device: Optional[torch.device],
) -> ManagedCollisionEmbeddingBagCollection:
    """An MC-EBC over ``tables`` (one field each, ``num_embeddings`` = the field's mch size).

    Args:
        tables: the tables, ``feature_names`` = [field].
        field_tables: field -> its ``collision: mch`` config.
        is_weighted: per-id weights in the KJT.
        device: ``meta`` to defer allocation to DMP.
    """
    modules: Dict[str, MCHManagedCollisionModule] = {}
    for table in tables:
        cfg = field_tables[table.feature_names[0]]
        modules[table.name] = MCHManagedCollisionModule(
            zch_size=table.num_embeddings,
            device=device if device is not None else torch.device("cpu"),
            eviction_policy=_eviction_policy(cfg.eviction),
            eviction_interval=cfg.eviction_interval,
            input_hash_size=MCH_INPUT_HASH_SIZE,
            input_hash_func=mix_ids,
            name=table.name,
        )
    return ManagedCollisionEmbeddingBagCollection(
        EmbeddingBagCollection(tables=list(tables), is_weighted=is_weighted, device=device),
        ManagedCollisionCollection(modules, list(tables)),
    )


def set_mch_buckets(module: nn.Module, world_size: int) -> None:
    """Gives every MCH module of ``module`` one row-wise bucket per rank (before planning).

    TorchRec's planner refuses a bucket count that is not a multiple of the world size, and the
    count only decides how the id space is split across ranks, so the job sets it.
    """
    for sub in module.modules():
        if isinstance(sub, MCHManagedCollisionModule):
            sub._buckets = world_size
