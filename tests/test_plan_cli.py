"""dtn-plan: the real planner on described clusters (no GPU), memory per rank, traffic, refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from dtn_torchrec.cli.plan import main as plan_main
from dtn_torchrec.distributed.config import (
    ShardingConfig,
    SparseOptimizerConfig,
    TableShardingConfig,
)
from dtn_torchrec.distributed.optimizers import apply_sparse_optimizer
from dtn_torchrec.distributed.plan_report import (
    PlanDoesNotFit,
    estimate_comms,
    plan_sharding,
    rank_memory,
)
from dtn_torchrec.distributed.topology import ClusterSpec
from dtn_torchrec.models.stats import ALICCP_VOCAB_LINES

REPO = Path(__file__).resolve().parent.parent
DTN_ALICCP = str(REPO / "configs" / "dtn_aliccp.yaml")
GIB = 1024**3
SCALE = 1000
EMBEDDING_DIM = 64  # configs/dtn_aliccp.yaml
# The reference trains with Adam; the CPU config defaults to row-wise Adagrad (no fused CPU Adam).
ADAM = "train.sparse_optimizer.name=adam"
MEMONET_BUCKETS = 100_000  # per codebook, 3 codebooks (click, conversion, shared)


@pytest.fixture(scope="module")
def plan_64(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    out = tmp_path_factory.mktemp("plan") / "plan64.json"
    code = plan_main(
        [
            "--config",
            DTN_ALICCP,
            "--world-size",
            "64",
            "--hbm-gb",
            "80",
            "--table-scale",
            str(SCALE),
            "--json",
            str(out),
            "--show-ranks",
            "4",
            ADAM,
        ]
    )
    assert code == 0
    return json.loads(out.read_text())


def test_64_gpus_hold_aliccp_x1000(plan_64: Dict[str, Any]) -> None:
    assert plan_64["fits"] is True
    # TorchRec's heuristic on CUDA: the reserve, then the dense model x 6 and 20 input batches.
    usable = plan_64["usable_bytes_per_rank"]
    assert 0 < usable < 80 * GIB * (1 - plan_64["storage_reservation"])
    dense_bytes = plan_64["dense_params"] * 4 * 6
    assert usable <= 80 * GIB * (1 - plan_64["storage_reservation"]) - dense_bytes
    ranks = plan_64["ranks"]
    assert [r["rank"] for r in ranks] == list(range(64))
    assert all(r["hbm"] <= usable for r in ranks)
    assert all(r["hbm_capacity"] == 80 * GIB for r in ranks)


def test_64_gpu_table_rows_are_the_scaled_aliccp_vocabularies(plan_64: Dict[str, Any]) -> None:
    rows = {t["name"]: t["rows"] for t in plan_64["tables"]}
    for field, vocab in ALICCP_VOCAB_LINES.items():
        assert rows[f"t_{field}"] == (vocab + 1) * SCALE
    codebooks = [n for n in rows if n.startswith("memonet_codebook_")]
    assert len(codebooks) == 3
    assert all(rows[n] == MEMONET_BUCKETS * SCALE for n in codebooks)
    # Every pair of the 17 crossed fields, hashed twice: 272 ids per row, one per bag.
    ids = {t["name"]: t["ids_per_row"] for t in plan_64["tables"]}
    assert all(ids[n] == 272 for n in codebooks)


def test_per_rank_memory_sums_match_the_table_sizes(plan_64: Dict[str, Any]) -> None:
    world = 64
    expected_weights = 0
    for t in plan_64["tables"]:
        copies = world if t["sharding_type"] == "data_parallel" else 1
        expected_weights += copies * t["rows"] * EMBEDDING_DIM * 4
        if t["sharding_type"] != "data_parallel":
            # The shards tile the table exactly once.
            assert sum(s["sizes"][0] * s["sizes"][1] for s in t["shards"]) == t["rows"] * t["dim"]
    ranks = plan_64["ranks"]
    assert sum(r["weights"] for r in ranks) == expected_weights
    for r in ranks:
        # Adam (ADAM override): two moments per weight.
        assert r["optimizer"] == 2 * r["weights"]
        assert r["hbm"] + r["ddr"] == r["weights"] + r["optimizer"] + r["cache"] + r["io"]
        assert r["io"] >= 0 and r["cache"] == 0 and r["ddr"] == 0


def test_8_gpus_of_16_gb_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan8.json"
    code = plan_main(
        [
            "--config",
            DTN_ALICCP,
            "--world-size",
            "8",
            "--hbm-gb",
            "16",
            "--table-scale",
            str(SCALE),
            "--json",
            str(out),
            ADAM,
        ]
    )
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "do not fit" in err and "add ranks" in err and "--uvm-caching" in err
    # weights + 2 Adam moments of every table, fp32
    field_rows = sum((v + 1) * SCALE for v in ALICCP_VOCAB_LINES.values())
    need_gib = 3 * 4 * EMBEDDING_DIM * (field_rows + 3 * MEMONET_BUCKETS * SCALE) / GIB
    assert f"{need_gib:,.1f} GiB" in err
    assert json.loads(out.read_text()) == {"fits": False, "reason": err.removeprefix("dtn-plan: ")}


def test_uvm_caching_needs_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    code = plan_main(
        ["--config", DTN_ALICCP, "--world-size", "2", "--compute-device", "cpu", "--uvm-caching"]
    )
    assert code == 1
    assert "--uvm-caching needs --compute-device cuda" in capsys.readouterr().err


def test_world_size_must_be_a_multiple_of_the_host_size(capsys: pytest.CaptureFixture[str]) -> None:
    code = plan_main(["--config", DTN_ALICCP, "--world-size", "12", "--local-world-size", "8"])
    assert code == 1
    assert "not a multiple of the local world size" in capsys.readouterr().err


# -- traffic and memory formulas on a hand-made model -------------------------------------------

BATCH = 128
ROWS, DIM = 1000, 16


def _two_table_module(optimizer: str) -> EmbeddingBagCollection:
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name=f"t{i}", embedding_dim=DIM, num_embeddings=ROWS, feature_names=[f"f{i}"]
            )
            for i in range(2)
        ],
        device=torch.device("meta"),
    )
    apply_sparse_optimizer(ebc, SparseOptimizerConfig(name=optimizer))
    return ebc


def _plan(
    sharding_type: str,
    pooling: List[float],
    world: int = 4,
    local: int = 2,
    optimizer: str = "adagrad",
):
    cluster = ClusterSpec(world_size=world, local_world_size=local, compute_device="cuda", hbm_gb=1)
    topology = cluster.topology()
    cfg = ShardingConfig(
        tables={
            f"t{i}": TableShardingConfig([sharding_type], ["fused"], pooling_factor=p)
            for i, p in enumerate(pooling)
        },
        storage_reservation=0.0,
    )
    planned = plan_sharding(
        _two_table_module(optimizer),
        cfg,
        None,
        topology=topology,
        batch_size=BATCH,
        optimizer=optimizer,
    )
    return topology, planned.options


def test_table_wise_traffic_matches_the_formula() -> None:
    world, local = 4, 2
    topology, options = _plan("table_wise", [3.0, 5.0], world, local)
    comms = estimate_comms(options, topology, BATCH, dense_params=100)
    off_rank = (world - 1) / world
    # ids: B x (8 bytes per id + 4 bytes of length) per table; output: B x D floats per table
    assert comms.input_ids == pytest.approx(BATCH * ((8 * 3 + 4) + (8 * 5 + 4)) * off_rank)
    assert comms.embeddings_fwd == pytest.approx(2 * BATCH * DIM * 4 * off_rank)
    assert comms.gradients_bwd == comms.embeddings_fwd
    assert comms.dense_allreduce == pytest.approx(2 * off_rank * 100 * 4)
    # Off-host share of an all-to-all over 4 ranks, 2 per host: 2 of the 3 peers.
    to_peers = comms.input_ids + 2 * comms.embeddings_fwd
    assert comms.inter_host == pytest.approx(to_peers * 2 / 3 + comms.dense_allreduce)
    assert comms.intra_host == pytest.approx(to_peers / 3)


def test_bags_per_row_multiply_ids_lengths_and_pooled_outputs() -> None:
    # MemoNet's pairs: several one-id bags per row (num_poolings); each bag sends an id and a
    # length and gets a pooled row back.
    world, local = 4, 2
    topology, options = _plan("table_wise", [1.0, 1.0], world, local)
    options[0].num_poolings = [6.0]
    comms = estimate_comms(options, topology, BATCH, dense_params=0)
    off_rank = (world - 1) / world
    assert comms.input_ids == pytest.approx(BATCH * (6 * (8 + 4) + (8 + 4)) * off_rank)
    assert comms.embeddings_fwd == pytest.approx((6 + 1) * BATCH * DIM * 4 * off_rank)


def test_row_wise_output_is_a_reduce_scatter() -> None:
    world = 4
    topology, options = _plan("row_wise", [2.0, 2.0], world, 2)
    comms = estimate_comms(options, topology, BATCH, dense_params=0)
    assert comms.embeddings_fwd == pytest.approx(2 * (world - 1) * BATCH * DIM * 4)
    assert comms.input_ids == pytest.approx(
        2 * BATCH * (8 * 2 * (world - 1) / world + 4 * (world - 1))
    )
    assert comms.dense_allreduce == 0


def test_rank_memory_splits_the_planner_estimate() -> None:
    topology, options = _plan("row_wise", [1.0, 1.0], optimizer="rowwise_adagrad")
    ranks = rank_memory(options, topology, "rowwise_adagrad")
    assert sum(r.weights for r in ranks) == 2 * ROWS * DIM * 4
    # Row-wise Adagrad: one float per row.
    assert sum(r.optimizer for r in ranks) == 2 * ROWS * 4
    for r in ranks:
        planned = sum(s.storage.hbm for o in options for s in o.shards if s.rank == r.rank)
        assert r.hbm == planned
        assert r.io == r.hbm - r.weights - r.optimizer >= 0


def test_no_plan_raises_with_advice() -> None:
    # 2 tables x 1000 x 16 fp32 with Adagrad = 256 KB; 4 ranks x 1 KB cannot hold them.
    cluster = ClusterSpec(world_size=4, local_world_size=2, compute_device="cuda", hbm_gb=1e-6)
    cfg = ShardingConfig(storage_reservation=0.0)
    with pytest.raises(PlanDoesNotFit, match="do not fit") as info:
        plan_sharding(
            _two_table_module("adagrad"),
            cfg,
            None,
            topology=cluster.topology(),
            batch_size=BATCH,
            optimizer="adagrad",
        )
    need = 2 * 2 * ROWS * DIM * 4  # weights + one Adagrad value per weight
    per_rank = math.floor(1e-6 * GIB)
    assert f"at least {math.ceil(need / per_rank):,} of this size" in str(info.value)
