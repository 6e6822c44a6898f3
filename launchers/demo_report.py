"""Prints a demo run's test AUC per task next to the oracle AUC of the synthetic data.

Usage: python launchers/demo_report.py SUMMARY_JSON TRUTH_JSON
"""

from __future__ import annotations

import json
import sys
from typing import Optional


def _fmt(value: Optional[float]) -> str:
    return "   n/a" if value is None else f"{value:.4f}"


def report(summary: dict, truth: dict, split: str = "test") -> str:
    """A small table: task, model AUC, oracle AUC (the AUC of the planted probabilities)."""
    oracle = truth["oracle_auc"][split]
    rows = [("task", "model AUC", "oracle AUC")]
    for task, metrics in summary[split].items():
        rows.append((task, _fmt(metrics.get("auc")), _fmt(oracle.get(task))))
        if "cvr_auc" in metrics:
            given_click = truth.get("oracle_auc_conversion_given_click", {}).get(split)
            rows.append((f"{task} | click", _fmt(metrics["cvr_auc"]), _fmt(given_click)))
    width = max(len(r[0]) for r in rows)
    lines = [f"{a:<{width}}  {b:>10}  {c:>10}" for a, b, c in rows]
    rate = summary["throughput"]["samples_per_s"]
    lines.append(
        f"throughput: {rate:,.0f} samples/s over {summary['world_size']} ranks "
        f"({summary['steps']} steps)"
        if rate is not None
        else "throughput: n/a"
    )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} SUMMARY_JSON TRUTH_JSON")
    with open(sys.argv[1]) as f:
        summary = json.load(f)
    with open(sys.argv[2]) as f:
        truth = json.load(f)
    print(report(summary, truth))


if __name__ == "__main__":
    main()
