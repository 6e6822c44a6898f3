"""Evaluation metrics against independent reference computations (pair counting, formulas)."""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dist_utils import free_port

from dtn_torchrec.train.metrics import (
    EvalAccumulator,
    bernoulli_entropy,
    binary_auc,
    binary_logloss,
    compute_task_metrics,
    gather_rows,
)


def pair_count_auc(scores, labels):
    """AUC by counting every (positive, negative) pair: 1 if ordered, 1/2 if tied."""
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("levels", [3, 10, 1000])
def test_auc_matches_pair_counting_with_ties(levels: int) -> None:
    g = torch.Generator().manual_seed(levels)
    labels = (torch.rand(300, generator=g) < 0.3).float()
    # few distinct score levels -> many ties; scores correlated with labels
    scores = torch.randint(0, levels, (300,), generator=g).float() + labels * levels / 3
    expected = pair_count_auc(scores.tolist(), labels.int().tolist())
    assert binary_auc(scores, labels) == pytest.approx(expected, abs=1e-12)


def test_auc_known_values() -> None:
    assert binary_auc(torch.tensor([0.1, 0.9]), torch.tensor([0.0, 1.0])) == 1.0
    assert binary_auc(torch.tensor([0.9, 0.1]), torch.tensor([0.0, 1.0])) == 0.0
    assert binary_auc(torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.0, 1.0, 1.0])) == 0.5
    # positives ranked 2 and 4 of 4 -> U = (2 + 4) - 3 = 3 of 4 pairs
    assert binary_auc(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0, 1, 0, 1.0])) == 0.75
    assert binary_auc(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0])) is None
    assert binary_auc(torch.tensor([]), torch.tensor([])) is None


def test_logloss_ne_calibration_against_formulas() -> None:
    logits = torch.tensor([[-2.0], [0.5], [1.5], [-0.3], [0.0]])
    labels = torch.tensor([[0.0], [1.0], [1.0], [0.0], [1.0]])
    m = compute_task_metrics(logits, labels, ["click"])["click"]
    ps = [1.0 / (1.0 + math.exp(-z)) for z in logits[:, 0].tolist()]
    ys = labels[:, 0].tolist()
    ll = -sum(y * math.log(p) + (1 - y) * math.log(1 - p) for p, y in zip(ps, ys)) / 5
    base = 3 / 5
    h = -(base * math.log(base) + (1 - base) * math.log(1 - base))
    assert m["logloss"] == pytest.approx(ll, rel=1e-12)
    assert m["ne"] == pytest.approx(ll / h, rel=1e-12)
    assert m["calibration"] == pytest.approx((sum(ps) / 5) / base, rel=1e-12)
    assert m["base_rate"] == base and m["rows"] == 5 and m["positives"] == 3
    assert bernoulli_entropy(0.0) == 0.0 and bernoulli_entropy(1.0) == 0.0


def test_undefined_metrics_are_none() -> None:
    m = compute_task_metrics(torch.zeros(4, 1), torch.zeros(4, 1), ["click"])["click"]
    assert m["auc"] is None and m["ne"] is None and m["calibration"] is None
    assert m["logloss"] == pytest.approx(math.log(2.0))
    empty = compute_task_metrics(torch.zeros(0, 1), torch.zeros(0, 1), ["click"])["click"]
    assert empty["logloss"] is None and empty["rows"] == 0


def test_conditional_cvr_auc_on_clicked_rows() -> None:
    g = torch.Generator().manual_seed(0)
    click = (torch.rand(200, generator=g) < 0.4).float()
    conv = click * (torch.rand(200, generator=g) < 0.3).float()
    logits = torch.randn(200, 2, generator=g) + torch.stack([click, conv], 1)
    labels = torch.stack([click, conv], 1)
    m = compute_task_metrics(logits, labels, ["click", "conversion"])
    clicked = click == 1
    expected_cvr = pair_count_auc(logits[clicked, 1].tolist(), conv[clicked].int().tolist())
    assert m["conversion"]["cvr_auc"] == pytest.approx(expected_cvr, abs=1e-12)
    assert m["conversion"]["cvr_rows"] == int(clicked.sum())
    expected_ctcvr = pair_count_auc(logits[:, 1].tolist(), conv.int().tolist())
    assert m["conversion"]["ctcvr_auc"] == pytest.approx(expected_ctcvr, abs=1e-12)
    assert m["conversion"]["auc"] == m["conversion"]["ctcvr_auc"]
    assert "cvr_auc" not in m["click"]
    # no funnel pairs requested -> no conditional metrics
    assert (
        "cvr_auc"
        not in compute_task_metrics(logits, labels, ["click", "conversion"], {})["conversion"]
    )


def test_shape_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        compute_task_metrics(torch.zeros(3, 1), torch.zeros(3, 1), ["a", "b"])


def test_accumulator_single_process_equals_direct() -> None:
    g = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(50, 2, generator=g), (torch.rand(50, 2, generator=g) < 0.5).float()
    acc = EvalAccumulator(["a", "b"])
    for lo in range(0, 50, 16):
        acc.update(logits[lo : lo + 16], labels[lo : lo + 16])
    acc.update(torch.zeros(0, 2), torch.zeros(0, 2))
    assert acc.compute() == compute_task_metrics(logits, labels, ["a", "b"])
    assert binary_logloss(logits[:, 0], labels[:, 0]) == acc.compute()["a"]["logloss"]


ROWS_PER_RANK = [3, 0, 5]  # uneven and empty shards


def _rank_rows(rank: int) -> torch.Tensor:
    """Rank ``rank``'s ``[n, 4]`` rows: two logit columns, two 0/1 label columns (with ties)."""
    g = torch.Generator().manual_seed(rank)
    n = ROWS_PER_RANK[rank]
    logits = torch.randint(-2, 3, (n, 2), generator=g).float() / 2
    return torch.cat([logits, (torch.rand(n, 2, generator=g) < 0.5).float()], dim=1)


def _gather_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    local = _rank_rows(rank)
    gathered = gather_rows(local)
    acc = EvalAccumulator(["click", "conversion"])
    acc.update(local[:, :2], local[:, 2:])
    result = {"gathered": gathered, "metrics": acc.compute()}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_rows_gathered_on_first_rank_only_and_metrics_equal_on_every_rank() -> None:
    world_size = len(ROWS_PER_RANK)
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(
            _gather_worker,
            args=(world_size, free_port(), d),
            nprocs=world_size,
            start_method="forkserver",
        )
        results = [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(world_size)]
    every_row = torch.cat([_rank_rows(r) for r in range(world_size)])
    assert torch.equal(results[0]["gathered"], every_row)
    assert all(r["gathered"] is None for r in results[1:])
    expected = compute_task_metrics(every_row[:, :2], every_row[:, 2:], ["click", "conversion"])
    assert "cvr_auc" in expected["conversion"]
    for r in results:
        assert r["metrics"] == expected
        assert isinstance(r["metrics"]["click"]["rows"], int)
