"""The training loop: pipelined (or plain) steps, periodic evaluation and checkpoints, exact resume.

The epoch is cut into *segments* that end where something must see a consistent state: an
evaluation point, a checkpoint point, ``max_steps`` or the end of the epoch. Each segment feeds
``TrainPipelineSparseDist`` an ``islice`` of the epoch's batch iterator, so the pipeline drains at
the segment end (``execute_all_batches``) and has pulled no batch beyond it. At that point the
reader's ``state_dict()`` is exactly "after the last trained batch", which is what makes a
checkpoint resume bit-for-bit, and the pipeline is empty, so evaluation can run through it.

Every rank runs the same number of steps per epoch (``len(reader)`` is identical on all ranks by
the reader's contract), so collectives stay in lockstep.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.optim.lr_scheduler import LRScheduler
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim.keyed import KeyedOptimizer
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dtn_torchrec.data.batch import Batch
from dtn_torchrec.data.reader import ParquetBatchReader
from dtn_torchrec.distributed.checkpoint import (
    CheckpointManager,
    capture_rng_state,
    restore_rng_state,
)
from dtn_torchrec.train.config import TrainConfig
from dtn_torchrec.train.metrics import EvalAccumulator, MetricValue
from dtn_torchrec.train.progress import ProgressReporter

# Fault injection for the restart tests: "<rank>:<step>" makes that rank SIGKILL itself right
# after that optimizer step, on the first attempt of a torchrun/TorchX job only.
KILL_AT_STEP_ENV = "DTN_FAULT_KILL_AT_STEP"
# Checkpoint ``extra`` keys that only make sense for the rank layout that wrote them.
RANK_LOCAL_KEYS = ("reader", "rng")

Metrics = Dict[str, Dict[str, MetricValue]]


@dataclass
class TrainState:
    """Where training stands; everything here goes into each checkpoint.

    Args:
        step: optimizer steps done in total.
        epoch: the epoch in progress (== ``epochs`` when all are done).
        batches_in_epoch: batches of ``epoch`` already trained.
        history: every evaluation so far, ``{"step", "epoch", "split", "metrics"}``.
    """

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` hands to the summary."""

    state: TrainState
    final_metrics: Dict[str, Metrics]
    train_samples: int
    train_seconds: float
    resumed_from_step: int


