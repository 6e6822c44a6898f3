"""An evaluation set held in memory as per-field id lists, sliceable into KJT batches and
permutable one field at a time (the unit of permutation importance)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Iterable, List, Optional

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dtn_torchrec.data.batch import Batch


@dataclass(frozen=True)
class FieldBags:
    """The id lists of one field for ``N`` rows.

    Args:
        lengths: int32 ``[N]``, ids per row.
        values: int64 ``[sum(lengths)]``, the rows' ids in row order.
        weights: float32 like ``values``, or None.
    """

    lengths: torch.Tensor
    values: torch.Tensor
    weights: Optional[torch.Tensor] = None

    @property
    def offsets(self) -> torch.Tensor:
        """int64 ``[N + 1]``: row ``i``'s ids are ``values[offsets[i]:offsets[i + 1]]``."""
        counts = self.lengths.long()
        return torch.cat([counts.new_zeros(1), counts.cumsum(0)])

    def take(self, rows: torch.Tensor) -> "FieldBags":
        """The bags of ``rows`` (int64 ``[M]``, any order, repeats allowed), in that order."""
        offsets = self.offsets
        lengths = self.lengths[rows]
        starts = offsets[rows]
        # Element j of output bag i comes from starts[i] + j.
        out_offsets = torch.cat([starts.new_zeros(1), lengths.long().cumsum(0)])
        index = torch.repeat_interleave(starts - out_offsets[:-1], lengths.long()) + torch.arange(
            int(out_offsets[-1]), dtype=torch.int64
        )
        return FieldBags(
            lengths=lengths,
            values=self.values[index],
            weights=self.weights[index] if self.weights is not None else None,
        )

    def slice(self, start: int, stop: int) -> "FieldBags":
        """Rows ``start .. stop - 1``."""
        offsets = self.offsets
        lo, hi = int(offsets[start]), int(offsets[stop])
        return FieldBags(
            lengths=self.lengths[start:stop],
            values=self.values[lo:hi],
            weights=self.weights[lo:hi] if self.weights is not None else None,
        )


def _cat_weights(bags: List[FieldBags]) -> Optional[torch.Tensor]:
    """The weights of ``bags`` concatenated (float32), or None when they carry none."""
    weights = [b.weights for b in bags if b.weights is not None]
    return torch.cat(weights).float() if weights else None


@dataclass(frozen=True)
class EvalRows:
    """``N`` rows: field bags keyed by field name (KJT key order), labels and sample ids.

    Args:
        fields: field name -> :class:`FieldBags`, in KJT key order.
        labels: float32 ``[N, L]`` in the dataset's label order.
        sample_ids: int64 ``[N]``.
    """

    fields: Dict[str, FieldBags]
    labels: torch.Tensor
    sample_ids: torch.Tensor

    @property
    def num_rows(self) -> int:
        return int(self.sample_ids.shape[0])

    @property
    def weighted(self) -> bool:
        return next(iter(self.fields.values())).weights is not None

    @staticmethod
    def from_batches(batches: Iterable[Batch], max_rows: Optional[int] = None) -> "EvalRows":
        """Concatenates reader batches (their first ``max_rows`` rows in all; 0-row batches are
        skipped)."""
        parts: List[Batch] = []
        rows = 0
        for batch in batches:
            if max_rows is not None and rows >= max_rows:
                break
            if batch.batch_size == 0:
                continue
            parts.append(batch)
            rows += batch.batch_size
        if not parts:
            raise ValueError("no rows to evaluate")
        keys = parts[0].sparse_features.keys()
        per_key: Dict[str, List[FieldBags]] = {key: [] for key in keys}
        for batch in parts:
            for key, jt in batch.sparse_features.to_dict().items():
                per_key[key].append(FieldBags(jt.lengths(), jt.values(), jt.weights_or_none()))
        fields = {
            key: FieldBags(
                lengths=torch.cat([b.lengths for b in bags]).int(),
                values=torch.cat([b.values for b in bags]).long(),
                weights=_cat_weights(bags),
            )
            for key, bags in per_key.items()
        }
        evaluated = EvalRows(
            fields=fields,
            labels=torch.cat([b.labels for b in parts]),
            sample_ids=torch.cat([b.sample_ids for b in parts]),
        )
        if max_rows is not None and evaluated.num_rows > max_rows:
            return evaluated.slice(0, max_rows)
        return evaluated

    def slice(self, start: int, stop: int) -> "EvalRows":
        """Rows ``start .. stop - 1``."""
        return EvalRows(
            fields={key: bags.slice(start, stop) for key, bags in self.fields.items()},
            labels=self.labels[start:stop],
            sample_ids=self.sample_ids[start:stop],
        )

    def with_field_permuted(self, name: str, permutation: torch.Tensor) -> "EvalRows":
        """A copy in which row ``i`` carries row ``permutation[i]``'s bag of field ``name``
        (ids and weights move together; every other field and the labels stay)."""
        if name not in self.fields:
            raise KeyError(f"field {name!r} not among {list(self.fields)}")
        fields = dict(self.fields)
        fields[name] = self.fields[name].take(permutation)
        return replace(self, fields=fields)

    def features(self, start: int, stop: int) -> KeyedJaggedTensor:
        """Rows ``start .. stop - 1`` (``stop > start``) as a KJT, keys in ``fields`` order."""
        bags = [b.slice(start, stop) for b in self.fields.values()]
        return KeyedJaggedTensor(
            keys=list(self.fields),
            values=torch.cat([b.values for b in bags]),
            lengths=torch.cat([b.lengths for b in bags]),
            weights=_cat_weights(bags),
        )


def score_rows(model: torch.nn.Module, rows: EvalRows, batch_size: int) -> torch.Tensor:
    """Logits ``[N, T]`` of ``model`` (``forward(kjt) -> [B, T]``) on all rows, in batches."""
    outputs = []
    with torch.no_grad():
        for start in range(0, rows.num_rows, batch_size):
            stop = min(start + batch_size, rows.num_rows)
            outputs.append(model(rows.features(start, stop)).float())
    return torch.cat(outputs)
