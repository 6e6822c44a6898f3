"""Per-task evaluation metrics over the whole evaluation split, exact and rank-independent.

Every rank scores its own shard of the split; :func:`gather_rows` collects the logits and labels
of all ranks on the first rank only, which computes the metrics on its device with
:func:`compute_task_metrics` and broadcasts the numbers (:func:`broadcast_metrics`), so every rank
returns the same result without holding every row. Per task:

* ``auc``: exact ROC AUC by the rank-sum (Mann-Whitney) statistic, tied scores sharing their
  average rank. ``torchrec.metrics`` AUC sorts without grouping ties (the result then depends on
  the order of tied rows) and only reports a window AUC, so it is not used for the summary.
* ``logloss``: mean binary cross-entropy of the logits.
* ``ne``: normalised entropy, ``logloss / H(base_rate)`` (``H`` = entropy of a Bernoulli).
* ``calibration``: mean predicted probability / mean label.
* ``cvr_auc`` (conditional AUC, for a task with a parent task such as Ali-CCP's ``conversion``
  under ``click``): the AUC of the task's own prediction on the rows whose parent label is 1,
  i.e. the post-click CVR AUC of the ESMM / PLE papers. The task's ``auc`` over all rows is then
  the entire-space (CTCVR) AUC, also reported as ``ctcvr_auc``.

AUC is computed on logits: the ranking is the same as on probabilities, without the ties that
``sigmoid`` saturation in float32 would add.
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

# Label pairs (task -> parent task) of the click -> conversion funnel; a pair is used only when
# both names are among the labels.
DEFAULT_PARENT_TASKS: Dict[str, str] = {"conversion": "click", "purchase": "click"}

MetricValue = Optional[float]
# Metrics that are row counts (ints); every other metric is a float.
_COUNTS = ("rows", "positives", "cvr_rows")


def binary_auc(scores: torch.Tensor, labels: torch.Tensor) -> MetricValue:
    """Exact ROC AUC with tied scores given their average rank.

    Args:
        scores: ``[N]`` real scores (logits or probabilities), higher = more likely positive.
        labels: ``[N]`` 0/1 labels.

    Returns:
        P(score of a random positive > score of a random negative) + 0.5 P(tie), or None when
        the labels hold no positive or no negative.
    """
    scores = scores.detach().reshape(-1).to(torch.float64)
    positive = labels.detach().reshape(-1) > 0.5
    n = scores.numel()
    n_pos = int(positive.sum())
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    sorted_positive = positive[order]
    _, counts = torch.unique_consecutive(sorted_scores, return_counts=True)
    # Tie group g spans 1-based ranks start_g+1 .. start_g+count_g, average rank
    # start_g + (count_g + 1) / 2; doubled to stay in exact int64 arithmetic.
    starts = torch.cumsum(counts, 0) - counts
    doubled_avg_rank = 2 * starts + counts + 1
    group_of_row = torch.repeat_interleave(counts)  # [N]: the tie group of each sorted row
    doubled_rank_sum = int(doubled_avg_rank[group_of_row][sorted_positive].sum())
    # Mann-Whitney U = rank_sum_pos - n_pos (n_pos + 1) / 2; AUC = U / (n_pos n_neg).
    doubled_u = doubled_rank_sum - n_pos * (n_pos + 1)
    return doubled_u / (2.0 * n_pos * n_neg)


def binary_logloss(logits: torch.Tensor, labels: torch.Tensor) -> MetricValue:
    """Mean binary cross-entropy of ``[N]`` logits against ``[N]`` 0/1 labels; None when N = 0."""
    if logits.numel() == 0:
        return None
    return float(
        F.binary_cross_entropy_with_logits(
            logits.detach().reshape(-1).to(torch.float64),
            labels.detach().reshape(-1).to(torch.float64),
        )
    )


def bernoulli_entropy(p: float) -> float:
    """Entropy in nats of a Bernoulli(p); 0 at p in {0, 1}."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log(p) + (1.0 - p) * math.log(1.0 - p))


