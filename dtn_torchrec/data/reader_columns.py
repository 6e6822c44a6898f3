"""Arrow list columns as numpy jagged arrays, and row gathers over them.

A decoded window keeps the Arrow buffers (zero copy): per field the start and length of every
row's list inside the flat values buffer. Building a batch from any rows (shuffled or not) is
then one vectorised gather per field, with no intermediate Arrow table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa


@dataclass
class JaggedColumn:
    """One list column of ``n`` rows: row ``i`` is ``values[starts[i] : starts[i] + lengths[i]]``
    and its weights ``weights[weight_starts[i] : weight_starts[i] + lengths[i]]``.

    Args:
        starts: int64 ``[n]``.
        lengths: int32 ``[n]`` (0 for a null list).
        values: flat int64 ids of the whole buffer.
        weight_starts, weights: the same for the row-aligned weight column, or None.
    """

    starts: np.ndarray
    lengths: np.ndarray
    values: np.ndarray
    weight_starts: Optional[np.ndarray] = None
    weights: Optional[np.ndarray] = None
    # Every row holds exactly one id (most Ali-CCP fields): a gather is then one indexing.
    single_valued: bool = field(init=False)

    def __post_init__(self) -> None:
        self.single_valued = bool((self.lengths == 1).all())

    @staticmethod
    def from_arrow(ids: pa.Array, weights: Optional[pa.Array] = None) -> "JaggedColumn":
        """From a ``list<int64>`` array and an optional ``list<float32>`` array whose list lengths
        agree row by row (checked by the caller with ``weight_mismatch``)."""
        starts, lengths, values = _list_parts(ids)
        if weights is None:
            return JaggedColumn(starts, lengths, values)
        weight_starts, _, weight_values = _list_parts(weights)
        return JaggedColumn(starts, lengths, values, weight_starts, weight_values)

    def gather(self, rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """(lengths int32 [k], ids int64 [sum], weights float32 [sum] | None) of ``rows``."""
        if self.single_valued and len(rows):
            # Row i's id is values[starts[0] + i] (lists of length 1 are adjacent).
            ids = self.values[int(self.starts[0]) :][rows]
            lengths = np.ones(len(rows), dtype=self.lengths.dtype)
            if self.weights is None:
                return lengths, ids, None
            return lengths, ids, self.weights[int(self.weight_starts[0]) :][rows]
        lengths = self.lengths[rows]
        ids = _take_lists(self.values, self.starts[rows], lengths)
        if self.weights is None:
            return lengths, ids, None
        return lengths, ids, _take_lists(self.weights, self.weight_starts[rows], lengths)


def single_array(column: pa.ChunkedArray) -> pa.Array:
    """The column as one array: its only chunk (no copy) or the chunks concatenated."""
    return column.chunk(0) if column.num_chunks == 1 else pa.concat_arrays(column.chunks)


def _list_parts(array: pa.Array) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts int64 [n], lengths int32 [n], flat values) of a list array, zero copy."""
    offsets = array.offsets.to_numpy().astype(np.int64, copy=False)
    lengths = np.diff(offsets).astype(np.int32)
    if array.null_count:
        lengths[array.is_null().to_numpy(zero_copy_only=False)] = 0
    return offsets[:-1], lengths, array.values.to_numpy()


def _take_lists(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The lists ``values[starts[i] : starts[i] + lengths[i]]`` concatenated (a slice when they
    are already adjacent, as for unshuffled rows)."""
    if len(starts) and np.array_equal(starts[1:], starts[:-1] + lengths[:-1]):
        lo = int(starts[0])
        return values[lo : lo + int(lengths.sum())]
    return values[_row_index(starts, lengths)]


def _row_index(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Flat positions of the lists ``[starts[i], starts[i] + lengths[i])``, concatenated."""
    total = int(lengths.sum())
    ends = np.cumsum(lengths, dtype=np.int64)
    return np.repeat(starts - (ends - lengths), lengths) + np.arange(total, dtype=np.int64)


def weight_mismatch(ids: pa.Array, weights: pa.Array) -> Optional[Tuple[int, int, int]]:
    """(row, id count, weight count) of the first row whose id and weight lists differ in
    length, or None."""
    _, id_lengths, _ = _list_parts(ids)
    _, w_lengths, _ = _list_parts(weights)
    bad = np.flatnonzero(id_lengths != w_lengths)
    if not len(bad):
        return None
    row = int(bad[0])
    return row, int(id_lengths[row]), int(w_lengths[row])


@dataclass
class DecodedWindow:
    """The rows of one shuffle window: ids per field, labels float32 ``[n, T]``, sample ids ``[n]``."""

    columns: Dict[str, JaggedColumn]
    labels: np.ndarray
    sample_ids: np.ndarray

    @property
    def num_rows(self) -> int:
        return len(self.sample_ids)

    @staticmethod
    def from_table(
        table: pa.Table,
        fields: List[str],
        weight_columns: Dict[str, str],
        labels: List[str],
        sample_id_column: str,
    ) -> "DecodedWindow":
        def single(name: str) -> pa.Array:
            return single_array(table.column(name))

        columns = {
            f: JaggedColumn.from_arrow(
                single(f), single(weight_columns[f]) if f in weight_columns else None
            )
            for f in fields
        }
        label_matrix = np.stack(
            [single(t).to_numpy(zero_copy_only=False).astype(np.float32) for t in labels], axis=1
        ).reshape(table.num_rows, len(labels))
        sample_ids = single(sample_id_column).to_numpy(zero_copy_only=False).astype(np.int64)
        return DecodedWindow(columns, label_matrix, sample_ids)
