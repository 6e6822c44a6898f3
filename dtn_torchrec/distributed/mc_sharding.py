"""Row-wise sharding of managed-collision tables (``ManagedCollisionEmbeddingBagCollection``).

TorchRec's ``ManagedCollisionEmbeddingBagCollectionSharder`` needs two corrections here:

* its default EBC sharder offers ``row_wise`` only on CUDA, and MC tables shard only row-wise,
  so on CPU it offers nothing; we give it the project's CPU row-wise EBC sharder, and on CPU
  only the ``fused`` kernel (it lists UVM / key-value kernels on every device);
* when an eviction gives rows to new ids it resets them with
  ``SplitTableBatchedEmbeddingBagsCodegen.reset_embedding_weight_momentum``, which calls
  ``fbgemm::reset_weight_momentum`` (no CPU kernel: ``NotImplementedError ... 'CPU' backend``)
  for rowwise Adagrad and leaves every other optimiser's state alone (an evicted row of exact
  Adagrad keeps its old accumulator). :class:`ShardedMchBags` re-initialises the evicted rows
  with the table's ``init_fn`` and zeroes their optimiser state through the TBE's per-table
  views, the same on every device and for every optimiser.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.mc_embeddingbag import (
    ManagedCollisionEmbeddingBagCollectionSharder,
    ShardedManagedCollisionEmbeddingBagCollection,
)
from torchrec.distributed.types import ParameterSharding, ShardingEnv
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection

_CPU = "cpu"


class ShardedMchBags(ShardedManagedCollisionEmbeddingBagCollection):
    """The sharded MC-EBC whose evictions reset rows and optimiser state on any device.

    A remapping written by N ranks loads on M ranks when M divides N (each rank's id range and
    rows are unions of the writers'); on other world sizes TorchRec's load hook
    (``MCHManagedCollisionModule.validate_state``) refuses it: "shard within range [a, b] cannot
    be built out of segements ...".
    """

    def _evict(self, evictions_per_table: Dict[str, Optional[torch.Tensor]]) -> None:
        """Args: evictions_per_table: table -> local rows ``[K]`` given to new ids, or None."""
        for table, rows in evictions_per_table.items():
            if rows is None or rows.numel() == 0:
                continue
            tbe, index = self._table_to_tbe_and_index[table]
            position = int(index.item())
            init_fn = self._embedding_module._table_name_to_config[table].init_fn
            with torch.no_grad():
                weight = tbe.split_embedding_weights()[position]
                rows = rows.to(weight.device).long()
                fresh = torch.empty(
                    (rows.numel(), weight.shape[1]), dtype=weight.dtype, device=weight.device
                )
                weight[rows] = init_fn(fresh) if init_fn is not None else fresh.zero_()
                for state in tbe.split_optimizer_states()[position]:
                    state[rows] = 0


class MchBagsSharder(ManagedCollisionEmbeddingBagCollectionSharder):
    """Row-wise sharder of MC-EBCs, usable on CPU + gloo (see the module docstring).

    Args:
        ebc_sharder: the sharder of the wrapped EBC (offers row_wise on CPU).
    """

    def __init__(self, ebc_sharder: EmbeddingBagCollectionSharder) -> None:
        super().__init__(ebc_sharder=ebc_sharder)

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        if compute_device_type == _CPU:
            return [EmbeddingComputeKernel.FUSED.value]
        return super().compute_kernels(sharding_type, compute_device_type)

    def shard(
        self,
        module: ManagedCollisionEmbeddingBagCollection,
        params: Dict[str, ParameterSharding],
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> ShardedMchBags:
        return ShardedMchBags(
            module,
            params,
            ebc_sharder=self._e_sharder,
            mc_sharder=self._mc_sharder,
            env=env,
            device=device if device is not None else torch.device("cuda"),
        )
