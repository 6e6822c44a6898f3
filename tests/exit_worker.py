"""Worker for test_launch.py: joins the job, trains a sharded toy model with a fused optimiser
for a few steps, prints ``rank <r>/<world> done`` and leaves through ``shutdown_and_exit``.

Run under ``torchrun`` (any number of ranks) or alone (one rank).
"""

from __future__ import annotations

import torch
from toy_model import ToyModel, ToyTrain, make_batch

from dtn_torchrec.distributed.config import (
    DenseOptimizerConfig,
    ShardingConfig,
    SparseOptimizerConfig,
)
from dtn_torchrec.distributed.launch import init_distributed, shutdown_and_exit
from dtn_torchrec.distributed.optimizers import apply_sparse_optimizer, build_dense_optimizer
from dtn_torchrec.distributed.parallel import shard_model
from dtn_torchrec.distributed.planning import plan_model
from dtn_torchrec.distributed.topology import topology_from_env


def main() -> None:
    import torch.distributed as dist

    rank, world_size, _, device, _ = init_distributed()
    cfg = ShardingConfig(sharding_types=["table_wise", "row_wise"])
    model = ToyTrain(ToyModel(torch.device("meta")))
    apply_sparse_optimizer(model, SparseOptimizerConfig(name="rowwise_adagrad"))
    plan = plan_model(
        model, cfg, topology=topology_from_env(device.type, cfg), batch_size=8, pg=dist.group.WORLD
    )
    dmp = shard_model(model, device=device, plan=plan)
    optimizers = build_dense_optimizer(dmp, DenseOptimizerConfig())
    for step in range(3):
        loss, _ = dmp(make_batch(seed=10 * step + rank))
        loss.backward()
        optimizers.optimizer.step()
        optimizers.optimizer.zero_grad()
    print(f"rank {rank}/{world_size} done", flush=True)
    shutdown_and_exit(0)


if __name__ == "__main__":
    main()
