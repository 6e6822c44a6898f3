"""Sparse (fused) and dense optimisers: LR schedule, dense-only clipping, row-sparse updates."""

from __future__ import annotations

import math
from typing import Any, Dict, List

import pytest
import torch
from dist_utils import run_on_ranks
from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode
from torch.optim.lr_scheduler import LambdaLR
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from dtn_torchrec.distributed.config import DenseOptimizerConfig, SparseOptimizerConfig
from dtn_torchrec.distributed.optimizers import (
    LrSchedule,
    lr_multiplier,
    materialize_state,
    sparse_optimizer_spec,
)

# -- learning-rate schedule --------------------------------------------------------------------


def test_linear_warmup_then_linear_decay() -> None:
    schedule = dict(warmup_steps=4, decay="linear", decay_steps=10, min_lr_ratio=0.1)
    expected = {0: 0.25, 1: 0.5, 2: 0.75, 3: 1.0, 4: 1.0, 9: 0.55, 13: 0.19, 14: 0.1, 500: 0.1}
    for step, value in expected.items():
        assert lr_multiplier(step, **schedule) == pytest.approx(value), step


def test_cosine_decay_without_warmup() -> None:
    schedule = dict(warmup_steps=0, decay="cosine", decay_steps=8, min_lr_ratio=0.2)
    # m + (1 - m) * (1 + cos(pi * t)) / 2 at t = 0, 1/4, 1/2, 1 and past the end.
    expected = {
        0: 1.0,
        2: 0.2 + 0.8 * (1 + math.sqrt(0.5)) / 2,
        4: 0.6,
        8: 0.2,
        50: 0.2,
    }
    for step, value in expected.items():
        assert lr_multiplier(step, **schedule) == pytest.approx(value), step


def test_warmup_only_stays_flat() -> None:
    schedule = dict(warmup_steps=2, decay="none", decay_steps=0, min_lr_ratio=0.0)
    values = [lr_multiplier(step, **schedule) for step in range(5)]
    assert values == [0.5, 1.0, 1.0, 1.0, 1.0]


def test_scheduler_sets_lr_per_step_and_round_trips() -> None:
    param = torch.nn.Parameter(torch.zeros(3))
    opt = KeyedOptimizerWrapper({"p": param}, lambda ps: torch.optim.SGD(ps, lr=0.5))
    scheduler = LambdaLR(opt, lr_lambda=LrSchedule(2, "linear", 4, 0.0))
    seen = []
    for _ in range(7):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    # warm-up 1/2, 2/2, then 1 - t for t = 0, 1/4, 2/4, 3/4, 1
    assert seen == pytest.approx([0.25, 0.5, 0.5, 0.375, 0.25, 0.125, 0.0])

    fresh_opt = KeyedOptimizerWrapper({"p": param}, lambda ps: torch.optim.SGD(ps, lr=0.5))
    fresh = LambdaLR(fresh_opt, lr_lambda=LrSchedule(2, "linear", 4, 0.0))
    fresh.load_state_dict(scheduler.state_dict())
    assert fresh.last_epoch == scheduler.last_epoch == 7


def test_config_rejects_decay_without_length() -> None:
    with pytest.raises(ValueError, match="decay_steps"):
        DenseOptimizerConfig(decay="cosine").validate()


# -- optimiser specs ---------------------------------------------------------------------------


def test_sparse_optimizer_specs_map_to_fbgemm_arguments() -> None:
    cls, kwargs = sparse_optimizer_spec(
        SparseOptimizerConfig(name="rowwise_adagrad", lr=0.05, eps=1e-6, weight_decay=1e-4)
    )
    assert cls is RowWiseAdagrad
    assert kwargs == {
        "lr": 0.05,
        "eps": 1e-6,
        "weight_decay": 1e-4,
        "weight_decay_mode": WeightDecayMode.L2,
    }
    adam = SparseOptimizerConfig(name="adam", lr=0.01, betas=(0.8, 0.95))
    _, kwargs = sparse_optimizer_spec(adam)
    assert kwargs == {"lr": 0.01, "eps": 1e-8, "beta1": 0.8, "beta2": 0.95, "weight_decay": 0.0}
    with pytest.raises(ValueError, match="no weight decay"):
        sparse_optimizer_spec(SparseOptimizerConfig(name="adagrad", weight_decay=0.1))


