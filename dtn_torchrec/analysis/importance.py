"""Per-task permutation importance of every input field, and how it diverges between tasks.

Field ``f``'s importance for task ``t`` is how much ``t``'s metrics worsen when the rows' id lists
of ``f`` are shuffled across rows (each row keeps its other fields and labels; ids and weights of a
bag move together), averaged over ``repeats`` seeded permutations:

* ``auc_drop = AUC - AUC_permuted`` (also ``cvr_auc_drop`` for a child task such as conversion
  under click, on the parent's positive rows; see ``train.metrics``),
* ``logloss_increase = logloss_permuted - logloss``.

DTN's motivation (docs/model.md, DTN) is that these differ between tasks; per field the divergence
is reported as the spread over tasks of its *share* (``max(auc_drop, 0)`` over the task's sum)
and of its *rank* (1 = most important for that task).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional

import numpy as np
import torch

from dtn_torchrec.analysis.rows import EvalRows, score_rows
from dtn_torchrec.train.metrics import compute_task_metrics

# (metric of train.metrics, name of its importance, sign: +1 when a higher metric is better).
IMPORTANCE_METRICS = (
    ("auc", "auc_drop", 1.0),
    ("cvr_auc", "cvr_auc_drop", 1.0),
    ("logloss", "logloss_increase", -1.0),
)
RANK_BY = {"auc": "auc_drop", "logloss": "logloss_increase"}


@dataclass
class ImportanceConfig:
    """Args:
    repeats: permutations per field (``R``); the mean and std over them are reported.
    seed: base seed; field ``i``'s repeat ``r`` uses a permutation drawn from ``(seed, i, r)``,
        so results do not depend on which other fields are analysed.
    batch_size: rows per forward.
    rank_by: ``auc`` (rank fields by ``auc_drop``) or ``logloss`` (by ``logloss_increase``).
    """

    repeats: int = 3
    seed: int = 0
    batch_size: int = 4096
    rank_by: str = "auc"

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.rank_by not in RANK_BY:
            raise ValueError(f"rank_by must be one of {list(RANK_BY)}, got {self.rank_by!r}")


@dataclass
class ImportanceResult:
    """Args:
    tasks: the analysed tasks.
    fields: the analysed fields, in KJT order.
    rows: evaluation rows.
    baseline: ``{task: {metric: value}}`` of the unpermuted rows.
    importance: ``{field: {task: {"auc_drop": mean, "auc_drop_std": std, ...}}}``.
    rank_by: the importance key ranks and shares are computed from.
    share: ``{task: {field: share}}``: ``max(importance, 0)`` over the task's sum (0 if all <= 0).
    rank: ``{task: {field: rank}}``, 1 = most important.
    divergence: ``{field: {"share_spread": .., "rank_spread": ..}}``: max - min over tasks.
    """

    tasks: List[str]
    fields: List[str]
    rows: int
    repeats: int
    seed: int
    baseline: Dict[str, Dict[str, Optional[float]]]
    importance: Dict[str, Dict[str, Dict[str, Optional[float]]]]
    rank_by: str
    share: Dict[str, Dict[str, float]] = field(default_factory=dict)
    rank: Dict[str, Dict[str, int]] = field(default_factory=dict)
    divergence: Dict[str, Dict[str, float]] = field(default_factory=dict)

    def ranking(self, task: str) -> List[str]:
        """Fields from most to least important for ``task``."""
        return sorted(self.fields, key=lambda f: self.rank[task][f])


def permutation_seed(seed: int, field_index: int, repeat: int) -> int:
    """The seed of one permutation, a hash of ``(seed, field_index, repeat)``."""
    state = np.random.SeedSequence([seed, field_index, repeat]).generate_state(1, np.uint64)
    return int(state[0] >> 1)  # torch seeds must fit in int64


def _importances(
    base: Mapping[str, Optional[float]], permuted: List[Mapping[str, Optional[float]]]
) -> Dict[str, Optional[float]]:
    out: Dict[str, Optional[float]] = {}
    for metric, name, sign in IMPORTANCE_METRICS:
        if base.get(metric) is None:
            continue
        values = [sign * (base[metric] - p[metric]) for p in permuted if p.get(metric) is not None]
        if not values:
            out[name] = out[f"{name}_std"] = None
            continue
        out[name] = float(np.mean(values))
        out[f"{name}_std"] = float(np.std(values))
    return out


def permutation_importance(
    model: torch.nn.Module,
    rows: EvalRows,
    tasks: List[str],
    label_columns: List[int],
    config: ImportanceConfig,
    fields: Optional[List[str]] = None,
) -> ImportanceResult:
    """Permutation importance of ``fields`` (default: all) for every task.

    Args:
        model: ``forward(kjt) -> logits [B, T]``, outputs in ``tasks`` order, eval mode.
        rows: the evaluation rows.
        tasks: the model's tasks.
        label_columns: each task's column in ``rows.labels``.
        config: repeats, seed, batch size, ranking metric.
        fields: fields to permute.

    Returns:
        The result with ranks, shares and divergences filled in.
    """
    fields = list(rows.fields) if fields is None else list(fields)
    labels = rows.labels[:, label_columns]

    def metrics(evaluated: EvalRows) -> Dict[str, Dict[str, Optional[float]]]:
        return compute_task_metrics(score_rows(model, evaluated, config.batch_size), labels, tasks)

    baseline = metrics(rows)
    field_index = {name: i for i, name in enumerate(rows.fields)}
    importance: Dict[str, Dict[str, Dict[str, Optional[float]]]] = {}
    for name in fields:
        permuted = []
        for repeat in range(config.repeats):
            seed = permutation_seed(config.seed, field_index[name], repeat)
            generator = torch.Generator().manual_seed(seed)
            permutation = torch.randperm(rows.num_rows, generator=generator)
            permuted.append(metrics(rows.with_field_permuted(name, permutation)))
        importance[name] = {t: _importances(baseline[t], [p[t] for p in permuted]) for t in tasks}
    result = ImportanceResult(
        tasks=list(tasks),
        fields=fields,
        rows=rows.num_rows,
        repeats=config.repeats,
        seed=config.seed,
        baseline=baseline,
        importance=importance,
        rank_by=RANK_BY[config.rank_by],
    )
    _rank_and_diverge(result)
    return result


def _rank_and_diverge(result: ImportanceResult) -> None:
    key = result.rank_by
    for task in result.tasks:
        scores = {f: result.importance[f][task].get(key) for f in result.fields}
        value = {f: (-math.inf if s is None else s) for f, s in scores.items()}
        # Ties keep field order, so ranks are deterministic.
        ordered = sorted(result.fields, key=lambda f: -value[f])
        result.rank[task] = {f: i + 1 for i, f in enumerate(ordered)}
        positive = {f: max(s or 0.0, 0.0) for f, s in scores.items()}
        total = sum(positive.values())
        result.share[task] = {f: (p / total if total > 0 else 0.0) for f, p in positive.items()}
    for f in result.fields:
        shares = [result.share[t][f] for t in result.tasks]
        ranks = [result.rank[t][f] for t in result.tasks]
        result.divergence[f] = {
            "share_spread": max(shares) - min(shares),
            "rank_spread": float(max(ranks) - min(ranks)),
        }
