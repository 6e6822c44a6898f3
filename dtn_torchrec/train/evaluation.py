"""Evaluation of whole splits on every rank: per-task metrics over all ranks' rows."""

from __future__ import annotations

from collections import deque
from typing import Deque, Dict, Iterator, List, Mapping

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dtn_torchrec.data.batch import Batch
from dtn_torchrec.data.reader import ParquetBatchReader
from dtn_torchrec.train.metrics import EvalAccumulator, MetricValue
from dtn_torchrec.train.steps import StepRunner

Metrics = Dict[str, Dict[str, MetricValue]]


class Evaluator:
    """Scores evaluation splits with the model of a :class:`StepRunner` (collective).

    Args:
        runner: runs the forward passes (through the pipeline when training uses one).
        readers: ``{split: reader}`` of this rank; all ranks yield the same number of batches.
        task_names: the T task names (label order).
    """

    def __init__(
        self,
        runner: StepRunner,
        readers: Mapping[str, ParquetBatchReader],
        task_names: List[str],
    ) -> None:
        self._runner = runner
        self._readers = dict(readers)
        self._task_names = list(task_names)

    @property
    def splits(self) -> List[str]:
        return list(self._readers)

    @property
    def task_names(self) -> List[str]:
        return list(self._task_names)

    def evaluate(self, split: str) -> Metrics:
        """One full pass over ``split`` on every rank; returns the all-rank metrics
        ``{task: {metric: value}}``."""
        reader = self._readers[split]
        reader.set_epoch(0)  # every evaluation is one full pass from the start
        accumulator = EvalAccumulator(self._task_names)
        # Rows of each batch handed to the model, oldest first (the pipeline pulls ahead).
        rows_in_flight: Deque[int] = deque()

        def nonempty(batches: Iterator[Batch]) -> Iterator[Batch]:
            for batch in batches:
                rows_in_flight.append(batch.batch_size)
                yield batch if batch.batch_size > 0 else one_empty_row(batch)

        model = self._runner.model
        model.eval()
        try:
            with torch.no_grad():
                for _, logits, labels in self._runner.forward(nonempty(iter(reader))):
                    rows = rows_in_flight.popleft()
                    accumulator.update(logits[:rows], labels[:rows])
        finally:
            model.train()
        device = self._runner.device
        return accumulator.compute(device=device if device.type != "cpu" else None)


def one_empty_row(batch: Batch) -> Batch:
    """A 1-row stand-in for a 0-row batch: every bag empty, label 0, sample id -1.

    The reader yields a 0-row batch on a rank whose rows ran out one step before another
    rank's (every rank must run the same steps). TorchRec's sharded ``EmbeddingCollection``
    cannot take a stride-0 KJT (``construct_jagged_tensors`` reshapes lengths to ``[-1, 0]``),
    so evaluation runs this row instead and drops its output.
    """
    features = batch.sparse_features
    keys = features.keys()
    weights = features.weights_or_none()
    return Batch(
        sparse_features=KeyedJaggedTensor(
            keys=keys,
            values=features.values()[:0],
            lengths=torch.zeros(len(keys), dtype=features.lengths().dtype),
            weights=None if weights is None else weights[:0],
        ),
        labels=batch.labels.new_zeros((1, batch.labels.shape[1])),
        sample_ids=batch.sample_ids.new_full((1,), -1),
    )
