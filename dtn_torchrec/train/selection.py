"""Model selection: the best evaluation of the valid split so far, and early stopping.

Selection is a pure function of the evaluation history (which every checkpoint holds), so a
resumed run has exactly the best-so-far state of the run it continues. The test split is never
looked at.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence

from dtn_torchrec.train.config import SelectConfig

Metrics = Mapping[str, Mapping[str, Optional[float]]]


@dataclass(frozen=True)
class Selection:
    """The evaluation a run returns.

    Args:
        step: optimizer steps done when it was evaluated.
        epoch: epochs completed at that step.
        score: its selection score (None: no valid split, or no defined score yet; the
            selection is then the last evaluation).
        stale: evaluations of the split after it that did not improve on it.
    """

    step: int
    epoch: int
    score: Optional[float]
    stale: int

    def should_stop(self, patience: Optional[int]) -> bool:
        """True once ``patience`` evaluations in a row have not improved (never for None)."""
        return patience is not None and self.stale >= patience


def selection_score(metrics: Metrics, cfg: SelectConfig) -> Optional[float]:
    """``cfg.metric`` of ``cfg.task`` (or its mean over all tasks); None if any is undefined.

    Args:
        metrics: ``{task: {metric: value}}`` of one evaluation.
    """
    tasks = list(metrics) if cfg.task == "mean" else [cfg.task]
    values = [metrics[task][cfg.metric] for task in tasks]
    if not values or any(value is None for value in values):
        return None
    return sum(float(value) for value in values) / len(values)


def _better(score: float, best: float, mode: str) -> bool:
    return score > best if mode == "max" else score < best


def select(history: Sequence[Mapping[str, Any]], split: str, cfg: SelectConfig) -> Selection:
    """The best evaluation of ``split`` in ``history`` (the earliest on ties).

    Without any defined score the selection is the last evaluation of ``split``.

    Args:
        history: evaluations ``{"step", "epoch", "split", "metrics"}``.
        split: the split selected on (the valid split).

    Raises:
        ValueError: ``history`` holds no evaluation of ``split``.
    """
    evaluations = sorted((h for h in history if h["split"] == split), key=lambda h: h["step"])
    if not evaluations:
        raise ValueError(f"no evaluation of split {split!r} to select from")
    best: Optional[Mapping[str, Any]] = None
    best_score: Optional[float] = None
    stale = 0
    for evaluation in evaluations:
        score = selection_score(evaluation["metrics"], cfg)
        if score is not None and (best_score is None or _better(score, best_score, cfg.mode)):
            best, best_score, stale = evaluation, score, 0
        else:
            stale += 1
    if best is None:
        last = evaluations[-1]
        return Selection(step=int(last["step"]), epoch=int(last["epoch"]), score=None, stale=0)
    return Selection(
        step=int(best["step"]), epoch=int(best["epoch"]), score=best_score, stale=stale
    )


def last_evaluation(history: Sequence[Mapping[str, Any]]) -> Selection:
    """The newest evaluation of any split (a run without a valid split reports that one)."""
    if not history:
        raise ValueError("no evaluation to select from")
    last = max(history, key=lambda h: h["step"])
    return Selection(step=int(last["step"]), epoch=int(last["epoch"]), score=None, stale=0)


def metrics_at(history: Sequence[Mapping[str, Any]], step: int) -> Dict[str, Any]:
    """``{split: metrics}`` of every evaluation at ``step``."""
    return {h["split"]: h["metrics"] for h in history if h["step"] == step}
