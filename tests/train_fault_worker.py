"""dtn-train with an injected fault, for the restart tests: rank R SIGKILLs itself right after
optimizer step S (before anything at that step is checkpointed), on the first attempt of a
torchrun job only.

    torchrun --max-restarts 1 ... tests/train_fault_worker.py --kill-at R:S <dtn-train args>

The product entry point runs unchanged; only ``StepRunner.train`` is wrapped here.
"""

from __future__ import annotations

import argparse
import os
import signal
from typing import Iterator

from dtn_torchrec.cli import train as train_cli
from dtn_torchrec.data.batch import Batch
from dtn_torchrec.train.steps import StepOutput, StepRunner


def kill_after_step(step: int) -> None:
    """Makes this process SIGKILL itself when the trainer asks for the batch after ``step``
    (steps counted from this process's start)."""
    train = StepRunner.train
    done = 0

    def train_then_die(self: StepRunner, batches: Iterator[Batch]) -> Iterator[StepOutput]:
        nonlocal done
        for output in train(self, batches):
            yield output
            done += 1
            if done == step:
                os.kill(os.getpid(), signal.SIGKILL)

    StepRunner.train = train_then_die  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill-at", required=True, help="RANK:STEP")
    args, train_args = parser.parse_known_args()
    rank, _, step = args.kill_at.partition(":")
    first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0
    if first_attempt and int(os.environ["RANK"]) == int(rank):
        kill_after_step(int(step))
    train_cli.main(train_args)


if __name__ == "__main__":
    main()
