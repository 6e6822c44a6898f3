"""The run summary (``<output.dir>/summary.json``), written atomically by rank 0.

Layout (the keys ``test``, ``throughput.samples_per_s`` and ``world_size`` are the command-line
contract)::

    {"test":  {"click": {"auc": .., "logloss": .., "ne": .., "calibration": .., ...},
               "conversion": {"auc": .., "cvr_auc": .., "ctcvr_auc": .., ...}},
     "valid": {...},                        # when the dataset has a valid split
     "throughput": {"samples_per_s": .., "train_samples": .., "train_seconds": ..},
     "world_size": 2, "steps": .., "epochs": .., "resumed_from_step": .., "tasks": [..],
     "history": [{"step": .., "epoch": .., "split": .., "metrics": {...}}, ...],
     "config": {...}}
"""

from __future__ import annotations

from typing import Any, Dict

SUMMARY_FILE = "summary.json"


def build_summary(
    *,
    final_metrics: Dict[str, Dict[str, Dict[str, Any]]],
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
        final_metrics: ``{split: {task: {metric: value}}}`` of the final evaluation.
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
    return {
        **final_metrics,
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
