"""Training steps and forward passes, through ``TrainPipelineSparseDist`` or a plain loop."""

from __future__ import annotations

from typing import Iterator, Literal, Optional, Tuple

import torch
from torch.optim.lr_scheduler import LRScheduler
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim.keyed import KeyedOptimizer

from dtn_torchrec.data.batch import Batch

# What the train wrapper returns next to its loss: (loss [], logits [B, T], labels [B, T]).
StepOutput = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class StepRunner:
    """Runs a ``forward(batch) -> (loss, (loss, logits, labels))`` model over batch iterators.

    With ``sparse_dist`` the pipeline overlaps the next batch's input all-to-all with the
    current step; every call drains it (``execute_all_batches``), so when an iterator is
    exhausted the pipeline has pulled no batch beyond it and holds none.

    Args:
        model: the sharded train wrapper (``DistributedModelParallel``) or any module with that
            forward.
        optimizer: the combined sparse + dense optimizer (one ``step`` per batch).
        lr_scheduler: stepped after every optimizer step; None for a constant rate.
        device: the rank's device.
        pipeline: ``sparse_dist`` or ``plain`` (forward, backward, step).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: KeyedOptimizer,
        lr_scheduler: Optional[LRScheduler],
        device: torch.device,
        pipeline: Literal["sparse_dist", "plain"],
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.device = device
        self._pipeline: Optional[TrainPipelineSparseDist] = (
            # pipeline_postproc: MemoNet's PairHasher runs in the data-dist stage, so the
            # codebooks' input all-to-all is pipelined too.
            TrainPipelineSparseDist(
                model, optimizer, device, execute_all_batches=True, pipeline_postproc=True
            )
            if pipeline == "sparse_dist"
            else None
        )

    def train(self, batches: Iterator[Batch]) -> Iterator[StepOutput]:
        """One optimizer step (and scheduler step) per batch; yields each step's output."""
        self.model.train()
        for output in self._run(batches, train=True):
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()
            yield output

    def forward(self, batches: Iterator[Batch]) -> Iterator[StepOutput]:
        """Forward only; yields each batch's output. The caller puts the model in eval mode
        and disables gradients around the whole iteration."""
        return self._run(batches, train=False)

    def current_lr(self) -> Optional[float]:
        """The dense learning rate now (None without a scheduler)."""
        if self.lr_scheduler is None:
            return None
        return float(self.lr_scheduler.get_last_lr()[0])

    def _run(self, batches: Iterator[Batch], *, train: bool) -> Iterator[StepOutput]:
        if self._pipeline is not None:
            # progress() trains in train mode and only runs the forward in eval mode.
            while True:
                try:
                    yield self._pipeline.progress(batches)
                except StopIteration:
                    return
        for batch in batches:
            # Asynchronous when the reader pinned the batch; ordered before the forward on the
            # same stream either way.
            batch = batch.to(self.device, non_blocking=True)
            if not train:
                yield self.model(batch)[1]
                continue
            self.optimizer.zero_grad()
            loss, output = self.model(batch)
            loss.sum().backward()
            self.optimizer.step()
            yield output
