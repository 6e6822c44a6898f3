"""Exact streaming AUC for scores that take a bounded set of values.

The synthetic generator quantises every planted logit to a grid (step 1/32, clipped to
[-10, 10]: 641 levels), so a true probability is one of 641 values and an entire-space
conversion probability one of 641^2 products. Counting positives and negatives per level in
constant memory then gives the AUC exactly, ties counted one half (the Mann-Whitney statistic).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

LOGIT_GRID_STEPS_PER_UNIT = 32
LOGIT_GRID_MAX = 10
LOGIT_GRID_LEVELS = 2 * LOGIT_GRID_STEPS_PER_UNIT * LOGIT_GRID_MAX + 1


def quantize_logit(logit: np.ndarray) -> np.ndarray:
    """Logits -> grid level index in [0, LOGIT_GRID_LEVELS)."""
    half = LOGIT_GRID_STEPS_PER_UNIT * LOGIT_GRID_MAX
    q = np.rint(np.asarray(logit, dtype=np.float64) * LOGIT_GRID_STEPS_PER_UNIT)
    return (np.clip(q, -half, half) + half).astype(np.int64)


def grid_probabilities() -> np.ndarray:
    """sigmoid of every grid level, float64 [LOGIT_GRID_LEVELS]."""
    half = LOGIT_GRID_STEPS_PER_UNIT * LOGIT_GRID_MAX
    logits = (np.arange(LOGIT_GRID_LEVELS) - half) / LOGIT_GRID_STEPS_PER_UNIT
    return 1.0 / (1.0 + np.exp(-logits))


class BinnedAUC:
    """Exact AUC of scores drawn from ``bin_scores`` (one score per bin; equal scores in
    different bins are ties), accumulated batch by batch."""

    def __init__(self, bin_scores: np.ndarray) -> None:
        self.bin_scores = np.asarray(bin_scores, dtype=np.float64).ravel()
        self.positives = np.zeros(len(self.bin_scores), dtype=np.int64)
        self.negatives = np.zeros(len(self.bin_scores), dtype=np.int64)

    def update(self, bins: np.ndarray, labels: np.ndarray) -> None:
        bins = np.asarray(bins, dtype=np.int64)
        labels = np.asarray(labels, dtype=bool)
        n = len(self.bin_scores)
        self.positives += np.bincount(bins[labels], minlength=n)
        self.negatives += np.bincount(bins[~labels], minlength=n)

    def compute(self) -> Optional[float]:
        """AUC, or None when there are no positives or no negatives."""
        values, inverse = np.unique(self.bin_scores, return_inverse=True)
        pos = np.bincount(inverse, weights=self.positives, minlength=len(values)).astype(np.int64)
        neg = np.bincount(inverse, weights=self.negatives, minlength=len(values)).astype(np.int64)
        total_pos, total_neg = int(pos.sum()), int(neg.sum())
        if total_pos == 0 or total_neg == 0:
            return None
        neg_below = np.cumsum(neg) - neg
        twice_wins = 2 * int(np.dot(pos, neg_below)) + int(np.dot(pos, neg))
        return twice_wins / (2 * total_pos * total_neg)
