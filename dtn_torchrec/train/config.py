"""The run configuration of ``dtn-train``: dataclasses loaded from YAML plus dotted overrides.

A run config file has the sections of :class:`RunConfig`::

    seed: 0
    data: {path: data/aliccp, batch_size: 2048, ...}      # DataConfig
    model: {name: dtn, ...}                                # models.config.ModelConfig
    train: {epochs: 1, max_steps: null, pipeline: sparse_dist,
            sparse_optimizer: {...}, dense_optimizer: {...}}   # TrainConfig
    sharding: {...}                                        # distributed ShardingConfig
    output: {dir: runs/dtn, tensorboard: true}             # OutputConfig

Command-line overrides ``train.epochs=3 model.name=mmoe data.shuffle=false`` replace single keys;
the value is parsed by ``yaml.safe_load``, so ``[64, 32]``, ``null`` and ``1e-3`` work. Unknown
keys and values of the wrong type are rejected by :func:`dataclass_from_dict` with a message that
names the dotted key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Literal, Optional, Sequence

import yaml

from dtn_torchrec.dataclass_config import (
    ConfigError,
    apply_overrides,
    config_to_dict,
    dataclass_from_dict,
)
from dtn_torchrec.distributed.config import (
    DenseOptimizerConfig,
    ShardingConfig,
    SparseOptimizerConfig,
)
from dtn_torchrec.models.config import ModelConfig


@dataclass
class DataConfig:
    """Where the Parquet dataset is and how batches are read from it.

    Args:
        path: dataset directory written by ``dtn-prepare`` (holds ``schema.json``).
        batch_size: training rows per batch and rank.
        eval_batch_size: evaluation rows per batch and rank; None = ``batch_size``.
        shuffle: shuffle training rows (row-group order plus a shuffle buffer).
        shuffle_buffer_rows: size of the shuffle buffer, in rows.
        use_weights: feed the per-id weight columns (Ali-CCP ``feature_value``) as KJT weights.
        prefetch_batches: batches the reader prepares ahead in a background thread.
        reader_workers: threads per rank that read, decode and assemble batches (the batches
            and their order do not depend on it).
        train_split: split to train on.
        eval_split: split evaluated every ``train.eval_every_steps``, at each epoch end and at
            the end of training; its metrics go to the summary under its name.
        valid_split: a second split evaluated at the same points when the dataset has it.
    """

    path: str
    batch_size: int = 512
    eval_batch_size: Optional[int] = None
    shuffle: bool = True
    shuffle_buffer_rows: int = 65536
    use_weights: bool = False
    prefetch_batches: int = 2
    reader_workers: int = 1
    train_split: str = "train"
    eval_split: str = "test"
    valid_split: Optional[str] = "valid"

    def __post_init__(self) -> None:
        _check_positive("batch_size", self.batch_size)
        if self.eval_batch_size is not None:
            _check_positive("eval_batch_size", self.eval_batch_size)
        _check_positive("shuffle_buffer_rows", self.shuffle_buffer_rows)
        if self.prefetch_batches < 0:
            raise ValueError(f"prefetch_batches: must be >= 0, got {self.prefetch_batches}")
        _check_positive("reader_workers", self.reader_workers)


# Metrics a checkpoint can be selected by (keys of ``metrics.task_metrics``).
SELECT_METRICS = ("auc", "logloss", "ne", "calibration")


@dataclass
class SelectConfig:
    """Which evaluation is the best, and when to stop looking for a better one.

    Every evaluation of ``data.valid_split`` scores the model; the best one's checkpoint is kept
    and its metrics (all splits) are what ``summary.json`` reports. The test split is never used
    to select.

    Args:
        metric: one of :data:`SELECT_METRICS`.
        task: a task name, or ``mean``: the mean of ``metric`` over all tasks.
        mode: ``max`` (higher is better, e.g. ``auc``) or ``min`` (e.g. ``logloss``).
        patience: stop training after this many evaluations in a row without improvement;
            None = run all epochs.
    """

    metric: str = "auc"
    task: str = "mean"
    mode: Literal["max", "min"] = "max"
    patience: Optional[int] = None

    def __post_init__(self) -> None:
        if self.metric not in SELECT_METRICS:
            raise ValueError(f"metric: must be one of {list(SELECT_METRICS)}, got {self.metric!r}")
        if self.patience is not None:
            _check_positive("patience", self.patience)


@dataclass
class TrainConfig:
    """The training loop.

    Args:
        epochs: passes over the training split.
        max_steps: stop after this many optimizer steps in total (over all epochs, counting the
            steps before a resume); None = run all epochs.
        pipeline: ``sparse_dist`` = ``TrainPipelineSparseDist`` (overlaps the sparse input
            all-to-all with forward/backward); ``plain`` = forward, backward, step in a loop.
        eval_every_steps: also evaluate every N steps (0 = only at epoch ends and the end).
        checkpoint_every_steps: also checkpoint every N steps (0 = only at epoch ends and the
            end).
        log_every_steps: log (stderr, TensorBoard) the mean training loss every N steps.
        keep_checkpoints: how many most recent checkpoints to keep.
        resume: continue from the latest checkpoint in ``output.dir`` (also implied by
            ``--resume`` and by a torchrun/TorchX restart).
        sparse_optimizer: the fused optimizer applied to embedding tables in backward.
        dense_optimizer: the optimizer of the dense (DDP) parameters.
        select: which evaluation's checkpoint the run returns, and early stopping.
        precision: arithmetic of the dense part (experts, gates, towers): ``fp32``; ``bf16``
            autocast with fp32 master weights (embeddings and loss stay fp32); ``auto`` = bf16
            where the device has bf16 GEMM (``models.multitask.precision``), else fp32.
        compile: ``torch.compile`` the dense part.
    """

    epochs: int = 1
    max_steps: Optional[int] = None
    pipeline: Literal["sparse_dist", "plain"] = "sparse_dist"
    eval_every_steps: int = 0
    checkpoint_every_steps: int = 0
    log_every_steps: int = 50
    keep_checkpoints: int = 2
    resume: bool = False
    sparse_optimizer: SparseOptimizerConfig = field(default_factory=SparseOptimizerConfig)
    dense_optimizer: DenseOptimizerConfig = field(default_factory=DenseOptimizerConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    precision: Literal["fp32", "bf16", "auto"] = "auto"
    compile: bool = False

    def __post_init__(self) -> None:
        _check_positive("epochs", self.epochs)
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(f"max_steps: must be >= 0 or null, got {self.max_steps}")
        for name in ("eval_every_steps", "checkpoint_every_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        _check_positive("log_every_steps", self.log_every_steps)
        _check_positive("keep_checkpoints", self.keep_checkpoints)


@dataclass
class OutputConfig:
    """Where a run writes: ``summary.json``, ``config.yaml``, ``plan.json``, ``checkpoints/``,
    ``tb/`` (TensorBoard).

    Args:
        dir: the run directory.
        tensorboard: write TensorBoard scalars under ``<dir>/tb``.
    """

    dir: str = "runs/default"
    tensorboard: bool = True


@dataclass
class RunConfig:
    """Everything ``dtn-train`` needs besides the dataset itself."""

    data: DataConfig
    model: ModelConfig
    seed: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    @property
    def eval_batch_size(self) -> int:
        return self.data.eval_batch_size or self.data.batch_size


def _check_positive(name: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"{name}: must be > 0, got {value}")


def run_config_from_dict(raw: Dict[str, Any]) -> RunConfig:
    """Builds a :class:`RunConfig` from the nested dict of a config file (overrides applied).

    The ``model`` section's architecture and experts are tagged unions (``name``, ``kind``):
    :func:`dataclass_from_dict` checks each against its own fields.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {raw!r}")
    cfg = dataclass_from_dict(RunConfig, raw)
    # The distributed layer's configs check themselves; their messages name their own section.
    for prefix, section in (
        ("", cfg.sharding),
        ("train.", cfg.train.sparse_optimizer),
        ("train.", cfg.train.dense_optimizer),
    ):
        try:
            section.validate()
        except ValueError as e:
            raise ConfigError(f"{prefix}{e}") from e
    select_task = cfg.train.select.task
    if select_task != "mean" and select_task not in cfg.model.tasks:
        raise ConfigError(
            f"train.select.task: {select_task!r} is neither 'mean' nor one of model.tasks "
            f"{list(cfg.model.tasks)}"
        )
    return cfg


def load_run_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> RunConfig:
    """Reads a YAML run config, applies ``dotted.key=value`` overrides and type-checks it.

    Raises:
        ConfigError: the message starts with the file name and names the offending key.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    try:
        return run_config_from_dict(apply_overrides(raw or {}, overrides))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def run_config_to_dict(cfg: RunConfig) -> Dict[str, Any]:
    """The config as plain nested dicts/lists (the echo in ``summary.json`` and ``config.yaml``);
    :func:`run_config_from_dict` loads it back."""
    return config_to_dict(cfg)
