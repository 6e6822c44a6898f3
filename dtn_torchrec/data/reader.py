"""Parquet split -> ``Batch`` stream, sharded over ranks, shuffled, prefetched, resumable.

Sharding, shuffling, batch counts and the last partial batch are specified in
``reader_plan``; this module does the I/O and builds the ``KeyedJaggedTensor`` key-major
(all of key 0's bags, then key 1's, ...) straight from the Arrow list offsets with numpy.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from dtn_torchrec.data import reader_plan
from dtn_torchrec.data.batch import Batch
from dtn_torchrec.data.reader_columns import DecodedWindow, single_array, weight_mismatch
from dtn_torchrec.data.reader_prefetch import Prefetcher, ordered_map
from dtn_torchrec.data.schema import SAMPLE_ID_COLUMN, SchemaSpec

# Rows of one decoded window, in the order they are taken: (window, row indices).
WindowRows = Tuple[DecodedWindow, np.ndarray]


def _is_int_list(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(t.value_type)


def _is_float_list(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_floating(t.value_type)


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


class ParquetBatchReader:
    """Iterable of ``Batch`` over one split of a ``dtn-prepare`` dataset.

    Args:
        dataset_dir: directory holding ``schema.json`` and the split folders.
        split: split name (``train``, ``test``, ``valid``).
        batch_size: rows per batch on this rank (B).
        rank, world_size: this process's place among the readers of the split.
        shuffle: permute the row-group order per (seed, epoch), and rows within windows of
            ``shuffle_buffer_rows`` rows (see ``reader_plan``).
        drop_last: yield only global steps in which every rank has a full batch.
        use_weights: attach per-id weights from the fields' weight columns (1.0 for fields
            without one).
        prefetch_batches: batches decoded ahead in a background thread (0: no thread).
        fields: KJT keys, a subset of the schema fields in any order (default: schema order).
        workers: threads that read and decode windows and assemble batches; any number yields
            the same batches in the same order (and resumes the same way) as one.
        pin_memory: hand out batches in page-locked host memory (pinned where they are built),
            so the copy to a CUDA device can be ``non_blocking``. Needs CUDA.

    Each batch: ``sparse_features`` with one key per field, int64 values and int32 lengths
    (stride B); ``labels`` float32 ``[B, T]`` in ``schema.labels`` order; ``sample_ids`` int64 ``[B]``.
    """

    def __init__(
        self,
        dataset_dir: str,
        split: str,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        shuffle_buffer_rows: int = 0,
        seed: int = 0,
        drop_last: bool = False,
        use_weights: bool = False,
        prefetch_batches: int = 2,
        fields: Optional[List[str]] = None,
        workers: int = 1,
        pin_memory: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        if prefetch_batches < 0 or shuffle_buffer_rows < 0:
            raise ValueError("prefetch_batches and shuffle_buffer_rows must be >= 0")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.schema = SchemaSpec.load(dataset_dir)
        if split not in self.schema.splits:
            raise ValueError(
                f"{Path(dataset_dir) / 'schema.json'}: no split {split!r} "
                f"(splits: {sorted(self.schema.splits)})"
            )
        self.split = split
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.shuffle_buffer_rows, self.seed = shuffle, shuffle_buffer_rows, seed
        self.drop_last, self.use_weights, self.prefetch_batches = (
            drop_last,
            use_weights,
            prefetch_batches,
        )
        self.workers, self.pin_memory = workers, pin_memory
        self.fields = list(fields) if fields is not None else self.schema.field_names
        if not self.fields:
            raise ValueError("fields must name at least one field")
        for name in self.fields:
            self.schema.field(name)  # KeyError names the unknown field
        self.labels = list(self.schema.labels)
        self.weight_columns: Dict[str, str] = {}
        if use_weights:
            self.weight_columns = {
                f: self.schema.field(f).weight_column
                for f in self.fields
                if self.schema.field(f).weight_column
            }
        self.columns = (
            [SAMPLE_ID_COLUMN] + self.fields + list(self.weight_columns.values()) + self.labels
        )
        # Every span is cast to this, so files from different writers concatenate.
        self._arrow_schema = pa.schema(
            [(SAMPLE_ID_COLUMN, pa.int64())]
            + [(f, pa.list_(pa.int64())) for f in self.fields]
            + [(w, pa.list_(pa.float32())) for w in self.weight_columns.values()]
            + [(t, pa.float32()) for t in self.labels]
        )

        self.files = self.schema.split_files(dataset_dir, split)
        self._units: List[Tuple[int, int]] = []  # (file index, row group)
        self._unit_rows: List[int] = []
        # Parsed footers: every window opens its files with them (no footer read per window).
        self._file_metadata: List[pq.FileMetaData] = []
        for file_index, path in enumerate(self.files):
            meta = self._check_file(path)
            self._file_metadata.append(meta)
            for rg in range(meta.num_row_groups):
                rows = meta.row_group(rg).num_rows
                if rows > 0:
                    self._units.append((file_index, rg))
                    self._unit_rows.append(rows)
        self.total_rows = int(sum(self._unit_rows))
        declared = self.schema.splits[split].rows
        if declared != self.total_rows:
            raise ValueError(
                f"{Path(dataset_dir) / 'schema.json'}: split {split!r} declares {declared} rows "
                f"but its files hold {self.total_rows}"
            )
        lo, hi = reader_plan.rank_row_range(self.total_rows, rank, world_size)
        self.num_rows = hi - lo
        self._num_batches = reader_plan.num_batches(
            self.total_rows, world_size, batch_size, drop_last
        )
        self._epoch = 0
        self._consumed = 0
        self._resume_from = 0

    # ------------------------------------------------------------------ validation
    def _expected_columns(self) -> Dict[str, str]:
        expected = {SAMPLE_ID_COLUMN: "sample_id"}
        for f in self.schema.fields:
            expected[f.name] = "ids"
            if f.weight_column:
                expected[f.weight_column] = "weights"
        for label in self.schema.labels:
            expected[label] = "label"
        return expected

    def _check_file(self, path: str) -> pq.FileMetaData:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: Parquet file listed in schema.json is missing")
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{path}: not a readable Parquet file: {e}") from e
        arrow_schema = pf.schema_arrow
        expected = self._expected_columns()
        for name, kind in expected.items():
            idx = arrow_schema.get_field_index(name)
            if idx < 0:
                raise ValueError(
                    f"{path}: column {name!r} ({kind}) required by schema.json is missing"
                )
            t = arrow_schema.field(idx).type
            ok = {
                "sample_id": pa.types.is_integer,
                "ids": _is_int_list,
                "weights": _is_float_list,
                "label": _is_number,
            }[kind](t)
            if not ok:
                raise ValueError(
                    f"{path}: column {name!r} has type {t}, expected {kind} "
                    f"({'list<int64>' if kind == 'ids' else 'list<float>' if kind == 'weights' else 'number'})"
                )
        for name in arrow_schema.names:
            if name not in expected:
                raise ValueError(f"{path}: column {name!r} is not in schema.json")
        return pf.metadata

    # ------------------------------------------------------------------ epoch / resume state
    def __len__(self) -> int:
        return self._num_batches

    @property
    def dropped_rows(self) -> int:
        """Rows of the split not yielded in an epoch (all ranks): nonzero only with drop_last."""
        return (
            self.total_rows - self._num_batches * self.batch_size * self.world_size
            if self.drop_last
            else 0
        )

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch the next iteration reads. Switching to another epoch forgets a
        position loaded by ``load_state_dict``; setting the loaded epoch keeps it."""
        if epoch != self._epoch:
            self._epoch = epoch
            self._consumed = 0
            self._resume_from = 0

    def state_dict(self) -> Dict[str, int]:
        """``{"epoch", "batches"}``: batches of the epoch handed to the consumer so far."""
        return {"epoch": self._epoch, "batches": self._consumed}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """The next iteration yields exactly the batches an uninterrupted run would have yielded
        after ``state["batches"]`` batches of ``state["epoch"]`` (same seed and world)."""
        batches = int(state["batches"])
        if not 0 <= batches <= self._num_batches:
            raise ValueError(f"state batches={batches} outside [0, {self._num_batches}]")
        self._epoch = int(state["epoch"])
        self._consumed = self._resume_from = batches

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Batch]:
        start = self._resume_from
        self._resume_from = 0
        self._consumed = start
        batches = self._batches(self._epoch, start)
        source = (
            Prefetcher(batches, self.prefetch_batches) if self.prefetch_batches > 0 else batches
        )
        try:
            for batch in source:
                self._consumed += 1
                yield batch
        finally:
            source.close()

    def _rank_windows(self, epoch: int) -> List[List[reader_plan.Span]]:
        order = reader_plan.unit_order(len(self._units), self.shuffle, self.seed, epoch)
        spans = reader_plan.rank_spans(self._unit_rows, order, self.rank, self.world_size)
        return reader_plan.windows(spans, self.shuffle_buffer_rows if self.shuffle else 0)

    def _windows(self, epoch: int, skip_rows: int) -> Iterator[Tuple[DecodedWindow, np.ndarray]]:
        """This rank's rows for the epoch in order, as (decoded window, row order) pairs, the first
        ``skip_rows`` left out (whole windows skipped without reading them). Windows are read and
        decoded on the worker threads, ahead of the consumer."""
        kept: List[Tuple[int, List[reader_plan.Span], int]] = []  # (window, spans, rows skipped)
        for w, spans in enumerate(self._rank_windows(epoch)):
            rows = sum(s.rows for s in spans)
            if skip_rows >= rows:
                skip_rows -= rows
                continue
            kept.append((w, spans, skip_rows))
            skip_rows = 0

        def decode(item: Tuple[int, List[reader_plan.Span], int]) -> WindowRows:
            w, spans, skipped = item
            window = self._read_window(spans)
            if self.shuffle and self.shuffle_buffer_rows > 0:
                order = reader_plan.window_permutation(
                    window.num_rows, self.seed, epoch, self.rank, self.world_size, w
                )
            else:
                order = np.arange(window.num_rows)
            return window, order[skipped:]

        return ordered_map(decode, kept, self.workers)

    def _read_window(self, spans: List[reader_plan.Span]) -> DecodedWindow:
        files: Dict[int, pq.ParquetFile] = {}
        try:
            table = pa.concat_tables([self._read_span(files, s) for s in spans])
        finally:
            for pf in files.values():
                pf.close()
        return DecodedWindow.from_table(
            table, self.fields, self.weight_columns, self.labels, SAMPLE_ID_COLUMN
        )

    def _read_span(self, files: Dict[int, pq.ParquetFile], span: reader_plan.Span) -> pa.Table:
        file_index, rg = self._units[span.unit]
        path = self.files[file_index]
        try:
            if file_index not in files:
                files[file_index] = pq.ParquetFile(path, metadata=self._file_metadata[file_index])
            table = files[file_index].read_row_group(rg, columns=self.columns).select(self.columns)
            table = table.cast(self._arrow_schema).slice(span.start, span.rows)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{path}: row group {rg}: cannot read: {e}") from e
        arrays = {
            name: single_array(table.column(name))
            for name in self.fields + list(self.weight_columns.values())
        }
        for name, array in arrays.items():
            if array.values.null_count:
                raise ValueError(
                    f"{path}: row group {rg}: column {name!r} holds a null inside a list"
                )
        for f, w in self.weight_columns.items():
            bad = weight_mismatch(arrays[f], arrays[w])
            if bad is not None:
                row, n_ids, n_weights = bad
                raise ValueError(
                    f"{path}: row group {rg}, row {span.start + row}: column {w!r} holds "
                    f"{n_weights} weights for {n_ids} ids of {f!r}"
                )
        return table

    def _batches(self, epoch: int, start: int) -> Iterator[Batch]:
        """Batches ``start, start + 1, ...`` of this rank's epoch (see ``reader_plan``), assembled
        (and pinned) on the worker threads, in order."""
        return ordered_map(self._assemble, self._batch_rows(epoch, start), self.workers)

    def _assemble(self, pieces: Optional[List[WindowRows]]) -> Batch:
        if pieces is None:  # nothing to copy; pinning would also drop its per-key JaggedTensors
            return self._empty_batch()
        batch = self._to_batch(pieces)
        return batch.pin_memory() if self.pin_memory else batch

    def _batch_rows(self, epoch: int, start: int) -> Iterator[Optional[List[WindowRows]]]:
        """The rows of batches ``start, start + 1, ...``: (window, row indices) pieces in batch
        order, or None for a 0-row batch."""
        b = self.batch_size
        emitted = start
        if emitted >= self._num_batches:
            return
        pending: List[WindowRows] = []
        pending_rows = 0
        for window, order in self._windows(epoch, start * b):
            pending.append((window, order))
            pending_rows += len(order)
            while pending_rows >= b and emitted < self._num_batches:
                pieces, need = [], b
                while need:
                    window_k, order_k = pending[0]
                    take = min(need, len(order_k))
                    pieces.append((window_k, order_k[:take]))
                    if take == len(order_k):
                        pending.pop(0)
                    else:
                        pending[0] = (window_k, order_k[take:])
                    need -= take
                pending_rows -= b
                yield pieces
                emitted += 1
            if emitted == self._num_batches:
                return
        if pending_rows and not self.drop_last:
            yield list(pending)
            emitted += 1
        while emitted < self._num_batches:  # this rank ran out one step early: 0-row batch
            yield None
            emitted += 1

    def _to_batch(self, pieces: List[WindowRows]) -> Batch:
        """One batch from rows of decoded windows: (window, row indices) in batch order."""
        lengths, values, weights = [], [], []
        for f in self.fields:
            parts = [window.columns[f].gather(rows) for window, rows in pieces]
            lengths.append(np.concatenate([p[0] for p in parts]))
            values.append(np.concatenate([p[1] for p in parts]))
            if self.use_weights:
                weights.append(
                    np.concatenate([p[2] for p in parts])
                    if f in self.weight_columns
                    else np.ones(len(values[-1]), dtype=np.float32)
                )
        labels = np.concatenate([window.labels[rows] for window, rows in pieces])
        sample_ids = np.concatenate([window.sample_ids[rows] for window, rows in pieces])
        return self._make_batch(len(sample_ids), lengths, values, weights, labels, sample_ids)

    def _empty_batch(self) -> Batch:
        """A 0-row batch (stride 0). torchrec 1.8's ``KeyedJaggedTensor.to_dict`` (used by an
        unsharded EmbeddingBagCollection) raises IndexError on an empty ``lengths``, so the
        per-key JaggedTensors are supplied up front."""
        k = len(self.fields)
        jt_dict = {
            key: JaggedTensor(
                values=torch.zeros(0, dtype=torch.int64),
                lengths=torch.zeros(0, dtype=torch.int32),
                offsets=torch.zeros(1, dtype=torch.int32),
                weights=torch.zeros(0, dtype=torch.float32) if self.use_weights else None,
            )
            for key in self.fields
        }
        return self._make_batch(
            0,
            [np.zeros(0, np.int32)] * k,
            [np.zeros(0, np.int64)] * k,
            [np.zeros(0, np.float32)] * k if self.use_weights else [],
            np.zeros((0, len(self.labels)), np.float32),
            np.zeros(0, np.int64),
            jt_dict,
        )

    def _make_batch(
        self,
        n: int,
        lengths: List[np.ndarray],
        values: List[np.ndarray],
        weights: List[np.ndarray],
        labels: np.ndarray,
        sample_ids: np.ndarray,
        jt_dict: Optional[Dict[str, JaggedTensor]] = None,
    ) -> Batch:
        length_per_key = [int(v.shape[0]) for v in values]
        offset_per_key = np.concatenate([[0], np.cumsum(length_per_key)]).astype(np.int64).tolist()
        all_lengths = np.concatenate(lengths)
        offsets = np.zeros(len(all_lengths) + 1, dtype=np.int32)
        np.cumsum(all_lengths, out=offsets[1:])
        kjt = KeyedJaggedTensor(
            keys=list(self.fields),
            values=torch.from_numpy(np.concatenate(values)),
            weights=torch.from_numpy(np.concatenate(weights)) if self.use_weights else None,
            lengths=torch.from_numpy(all_lengths),
            offsets=torch.from_numpy(offsets),
            stride=n,
            length_per_key=length_per_key,
            offset_per_key=offset_per_key,
            jt_dict=jt_dict,
        )
        return Batch(
            sparse_features=kjt,
            labels=torch.from_numpy(np.ascontiguousarray(labels)),
            sample_ids=torch.from_numpy(np.ascontiguousarray(sample_ids)),
        )
