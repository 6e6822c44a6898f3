"""Prints the demo's models side by side: test AUC per task next to the oracle AUC of the
synthetic data (the AUC of the true probabilities, the best any model can reach), the gap to it,
and each run's selected step and throughput.

Usage: python launchers/demo_report.py TRUTH_JSON NAME=SUMMARY_JSON [NAME=SUMMARY_JSON ...]
"""

from __future__ import annotations

import json
import sys
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

SPLIT = "test"


def _auc(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _rows(truth: Mapping, runs: Mapping[str, Mapping]) -> List[Tuple[str, Optional[float], List]]:
    """(label, oracle AUC, [model AUC per run]) per task, plus conversion on clicked rows."""
    oracle = truth["oracle_auc"][SPLIT]
    tasks = list(next(iter(runs.values()))[SPLIT])
    rows = [
        (task, oracle.get(task), [r[SPLIT][task].get("auc") for r in runs.values()])
        for task in tasks
    ]
    if any("cvr_auc" in r[SPLIT].get("conversion", {}) for r in runs.values()):
        given_click = truth.get("oracle_auc_conversion_given_click", {}).get(SPLIT)
        rows.append(
            (
                "conversion | click",
                given_click,
                [r[SPLIT].get("conversion", {}).get("cvr_auc") for r in runs.values()],
            )
        )
    return rows


def _selected(summary: Mapping) -> str:
    """The step whose evaluation is reported (best on valid; older summaries: the last)."""
    step = (summary.get("selected") or {}).get("step", summary.get("steps"))
    return "?" if step is None else str(step)


def report(truth: Mapping, runs: Mapping[str, Mapping]) -> str:
    """The side-by-side table; ``runs`` maps a model label to its ``summary.json``."""
    names = list(runs)
    width = max(18, *(len(label) for label, _, _ in _rows(truth, runs)))
    col = max(8, *(len(n) for n in names))

    def line(label: str, cells: Sequence[str]) -> str:
        return f"{label:<{width}}" + "".join(f"  {c:>{col}}" for c in cells)

    out = [line(f"{SPLIT} AUC", ["oracle", *names])]
    gaps: Dict[str, List[str]] = {}
    for label, oracle, aucs in _rows(truth, runs):
        out.append(line(label, [_auc(oracle), *(_auc(a) for a in aucs)]))
        gaps[label] = [
            "n/a" if a is None or oracle is None else f"{oracle - a:+.4f}"[1:] for a in aucs
        ]
    out.append("")
    out.append(line("gap to oracle", ["", *names]))
    for label, cells in gaps.items():
        out.append(line(label, ["", *cells]))
    out.append("")
    rates = []
    for summary in runs.values():
        rate = summary.get("throughput", {}).get("samples_per_s")
        rates.append("n/a" if rate is None else f"{rate:,.0f}")
    out.append(
        line(f"samples/s ({next(iter(runs.values())).get('world_size', '?')} ranks)", ["", *rates])
    )
    out.append(line("reported step", ["", *(_selected(s) for s in runs.values())]))
    return "\n".join(out)


def main(argv: Sequence[str]) -> None:
    if len(argv) < 2 or any("=" not in a for a in argv[1:]):
        sys.exit("usage: demo_report.py TRUTH_JSON NAME=SUMMARY_JSON [NAME=SUMMARY_JSON ...]")
    with open(argv[0]) as f:
        truth = json.load(f)
    runs = {}
    for arg in argv[1:]:
        name, _, path = arg.partition("=")
        with open(path) as f:
            runs[name] = json.load(f)
    print(report(truth, runs))


if __name__ == "__main__":
    main(sys.argv[1:])
