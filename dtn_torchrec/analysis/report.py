"""Writes an importance analysis as tables (CSV + JSON) and PNG plots into one directory.

Files::

    importance.csv           field, task, auc_drop(_std), cvr_auc_drop(_std),
                             logloss_increase(_std), share, rank
    divergence.csv           field, share_spread, rank_spread, share_<task>..., rank_<task>...
    gates.csv                task, gate, expert, mean_weight, std_weight        (DTN only)
    analysis.json            all of the above, baseline metrics, per-task rankings, settings
    importance_heatmap.png   field x task importance
    importance_divergence.png  per-task shares and rank spread per field
    gate_usage.png           mean gate weight per module and task              (DTN only)
"""

from __future__ import annotations

import csv
import dataclasses
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from dtn_torchrec.analysis.gates import GateUsage
from dtn_torchrec.analysis.importance import IMPORTANCE_METRICS, ImportanceResult
from dtn_torchrec.analysis.plots import plot_divergence, plot_gate_usage, plot_importance_heatmap
from dtn_torchrec.atomic_files import write_json_atomic

IMPORTANCE_CSV = "importance.csv"
DIVERGENCE_CSV = "divergence.csv"
GATES_CSV = "gates.csv"
ANALYSIS_JSON = "analysis.json"
HEATMAP_PNG = "importance_heatmap.png"
DIVERGENCE_PNG = "importance_divergence.png"
GATES_PNG = "gate_usage.png"


def _write_csv(path: Path, header: List[str], rows: List[List[Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def importance_rows(result: ImportanceResult) -> List[Dict[str, Any]]:
    """One record per (field, task): importances, share and rank."""
    keys = [k for _, name, _ in IMPORTANCE_METRICS for k in (name, f"{name}_std")]
    return [
        {
            "field": f,
            "task": t,
            **{k: result.importance[f][t].get(k) for k in keys},
            "share": result.share[t][f],
            "rank": result.rank[t][f],
        }
        for f in result.fields
        for t in result.tasks
    ]


def write_report(
    directory: str | os.PathLike,
    result: ImportanceResult,
    gates: Optional[List[GateUsage]],
    settings: Dict[str, Any],
) -> List[str]:
    """Writes every file of the module docstring into ``directory``; returns their names.

    Args:
        directory: an existing (staging) directory.
        result: the permutation importance.
        gates: DTN gate usage, or None for other architectures.
        settings: run settings echoed into ``analysis.json`` (checkpoint, split, ...).
    """
    out = Path(directory)
    records = importance_rows(result)
    header = list(records[0])
    _write_csv(out / IMPORTANCE_CSV, header, [[r[k] for k in header] for r in records])
    _write_csv(
        out / DIVERGENCE_CSV,
        ["field", "share_spread", "rank_spread"]
        + [f"share_{t}" for t in result.tasks]
        + [f"rank_{t}" for t in result.tasks],
        [
            [f, result.divergence[f]["share_spread"], result.divergence[f]["rank_spread"]]
            + [result.share[t][f] for t in result.tasks]
            + [result.rank[t][f] for t in result.tasks]
            for f in result.fields
        ],
    )
    plot_importance_heatmap(result, out / HEATMAP_PNG)
    plot_divergence(result, out / DIVERGENCE_PNG)
    files = [IMPORTANCE_CSV, DIVERGENCE_CSV, HEATMAP_PNG, DIVERGENCE_PNG]
    if gates is not None:
        _write_csv(
            out / GATES_CSV,
            ["task", "gate", "expert", "mean_weight", "std_weight"],
            [[g.task, g.gate, e, m, s] for g in gates for e, m, s in zip(g.experts, g.mean, g.std)],
        )
        plot_gate_usage(gates, result.tasks, out / GATES_PNG)
        files += [GATES_CSV, GATES_PNG]
    write_json_atomic(
        out / ANALYSIS_JSON,
        {
            **settings,
            "rows": result.rows,
            "repeats": result.repeats,
            "seed": result.seed,
            "rank_by": result.rank_by,
            "tasks": result.tasks,
            "baseline": result.baseline,
            "ranking": {t: result.ranking(t) for t in result.tasks},
            "importance": result.importance,
            "share": result.share,
            "rank": result.rank,
            "divergence": result.divergence,
            "gates": [dataclasses.asdict(g) for g in gates] if gates is not None else None,
            "files": files + [ANALYSIS_JSON],
        },
    )
    return files + [ANALYSIS_JSON]
