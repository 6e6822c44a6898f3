"""The one build path (distributed/build.py): planner inputs shared by dtn-train and dtn-plan.

* No table is data-parallel unless the config names it, for the reference model on simulated
  CUDA clusters of 8, 16 and 64 ranks (the planner's choice used to flip with the rank count).
* MemoNet's pair feature is planned with ``F (F - 1) / 2 x num_hash`` ids per row, one per
  bag (TorchRec's ``num_poolings``), and dtn-plan's traffic report counts them so.
* dtn-train's ``plan.json`` equals dtn-plan's plan for the same config, schema and world size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import pytest
from dist_utils import run_on_ranks

from dtn_torchrec.cli.plan import main as plan_main
from dtn_torchrec.distributed.build import (
    build_meta_train_model,
    feature_bags_per_row,
    feature_ids_per_row,
    plan_for,
)
from dtn_torchrec.distributed.config import ShardingConfig
from dtn_torchrec.distributed.planning import (
    find_embedding_tables,
    plan_to_json,
    planner_constraints,
)
from dtn_torchrec.distributed.sharders import embedding_sharders
from dtn_torchrec.distributed.topology import ClusterSpec
from dtn_torchrec.models.pair_hash import MEMONET_PAIRS_KEY
from dtn_torchrec.models.stats import aliccp_reference_schema
from dtn_torchrec.train.config import load_run_config

REPO = Path(__file__).resolve().parent.parent
DTN_ALICCP = str(REPO / "configs" / "dtn_aliccp.yaml")
DTN_DEMO = str(REPO / "configs" / "dtn_demo.yaml")
HOST_RANKS = 8
HBM_GB = 80.0


def _sharding_types(world_size: int, overrides: List[str]) -> Dict[str, str]:
    cfg = load_run_config(DTN_ALICCP, overrides)
    schema = aliccp_reference_schema()
    model = build_meta_train_model(cfg.model, schema, cfg.train.sparse_optimizer)
    cluster = ClusterSpec(world_size, HOST_RANKS, "cuda", hbm_gb=HBM_GB)
    plan = plan_for(
        model, cfg.sharding, schema, topology=cluster.topology(), batch_size=cfg.data.batch_size
    )
    return {
        table: info["sharding_type"]
        for tables in plan_to_json(plan).values()
        for table, info in tables.items()
    }


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [8, 16, 64])
def test_reference_model_has_no_data_parallel_table_unless_configured(world_size: int) -> None:
    types = _sharding_types(world_size, [])
    assert len(types) == 26  # 23 fields + 3 MemoNet codebooks
    assert [t for t, kind in types.items() if kind == "data_parallel"] == []


@pytest.mark.slow
def test_configured_data_parallel_table_stays_data_parallel() -> None:
    types = _sharding_types(16, ["sharding.tables={t_101: {sharding_types: [data_parallel]}}"])
    assert types["t_101"] == "data_parallel"
    assert [t for t, kind in types.items() if kind == "data_parallel"] == ["t_101"]


def test_memonet_pairs_are_planned_with_every_pair_and_hash() -> None:
    cfg = load_run_config(DTN_DEMO, [])
    schema = aliccp_reference_schema()
    model = build_meta_train_model(cfg.model, schema, cfg.train.sparse_optimizer)
    ids = feature_ids_per_row(schema, model)
    fields = 17  # dtn_demo.yaml's MemoNet fields
    assert ids[MEMONET_PAIRS_KEY] == fields * (fields - 1) // 2 * 2  # num_hash 2
    # Multi-valued fields: the midpoint of the reference's list lengths, never below 1.
    assert all(value >= 1 for value in ids.values())
    bags = feature_bags_per_row(model)
    assert bags == {MEMONET_PAIRS_KEY: ids[MEMONET_PAIRS_KEY]}  # one id per bag
    tables = find_embedding_tables(model, embedding_sharders())
    constraints = planner_constraints(tables, ShardingConfig(), "cpu", ids, bags)
    codebooks = [t.name for t in tables if t.feature_names == (MEMONET_PAIRS_KEY,)]
    assert len(codebooks) == 3  # dtn_demo's MemoNet modules
    for table in tables:
        c = constraints[table.name]
        if table.name in codebooks:
            assert (c.pooling_factors, c.num_poolings) == ([1.0], [272.0])
        else:
            assert c.num_poolings is None and c.pooling_factors[0] == ids[table.feature_names[0]]


def _train_one_step(config: str, overrides: List[str]) -> Dict[str, Any]:
    import torch
    import torch.distributed as dist

    from dtn_torchrec.distributed.launch import DistributedContext
    from dtn_torchrec.train.session import PLAN_FILE, run_training

    cfg = load_run_config(config, overrides)
    rank, world = dist.get_rank(), dist.get_world_size()
    ctx = DistributedContext(rank, world, rank, torch.device("cpu"), "gloo")
    run_training(cfg, ctx, resume=False)
    return json.loads((Path(cfg.output.dir) / PLAN_FILE).read_text())


@pytest.mark.slow
def test_dtn_plan_reports_the_plan_dtn_train_uses(tmp_path: Path) -> None:
    from dtn_torchrec.data.prepare import PrepareOptions, prepare_dataset
    from dtn_torchrec.data.synth import SynthConfig, generate

    generate(
        SynthConfig(
            train_rows=300,
            test_rows=100,
            seed=3,
            id_scale=0.001,
            history_scale=0.05,
            rows_per_user=5,
        ),
        tmp_path / "raw",
    )
    data = tmp_path / "data"
    prepare_dataset("aliccp-raw", tmp_path / "raw", data, PrepareOptions(valid_fraction=0.0))
    # DDR per rank fixed: dtn-train would otherwise detect this host's RAM, dtn-plan assume 128 GiB.
    common = [f"data.path={data}", "data.batch_size=32", "sharding.ddr_cap_gb=16"]
    trained = run_on_ranks(
        _train_one_step,
        2,
        timeout_s=300,
        config=DTN_DEMO,
        overrides=[
            *common,
            f"output.dir={tmp_path / 'run'}",
            "train.max_steps=1",
            "output.tensorboard=false",
        ],
    )
    out = tmp_path / "plan.json"
    code = plan_main(
        [
            "--config",
            DTN_DEMO,
            "--world-size",
            "2",
            "--local-world-size",
            "2",
            "--compute-device",
            "cpu",
            "--schema",
            str(data),
            "--json",
            str(out),
            *common,
        ]
    )
    assert code == 0
    planned = json.loads(out.read_text())["plan"]
    assert trained[0] == trained[1] == planned
    # Both ranks hold tables (field tables or codebooks): the comparison covers a real 2-rank
    # layout.
    tables = [t for module in planned.values() for t in module.values()]
    ranks = {s["rank"] for t in tables for s in t["shards"]}
    assert ranks == {0, 1} and len(planned) > 1
