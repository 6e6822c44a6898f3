"""Sharders for EmbeddingBagCollection / EmbeddingCollection with the CPU offer corrected.

TorchRec's stock sharders decide which sharding types the planner may use on each device. On CPU
(gloo) they are wrong in two places, both checked on the pinned stack
(``docs/sharding.md``, sharding types):

* ``EmbeddingBagCollectionSharder`` offers ``row_wise`` / ``table_row_wise`` only on CUDA, yet
  both are exact on CPU + gloo (forward and fused update equal an unsharded model). We add them
  to what may be *requested*; a table without constraints still gets the stock offer
  (``default_sharding_types``), so the planner's choice on CPU is unchanged.
* ``EmbeddingCollectionSharder`` offers ``data_parallel``, which crashes on CPU (FBGEMM's CPU
  dense TBE ignores ``PoolingMode.NONE`` and returns pooled rows), so we withdraw it on CPU.

A table the configuration does not constrain is never offered ``data_parallel``
(``default_sharding_types``): the planner's choice for it flips with the world size, and a
table that moves between data-parallel and sharded changes its optimiser (dense vs fused) and
so its checkpoint layout. A configuration that names ``data_parallel`` still gets it.
"""

from __future__ import annotations

from typing import List

import torch.nn as nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.types import ModuleSharder, ShardingType

from dtn_torchrec.distributed.mc_sharding import MchBagsSharder

_CPU = "cpu"


def _without_data_parallel(types: List[str]) -> List[str]:
    return [t for t in types if t != ShardingType.DATA_PARALLEL.value]


class EmbeddingBagCollectionCpuRowWiseSharder(EmbeddingBagCollectionSharder):
    """``EmbeddingBagCollectionSharder`` that also allows row_wise / table_row_wise on CPU."""

    def sharding_types(self, compute_device_type: str) -> List[str]:
        types = super().sharding_types(compute_device_type)
        if compute_device_type == _CPU:
            types += [ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value]
        return types

    def default_sharding_types(self, compute_device_type: str) -> List[str]:
        """Types the planner may pick for a table the configuration does not constrain."""
        return _without_data_parallel(super().sharding_types(compute_device_type))


class EmbeddingCollectionCpuSafeSharder(EmbeddingCollectionSharder):
    """``EmbeddingCollectionSharder`` without data_parallel on CPU (it crashes there)."""

    def sharding_types(self, compute_device_type: str) -> List[str]:
        types = super().sharding_types(compute_device_type)
        if compute_device_type == _CPU:
            types = _without_data_parallel(types)
        return types

    def default_sharding_types(self, compute_device_type: str) -> List[str]:
        """Types the planner may pick for a table the configuration does not constrain."""
        return _without_data_parallel(self.sharding_types(compute_device_type))


def embedding_sharders() -> List[ModuleSharder[nn.Module]]:
    """The sharders to give both the planner and ``DistributedModelParallel``."""
    ebc_sharder = EmbeddingBagCollectionCpuRowWiseSharder()
    return [ebc_sharder, EmbeddingCollectionCpuSafeSharder(), MchBagsSharder(ebc_sharder)]
