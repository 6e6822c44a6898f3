"""Mean training losses over a window of steps, reduced over all ranks for the log lines."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dtn_torchrec.train.steps import StepOutput


class LossWindow:
    """Sums ``loss * rows``, per-task BCE and rows of the steps since the last :meth:`reduce`.

    Args:
        task_names: the T task names (label order).
        device: where the sums live (the rank's device, so adding them needs no host sync).
    """

    def __init__(self, task_names: List[str], device: torch.device) -> None:
        self._task_names = list(task_names)
        # [loss * rows, rows, BCE sum of each task]
        self._sums = torch.zeros(2 + len(task_names), dtype=torch.float64, device=device)

    def add(self, output: StepOutput) -> None:
        """Adds one step's ``(loss, logits [B, T], labels [B, T])``."""
        loss, logits, labels = output
        rows = labels.shape[0]
        if rows == 0:  # a 0-row batch has a NaN mean loss and nothing to add
            return
        bce = F.binary_cross_entropy_with_logits(
            logits.float(), labels.float(), reduction="none"
        ).sum(0)
        self._sums[0] += loss.detach().sum().double() * rows
        self._sums[1] += rows
        self._sums[2:] += bce.double()

    def reduce(self) -> Optional[Dict[str, float]]:
        """All-rank means ``{"loss", "logloss_<task>"...}`` of the window (collective), then
        starts a new window; None when the window holds no rows."""
        sums = self._sums.clone()
        if dist.is_initialized():
            dist.all_reduce(sums)
        self._sums.zero_()
        rows = float(sums[1])
        if rows == 0:
            return None
        means = {"loss": float(sums[0]) / rows}
        means.update({f"logloss_{t}": float(v) / rows for t, v in zip(self._task_names, sums[2:])})
        return means
