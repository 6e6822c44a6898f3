"""The training loop: segments of steps between evaluation and checkpoint points, model
selection on the valid split, early stopping, exact resume.

The epoch is cut into *segments* that end where something must see a consistent state: an
evaluation point, a checkpoint point, ``max_steps`` or the end of the epoch. Each segment feeds
the :class:`StepRunner` an ``islice`` of the epoch's batch iterator, so the pipeline drains at the
segment end and has pulled no batch beyond it. At that point the reader's ``state_dict()`` is
exactly "after the last trained batch", which is what makes a checkpoint resume bit-for-bit, and
the pipeline is empty, so evaluation can run through it.

Every evaluation of the valid split updates the selection (:mod:`selection`); a new best is
checkpointed at once and that checkpoint is protected from pruning. Every rank runs the same
number of steps per epoch (``len(reader)`` is identical on all ranks by the reader's contract),
so collectives stay in lockstep.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from dtn_torchrec.data.batch import Batch
from dtn_torchrec.data.reader import ParquetBatchReader
from dtn_torchrec.train.checkpointing import ResumePoint, TrainCheckpointer
from dtn_torchrec.train.config import TrainConfig
from dtn_torchrec.train.evaluation import Evaluator
from dtn_torchrec.train.loss_window import LossWindow
from dtn_torchrec.train.progress import ProgressReporter
from dtn_torchrec.train.selection import Selection, last_evaluation, select
from dtn_torchrec.train.state import TrainState
from dtn_torchrec.train.steps import StepRunner


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` hands to the summary.

    Args:
        state: the final run state (its history holds every evaluation).
        selection: the evaluation the run returns (the best valid one, else the last).
        stopped_early: training stopped after ``select.patience`` evaluations without
            improvement.
        train_samples: training rows of all ranks in this process's lifetime.
        train_seconds: wall time of the training steps (slowest rank).
        resumed_from_step: step of the checkpoint this run resumed from (0 = fresh start).
    """

    state: TrainState
    selection: Selection
    stopped_early: bool
    train_samples: int
    train_seconds: float
    resumed_from_step: int


