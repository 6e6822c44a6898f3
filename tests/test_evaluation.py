"""train/evaluation.py helpers that need no process group."""

from __future__ import annotations

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dtn_torchrec.data.batch import Batch
from dtn_torchrec.train.evaluation import one_empty_row


def _empty_batch(with_weights: bool) -> Batch:
    return Batch(
        sparse_features=KeyedJaggedTensor(
            keys=["a", "b", "c"],
            values=torch.zeros(0, dtype=torch.int64),
            lengths=torch.zeros(0, dtype=torch.int32),
            weights=torch.zeros(0) if with_weights else None,
            stride=0,
        ),
        labels=torch.zeros(0, 2),
        sample_ids=torch.zeros(0, dtype=torch.int64),
    )


def test_one_empty_row_replaces_a_zero_row_batch() -> None:
    for with_weights in (False, True):
        row = one_empty_row(_empty_batch(with_weights))
        kjt = row.sparse_features
        assert row.batch_size == 1 and kjt.stride() == 1
        assert kjt.keys() == ["a", "b", "c"]
        assert kjt.lengths().tolist() == [0, 0, 0] and kjt.lengths().dtype == torch.int32
        assert kjt.values().numel() == 0 and kjt.values().dtype == torch.int64
        assert (kjt.weights_or_none() is not None) == with_weights
        assert kjt.to_dict()["b"].lengths().tolist() == [0]
        assert row.labels.tolist() == [[0.0, 0.0]] and row.sample_ids.tolist() == [-1]
