"""Ragged id lists (offsets + values in numpy) and the vectorised operations `dtn-prepare` needs:
grouping flat ``(row, field, id)`` triples by field, gathering rows, concatenating rows, and
conversion to Arrow list columns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa


@dataclass
class Ragged:
    """One field over N rows: row ``i`` holds ``ids[offsets[i]:offsets[i + 1]]``.

    Args:
        offsets: int64 ``[N + 1]``, ``offsets[0] == 0``.
        ids: int64 ``[nnz]``.
        weights: float32 ``[nnz]`` aligned with ``ids``, or None.
    """

    offsets: np.ndarray
    ids: np.ndarray
    weights: Optional[np.ndarray] = None

    @property
    def num_rows(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @staticmethod
    def empty(num_rows: int, weighted: bool) -> "Ragged":
        return Ragged(
            np.zeros(num_rows + 1, dtype=np.int64),
            np.zeros(0, dtype=np.int64),
            np.zeros(0, dtype=np.float32) if weighted else None,
        )

    @staticmethod
    def from_lengths(
        lengths: np.ndarray, ids: np.ndarray, weights: Optional[np.ndarray] = None
    ) -> "Ragged":
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return Ragged(offsets, ids, weights)

    def with_ids(self, ids: np.ndarray) -> "Ragged":
        return Ragged(self.offsets, ids, self.weights)

    def drop_missing(self, missing_id: Optional[int]) -> "Ragged":
        """Removes the raw id ``missing_id`` from every list, with its weight (None: keeps all)."""
        if missing_id is None:
            return self
        keep = self.ids != missing_id
        if keep.all():
            return self
        rows = np.repeat(np.arange(self.num_rows), self.lengths)
        lengths = np.bincount(rows[keep], minlength=self.num_rows)
        return Ragged.from_lengths(
            lengths, self.ids[keep], None if self.weights is None else self.weights[keep]
        )

    def take(self, rows: np.ndarray) -> "Ragged":
        """The lists of ``rows`` (int64 ``[M]``, any order, repeats allowed)."""
        starts = self.offsets[rows]
        lengths = self.offsets[rows + 1] - starts
        out = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=out[1:])
        index = np.repeat(starts - out[:-1], lengths) + np.arange(out[-1], dtype=np.int64)
        return Ragged(out, self.ids[index], None if self.weights is None else self.weights[index])

    def concat_rows(self, other: "Ragged") -> "Ragged":
        """Row-wise concatenation: row ``i`` becomes ``self[i] + other[i]``."""
        if other.offsets[-1] == 0:
            return self
        if self.offsets[-1] == 0:
            return other
        offsets = self.offsets + other.offsets
        ids = np.empty(offsets[-1], dtype=np.int64)
        mine = np.arange(self.offsets[-1], dtype=np.int64) + np.repeat(
            other.offsets[:-1], self.lengths
        )
        theirs = np.arange(other.offsets[-1], dtype=np.int64) + np.repeat(
            self.offsets[1:], other.lengths
        )
        ids[mine], ids[theirs] = self.ids, other.ids
        weights = None
        if self.weights is not None and other.weights is not None:
            weights = np.empty(offsets[-1], dtype=np.float32)
            weights[mine], weights[theirs] = self.weights, other.weights
        return Ragged(offsets, ids, weights)

    def slice_rows(self, start: int, stop: int) -> "Ragged":
        lo, hi = self.offsets[start], self.offsets[stop]
        return Ragged(
            self.offsets[start : stop + 1] - lo,
            self.ids[lo:hi],
            None if self.weights is None else self.weights[lo:hi],
        )

    def arrow_lists(self, large: bool = False) -> Tuple[pa.Array, Optional[pa.Array]]:
        """``list<int64>`` ids and ``list<float32>`` weights (or None); ``large`` for int64 offsets."""
        if large:
            offsets = pa.array(self.offsets, type=pa.int64())
            make = pa.LargeListArray.from_arrays
        else:
            offsets = pa.array(self.offsets.astype(np.int32, copy=False), type=pa.int32())
            make = pa.ListArray.from_arrays
        ids = make(offsets, pa.array(self.ids, type=pa.int64()))
        return ids, None if self.weights is None else make(
            offsets, pa.array(self.weights, type=pa.float32())
        )


def concat_blocks(parts: Sequence[Ragged]) -> Ragged:
    """Stacks the rows of several Ragged one after another."""
    if len(parts) == 1:
        return parts[0]
    lengths = np.concatenate([p.lengths for p in parts])
    ids = np.concatenate([p.ids for p in parts])
    weighted = all(p.weights is not None for p in parts)
    return Ragged.from_lengths(
        lengths, ids, np.concatenate([p.weights for p in parts]) if weighted else None
    )


def group_by_field(
    row_of: np.ndarray,
    field_of: np.ndarray,
    ids: np.ndarray,
    weights: Optional[np.ndarray],
    num_rows: int,
    num_fields: int,
    missing_id: Optional[int],
) -> List[Ragged]:
    """Splits flat features into one Ragged per field, keeping source order within each list.

    Args:
        row_of: int64 ``[m]`` row of each feature, non-decreasing.
        field_of: int64 ``[m]`` field index of each feature.
        ids: int64 ``[m]`` raw ids; ``missing_id`` (None: none) is dropped.
        weights: float32 ``[m]`` or None.
    """
    keep = ids != missing_id if missing_id is not None else np.ones(len(ids), dtype=bool)
    if not keep.all():
        row_of, field_of, ids = row_of[keep], field_of[keep], ids[keep]
        weights = None if weights is None else weights[keep]
    order = np.argsort(field_of, kind="stable")
    bounds = np.zeros(num_fields + 1, dtype=np.int64)
    np.cumsum(np.bincount(field_of, minlength=num_fields), out=bounds[1:])
    out = []
    for f in range(num_fields):
        sel = order[bounds[f] : bounds[f + 1]]
        lengths = np.bincount(row_of[sel], minlength=num_rows)
        out.append(
            Ragged.from_lengths(lengths, ids[sel], None if weights is None else weights[sel])
        )
    return out
