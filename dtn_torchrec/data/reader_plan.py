"""Which rows each rank reads, in which order: pure index arithmetic, no I/O.

A split is a sequence of *units* (one Parquet row group each, in file order). Per epoch:

1. The unit order is the file order, or with ``shuffle`` a permutation drawn from
   ``(seed, epoch)``, the same on every rank.
2. The units, in that order, are laid end to end as one stream of ``T`` rows; rank ``r`` of
   ``R`` takes rows ``[r*T//R, (r+1)*T//R)`` of it: a few contiguous *spans* of row groups.
   Every row is read by exactly one rank and per-rank row counts differ by at most one.
3. The rank's spans are grouped into *windows* of at least ``shuffle_buffer_rows`` rows
   (whole spans); with ``shuffle`` and a buffer, the rows of a window are permuted with a
   generator drawn from ``(seed, epoch, rank, world_size, window)``. The window is the shuffle
   buffer: it bounds memory to ``shuffle_buffer_rows`` plus one row group.
4. The rank's row stream (windows in order) is cut into batches of ``batch_size`` rows.

Batch counts (identical on all ranks, see ``num_batches``):

* ``drop_last=False``: ``ceil(ceil(T/R) / B)``. Every row is yielded once. The final batch of a
  rank holds its remaining rows; a rank whose rows ran out one step early (its count is
  ``floor(T/R)``, a multiple of ``B``, while another rank has one more row; or ``T < R``)
  yields a well-formed 0-row batch for that step, so no rank waits on a collective forever.
* ``drop_last=True``: ``floor(floor(T/R) / B)``: only global steps in which every rank has a
  full batch; the ``T - R * B * num_batches`` remaining rows of the epoch are skipped on all ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import numpy as np


@dataclass(frozen=True)
class Span:
    """Rows ``[start, stop)`` of unit ``unit`` (an index into the split's row groups)."""

    unit: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def rank_row_range(total_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    return rank * total_rows // world_size, (rank + 1) * total_rows // world_size


def num_batches(total_rows: int, world_size: int, batch_size: int, drop_last: bool) -> int:
    """Batches per epoch, the same on every rank."""
    if drop_last:
        return (total_rows // world_size) // batch_size
    most_rows = -(-total_rows // world_size)
    return -(-most_rows // batch_size)


def unit_order(num_units: int, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    if not shuffle:
        return np.arange(num_units)
    return np.random.default_rng([seed, epoch]).permutation(num_units)


def rank_spans(
    unit_rows: Sequence[int], order: np.ndarray, rank: int, world_size: int
) -> List[Span]:
    """This rank's contiguous share of the units laid end to end in ``order``."""
    lo, hi = rank_row_range(int(sum(unit_rows)), rank, world_size)
    spans: List[Span] = []
    offset = 0
    for unit in order.tolist():
        rows = unit_rows[unit]
        start, stop = max(lo, offset), min(hi, offset + rows)
        if start < stop:
            spans.append(Span(unit, start - offset, stop - offset))
        offset += rows
        if offset >= hi:
            break
    return spans


def windows(spans: Sequence[Span], buffer_rows: int) -> List[List[Span]]:
    """Consecutive spans grouped until each group holds at least ``buffer_rows`` rows (the last
    group may hold fewer); ``buffer_rows <= 0`` makes every span its own window."""
    out: List[List[Span]] = []
    current: List[Span] = []
    rows = 0
    for span in spans:
        current.append(span)
        rows += span.rows
        if rows >= buffer_rows:
            out.append(current)
            current, rows = [], 0
    if current:
        out.append(current)
    return out


def window_permutation(
    rows: int, seed: int, epoch: int, rank: int, world_size: int, window: int
) -> np.ndarray:
    return np.random.default_rng([seed, epoch, rank, world_size, window]).permutation(rows)
