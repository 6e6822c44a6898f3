"""Checkpoints of a training run: model, optimizer and scheduler tensors plus the run state,
saved at a drained pipeline and restored for an exact resume (or a continued one at another
world size)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Collection, Dict, Optional

from dtn_torchrec.data.reader import ParquetBatchReader
from dtn_torchrec.distributed.checkpoint import (
    CheckpointManager,
    capture_rng_state,
    restore_rng_state,
)
from dtn_torchrec.train.state import TrainState
from dtn_torchrec.train.steps import StepRunner

# Checkpoint ``extra`` keys that only make sense for the rank layout that wrote them.
RANK_LOCAL_KEYS = ("reader", "rng")


@dataclass
class ResumePoint:
    """Where a restored run continues.

    Args:
        state: the restored run state.
        reader_state: the train reader's ``state_dict()`` to load before iterating (same rank
            layout, mid-epoch), else None.
        skip_batches: batches of the epoch to skip instead (another rank layout, mid-epoch).
    """

    state: TrainState
    reader_state: Optional[Dict[str, Any]]
    skip_batches: int


class TrainCheckpointer:
    """Saves and restores a run through a :class:`CheckpointManager` (collective).

    Args:
        manager: the checkpoint store (built with ``rank_local_keys=RANK_LOCAL_KEYS``).
        runner: holds the model, optimizer and LR scheduler to save and restore.
        train_reader: this rank's training reader (its position is saved mid-epoch).
        world_size: ranks of the run.
        log: prints one line (rank 0's reporter).
    """

    def __init__(
        self,
        manager: CheckpointManager,
        runner: StepRunner,
        train_reader: ParquetBatchReader,
        world_size: int,
        log: Callable[[str], None],
    ) -> None:
        self._manager = manager
        self._runner = runner
        self._train_reader = train_reader
        self._world_size = world_size
        self._log = log

    def save(
        self, state: TrainState, steps_per_epoch: int, protected_steps: Collection[int] = ()
    ) -> None:
        """Writes checkpoint ``state.step``; pruning keeps ``protected_steps``."""
        mid_epoch = state.batches_in_epoch > 0
        extra = {
            "step": state.step,
            "epoch": state.epoch,
            "batches_in_epoch": state.batches_in_epoch,
            "history": state.history,
            "world_size": self._world_size,
            "steps_per_epoch": steps_per_epoch,
            "reader": self._train_reader.state_dict() if mid_epoch else None,
            "rng": capture_rng_state(),
        }
        self._manager.save(
            state.step,
            model=self._runner.model,
            optimizer=self._runner.optimizer,
            extra=extra,
            scheduler=self._runner.lr_scheduler,
            protected_steps=protected_steps,
        )
        self._log(f"[checkpoint] step {state.step} saved")

    def restore_latest(self, steps_per_epoch: int) -> Optional[ResumePoint]:
        """Loads the latest checkpoint into the model, optimizer and scheduler; None if there
        is none. Restores this process's RNG streams when the rank layout is the same."""
        step = self._manager.latest_step()
        if step is None:
            return None
        runner = self._runner
        extra = self._manager.load(
            runner.model, runner.optimizer, step, scheduler=runner.lr_scheduler
        )
        state = TrainState(
            step=int(extra["step"]),
            epoch=int(extra["epoch"]),
            batches_in_epoch=int(extra["batches_in_epoch"]),
            history=list(extra["history"]),
        )
        same_layout = (
            int(extra["world_size"]) == self._world_size
            and int(extra["steps_per_epoch"]) == steps_per_epoch
        )
        if same_layout:
            restore_rng_state(extra["rng"])
            return ResumePoint(state=state, reader_state=extra["reader"], skip_batches=0)
        # Another world size (or batch size) splits the rows differently: the saved reader
        # position and RNG streams do not apply. Continue the epoch after the same fraction of
        # its rows, from the epoch's own shuffle order.
        if state.batches_in_epoch > 0:
            done_fraction = state.batches_in_epoch / int(extra["steps_per_epoch"])
            state.batches_in_epoch = min(round(done_fraction * steps_per_epoch), steps_per_epoch)
            self._log(
                f"[resume] checkpoint from world size {extra['world_size']}; epoch "
                f"{state.epoch} continues at batch {state.batches_in_epoch} of "
                f"{steps_per_epoch} (rows before it are skipped, not replayed exactly)"
            )
        if state.batches_in_epoch == steps_per_epoch:
            state.epoch += 1
            state.batches_in_epoch = 0
        return ResumePoint(state=state, reader_state=None, skip_batches=state.batches_in_epoch)