def task_metrics(logits: torch.Tensor, labels: torch.Tensor) -> Dict[str, MetricValue]:
    """All metrics of one task.

    Args:
        logits: ``[N]`` logits.
        labels: ``[N]`` 0/1 labels.

    Returns:
        ``auc``, ``logloss``, ``ne``, ``calibration``, ``base_rate``, ``mean_prediction``,
        ``rows``, ``positives``; a metric that is undefined on these rows (no positive, no
        negative, no rows) is None.
    """
    rows = int(labels.numel())
    positives = int((labels > 0.5).sum())
    logloss = binary_logloss(logits, labels)
    base_rate = positives / rows if rows else None
    mean_prediction = float(torch.sigmoid(logits.to(torch.float64)).mean()) if rows else None
    entropy = bernoulli_entropy(base_rate) if base_rate is not None else 0.0
    return {
        "auc": binary_auc(logits, labels),
        "logloss": logloss,
        "ne": logloss / entropy if logloss is not None and entropy > 0.0 else None,
        "calibration": (
            mean_prediction / base_rate if mean_prediction is not None and base_rate else None
        ),
        "base_rate": base_rate,
        "mean_prediction": mean_prediction,
        "rows": rows,
        "positives": positives,
    }


def compute_task_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    task_names: List[str],
    parent_tasks: Optional[Mapping[str, str]] = None,
) -> Dict[str, Dict[str, MetricValue]]:
    """Metrics of every task, plus conditional AUCs for child tasks of a funnel.

    Args:
        logits: ``[N, T]`` logits, columns in ``task_names`` order.
        labels: ``[N, T]`` 0/1 labels, same layout.
        task_names: the T task names.
        parent_tasks: child task -> parent task; for each pair with both names in
            ``task_names`` the child also gets ``cvr_auc`` (its AUC on rows with parent label 1,
            ``cvr_rows`` of them) and ``ctcvr_auc`` (= its ``auc`` over all rows). Default:
            :data:`DEFAULT_PARENT_TASKS`.

    Returns:
        ``{task_name: {metric: value}}``.
    """
    if logits.dim() != 2 or logits.shape != labels.shape or logits.shape[1] != len(task_names):
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must both be "
            f"[N, {len(task_names)}] for tasks {task_names}"
        )
    parents = DEFAULT_PARENT_TASKS if parent_tasks is None else parent_tasks
    results = {name: task_metrics(logits[:, i], labels[:, i]) for i, name in enumerate(task_names)}
    for child, parent in parents.items():
        if child in task_names and parent in task_names:
            c, p = task_names.index(child), task_names.index(parent)
            clicked = labels[:, p] > 0.5
            results[child]["cvr_auc"] = binary_auc(logits[clicked, c], labels[clicked, c])
            results[child]["cvr_rows"] = int(clicked.sum())
            results[child]["ctcvr_auc"] = results[child]["auc"]
    return results


