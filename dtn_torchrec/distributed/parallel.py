"""Wrapping a model in ``DistributedModelParallel``: sharded tables + DDP for the rest."""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook
from torch.nn.parallel import DistributedDataParallel
from torchrec.distributed.model_parallel import (
    DefaultDataParallelWrapper,
    DistributedModelParallel,
)
from torchrec.distributed.types import ModuleSharder, ShardingEnv, ShardingPlan

from dtn_torchrec.distributed.library_warnings import harmless_warnings
from dtn_torchrec.distributed.optimizers import check_fused_optimizers
from dtn_torchrec.distributed.sharders import embedding_sharders
from dtn_torchrec.models.experts.memonet import PairIdDedup


def shard_model(
    module: nn.Module,
    *,
    device: torch.device,
    plan: ShardingPlan,
    sharders: Optional[List[ModuleSharder[nn.Module]]] = None,
    pg: Optional[dist.ProcessGroup] = None,
    find_unused_parameters: bool = False,
) -> DistributedModelParallel:
    """Shards ``module`` by ``plan``; materialises ``meta`` parameters on ``device``. On more
    than one rank MemoNet's distinct-id lookups get ``pg`` to pad to one batch size
    (:class:`PairIdDedup`).

    Args:
        module: the unsharded model, with ``optimizers.apply_sparse_optimizer`` applied.
        device: this rank's device.
        plan: from ``planning.plan_model`` (made with the same sharders).
        sharders: defaults to ``sharders.embedding_sharders()``.
        pg: process group; None = the default group.
        find_unused_parameters: DDP's flag, for models whose dense graph varies per batch.

    Raises:
        ValueError: a fused table's sparse optimiser cannot run on ``device`` (names the table).
    """
    check_fused_optimizers(module, plan, device.type)
    group = pg if pg is not None else dist.group.WORLD
    with harmless_warnings(
        "`broadcast_buffers` is deprecated",
        reason="TorchRec's DDP wrapper passes broadcast_buffers=False, deprecated but honoured"
        " by torch 2.13 as before (buffers are not synced, as TorchRec intends)",
    ):
        model = DistributedModelParallel(
            module=module,
            env=ShardingEnv.from_process_group(group),
            device=device,
            plan=plan,
            sharders=sharders if sharders is not None else embedding_sharders(),
            data_parallel_wrapper=DefaultDataParallelWrapper(
                find_unused_parameters=find_unused_parameters,
                # static_graph assumes every step uses the same parameters; unused ones break it.
                static_graph=not find_unused_parameters,
            ),
        )
    if group.size() > 1:
        for sub in model.modules():
            if isinstance(sub, PairIdDedup):
                sub.group = group  # one codebook batch size on every rank
    ddp = model._dmp_wrapped_module
    if group.size() == 1 and isinstance(ddp, DistributedDataParallel):
        # One rank: the all-reduce and its division by the world size would only copy and
        # scale every dense gradient by 1 (~3% of DTN's reference step on CPU). PyTorch's no-op
        # hook (meant for headroom analysis) is the exact synchronisation of a one-rank group.
        ddp.register_comm_hook(state=None, hook=noop_hook)
    return model
