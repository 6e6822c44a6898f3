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
"""

from __future__ import annotations

from typing import List

import torch.nn as nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.types import ModuleSharder, ShardingType

_CPU = "cpu"


class EmbeddingBagCollectionCpuRowWiseSharder(EmbeddingBagCollectionSharder):
    """``EmbeddingBagCollectionSharder`` that also allows row_wise / table_row_wise on CPU."""

    def sharding_types(self, compute_device_type: str) -> List[str]:
        types = super().sharding_types(compute_device_type)
        if compute_device_type == _CPU:
            types += [ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value]
        return types

    def default_sharding_types(self, compute_device_type: str) -> List[str]:
        """Types the planner may pick for a table the configuration does not constrain."""
        return super().sharding_types(compute_device_type)


class EmbeddingCollectionCpuSafeSharder(EmbeddingCollectionSharder):
    """``EmbeddingCollectionSharder`` without data_parallel on CPU (it crashes there)."""

    def sharding_types(self, compute_device_type: str) -> List[str]:
        types = super().sharding_types(compute_device_type)
        if compute_device_type == _CPU:
            types = [t for t in types if t != ShardingType.DATA_PARALLEL.value]
        return types

    def default_sharding_types(self, compute_device_type: str) -> List[str]:
        """Types the planner may pick for a table the configuration does not constrain."""
        return self.sharding_types(compute_device_type)


def embedding_sharders() -> List[ModuleSharder[nn.Module]]:
    """The sharders to give both the planner and ``DistributedModelParallel``."""
    return [EmbeddingBagCollectionCpuRowWiseSharder(), EmbeddingCollectionCpuSafeSharder()]
