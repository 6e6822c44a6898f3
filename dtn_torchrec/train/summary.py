"""The run summary (``<output.dir>/summary.json``), written atomically by rank 0.

Layout (the keys ``test``, ``throughput.samples_per_s`` and ``world_size`` are the command-line
contract)::

    {"test":  {"click": {"auc": .., "logloss": .., "ne": .., "calibration": .., ...},
               "conversion": {"auc": .., "cvr_auc": .., "ctcvr_auc": .., ...}},
     "valid": {...},                        # when the dataset has a valid split
     "selected": {"step": .., "epoch": .., "valid": {...} | null, "score": .. | null,
                  "rule": "max mean valid auc" | "last evaluation (no valid split)",
                  "stopped_early": false},
     "throughput": {"samples_per_s": .., "train_samples": .., "train_seconds": ..},
     "world_size": 2, "steps": .., "epochs": .., "resumed_from_step": .., "tasks": [..],
     "history": [{"step": .., "epoch": .., "split": .., "metrics": {...}}, ...],
     "config": {...}}

The metrics of every split (``test``, ``valid``) are those of the *selected* evaluation: the
best one on the valid split by ``train.select`` (its checkpoint is ``checkpoints/step_<step>``),
or the last one when the dataset has no valid split. ``epoch`` counts the epochs completed at
that step. ``history`` holds every evaluation.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from dtn_torchrec.train.config import SelectConfig
from dtn_torchrec.train.selection import Selection, metrics_at

SUMMARY_FILE = "summary.json"


def build_summary(
    *,
    selection: Selection,
    select: SelectConfig,
    valid_split: Optional[str],
    stopped_early: bool,
    train_samples: int,
    train_seconds: float,
    world_size: int,
    steps: int,
    epochs: int,
    resumed_from_step: int,
    tasks: list,
    history: list,
    config: Dict[str, Any],
) -> Dict[str, Any]:
    """Assembles the summary dict.

    Args:
        selection: the evaluation the run returns.
        select: the selection rule.
        valid_split: the split selected on, or None (the selection is the last evaluation).
        stopped_early: training stopped for lack of improvement.
        train_samples: training rows processed by all ranks in this process's lifetime.
        train_seconds: wall time of the training steps (evaluation and checkpoints excluded).
        world_size: ranks of the run.
        steps: optimizer steps done in total (including those before a resume).
        epochs: epochs completed.
        resumed_from_step: step of the checkpoint this run resumed from (0 = fresh start).
        tasks: task names in label order.
        history: every evaluation ``{"step", "epoch", "split", "metrics"}``.
        config: the run config echo.
    """
    selected_metrics = metrics_at(history, selection.step)
    if valid_split is None:
        rule = "last evaluation (no valid split)"
    else:
        rule = f"{select.mode} {select.task} {valid_split} {select.metric}"
    return {
        **selected_metrics,
        "selected": {
            "step": selection.step,
            "epoch": selection.epoch,
            "valid": selected_metrics.get(valid_split) if valid_split is not None else None,
            "score": selection.score,
            "rule": rule,
            "stopped_early": stopped_early,
        },
        "throughput": {
            "samples_per_s": train_samples / train_seconds if train_seconds > 0 else None,
            "train_samples": train_samples,
            "train_seconds": train_seconds,
        },
        "world_size": world_size,
        "steps": steps,
        "epochs": epochs,
        "resumed_from_step": resumed_from_step,
        "tasks": list(tasks),
        "history": history,
        "config": config,
    }