@pytest.mark.parametrize("name", ["adam", "adamw", "adagrad"])
def test_materialized_state_is_a_fresh_state(name: str) -> None:
    """Building the state ahead changes neither the parameters nor the first real step."""
    make = {
        "adam": lambda ps: torch.optim.Adam(ps, lr=0.1, weight_decay=0.01),
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.01),
        "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1, weight_decay=0.01),
    }[name]
    start = torch.tensor([0.5, -1.0, 2.0])
    grad = torch.tensor([0.1, 0.2, -0.3])
    fresh_param = torch.nn.Parameter(start.clone())
    early_param = torch.nn.Parameter(start.clone())
    fresh, early = make([fresh_param]), make([early_param])
    materialize_state(early)
    assert torch.equal(early_param.detach(), start)
    assert len(early.state[early_param]) > 0
    for param, opt in ((fresh_param, fresh), (early_param, early)):
        param.grad = grad.clone()
        opt.step()
    assert torch.equal(early_param.detach(), fresh_param.detach())


# -- fused sparse and dense updates on a sharded model (1 gloo rank) ---------------------------


def _fused_update_rows(name: str) -> Dict[str, Any]:
    """One fused step; returns, per table, the rows the batch addressed, the weights before and
    after, and the reference (unsharded) gradient."""
    from toy_model import ToyModel, ToyTrain, make_batch, write_known_values

    from dtn_torchrec.distributed.config import ShardingConfig
    from dtn_torchrec.distributed.optimizers import apply_sparse_optimizer
    from dtn_torchrec.distributed.parallel import shard_model
    from dtn_torchrec.distributed.planning import plan_model
    from dtn_torchrec.distributed.topology import topology_from_env

    cfg = ShardingConfig(sharding_types=["table_wise"])
    model = ToyTrain(ToyModel(torch.device("meta")))
    apply_sparse_optimizer(model, SparseOptimizerConfig(name=name, lr=FUSED_LR, eps=FUSED_EPS))
    plan = plan_model(model, cfg, topology=topology_from_env("cpu", cfg), batch_size=8)
    dmp = shard_model(model, device=torch.device("cpu"), plan=plan)
    write_known_values(dmp)
    batch = make_batch(seed=7)

    reference = ToyTrain(ToyModel(torch.device("cpu")))
    write_known_values(reference)
    reference(batch)[0].backward()

    tables = {
        "model.ebc.embedding_bags.t_f1.weight": "f1",
        "model.ec.embeddings.c0.weight": "p0",
    }
    ids = batch.sparse_features.to_dict()
    before = {key: reference.state_dict()[key].clone() for key in tables}
    dmp(batch)[0].backward()  # the fused optimiser updates in backward
    state = dmp.state_dict()
    out = {}
    for key, feature in tables.items():
        out[key] = {
            "rows": sorted(set(ids[feature].values().tolist())),
            "before": before[key],
            "after": state[key].local_shards()[0].tensor.detach().clone(),
            "grad": dict(reference.named_parameters())[key].grad.clone(),
        }
    return out


FUSED_LR, FUSED_EPS = 0.05, 1e-3


