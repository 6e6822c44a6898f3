"""Hashing and distinct counting of int64 ids for `dtn-prepare`.

``DistinctSketch`` is a KMV ("k minimum values") sketch: it keeps the ``k`` smallest distinct
64-bit hashes of the ids it saw. Below ``k`` distinct ids the count is exact; above, the estimate
``(k - 1) / (h_k / 2**64)`` (``h_k`` the k-th smallest hash) is unbiased with relative standard
error about ``1 / sqrt(k - 2)`` (1.6% for the default ``k = 4096``), in ``8 k`` bytes whatever the
number of ids. Sketches of the same ``k`` merge exactly (``merge``).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
DEFAULT_SKETCH_SIZE = 4096


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, a bijection on uint64, elementwise (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = np.asarray(x).astype(np.uint64)
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


class DistinctSketch:
    """KMV distinct-count estimate of int64 ids (see the module docstring).

    Args:
        k: hashes kept; the relative standard error is about ``1 / sqrt(k - 2)``.
    """

    def __init__(self, k: int = DEFAULT_SKETCH_SIZE) -> None:
        if k < 3:
            raise ValueError(f"sketch size must be >= 3, got {k}")
        self.k = k
        self._mins = np.zeros(0, dtype=np.uint64)

    def add(self, ids: np.ndarray, counts: Optional[np.ndarray] = None) -> None:
        """Adds ``ids`` (int64 ``[m]``); ``counts`` (how often each occurs) does not matter."""
        if len(ids) == 0:
            return
        hashes = splitmix64(np.asarray(ids, dtype=np.int64).view(np.uint64) + _GOLDEN)
        if len(self._mins) == self.k:
            hashes = hashes[hashes < self._mins[-1]]
        self._mins = np.unique(np.concatenate([self._mins, hashes]))[: self.k]

    def merge(self, other: "DistinctSketch") -> None:
        if other.k != self.k:
            raise ValueError(f"cannot merge sketches of size {self.k} and {other.k}")
        self._mins = np.unique(np.concatenate([self._mins, other._mins]))[: self.k]

    @property
    def exact(self) -> bool:
        """True while fewer than ``k`` distinct ids were seen (``estimate`` is then a count)."""
        return len(self._mins) < self.k

    def estimate(self) -> int:
        if self.exact:
            return len(self._mins)
        return round((self.k - 1) / ((float(self._mins[-1]) + 1.0) / 2.0**64))

    def relative_standard_error(self) -> float:
        """0 for an exact count, else about ``1 / sqrt(k - 2)``."""
        return 0.0 if self.exact else 1.0 / math.sqrt(self.k - 2)