class Trainer:
    """Trains, evaluates, selects and checkpoints as ``cfg`` says.

    Args:
        cfg: the ``train`` section of the run config.
        runner: runs the training steps.
        train_reader: training batches of this rank.
        evaluator: scores the evaluation splits at every evaluation point.
        valid_split: the split selected on, or None (the run then returns its last evaluation).
        reporter: progress bar / log lines / TensorBoard (active on rank 0).
        checkpointer: the checkpoint store, or None for no checkpoints.
    """

    def __init__(
        self,
        *,
        cfg: TrainConfig,
        runner: StepRunner,
        train_reader: ParquetBatchReader,
        evaluator: Evaluator,
        valid_split: Optional[str],
        reporter: ProgressReporter,
        checkpointer: Optional[TrainCheckpointer],
    ) -> None:
        if valid_split is not None and valid_split not in evaluator.splits:
            raise ValueError(f"valid split {valid_split!r} is not among {evaluator.splits}")
        self._cfg = cfg
        self._runner = runner
        self._train_reader = train_reader
        self._evaluator = evaluator
        self._valid_split = valid_split
        self._reporter = reporter
        self._checkpointer = checkpointer
        self._rank = dist.get_rank() if dist.is_initialized() else 0
        self._world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.state = TrainState()
        self._selection: Optional[Selection] = None
        self._resume_point: Optional[ResumePoint] = None
        self._last_eval_step: Optional[int] = None
        self._last_checkpoint_step: Optional[int] = None
        self._steps_per_epoch = self._agreed_steps_per_epoch()
        self._window = LossWindow(evaluator.task_names, runner.device)
        self._train_samples_local = 0
        self._train_seconds = 0.0

    # ------------------------------------------------------------------ public API

    @property
    def steps_per_epoch(self) -> int:
        return self._steps_per_epoch

    @property
    def valid_split(self) -> Optional[str]:
        """The split selected on (None: the run returns its last evaluation)."""
        return self._valid_split

    @property
    def total_steps(self) -> int:
        """Steps the run ends at: all epochs, capped by ``max_steps``."""
        total = self._cfg.epochs * self._steps_per_epoch
        return total if self._cfg.max_steps is None else min(total, self._cfg.max_steps)

    def restore_latest(self) -> bool:
        """Loads the latest checkpoint, if there is one; returns whether one was loaded."""
        if self._checkpointer is None:
            return False
        point = self._checkpointer.restore_latest(self._steps_per_epoch)
        if point is None:
            return False
        self._resume_point = point
        self.state = point.state
        self._last_checkpoint_step = self.state.step
        self._update_selection()
        return True

    def fit(self) -> TrainResult:
        """Trains until ``epochs``, ``max_steps`` or early stopping; evaluates, selects and
        checkpoints on the way, and once more at the final step if that was no such point."""
        resumed_from_step = self.state.step
        if self._valid_split is None:
            self._reporter.message(
                "[select] warning: no valid split to select on; the run reports its last evaluation"
            )
        while self.state.epoch < self._cfg.epochs and not self._finished():
            batches = self._epoch_batches()
            while self.state.batches_in_epoch < self._steps_per_epoch and not self._finished():
                if self._train_segment(batches, self._segment_length()) == 0:
                    raise RuntimeError(
                        f"rank {self._rank}: the train reader stopped after "
                        f"{self.state.batches_in_epoch} batches of epoch {self.state.epoch}, "
                        f"but its len() is {self._steps_per_epoch}"
                    )
                epoch_end = self.state.batches_in_epoch == self._steps_per_epoch
                if epoch_end:
                    self.state.epoch += 1
                    self.state.batches_in_epoch = 0
                if epoch_end or _due(self.state.step, self._cfg.eval_every_steps):
                    self._evaluate_all()
                if (
                    epoch_end
                    or _due(self.state.step, self._cfg.checkpoint_every_steps)
                    or self._is_new_best()
                ):
                    self._save_checkpoint()
                if epoch_end:
                    break
        if self._last_eval_step != self.state.step:
            self._evaluate_all()
        if self._last_checkpoint_step != self.state.step:
            self._save_checkpoint()
        assert self._selection is not None
        return TrainResult(
            state=self.state,
            selection=self._selection,
            stopped_early=self._stopped_early(),
            train_samples=int(self._all_reduce(float(self._train_samples_local), "sum")),
            train_seconds=self._all_reduce(self._train_seconds, "max"),
            resumed_from_step=resumed_from_step,
        )

    # ------------------------------------------------------------------ steps

    def _epoch_batches(self) -> Iterator[Batch]:
        """The batch iterator of the current epoch, positioned after the batches done."""
        self._train_reader.set_epoch(self.state.epoch)
        point, self._resume_point = self._resume_point, None
        if point is not None and point.reader_state is not None:
            self._train_reader.load_state_dict(point.reader_state)
        batches = iter(self._train_reader)
        for _ in range(point.skip_batches if point is not None else 0):
            next(batches)
        return batches

    def _train_segment(self, batches: Iterator[Batch], length: int) -> int:
        """Trains on the next ``length`` batches; returns how many there were."""
        start = time.perf_counter()
        done = 0
        for output in self._runner.train(itertools.islice(batches, length)):
            self._train_seconds += time.perf_counter() - start
            self.state.step += 1
            self.state.batches_in_epoch += 1
            rows = output[2].shape[0]
            self._train_samples_local += rows
            self._window.add(output)
            self._reporter.step(rows * self._world_size)
            if self.state.step % self._cfg.log_every_steps == 0:
                self._log_window()
            done += 1
            start = time.perf_counter()
        self._train_seconds += time.perf_counter() - start
        return done

    def _log_window(self) -> None:
        losses = self._window.reduce()
        if losses is not None:
            self._reporter.log_train(
                self.state.step, self.state.epoch, losses, self._runner.current_lr()
            )

    # ------------------------------------------------------------------ boundaries

    def _finished(self) -> bool:
        reached_max = self._cfg.max_steps is not None and self.state.step >= self._cfg.max_steps
        return reached_max or self._stopped_early()

    def _stopped_early(self) -> bool:
        return (
            self._valid_split is not None
            and self._selection is not None
            and self._selection.should_stop(self._cfg.select.patience)
        )

    def _segment_length(self) -> int:
        """Batches until the next point that needs a drained pipeline."""
        n = self._steps_per_epoch - self.state.batches_in_epoch
        if self._cfg.max_steps is not None:
            n = min(n, self._cfg.max_steps - self.state.step)
        for every in (self._cfg.eval_every_steps, self._cfg.checkpoint_every_steps):
            if every:
                n = min(n, every - self.state.step % every)
        return n

    # ------------------------------------------------------------------ evaluation, selection

    def _evaluate_all(self) -> None:
        for split in self._evaluator.splits:
            metrics = self._evaluator.evaluate(split)
            self.state.record(split, metrics)
            self._reporter.log_eval(self.state.step, split, metrics)
        self._last_eval_step = self.state.step
        self._update_selection()
        if self._valid_split is None:
            return
        assert self._selection is not None
        if self._is_new_best():
            self._reporter.message(
                f"[select] step {self.state.step}: new best valid "
                f"{self._cfg.select.task} {self._cfg.select.metric} {self._selection.score:.5f}"
            )
        elif self._stopped_early():
            self._reporter.message(
                f"[select] no improvement in {self._selection.stale} evaluations: stopping "
                f"at step {self.state.step}; the best is step {self._selection.step}"
            )

    def _update_selection(self) -> None:
        if not self.state.history:
            return
        if self._valid_split is None:
            self._selection = last_evaluation(self.state.history)
        else:
            self._selection = select(self.state.history, self._valid_split, self._cfg.select)

    def _is_new_best(self) -> bool:
        """The evaluation just made at this step is the best so far."""
        return (
            self._valid_split is not None
            and self._last_eval_step == self.state.step
            and self._selection is not None
            and self._selection.step == self.state.step
            and self._selection.score is not None
        )

    # ------------------------------------------------------------------ checkpoints

    def _save_checkpoint(self) -> None:
        if self._checkpointer is None or self._last_checkpoint_step == self.state.step:
            return
        protected = (
            [self._selection.step]
            if self._valid_split is not None and self._selection is not None
            else []
        )
        self._checkpointer.save(self.state, self._steps_per_epoch, protected_steps=protected)
        self._last_checkpoint_step = self.state.step

    # ------------------------------------------------------------------ collectives

    def _agreed_steps_per_epoch(self) -> int:
        steps = len(self._train_reader)
        low = -self._all_reduce(-float(steps), "max")
        high = self._all_reduce(float(steps), "max")
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

    def _all_reduce(self, value: float, op: str) -> float:
        if not dist.is_initialized():
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._runner.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return float(t)


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0
