"""Progress reporting of rank 0: a tqdm bar on stderr, log lines, TensorBoard scalars.

Other ranks get a reporter that does nothing, so the loop calls it unconditionally.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Mapping, Optional

from tqdm import tqdm


class ProgressReporter:
    """Reports training progress and evaluation results (active on rank 0 only).

    The bar is drawn only when stderr is a terminal (under torchrun/TorchX stderr is a log
    file, where the periodic log lines are what is wanted).

    Args:
        active: False on ranks other than 0: every method is then a no-op.
        tensorboard_dir: directory for TensorBoard event files, or None for none.
    """

    def __init__(self, active: bool, tensorboard_dir: Optional[Path] = None) -> None:
        self._active = active
        self._tensorboard_dir = tensorboard_dir
        self._bar: Optional[tqdm] = None
        self._writer = None
        self._window_start = time.perf_counter()
        self._window_samples = 0

    def start(self, total_steps: int, initial_step: int) -> None:
        """Opens the bar (``initial_step`` of ``total_steps`` done) and the TensorBoard writer."""
        if not self._active:
            return
        self._bar = tqdm(
            total=total_steps,
            initial=initial_step,
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=not sys.stderr.isatty(),
        )
        if self._tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self._tensorboard_dir))
        self._window_start = time.perf_counter()
        self._window_samples = 0

    def step(self, samples: int) -> None:
        """One training step of ``samples`` rows over all ranks done."""
        if not self._active:
            return
        self._window_samples += samples
        if self._bar is not None:
            self._bar.update(1)

    def log_train(
        self, step: int, epoch: int, losses: Mapping[str, float], lr: Optional[float]
    ) -> None:
        """Logs the mean training losses since the previous call and the window's samples/s."""
        if not self._active:
            return
        now = time.perf_counter()
        rate = self._window_samples / max(now - self._window_start, 1e-9)
        self._window_start, self._window_samples = now, 0
        postfix = {name: f"{v:.4f}" for name, v in losses.items()}
        postfix["samples/s"] = f"{rate:.0f}"
        if self._bar is not None:
            self._bar.set_postfix(postfix, refresh=False)
        text = " ".join(f"{k}={v}" for k, v in postfix.items())
        lr_text = f" lr={lr:.3g}" if lr is not None else ""
        self._write(f"[train] epoch {epoch} step {step}: {text}{lr_text}")
        if self._writer is not None:
            for name, value in losses.items():
                self._writer.add_scalar(f"train/{name}", value, step)
            self._writer.add_scalar("train/samples_per_s", rate, step)
            if lr is not None:
                self._writer.add_scalar("train/lr", lr, step)

    def log_eval(
        self, step: int, split: str, metrics: Mapping[str, Mapping[str, Optional[float]]]
    ) -> None:
        """Logs ``{task: {metric: value}}`` of one evaluation of ``split``."""
        if not self._active:
            return
        parts = []
        for task, values in metrics.items():
            shown = {k: v for k, v in values.items() if k in ("auc", "logloss", "ne", "cvr_auc")}
            parts.append(task + " " + " ".join(f"{k}={_fmt(v)}" for k, v in shown.items()))
        self._write(f"[eval {split}] step {step}: " + "; ".join(parts))
        if self._writer is not None:
            for task, values in metrics.items():
                for name, value in values.items():
                    if isinstance(value, float):
                        self._writer.add_scalar(f"{split}/{task}/{name}", value, step)
            self._writer.flush()

    def message(self, text: str) -> None:
        """Prints one line (rank 0 only) without breaking the bar."""
        if self._active:
            self._write(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()

    def _write(self, text: str) -> None:
        tqdm.write(text, file=sys.stderr)
        sys.stderr.flush()


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.5f}"
