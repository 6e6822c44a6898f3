"""Per-task weighted BCE and the ESMM-style probability-product relation."""

from __future__ import annotations

import math

import pytest
import torch

from dtn_torchrec.models.losses import MultiTaskLoss, ProductRelation, log1mexp, logit_from_log_prob


def manual_wce(z: float, y: float, pos_weight: float) -> float:
    """``tf.nn.weighted_cross_entropy_with_logits`` written out: -w y log s - (1-y) log(1-s)."""
    s = 1.0 / (1.0 + math.exp(-z))
    return -pos_weight * y * math.log(s) - (1.0 - y) * math.log(1.0 - s)


def test_multitask_loss_matches_manual_formula() -> None:
    logits = torch.tensor([[0.3, -2.0], [-1.2, 0.7], [2.5, -0.1], [0.0, 1.5]], dtype=torch.float64)
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    loss = MultiTaskLoss(
        ["click", "conversion"],
        task_weights={"conversion": 0.5},
        pos_weights={"click": 200.0, "conversion": 3000.0},
    )
    total, per_task = loss(logits, labels)
    expected_per_task = [
        sum(manual_wce(float(logits[b, t]), float(labels[b, t]), pw) for b in range(4)) / 4
        for t, pw in enumerate([200.0, 3000.0])
    ]
    torch.testing.assert_close(per_task, torch.tensor(expected_per_task, dtype=torch.float64))
    expected_total = 1.0 * expected_per_task[0] + 0.5 * expected_per_task[1]
    torch.testing.assert_close(total, torch.tensor(expected_total, dtype=torch.float64))


def test_multitask_loss_defaults_are_plain_bce_weight_one() -> None:
    logits = torch.tensor([[0.3, -2.0, 4.0], [-1.2, 0.7, -3.0]])
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    total, per_task = MultiTaskLoss(["a", "b", "c"])(logits, labels)
    expected = [
        sum(manual_wce(float(logits[b, t]), float(labels[b, t]), 1.0) for b in range(2)) / 2
        for t in range(3)
    ]
    torch.testing.assert_close(per_task, torch.tensor(expected))
    torch.testing.assert_close(total, torch.tensor(sum(expected)))


def test_multitask_loss_rejects_unknown_task() -> None:
    with pytest.raises(ValueError, match="unknown task"):
        MultiTaskLoss(["click", "conversion"], pos_weights={"purchase": 2.0})


def test_log1mexp_matches_float64_reference() -> None:
    x64 = -torch.logspace(-30, 3, 400, dtype=torch.float64)
    reference = torch.log(-torch.expm1(x64))  # exact enough in float64 over this range
    got = log1mexp(x64.float()).double()
    torch.testing.assert_close(got, reference, rtol=2e-6, atol=1e-6)


def esmm_closed_form(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """logit(s(a) s(b)) = -log(e^-a + e^-b + e^-(a+b)) (from 1 - s(a)s(b) over s(a)s(b))."""
    return -torch.logsumexp(torch.stack([-a, -b, -(a + b)]), dim=0)


def test_esmm_logit_matches_naive_on_moderate_values() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 1000, generator=g, dtype=torch.float64) * 4
    naive = torch.logit(torch.sigmoid(a) * torch.sigmoid(b))
    relation = ProductRelation(["click", "conversion"], {"conversion": ["click"]})
    out = relation(torch.stack([a, b], dim=1).float())
    torch.testing.assert_close(out[:, 1].double(), naive, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[:, 0].double(), a.float().double())  # parent column untouched


@pytest.mark.parametrize(
    "a,b",
    [
        (50.0, 50.0),
        (30.0, 30.0),
        (-50.0, -50.0),
        (50.0, -50.0),
        (-80.0, 90.0),
        (0.0, 0.0),
        (1e-7, 20.0),
        (-1e4, 3.0),
    ],
)
def test_esmm_logit_extremes_are_accurate_and_finite(a: float, b: float) -> None:
    """Where the naive formula saturates (float32 sigmoid rounds to 1, logit(1) = inf) the log-space
    form still gives the true logit, e.g. a = b = 50: 50 - log 2."""
    heads = torch.tensor([[a, b]], requires_grad=True)
    out = ProductRelation(["click", "conversion"], {"conversion": ["click"]})(heads)
    expected = esmm_closed_form(
        torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    )
    torch.testing.assert_close(out[0, 1].double(), expected, rtol=1e-5, atol=1e-4)
    out[0, 1].backward()
    assert torch.isfinite(heads.grad).all()


def test_esmm_saturated_inputs_stay_finite() -> None:
    """Beyond float32 range of log(1 - p) (both heads ~ +200) the output is clamped, not inf/NaN."""
    heads = torch.tensor([[200.0, 200.0], [1e4, 1e4], [-1e4, -1e4]], requires_grad=True)
    out = ProductRelation(["click", "conversion"], {"conversion": ["click"]})(heads)
    assert torch.isfinite(out).all()
    assert out[0, 1] > 80 and out[1, 1] > 80 and out[2, 1] < -1e4
    out[:, 1].sum().backward()
    assert torch.isfinite(heads.grad).all()


def test_esmm_chain_multiplies_probabilities() -> None:
    """ctr -> atc -> cvr: p(atc) = p_ctr p_atc|ctr, p(cvr) = p(atc) p_cvr|atc; any column order."""
    g = torch.Generator().manual_seed(1)
    heads = torch.randn(64, 3, generator=g) * 3  # columns: cvr, ctr, atc
    out = ProductRelation(["cvr", "ctr", "atc"], {"cvr": ["atc"], "atc": ["ctr"]})(heads)
    s = torch.sigmoid(heads.double())
    torch.testing.assert_close(torch.sigmoid(out[:, 1].double()), s[:, 1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(
        torch.sigmoid(out[:, 2].double()), s[:, 1] * s[:, 2], rtol=1e-5, atol=1e-7
    )
    torch.testing.assert_close(
        torch.sigmoid(out[:, 0].double()), s[:, 1] * s[:, 2] * s[:, 0], rtol=1e-5, atol=1e-7
    )


def test_logit_from_log_prob_roundtrip() -> None:
    p = torch.tensor([1e-30, 1e-6, 0.1, 0.5, 0.9, 1 - 1e-6], dtype=torch.float64)
    torch.testing.assert_close(logit_from_log_prob(torch.log(p)), torch.logit(p))


def test_product_relation_rejects_cycles_and_unknown_tasks() -> None:
    with pytest.raises(ValueError, match="cycle"):
        ProductRelation(["a", "b"], {"a": ["b"], "b": ["a"]})
    with pytest.raises(ValueError, match="not a task"):
        ProductRelation(["a", "b"], {"b": ["click"]})