def gather_rows(
    local: torch.Tensor, process_group: Optional[dist.ProcessGroup] = None
) -> Optional[torch.Tensor]:
    """Concatenates every rank's ``[n_r, C]`` rows (n_r may differ, may be 0) in rank order on the
    group's first rank; the other ranks get None.

    Returns ``local`` itself when torch.distributed is not initialised. The collectives run on
    ``local``'s device (CPU for gloo, the rank's GPU for nccl); only the row counts go to every
    rank.

    Returns:
        ``[sum_r n_r, C]`` on the first rank of the group, None on the others.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return local
    world_size = dist.get_world_size(process_group)
    count = torch.tensor([local.shape[0]], dtype=torch.int64, device=local.device)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count, group=process_group)
    sizes = [int(c) for c in counts]
    padded = local.new_zeros((max(sizes),) + tuple(local.shape[1:]))
    padded[: local.shape[0]] = local
    first = _first_rank(process_group)
    if dist.get_rank() != first:
        dist.gather(padded, None, dst=first, group=process_group)
        return None
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.gather(padded, gathered, dst=first, group=process_group)
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)], dim=0)


def broadcast_metrics(
    metrics: Dict[str, Dict[str, MetricValue]],
    process_group: Optional[dist.ProcessGroup] = None,
    device: Optional[torch.device] = None,
) -> Dict[str, Dict[str, MetricValue]]:
    """The first rank's metric values on every rank.

    Every rank passes a dict of the same layout (tasks and metric names, e.g. from
    :func:`compute_task_metrics` on zero rows); the values travel as one float64 tensor (None as
    NaN; counts stay exact below 2**53), so no object is pickled.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return metrics
    names = [(task, name) for task, values in metrics.items() for name in values]
    values = torch.tensor(
        [_as_float(metrics[task][name]) for task, name in names],
        dtype=torch.float64,
        device=device or torch.device("cpu"),
    )
    dist.broadcast(values, src=_first_rank(process_group), group=process_group)
    result: Dict[str, Dict[str, MetricValue]] = {task: {} for task in metrics}
    for (task, name), value in zip(names, values.tolist()):
        result[task][name] = None if math.isnan(value) else int(value) if name in _COUNTS else value
    return result


def _as_float(value: MetricValue) -> float:
    return float("nan") if value is None else float(value)


def _first_rank(process_group: Optional[dist.ProcessGroup]) -> int:
    """Global rank of the group's rank 0."""
    if process_group is None:
        return 0
    return dist.get_global_rank(process_group, 0)


class EvalAccumulator:
    """Collects ``[B, T]`` logits and labels batch by batch on one rank (on their device), then
    all ranks' rows on the first rank, which computes the metrics for every rank.

    Args:
        task_names: the T task names (label order of the schema).
        parent_tasks: see :func:`compute_task_metrics`.

    Example::

        acc = EvalAccumulator(["click", "conversion"])
        for batch in reader:
            _, (_, logits, labels) = model(batch)
            acc.update(logits, labels)
        metrics = acc.compute()      # collective: every rank must call it
    """

    def __init__(
        self, task_names: List[str], parent_tasks: Optional[Mapping[str, str]] = None
    ) -> None:
        self._task_names = list(task_names)
        self._parent_tasks = parent_tasks
        self._logits: List[torch.Tensor] = []
        self._labels: List[torch.Tensor] = []

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Adds one batch: ``logits`` and ``labels`` ``[B, T]`` (B may be 0)."""
        t = len(self._task_names)
        self._logits.append(logits.detach().reshape(-1, t).to(torch.float32))
        self._labels.append(labels.detach().reshape(-1, t).to(torch.float32))

    def compute(
        self,
        process_group: Optional[dist.ProcessGroup] = None,
        device: Optional[torch.device] = None,
    ) -> Dict[str, Dict[str, MetricValue]]:
        """Gathers the rows of every rank on the first rank, computes the metrics there and
        returns them on every rank (collective: every rank must call it).

        Args:
            process_group: group to gather over; default the world.
            device: device of the collectives and the computation (the rank's GPU under nccl);
                default CPU.
        """
        t = len(self._task_names)
        device = device or torch.device("cpu")
        local = torch.cat(
            [torch.cat([lg, lb], dim=1).to(device) for lg, lb in zip(self._logits, self._labels)]
            or [torch.zeros((0, 2 * t), device=device)],
            dim=0,
        )
        rows = gather_rows(local, process_group)
        if rows is None:  # not the first rank: the same layout, values from the first rank
            rows = local[:0]
        metrics = compute_task_metrics(
            rows[:, :t], rows[:, t:], self._task_names, self._parent_tasks
        )
        return broadcast_metrics(metrics, process_group, device)
