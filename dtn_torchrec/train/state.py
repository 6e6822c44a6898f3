"""Where a training run stands: the part of every checkpoint that is not tensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List


@dataclass
class TrainState:
    """Position and evaluation history of a run.

    Args:
        step: optimizer steps done in total.
        epoch: epochs completed (the epoch in progress; == ``epochs`` when all are done).
        batches_in_epoch: batches of ``epoch`` already trained.
        history: every evaluation so far, ``{"step", "epoch", "split", "metrics"}``.
    """

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)

    def record(self, split: str, metrics: Dict[str, Any]) -> None:
        """Adds an evaluation of ``split`` at the current step (replacing one at the same step:
        a resumed run evaluates its restored step again)."""
        self.history = [h for h in self.history if (h["step"], h["split"]) != (self.step, split)]
        self.history.append(
            {"step": self.step, "epoch": self.epoch, "split": split, "metrics": metrics}
        )
