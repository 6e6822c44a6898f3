"""PNG plots of the importance analysis (matplotlib ``Figure`` objects: Agg, no pyplot state)."""

from __future__ import annotations

import os
from typing import List

import numpy as np
from matplotlib.figure import Figure

from dtn_torchrec.analysis.gates import GATE_KINDS, GateUsage
from dtn_torchrec.analysis.importance import ImportanceResult

_DPI = 120


def _fields_by_importance(result: ImportanceResult) -> List[str]:
    """Fields ordered by their best rank over the tasks, then by field order."""
    return sorted(result.fields, key=lambda f: min(result.rank[t][f] for t in result.tasks))


def plot_importance_heatmap(result: ImportanceResult, path: str | os.PathLike) -> None:
    """Field x task heatmap of the ranking importance (``result.rank_by``), values annotated."""
    fields = _fields_by_importance(result)
    matrix = np.array(
        [[result.importance[f][t].get(result.rank_by) or 0.0 for t in result.tasks] for f in fields]
    )
    fig = Figure(figsize=(2.0 + 1.6 * len(result.tasks), 1.2 + 0.32 * len(fields)), dpi=_DPI)
    ax = fig.add_subplot(1, 1, 1)
    limit = float(np.abs(matrix).max()) or 1.0
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(len(result.tasks)), result.tasks)
    ax.set_yticks(range(len(fields)), fields)
    for i in range(len(fields)):
        for j in range(len(result.tasks)):
            ax.text(j, i, f"{matrix[i, j]:.4f}", ha="center", va="center", fontsize=7)
    ax.set_title(
        f"permutation importance ({result.rank_by}), {result.rows} rows x {result.repeats} repeats"
    )
    fig.colorbar(image, ax=ax, shrink=0.6)
    fig.tight_layout()
    fig.savefig(path)


def plot_divergence(result: ImportanceResult, path: str | os.PathLike) -> None:
    """Per field: each task's share of importance (grouped bars) and the rank spread over tasks,
    fields sorted by the share spread (most task-specific first)."""
    fields = sorted(result.fields, key=lambda f: -result.divergence[f]["share_spread"])
    y = np.arange(len(fields))
    height = 0.8 / len(result.tasks)
    fig = Figure(figsize=(11, 1.2 + 0.32 * len(fields)), dpi=_DPI)
    shares, ranks = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for k, task in enumerate(result.tasks):
        shares.barh(y + k * height, [result.share[task][f] for f in fields], height, label=task)
    shares.set_yticks(y + 0.4 - height / 2, fields)
    shares.invert_yaxis()
    shares.set_xlabel(f"share of the task's total {result.rank_by}")
    shares.set_title("importance share per task")
    shares.legend(loc="lower right")
    ranks.barh(y, [result.divergence[f]["rank_spread"] for f in fields], 0.6, color="grey")
    ranks.set_yticks(y, fields)
    ranks.invert_yaxis()
    ranks.set_xlabel("max - min rank over tasks")
    ranks.set_title("rank divergence")
    fig.tight_layout()
    fig.savefig(path)


def plot_gate_usage(usages: List[GateUsage], tasks: List[str], path: str | os.PathLike) -> None:
    """One panel per task: mean weight (+- std over rows) of every module in its two gates."""
    fig = Figure(figsize=(4.5 * len(tasks), 4.2), dpi=_DPI)
    for i, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), i + 1)
        positions: List[int] = []
        labels: List[str] = []
        offset = 0
        for kind in GATE_KINDS:
            (usage,) = [u for u in usages if u.task == task and u.gate == kind]
            x = list(range(offset, offset + len(usage.experts)))
            ax.bar(x, usage.mean, 0.8, yerr=usage.std, capsize=2, label=kind)
            positions += x
            labels += usage.experts
            offset += len(usage.experts) + 1  # a gap between the two gates
        ax.set_xticks(positions, labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("mean gate weight")
        ax.set_title(f"{task}: module use")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
