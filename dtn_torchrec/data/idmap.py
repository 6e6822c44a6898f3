"""Raw id -> embedding row mapping used by `dtn-prepare`, per field.

Raw id 0 means "missing" in every input format and never reaches a mapper (it is removed from
the lists); row 0 of every table is reserved.

* ``vocab``: the raw ids of the training split with at least ``min_count`` occurrences, sorted
  ascending, get rows ``1..V``; any other raw id (out of vocabulary) maps to row 0;
  ``num_embeddings = V + 1``. Saved as ``<dataset>/vocab/<field>.parquet`` with columns
  ``raw_id`` (int64, ascending) and ``count`` (int64, occurrences in the training split): the
  raw id in row ``r`` of that file maps to ``r + 1``. ``load_vocab`` reads it back.
* ``hash``: ``1 + (raw mod (size - 1))`` (the non-negative remainder, also for negative raw
  ids), no vocabulary pass; ``num_embeddings = size``.
* ``raw``: the raw 64-bit ids unchanged, no vocabulary pass; ``num_embeddings = 0`` (no table
  size: an open id space, for tables that remap ids themselves, e.g. managed collisions).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

VOCAB_DIR = "vocab"
DEFAULT_HASH_SIZE = 1_000_003
_FIELD_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


class VocabIdMap:
    """Sorted raw ids -> rows ``1..V`` by binary search; unknown ids -> 0.

    Args:
        raw_ids: int64 ``[V]``, strictly increasing.
        counts: int64 ``[V]`` occurrences in the training split.
    """

    def __init__(self, raw_ids: np.ndarray, counts: np.ndarray) -> None:
        self.raw_ids = np.asarray(raw_ids, dtype=np.int64)
        self.counts = np.asarray(counts, dtype=np.int64)

    @property
    def num_embeddings(self) -> int:
        return len(self.raw_ids) + 1

    def map(self, ids: np.ndarray) -> np.ndarray:
        if len(self.raw_ids) == 0:
            return np.zeros_like(ids)
        pos = np.searchsorted(self.raw_ids, ids)
        np.minimum(pos, len(self.raw_ids) - 1, out=pos)
        return np.where(self.raw_ids[pos] == ids, pos + 1, 0)


class HashIdMap:
    """``1 + (raw mod (size - 1))``; row 0 stays reserved for missing."""

    def __init__(self, size: int) -> None:
        if size < 2:
            raise ValueError(f"hash size must be at least 2 (row 0 is reserved), got {size}")
        self.size = int(size)

    @property
    def num_embeddings(self) -> int:
        return self.size

    def map(self, ids: np.ndarray) -> np.ndarray:
        return 1 + np.mod(ids, np.int64(self.size - 1))


class RawIdMap:
    """Keeps raw ids as they are; ``num_embeddings`` is 0 (no fixed table)."""

    @property
    def num_embeddings(self) -> int:
        return 0

    def map(self, ids: np.ndarray) -> np.ndarray:
        return ids


IdMap = Union[VocabIdMap, HashIdMap, RawIdMap]


def map_in_place(id_map: IdMap, ids: np.ndarray, chunk: int = 1 << 22) -> None:
    """Maps ``ids`` (int64 ``[m]``) in place, ``chunk`` ids at a time (bounded temporaries for
    the hundreds of millions of ids of a common-features table)."""
    for lo in range(0, len(ids), chunk):
        ids[lo : lo + chunk] = id_map.map(ids[lo : lo + chunk])


class IdCounter:
    """Occurrence counts of int64 ids, merged in sorted chunks so memory follows the number of
    distinct ids, not the number of occurrences."""

    def __init__(self) -> None:
        self._ids = np.zeros(0, dtype=np.int64)
        self._counts = np.zeros(0, dtype=np.int64)
        self._pending: List[Tuple[np.ndarray, np.ndarray]] = []
        self._pending_size = 0

    def add(self, ids: np.ndarray, counts: Optional[np.ndarray] = None) -> None:
        """Adds ``ids`` (int64 ``[m]``), each ``counts[i]`` times (default once)."""
        if len(ids) == 0:
            return
        if counts is None:
            unique, unique_counts = np.unique(ids, return_counts=True)
        else:
            unique, unique_counts = _sum_by_id(ids, counts)
        self._pending.append((unique, unique_counts.astype(np.int64)))
        self._pending_size += len(unique)
        if self._pending_size > max(len(self._ids), 1 << 20):
            self._merge()

    def result(self) -> Tuple[np.ndarray, np.ndarray]:
        """Distinct ids ascending (int64 ``[U]``) and their counts (int64 ``[U]``)."""
        self._merge()
        return self._ids, self._counts

    def _merge(self) -> None:
        if not self._pending:
            return
        ids = np.concatenate([self._ids] + [p[0] for p in self._pending])
        counts = np.concatenate([self._counts] + [p[1] for p in self._pending])
        self._ids, self._counts = _sum_by_id(ids, counts)
        self._pending, self._pending_size = [], 0


def _sum_by_id(ids: np.ndarray, counts: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    order = np.argsort(ids, kind="stable")
    ids, counts = ids[order], counts[order]
    starts = np.flatnonzero(np.concatenate([[True], ids[1:] != ids[:-1]]))
    return ids[starts], np.add.reduceat(counts.astype(np.int64), starts)


def build_vocab(counter: IdCounter, min_count: int) -> VocabIdMap:
    ids, counts = counter.result()
    keep = counts >= min_count
    return VocabIdMap(ids[keep], counts[keep])


def check_field_name(name: str) -> str:
    """Field names become Parquet columns, KJT keys and vocab file names."""
    if not _FIELD_NAME.match(name):
        raise ValueError(
            f"field name {name!r} is not usable (letters, digits, '_', '.', '-'; not starting with '.' or '-')"
        )
    return name


def vocab_path(dataset_dir: Union[str, os.PathLike], field_name: str) -> Path:
    return Path(dataset_dir) / VOCAB_DIR / f"{check_field_name(field_name)}.parquet"


def save_vocab(dataset_dir: Union[str, os.PathLike], field_name: str, vocab: VocabIdMap) -> str:
    """Writes ``<dataset>/vocab/<field>.parquet``; returns its path relative to the dataset."""
    path = vocab_path(dataset_dir, field_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {"raw_id": pa.array(vocab.raw_ids, pa.int64()), "count": pa.array(vocab.counts, pa.int64())}
    )
    pq.write_table(table, path)
    return str(path.relative_to(dataset_dir))


def load_vocab(dataset_dir: Union[str, os.PathLike], field_name: str) -> VocabIdMap:
    """Reads a vocabulary written by ``save_vocab``."""
    table = pq.read_table(vocab_path(dataset_dir, field_name), columns=["raw_id", "count"])
    raw_ids = table.column("raw_id").to_numpy()
    if len(raw_ids) > 1 and not (np.diff(raw_ids) > 0).all():
        raise ValueError(
            f"{vocab_path(dataset_dir, field_name)}: raw_id is not strictly increasing"
        )
    return VocabIdMap(raw_ids, table.column("count").to_numpy())


def load_id_maps(
    dataset_dir: Union[str, os.PathLike], id_mapping: str, num_embeddings: Dict[str, int]
) -> Dict[str, IdMap]:
    """The id maps of an existing dataset (for ``--vocab-from``), per field."""
    if id_mapping == "raw":
        return {name: RawIdMap() for name in num_embeddings}
    if id_mapping == "hash":
        return {name: HashIdMap(size) for name, size in num_embeddings.items()}
    maps: Dict[str, IdMap] = {}
    for name, size in num_embeddings.items():
        vocab = load_vocab(dataset_dir, name)
        if vocab.num_embeddings != size:
            raise ValueError(
                f"{vocab_path(dataset_dir, name)}: {len(vocab.raw_ids)} ids, but schema.json says "
                f"num_embeddings={size}"
            )
        maps[name] = vocab
    return maps
