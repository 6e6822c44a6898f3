"""MemoNet's codebook on 2 ranks with distinct-id lookups: the ranks' batches have different
numbers of distinct ids, each rank pads its bags to the largest (``PairIdDedup.group``, set by
``shard_model``), and the sharded step equals an unsharded one. Checked: the
expert's output on each rank, and the codebook after one fused SGD step on the mean of both
ranks' gradients (TorchRec divides embedding gradients by the world size).
"""

from __future__ import annotations

from typing import Any, Dict, List

import pytest
import torch
from dist_utils import run_on_ranks
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from toy_model import local_state, slice_of, write_known_values

from dtn_torchrec.models.experts.memonet import MemoNetExpert
from dtn_torchrec.models.pair_hash import MEMONET_PAIRS_KEY
from dtn_torchrec.models.types import ExpertInputs

FIELDS, DIM, BUCKETS, NUM_HASH, BATCH = 4, 8, 40, 2, 6
PAIRS = FIELDS * (FIELDS - 1) // 2
LR = 0.5


def _expert(device: torch.device) -> MemoNetExpert:
    return MemoNetExpert(
        num_fields=FIELDS,
        embedding_dim=DIM,
        num_crossed_fields=FIELDS,
        num_hash=NUM_HASH,
        num_buckets=BUCKETS,
        codeword_dim=DIM,
        output_dim=5,
        name="x",
        device=device,
    )


def _inputs(rank: int) -> ExpertInputs:
    """Rank 0 spreads its ids over the codebook, rank 1 repeats a few: different strides."""
    g = torch.Generator().manual_seed(10 + rank)
    num_ids = BATCH * PAIRS * NUM_HASH
    high = BUCKETS if rank == 0 else 5
    ids = torch.randint(0, high, (num_ids,), generator=g)
    fields = torch.randn(BATCH, FIELDS, DIM, generator=g)
    return ExpertInputs(
        fields=fields,
        flat=fields.flatten(1),
        pair_ids=KeyedJaggedTensor(
            keys=[MEMONET_PAIRS_KEY],
            values=ids,
            lengths=torch.ones(num_ids, dtype=torch.int32),
            stride=num_ids,
        ),
    )


def _output_weights(rank: int) -> torch.Tensor:
    return torch.randn(BATCH, 5, generator=torch.Generator().manual_seed(20 + rank))


def _sharded_step(sharding_type: str) -> Dict[str, Any]:
    import torch.distributed as dist

    from dtn_torchrec.distributed.config import (
        ShardingConfig,
        SparseOptimizerConfig,
        TableShardingConfig,
    )
    from dtn_torchrec.distributed.optimizers import apply_sparse_optimizer
    from dtn_torchrec.distributed.parallel import shard_model
    from dtn_torchrec.distributed.planning import plan_model, plan_to_json
    from dtn_torchrec.distributed.topology import topology_from_env

    rank, world_size = dist.get_rank(), dist.get_world_size()
    module = _expert(torch.device("meta"))
    apply_sparse_optimizer(module, SparseOptimizerConfig(name="sgd", lr=LR))
    cfg = ShardingConfig(tables={"memonet_*": TableShardingConfig([sharding_type])})
    plan = plan_model(
        module, cfg, topology=topology_from_env("cpu", cfg), batch_size=BATCH, pg=dist.group.WORLD
    )
    dmp = shard_model(module, device=torch.device("cpu"), plan=plan)
    write_known_values(dmp)

    inputs = _inputs(rank)
    distinct = int(torch.unique(inputs.pair_ids.values()).numel())
    out = dmp(inputs)
    (out * _output_weights(rank)).sum().backward()  # the fused SGD steps the codebook

    reference = _expert(torch.device("cpu"))
    write_known_values(reference)
    codebook = next(n for n, _ in reference.named_parameters() if "codebook" in n)
    reference_out = reference(inputs)
    for r in range(world_size):  # the sharded table steps on the mean of the ranks' gradients
        ((reference(_inputs(r)) * _output_weights(r)).sum() / world_size).backward()
    stepped = reference.get_parameter(codebook) - LR * reference.get_parameter(codebook).grad
    checked: List[str] = []
    for key, value in local_state(dmp).items():
        name, _, offsets = key.partition("@")
        if name == codebook:
            expected = slice_of(stepped, [int(o) for o in offsets.split(",")], list(value.shape))
            torch.testing.assert_close(value, expected.detach(), atol=1e-6, rtol=1e-5)
            checked.append(key)
    torch.testing.assert_close(out, reference_out, atol=1e-6, rtol=1e-5)
    return {"plan": plan_to_json(plan), "distinct": distinct, "checked": checked}


@pytest.mark.slow
@pytest.mark.parametrize("sharding_type", ["table_wise", "row_wise"])
def test_codebook_with_a_stride_per_rank_matches_unsharded(sharding_type: str) -> None:
    results = run_on_ranks(_sharded_step, world_size=2, sharding_type=sharding_type)
    assert results[0]["distinct"] > results[1]["distinct"]  # rank 1 pads
    (module,) = results[0]["plan"].values()
    assert [info["sharding_type"] for info in module.values()] == [sharding_type]
    assert sum(len(r["checked"]) for r in results) >= 1  # some rank compared its shard(s)
