"""Planning and sharding: config validation, plans, and sharded == unsharded on 2 gloo ranks."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import pytest
import torch
import torch.nn as nn
from dist_utils import run_on_ranks
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from toy_model import BAG_FEATURES, BAG_ROWS, ToyModel, ToyTrain, bag_table

from dtn_torchrec.distributed.config import ShardingConfig, TableShardingConfig
from dtn_torchrec.distributed.planning import (
    column_shards,
    find_embedding_tables,
    format_plan,
    plan_model,
    plan_to_json,
    table_constraints,
)
from dtn_torchrec.distributed.sharders import embedding_sharders
from dtn_torchrec.distributed.topology import make_topology

SPARSE_LR = 0.1
DENSE_LR = 0.3  # differs from SPARSE_LR: shows which optimiser updated a table
BATCH_SIZE = 8


def _meta_model() -> ToyTrain:
    return ToyTrain(ToyModel(torch.device("meta")))


def _tables_cfg(bag_types: Optional[List[str]], seq_types: Optional[List[str]]) -> ShardingConfig:
    return ShardingConfig(
        tables={
            "t_*": TableShardingConfig(sharding_types=bag_types, min_partition=8),
            "c0": TableShardingConfig(sharding_types=seq_types, min_partition=4),
        }
    )


def _constraints(cfg: ShardingConfig, device: str = "cpu") -> None:
    sharders = embedding_sharders()
    table_constraints(find_embedding_tables(_meta_model(), sharders), cfg, device)


# -- configuration errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg, words",
    [
        # EC + data_parallel crashes on CPU (FBGEMM's dense CPU TBE ignores PoolingMode.NONE).
        (_tables_cfg(None, ["data_parallel"]), ["'c0'", "EmbeddingCollection", "data_parallel"]),
        # EC never supports table_row_wise.
        (_tables_cfg(None, ["table_row_wise"]), ["'c0'", "table_row_wise"]),
        # The dense kernel exists only for data_parallel.
        (
            ShardingConfig(
                tables={"t_f1": TableShardingConfig(["table_wise"], compute_kernels=["dense"])}
            ),
            ["'t_f1'", "table_wise", "dense"],
        ),
        # CUDA-only kernel requested on CPU.
        (
            ShardingConfig(
                tables={"t_f2": TableShardingConfig(["row_wise"], ["fused_uvm_caching"])}
            ),
            ["'t_f2'", "fused_uvm_caching"],
        ),
        (ShardingConfig(sharding_types=["diagonal"]), ["sharding.sharding_types", "diagonal"]),
        (ShardingConfig(tables={"memonet_*": TableShardingConfig(["row_wise"])}), ["memonet_*"]),
    ],
)
def test_unsupported_request_names_the_table(cfg: ShardingConfig, words: List[str]) -> None:
    with pytest.raises(ValueError) as info:
        _constraints(cfg)
    for word in words:
        assert word in str(info.value)


def test_kernel_only_request_keeps_the_types_that_offer_it() -> None:
    cfg = ShardingConfig(tables={"t_f0": TableShardingConfig(compute_kernels=["dense"])})
    sharders = embedding_sharders()
    constraints = table_constraints(find_embedding_tables(_meta_model(), sharders), cfg, "cpu")
    assert constraints["t_f0"].sharding_types == ["data_parallel"]
    assert constraints["t_f0"].compute_kernels == ["dense"]
    # The EmbeddingCollection's only dense option (data_parallel) is withdrawn on CPU.
    cfg = ShardingConfig(tables={"c0": TableShardingConfig(compute_kernels=["dense"])})
    with pytest.raises(ValueError, match="table 'c0'.*cannot use compute kernel"):
        _constraints(cfg)


def test_duplicate_table_names_are_refused() -> None:
    class TwoBags(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            config = EmbeddingBagConfig(
                name="t", embedding_dim=8, num_embeddings=10, feature_names=["f"]
            )
            self.a = EmbeddingBagCollection(tables=[config], device=torch.device("meta"))
            self.b = EmbeddingBagCollection(tables=[config], device=torch.device("meta"))

    with pytest.raises(ValueError, match="'t' appears in 'a' and 'b'"):
        find_embedding_tables(TwoBags(), embedding_sharders())


def test_exact_name_wins_over_pattern() -> None:
    cfg = ShardingConfig(
        sharding_types=["table_wise"],
        tables={
            "t_*": TableShardingConfig(["column_wise"]),
            "t_f2": TableShardingConfig(["row_wise"]),
        },
    )
    sharders = embedding_sharders()
    constraints = table_constraints(find_embedding_tables(_meta_model(), sharders), cfg, "cpu")
    assert constraints["t_f2"].sharding_types == ["row_wise"]
    assert constraints["t_f0"].sharding_types == ["column_wise"]
    assert constraints["c0"].sharding_types == ["table_wise"]


# -- plans without a process group (dtn-plan) --------------------------------------------------


def test_row_wise_plan_on_cpu_splits_rows_evenly() -> None:
    cfg = _tables_cfg(["row_wise"], ["row_wise"])
    topology = make_topology(world_size=2, local_world_size=2, compute_device="cpu", cfg=cfg)
    plan = plan_to_json(plan_model(_meta_model(), cfg, topology=topology, batch_size=BATCH_SIZE))
    for feature, rows in zip(BAG_FEATURES, BAG_ROWS):
        table = plan["model.ebc"][bag_table(feature)]
        assert table["sharding_type"] == "row_wise"
        assert table["compute_kernel"] == "fused"
        half = rows // 2
        assert table["shards"] == [
            {"rank": 0, "offsets": [0, 0], "sizes": [half, 16]},
            {"rank": 1, "offsets": [half, 0], "sizes": [rows - half, 16]},
        ]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_unconstrained_tables_are_never_offered_data_parallel(device: str) -> None:
    sharders = embedding_sharders()
    tables = find_embedding_tables(_meta_model(), sharders)
    cfg = ShardingConfig()
    for table in tables:
        offered = table_constraints(tables, cfg, device)[table.name].sharding_types
        assert "data_parallel" not in offered and "table_wise" in offered
        # 16 columns make one column shard: column-splitting types would duplicate table_wise.
        assert not {"column_wise", "table_column_wise", "grid_shard"} & set(offered)
    # Narrow column shards make column_wise a real choice again.
    wide = ShardingConfig(tables={"t_*": TableShardingConfig(min_partition=8)})
    offered = table_constraints(tables, wide, "cpu")[bag_table(BAG_FEATURES[0])].sharding_types
    assert offered == ["table_wise", "column_wise", "table_column_wise"]
    # Asking for data_parallel, or for its dense kernel, still gets it.
    asked = ShardingConfig(tables={"t_*": TableShardingConfig(["data_parallel", "table_wise"])})
    assert (
        "data_parallel"
        in table_constraints(tables, asked, "cpu")[bag_table(BAG_FEATURES[0])].sharding_types
    )


@pytest.mark.parametrize(
    "dim, min_partition, shards",
    [(16, None, 1), (64, None, 1), (256, None, 2), (16, 8, 2), (16, 4, 4), (18, 4, 1)],
)
def test_column_shards_follow_torchrec(dim: int, min_partition: Optional[int], shards: int) -> None:
    from torchrec.distributed.sharding_plan import _get_block_size_for_cw_shard

    assert column_shards(dim, min_partition) == shards
    if dim % 4 == 0:  # TorchRec warns (and uses one block) otherwise
        assert dim // _get_block_size_for_cw_shard(dim, min_partition) == shards


def test_cuda_cluster_plan_needs_no_gpu() -> None:
    cfg = ShardingConfig(sharding_types=["row_wise", "table_wise"], hbm_cap_gb=1.0)
    topology = make_topology(world_size=4, local_world_size=2, compute_device="cuda", cfg=cfg)
    plan = plan_model(_meta_model(), cfg, topology=topology, batch_size=BATCH_SIZE)
    tables = plan_to_json(plan)
    names = {table for module in tables.values() for table in module}
    assert names == {bag_table(f) for f in BAG_FEATURES} | {"c0"}
    for module in tables.values():
        for info in module.values():
            assert info["sharding_type"] in ("row_wise", "table_wise")
            assert info["shards"] and all(0 <= s["rank"] < 4 for s in info["shards"])
    text = format_plan(plan)
    assert all(name in text for name in names)


# -- sharded forward / update == unsharded reference (2 gloo ranks) ----------------------------


def _check_against_reference(table_types: Dict[str, List[str]]) -> Dict[str, Any]:
    """Runs on each rank: one fused-SGD + dense-SGD step of the sharded model against an
    unsharded copy with the same weights, stepped with SGD on the mean of both ranks' losses
    (fused tables at the sparse lr; data_parallel tables and the tower at the dense lr)."""
    import torch.distributed as dist
    from toy_model import (
        local_state,
        make_batch,
        reference_sgd_step,
        slice_of,
        write_known_values,
    )

    from dtn_torchrec.distributed.config import DenseOptimizerConfig, SparseOptimizerConfig
    from dtn_torchrec.distributed.optimizers import apply_sparse_optimizer, build_dense_optimizer
    from dtn_torchrec.distributed.parallel import shard_model
    from dtn_torchrec.distributed.topology import topology_from_env

    rank, world_size = dist.get_rank(), dist.get_world_size()
    cfg = ShardingConfig(
        tables={
            name: TableShardingConfig(sharding_types=types, min_partition=8 if name != "c0" else 4)
            for name, types in table_types.items()
        }
    )
    model = _meta_model()
    apply_sparse_optimizer(model, SparseOptimizerConfig(name="sgd", lr=SPARSE_LR))
    topology = topology_from_env("cpu", cfg)
    plan = plan_model(model, cfg, topology=topology, batch_size=BATCH_SIZE, pg=dist.group.WORLD)
    dmp = shard_model(model, device=torch.device("cpu"), plan=plan)
    write_known_values(dmp)
    optimizers = build_dense_optimizer(dmp, DenseOptimizerConfig(name="sgd", lr=DENSE_LR))

    batches = [make_batch(seed=100 + r, batch_size=BATCH_SIZE) for r in range(world_size)]
    loss, (_, logits, _) = dmp(batches[rank])
    loss.backward()
    optimizers.optimizer.step()
    with torch.no_grad():
        _, (_, next_logits, _) = dmp(batches[rank])

    reference = ToyTrain(ToyModel(torch.device("cpu")))
    write_known_values(reference)
    # Fused tables step with the sparse lr; data_parallel tables and the tower with the dense one.
    fused = {
        f"{module}.{'embedding_bags' if module.endswith('ebc') else 'embeddings'}.{table}.weight"
        for module, tables in plan_to_json(plan).items()
        for table, info in tables.items()
        if info["compute_kernel"] == "fused"
    }
    lrs = {
        name: SPARSE_LR if name in fused else DENSE_LR for name, _ in reference.named_parameters()
    }
    ref_logits = reference_sgd_step(reference, batches, lrs)
    with torch.no_grad():
        _, (_, ref_next_logits, _) = reference(batches[rank])

    torch.testing.assert_close(logits, ref_logits[rank], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(next_logits, ref_next_logits, atol=1e-6, rtol=1e-5)
    ref_state = reference.state_dict()
    checked = []
    for key, value in local_state(dmp).items():
        name, _, offsets = key.partition("@")
        expected = ref_state[name]
        if offsets:
            expected = slice_of(expected, [int(o) for o in offsets.split(",")], list(value.shape))
        torch.testing.assert_close(
            value, expected, atol=1e-6, rtol=1e-5, msg=lambda m: f"{key}: {m}"
        )
        checked.append(key)
    return {"plan": plan_to_json(plan), "checked": checked}


SHARDING_CASES = {
    "table_wise": {"t_*": ["table_wise"], "c0": ["table_wise"]},
    "column_wise": {"t_*": ["column_wise"], "c0": ["column_wise"]},
    "row_wise": {"t_*": ["row_wise"], "c0": ["row_wise"]},
    "table_row_wise": {"t_*": ["table_row_wise"], "c0": ["table_wise"]},
    "table_column_wise": {"t_*": ["table_column_wise"], "c0": ["row_wise"]},
    "data_parallel": {"t_*": ["data_parallel"], "c0": ["column_wise"]},
    "mixed": {
        "t_f0": ["table_wise"],
        "t_f1": ["column_wise"],
        "t_f2": ["row_wise"],
        "t_f3": ["data_parallel"],
        "c0": ["row_wise"],
    },
}


def _expected_type(table_types: Dict[str, List[str]], table: str) -> str:
    if table in table_types:
        return table_types[table][0]
    return table_types["t_*"][0]


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(SHARDING_CASES))
def test_sharded_step_matches_unsharded(case: str) -> None:
    table_types = SHARDING_CASES[case]
    results = run_on_ranks(_check_against_reference, world_size=2, table_types=table_types)
    plan = results[0]["plan"]
    for module in ("model.ebc", "model.ec"):
        for table, info in plan[module].items():
            assert info["sharding_type"] == _expected_type(table_types, table), (table, info)
            if info["sharding_type"] in ("column_wise", "table_column_wise", "row_wise"):
                assert sorted(s["rank"] for s in info["shards"]) == [0, 1], (table, info)
    # Between them the ranks compared every table (all its shards) and every dense tensor.
    checked = {key.partition("@")[0] for result in results for key in result["checked"]}
    assert checked == set(ToyTrain(ToyModel(torch.device("meta"))).state_dict())


@pytest.mark.slow
def test_one_rank_step_matches_unsharded() -> None:
    # One rank: DDP's all-reduce is replaced by the local gradients (shard_model's no-op hook);
    # the step, data-parallel tables included, still equals the reference.
    (result,) = run_on_ranks(
        _check_against_reference, world_size=1, table_types=SHARDING_CASES["data_parallel"]
    )
    assert result["checked"]