def _expected_rows(name: str, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """First step of FBGEMM's exact optimisers from zero state."""
    if name == "rowwise_adagrad":
        state = (g * g).mean(dim=1, keepdim=True)  # one accumulator per row
        return w - FUSED_LR * g / (state.sqrt() + FUSED_EPS)
    if name == "adagrad":
        return w - FUSED_LR * g / ((g * g).sqrt() + FUSED_EPS)
    return w - FUSED_LR * g


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rowwise_adagrad", "adagrad", "sgd"])
def test_fused_optimizer_updates_only_addressed_rows(name: str) -> None:
    (result,) = run_on_ranks(_fused_update_rows, world_size=1, name=name)
    for key, table in result.items():
        rows: List[int] = table["rows"]
        assert 0 < len(rows) < table["before"].shape[0], key
        untouched = [r for r in range(table["before"].shape[0]) if r not in rows]
        assert torch.equal(table["after"][untouched], table["before"][untouched]), key
        expected = _expected_rows(name, table["before"][rows], table["grad"][rows])
        torch.testing.assert_close(table["after"][rows], expected, atol=1e-6, rtol=1e-5)
        assert not torch.allclose(table["after"][rows], table["before"][rows])


@pytest.mark.parametrize(
    "cfg, words",
    [
        (SparseOptimizerConfig(name="adam"), ["table '", "'model.e", "'adam'", "CPU"]),
        (
            SparseOptimizerConfig(name="rowwise_adagrad", weight_decay=0.01),
            ["table '", "weight_decay"],
        ),
    ],
)
def test_cpu_refuses_fused_optimizers_fbgemm_cannot_run(
    cfg: SparseOptimizerConfig, words: List[str]
) -> None:
    from toy_model import ToyModel, ToyTrain

    from dtn_torchrec.distributed.config import ShardingConfig
    from dtn_torchrec.distributed.optimizers import apply_sparse_optimizer, check_fused_optimizers
    from dtn_torchrec.distributed.planning import plan_model
    from dtn_torchrec.distributed.topology import make_topology

    sharding = ShardingConfig(sharding_types=["table_wise"])
    model = ToyTrain(ToyModel(torch.device("meta")))
    apply_sparse_optimizer(model, cfg)
    topology = make_topology(world_size=1, local_world_size=1, compute_device="cpu", cfg=sharding)
    plan = plan_model(model, sharding, topology=topology, batch_size=8)
    with pytest.raises(ValueError) as info:
        check_fused_optimizers(model, plan, "cpu")
    for word in words:
        assert word in str(info.value)
    check_fused_optimizers(model, plan, "cuda")  # FBGEMM's CUDA kernels run both


def _fused_lrs(dmp: Any) -> List[float]:
    return [group["lr"] for _, opt in dmp.fused_optimizer.optimizers for group in opt.param_groups]


def _clip_and_schedule() -> Dict[str, Any]:
    """Dense SGD (lr 1) with clipping and a schedule next to fused SGD (lr 0.1)."""
    from toy_model import ToyModel, ToyTrain, make_batch, write_known_values

    from dtn_torchrec.distributed.config import ShardingConfig
    from dtn_torchrec.distributed.optimizers import apply_sparse_optimizer, build_dense_optimizer
    from dtn_torchrec.distributed.parallel import shard_model
    from dtn_torchrec.distributed.planning import plan_model
    from dtn_torchrec.distributed.topology import topology_from_env

    cfg = ShardingConfig(sharding_types=["table_wise"])
    model = ToyTrain(ToyModel(torch.device("meta")))
    apply_sparse_optimizer(model, SparseOptimizerConfig(name="sgd", lr=0.1))
    plan = plan_model(model, cfg, topology=topology_from_env("cpu", cfg), batch_size=8)
    dmp = shard_model(model, device=torch.device("cpu"), plan=plan)
    write_known_values(dmp)
    dense_cfg = DenseOptimizerConfig(
        name="sgd", lr=1.0, grad_clip_norm=0.01, warmup_steps=2, decay="linear", decay_steps=2
    )
    optimizers = build_dense_optimizer(dmp, dense_cfg)
    batch = make_batch(seed=3)

    reference = ToyTrain(ToyModel(torch.device("cpu")))
    write_known_values(reference)
    reference(batch)[0].backward()
    ref_grads = {k: p.grad.clone() for k, p in reference.named_parameters()}
    before = {k: v.clone() for k, v in reference.state_dict().items()}

    lrs = [optimizers.dense.param_groups[0]["lr"]]
    sparse_lrs = _fused_lrs(dmp)
    dmp(batch)[0].backward()
    optimizers.optimizer.step()
    optimizers.scheduler.step()
    norm = float(optimizers.dense.last_total_grad_norm)
    after = {
        k: v.local_shards()[0].tensor.clone() if hasattr(v, "local_shards") else v.clone()
        for k, v in dmp.state_dict().items()
    }
    for _ in range(4):
        lrs.append(optimizers.dense.param_groups[0]["lr"])
        optimizers.optimizer.step()
        optimizers.scheduler.step()
    sparse_lrs_after = _fused_lrs(dmp)
    return {
        "ref_grads": ref_grads,
        "before": before,
        "after": after,
        "norm": norm,
        "lrs": lrs,
        "sparse_lrs": (sparse_lrs, sparse_lrs_after),
    }


@pytest.mark.slow
def test_clipping_and_schedule_touch_dense_parameters_only() -> None:
    (result,) = run_on_ranks(_clip_and_schedule, world_size=1)
    grads, before, after = result["ref_grads"], result["before"], result["after"]
    dense = [k for k in grads if ".tower." in k]
    sparse = [k for k in grads if ".tower." not in k]
    total = math.sqrt(sum(float(grads[k].pow(2).sum()) for k in dense))
    assert result["norm"] == pytest.approx(total, rel=1e-5)
    assert total > 0.01  # so clipping is active
    # Step 0 runs at lr 1 * warm-up 1/2; clip_grad_norm_ scales by max_norm / (norm + 1e-6).
    coef = 0.01 / (total + 1e-6)
    for key in dense:
        torch.testing.assert_close(after[key], before[key] - 0.5 * coef * grads[key])
    # Embeddings: fused SGD with its own lr on the unclipped gradient.
    for key in sparse:
        torch.testing.assert_close(after[key], before[key] - 0.1 * grads[key], atol=1e-7, rtol=1e-6)
    assert result["lrs"] == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.0])
    sparse_before, sparse_after = result["sparse_lrs"]
    assert sparse_before == sparse_after
    assert sparse_before == pytest.approx([0.1] * len(sparse_before))  # fp32 in FBGEMM