class Trainer:
    """Runs training of a ``forward(batch) -> (loss, (loss, logits, labels))`` model.

    Args:
        model: the sharded train wrapper (``DistributedModelParallel``) or any module with that
            forward; logits and labels are ``[B, T]``.
        optimizer: the combined sparse + dense optimizer (``step`` is called once per batch).
        lr_scheduler: stepped after every optimizer step; None for a constant rate.
        train_reader: training batches of this rank.
        eval_readers: ``{split: reader}`` evaluated at every evaluation point, all ranks.
        task_names: the T task names (label order).
        cfg: the ``train`` section of the run config.
        device: the rank's device.
        rank: global rank.
        world_size: number of ranks.
        reporter: progress bar / log lines / TensorBoard (active on rank 0).
        checkpoints: checkpoint store, or None for no checkpoints.
    """

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        optimizer: KeyedOptimizer,
        lr_scheduler: Optional[LRScheduler],
        train_reader: ParquetBatchReader,
        eval_readers: Mapping[str, ParquetBatchReader],
        task_names: List[str],
        cfg: TrainConfig,
        device: torch.device,
        rank: int,
        world_size: int,
        reporter: ProgressReporter,
        checkpoints: Optional[CheckpointManager],
    ) -> None:
        self._model = model
        self._optimizer = optimizer
        self._lr_scheduler = lr_scheduler
        self._train_reader = train_reader
        self._eval_readers = dict(eval_readers)
        self._task_names = list(task_names)
        self._cfg = cfg
        self._device = device
        self._rank = rank
        self._world_size = world_size
        self._reporter = reporter
        self._checkpoints = checkpoints
        self._pipeline: Optional[TrainPipelineSparseDist] = (
            TrainPipelineSparseDist(model, optimizer, device, execute_all_batches=True)
            if cfg.pipeline == "sparse_dist"
            else None
        )
        self.state = TrainState()
        self._resumed_from_step = 0
        self._last_eval_step: Optional[int] = None
        self._last_checkpoint_step: Optional[int] = None
        self._pending_reader_state: Optional[Dict[str, Any]] = None
        self._skip_batches = 0
        self._steps_per_epoch = self._agreed_steps_per_epoch()
        self._kill_at = _parse_kill_at_step(os.environ.get(KILL_AT_STEP_ENV))
        # Window statistics for the log lines: sum of loss * rows, per-task BCE sums, rows.
        self._window = torch.zeros(2 + len(self._task_names), dtype=torch.float64, device=device)
        self._train_samples_local = 0
        self._train_seconds = 0.0

    # ------------------------------------------------------------------ public API

    @property
    def steps_per_epoch(self) -> int:
        return self._steps_per_epoch

    @property
    def total_steps(self) -> int:
        """Steps the run ends at: all epochs, capped by ``max_steps``."""
        total = self._cfg.epochs * self._steps_per_epoch
        return total if self._cfg.max_steps is None else min(total, self._cfg.max_steps)

    def restore_latest(self) -> bool:
        """Loads the latest checkpoint, if there is one; returns whether one was loaded."""
        if self._checkpoints is None:
            return False
        step = self._checkpoints.latest_step()
        if step is None:
            return False
        extra = self._checkpoints.load(
            self._model, self._optimizer, step, scheduler=self._lr_scheduler
        )
        self._restore_extra(extra)
        self._resumed_from_step = self.state.step
        self._last_checkpoint_step = self.state.step
        return True

    def fit(self) -> TrainResult:
        """Trains until ``epochs`` or ``max_steps``, evaluates and checkpoints on the way.

        Returns the final evaluation of every split (run again at the end unless the last
        evaluation was at the final step of this process).
        """
        cfg = self._cfg
        self._model.train()
        while self.state.epoch < cfg.epochs and not self._reached_max_steps():
            self._train_reader.set_epoch(self.state.epoch)
            if self._pending_reader_state is not None:
                self._train_reader.load_state_dict(self._pending_reader_state)
                self._pending_reader_state = None
            batches = iter(self._train_reader)
            for _ in range(self._skip_batches):
                next(batches)
            self._skip_batches = 0
            while self.state.batches_in_epoch < self._steps_per_epoch and not self._reached_max_steps():
                done = self._train_segment(batches, self._segment_length())
                if done == 0:
                    raise RuntimeError(
                        f"rank {self._rank}: the train reader stopped after "
                        f"{self.state.batches_in_epoch} batches of epoch {self.state.epoch}, but its "
                        f"len() is {self._steps_per_epoch}"
                    )
                if self.state.batches_in_epoch == self._steps_per_epoch:
                    self.state.epoch += 1
                    self.state.batches_in_epoch = 0
                    self._evaluate_all()
                    self._save_checkpoint()
                    break
                if _due(self.state.step, cfg.eval_every_steps):
                    self._evaluate_all()
                if _due(self.state.step, cfg.checkpoint_every_steps):
                    self._save_checkpoint()
        if self._last_eval_step != self.state.step:
            self._evaluate_all()
        if self._last_checkpoint_step != self.state.step:
            self._save_checkpoint()
        final = {
            h["split"]: h["metrics"] for h in self.state.history if h["step"] == self.state.step
        }
        return TrainResult(
            state=self.state,
            final_metrics=final,
            train_samples=int(self._all_reduce_sum(float(self._train_samples_local))),
            train_seconds=self._all_reduce_max(self._train_seconds),
            resumed_from_step=self._resumed_from_step,
        )

    def evaluate(self, split: str) -> Metrics:
        """Scores the whole ``split`` on every rank and returns the all-rank metrics."""
        reader = self._eval_readers[split]
        reader.set_epoch(0)  # every evaluation is one full pass from the start
        accumulator = EvalAccumulator(self._task_names)
        # Rows of each batch handed to the model, oldest first (the pipeline pulls ahead).
        rows_in_flight: Deque[int] = deque()

        def nonempty(batches: Iterator[Batch]) -> Iterator[Batch]:
            for batch in batches:
                rows_in_flight.append(batch.batch_size)
                yield batch if batch.batch_size > 0 else one_empty_row(batch)

        self._model.eval()
        with torch.no_grad():
            for _, logits, labels in self._forward_all(nonempty(iter(reader))):
                rows = rows_in_flight.popleft()
                accumulator.update(logits[:rows], labels[:rows])
        self._model.train()
        return accumulator.compute(device=self._device if self._device.type != "cpu" else None)

    # ------------------------------------------------------------------ steps

    def _train_segment(self, batches: Iterator[Batch], length: int) -> int:
        """Trains on the next ``length`` batches; returns how many there were."""
        start = time.perf_counter()
        done = 0
        for output in self._train_steps(itertools.islice(batches, length)):
            self._train_seconds += time.perf_counter() - start
            self._after_step(output)
            done += 1
            start = time.perf_counter()
        self._train_seconds += time.perf_counter() - start
        return done

    def _train_steps(self, batches: Iterator[Batch]) -> Iterator[Tuple[torch.Tensor, ...]]:
        """One optimizer step per batch; yields the model's ``(loss, logits, labels)``."""
        if self._pipeline is not None:
            yield from self._pipeline_outputs(batches)
            return
        for batch in batches:
            batch = batch.to(self._device)
            self._optimizer.zero_grad()
            loss, output = self._model(batch)
            loss.sum().backward()
            self._optimizer.step()
            yield output

    def _forward_all(self, batches: Iterator[Batch]) -> Iterator[Tuple[torch.Tensor, ...]]:
        """Forward only (the model in eval mode): ``(loss, logits, labels)`` per batch."""
        if self._pipeline is not None:
            yield from self._pipeline_outputs(batches)
            return
        for batch in batches:
            _, output = self._model(batch.to(self._device))
            yield output

    def _pipeline_outputs(self, batches: Iterator[Batch]) -> Iterator[Tuple[torch.Tensor, ...]]:
        """Runs ``TrainPipelineSparseDist.progress`` until ``batches`` is exhausted (a training
        step in train mode, a forward in eval mode); yields each ``(loss, logits, labels)``."""
        assert self._pipeline is not None
        while True:
            try:
                yield self._pipeline.progress(batches)
            except StopIteration:
                return

    def _after_step(self, output: Tuple[torch.Tensor, ...]) -> None:
        loss, logits, labels = output
        if self._lr_scheduler is not None:
            self._lr_scheduler.step()
        self.state.step += 1
        self.state.batches_in_epoch += 1
        rows = labels.shape[0]
        self._train_samples_local += rows
        if rows > 0:  # a 0-row batch has a NaN mean loss and nothing to add
            bce = F.binary_cross_entropy_with_logits(
                logits.float(), labels.float(), reduction="none"
            ).sum(0)
            self._window[0] += loss.detach().sum().double() * rows
            self._window[1] += rows
            self._window[2:] += bce.double()
        self._reporter.step(rows * self._world_size)
        if self._kill_at is not None and self._kill_at == (self._rank, self.state.step):
            if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
                os.kill(os.getpid(), signal.SIGKILL)
        if self.state.step % self._cfg.log_every_steps == 0:
            self._log_window()

    def _log_window(self) -> None:
        window = self._window.clone()
        if dist.is_initialized():
            dist.all_reduce(window)
        self._window.zero_()
        rows = float(window[1])
        if rows == 0:
            return
        losses = {"loss": float(window[0]) / rows}
        losses.update(
            {f"logloss_{t}": float(v) / rows for t, v in zip(self._task_names, window[2:])}
        )
        self._reporter.log_train(self.state.step, self.state.epoch, losses, self._current_lr())

    def _current_lr(self) -> Optional[float]:
        if self._lr_scheduler is None:
            return None
        return float(self._lr_scheduler.get_last_lr()[0])

    # ------------------------------------------------------------------ boundaries

    def _reached_max_steps(self) -> bool:
        return self._cfg.max_steps is not None and self.state.step >= self._cfg.max_steps

    def _segment_length(self) -> int:
        """Batches until the next point that needs a drained pipeline."""
        n = self._steps_per_epoch - self.state.batches_in_epoch
        if self._cfg.max_steps is not None:
            n = min(n, self._cfg.max_steps - self.state.step)
        for every in (self._cfg.eval_every_steps, self._cfg.checkpoint_every_steps):
            if every:
                n = min(n, every - self.state.step % every)
        return n

    def _evaluate_all(self) -> None:
        for split in self._eval_readers:
            metrics = self.evaluate(split)
            # A resumed run evaluates its restored step again; the fresh result replaces the old.
            self.state.history = [
                h for h in self.state.history if (h["step"], h["split"]) != (self.state.step, split)
            ]
            self.state.history.append(
                {"step": self.state.step, "epoch": self.state.epoch, "split": split, "metrics": metrics}
            )
            self._reporter.log_eval(self.state.step, split, metrics)
        self._last_eval_step = self.state.step

    # ------------------------------------------------------------------ checkpoints

    def _save_checkpoint(self) -> None:
        if self._checkpoints is None:
            return
        self._checkpoints.save(
            self.state.step,
            model=self._model,
            optimizer=self._optimizer,
            extra=self._capture_extra(),
            scheduler=self._lr_scheduler,
        )
        self._last_checkpoint_step = self.state.step
        self._reporter.message(f"[checkpoint] step {self.state.step} saved")

    def _capture_extra(self) -> Dict[str, Any]:
        """This rank's non-tensor state: position, reader, RNGs, history (keys in
        :data:`RANK_LOCAL_KEYS` are dropped by the manager at another world size)."""
        mid_epoch = self.state.batches_in_epoch > 0
        return {
            "step": self.state.step,
            "epoch": self.state.epoch,
            "batches_in_epoch": self.state.batches_in_epoch,
            "history": self.state.history,
            "world_size": self._world_size,
            "steps_per_epoch": self._steps_per_epoch,
            "reader": self._train_reader.state_dict() if mid_epoch else None,
            "rng": capture_rng_state(),
        }

    def _restore_extra(self, extra: Dict[str, Any]) -> None:
        self.state = TrainState(
            step=int(extra["step"]),
            epoch=int(extra["epoch"]),
            batches_in_epoch=int(extra["batches_in_epoch"]),
            history=list(extra["history"]),
        )
        same_layout = (
            int(extra["world_size"]) == self._world_size
            and int(extra["steps_per_epoch"]) == self._steps_per_epoch
        )
        if same_layout:
            self._pending_reader_state = extra["reader"]
            restore_rng_state(extra["rng"])
            return
        # Another world size (or batch size) splits the rows differently: the saved reader
        # position and RNG streams do not apply. Continue the epoch after the same fraction of
        # its rows, from the epoch's own shuffle order.
        if self.state.batches_in_epoch > 0:
            done_fraction = self.state.batches_in_epoch / int(extra["steps_per_epoch"])
            self.state.batches_in_epoch = min(
                round(done_fraction * self._steps_per_epoch), self._steps_per_epoch
            )
            self._reporter.message(
                f"[resume] checkpoint from world size {extra['world_size']}; epoch "
                f"{self.state.epoch} continues at batch {self.state.batches_in_epoch} of "
                f"{self._steps_per_epoch} (rows before it are skipped, not replayed exactly)"
            )
        if self.state.batches_in_epoch == self._steps_per_epoch:
            self.state.epoch += 1
            self.state.batches_in_epoch = 0
        self._skip_batches = self.state.batches_in_epoch

    # ------------------------------------------------------------------ collectives

    def _agreed_steps_per_epoch(self) -> int:
        steps = len(self._train_reader)
        low, high = -self._all_reduce_max(-float(steps)), self._all_reduce_max(float(steps))
        if low != high:
            raise RuntimeError(
                f"train reader lengths differ across ranks ({int(low)}..{int(high)} batches); "
                "every rank must run the same number of steps"
            )
        if steps == 0:
            raise ValueError(
                "the train split gives no full batch per rank; lower data.batch_size or use "
                "fewer ranks"
            )
        return steps

    def _all_reduce_sum(self, value: float) -> float:
        return self._all_reduce(value, dist.ReduceOp.SUM)

    def _all_reduce_max(self, value: float) -> float:
        return self._all_reduce(value, dist.ReduceOp.MAX)

    def _all_reduce(self, value: float, op: "dist.ReduceOp") -> float:
        if not dist.is_initialized():
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._device)
        dist.all_reduce(t, op=op)
        return float(t)


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


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _parse_kill_at_step(text: Optional[str]) -> Optional[Tuple[int, int]]:
    if not text:
        return None
    rank, _, step = text.partition(":")
    return int(rank), int(step)

