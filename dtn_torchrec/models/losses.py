"""Per-task losses and task relations (ESMM-style probability products)."""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from dtn_torchrec.models.task_graph import dependency_order

_LN2 = math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate over the whole range (Maechler 2012).

    ``x`` is clamped to ``<= -tiny`` so that ``x -> 0`` gives a large finite value instead of
    ``-inf``; each branch sees only inputs it is accurate for, so gradients stay finite.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    near_zero = x > -_LN2
    ln2 = torch.full_like(x, -_LN2)
    small = torch.log(-torch.expm1(torch.where(near_zero, x, ln2)))
    large = torch.log1p(-torch.exp(torch.where(near_zero, ln2, x)))
    return torch.where(near_zero, small, large)


def logit_from_log_prob(log_p: torch.Tensor) -> torch.Tensor:
    """``logit(p) = log p - log(1 - p)`` from ``log p``, without forming ``p``."""
    return log_p - log1mexp(log_p)


class ProductRelation(nn.Module):
    """ESMM-style relation: ``p_out(t) = sigmoid(head_t) * prod_{s in parents(t)} p_out(s)``.

    With ``product_of = {"conversion": ["click"]}`` the conversion head learns pCVR and the
    conversion output is pCTCVR = pCTR * pCVR; chains (``atc: [click]``, ``purchase: [atc]``)
    compose. Outputs stay logits (``logit(p_out)``, computed in log space), so the loss, metrics and
    prediction code just apply a sigmoid. Tasks without parents pass through unchanged.

    Args:
        tasks (Sequence[str]): task names, column order of the logits.
        product_of (Mapping[str, Sequence[str]]): task -> tasks whose output probabilities multiply
            its head probability.

    Call args:
        head_logits (torch.Tensor): ``[B, T]``.

    Returns:
        torch.Tensor: ``[B, T]`` logits of the related probabilities.
    """

    def __init__(self, tasks: Sequence[str], product_of: Mapping[str, Sequence[str]]) -> None:
        super().__init__()
        self._tasks: List[str] = list(tasks)
        self._order: List[str] = dependency_order(self._tasks, product_of, "loss.product_of")
        self._parents: Dict[str, List[int]] = {
            t: [self._tasks.index(p) for p in product_of.get(t, [])] for t in self._tasks
        }

    def forward(self, head_logits: torch.Tensor) -> torch.Tensor:
        log_p: Dict[int, torch.Tensor] = {}
        out: Dict[int, torch.Tensor] = {}
        for task in self._order:
            i = self._tasks.index(task)
            head = head_logits[:, i]
            log_p[i] = F.logsigmoid(head)
            for parent in self._parents[task]:
                log_p[i] = log_p[i] + log_p[parent]
            out[i] = logit_from_log_prob(log_p[i]) if self._parents[task] else head
        return torch.stack([out[i] for i in range(len(self._tasks))], dim=1)


class MultiTaskLoss(nn.Module):
    """``L = sum_t w_t * mean_b BCEWithLogits(logit_bt, y_bt; pos_weight_t)``.

    ``pos_weight`` scales the positive term as ``tf.nn.weighted_cross_entropy_with_logits`` does
    (reference: click 200, conversion 3000). The weights are non-persistent buffers built on the
    host even for a meta model (DMP materialises meta buffers as zeros); they move to the rank's
    device with the module, so the step copies nothing from the host.

    Args:
        tasks (Sequence[str]): task names, column order of logits and labels.
        task_weights (Mapping[str, float]): per-task loss weight, 1.0 when absent.
        pos_weights (Mapping[str, float]): per-task positive-class weight, 1.0 (plain BCE) when absent.

    Call args:
        logits (torch.Tensor): ``[B, T]``.
        labels (torch.Tensor): ``[B, T]`` in ``{0, 1}``.

    Returns:
        Tuple[torch.Tensor, torch.Tensor]: the total loss (scalar) and the unweighted per-task
        losses ``[T]``.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        task_weights: Optional[Mapping[str, float]] = None,
        pos_weights: Optional[Mapping[str, float]] = None,
    ) -> None:
        super().__init__()
        task_weights = dict(task_weights or {})
        pos_weights = dict(pos_weights or {})
        unknown = sorted((set(task_weights) | set(pos_weights)) - set(tasks))
        if unknown:
            raise ValueError(f"loss weights name unknown task(s) {unknown} (tasks: {list(tasks)})")
        self.register_buffer(
            "task_weights",
            torch.tensor([float(task_weights.get(t, 1.0)) for t in tasks]),
            persistent=False,
        )  # [T]
        self.register_buffer(
            "pos_weights",
            torch.tensor([float(pos_weights.get(t, 1.0)) for t in tasks]),
            persistent=False,
        )  # [T]

    def forward(
        self, logits: torch.Tensor, labels: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        per_element = F.binary_cross_entropy_with_logits(
            logits, labels, pos_weight=self.pos_weights.to(logits.dtype), reduction="none"
        )
        per_task = per_element.mean(dim=0)  # [T]
        total = (per_task * self.task_weights.to(per_task.dtype)).sum()
        return total, per_task
