"""One training run from a :class:`RunConfig`: the dlrm_main skeleton on this project's parts.

model on ``meta`` -> fused sparse optimizer -> sharding plan (printed, saved) -> DMP -> dense
optimizer + schedule -> readers -> :class:`Trainer` (resume, train, evaluate, checkpoint) ->
``summary.json``. Every rank calls :func:`run_training`; the process group must be initialised.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

from dtn_torchrec.atomic_files import write_json_atomic
from dtn_torchrec.data.reader import ParquetBatchReader
from dtn_torchrec.data.schema import SchemaSpec
from dtn_torchrec.distributed.build import build_meta_train_model, build_sharded_model
from dtn_torchrec.distributed.checkpoint import CheckpointManager
from dtn_torchrec.distributed.launch import DistributedContext
from dtn_torchrec.distributed.optimizers import build_dense_optimizer
from dtn_torchrec.distributed.planning import format_plan, plan_to_json
from dtn_torchrec.models.multitask.precision import configure_dense_arch
from dtn_torchrec.train.allocator import keep_freed_memory
from dtn_torchrec.train.checkpointing import RANK_LOCAL_KEYS, TrainCheckpointer
from dtn_torchrec.train.config import RunConfig, run_config_to_dict
from dtn_torchrec.train.evaluation import Evaluator
from dtn_torchrec.train.loop import Trainer
from dtn_torchrec.train.progress import ProgressReporter
from dtn_torchrec.train.run_dir import (
    CHECKPOINT_DIR,
    check_dataset,
    check_model_config,
    write_run_record,
)
from dtn_torchrec.train.steps import StepRunner
from dtn_torchrec.train.summary import SUMMARY_FILE, build_summary

PLAN_FILE = "plan.json"


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def restarted_by_launcher() -> bool:
    """True when torchrun / TorchX restarted this worker group after a failure."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def run_training(
    cfg: RunConfig, ctx: DistributedContext, *, resume: bool, allow_config_change: bool = False
) -> Dict[str, Any]:
    """Trains, evaluates and checkpoints as ``cfg`` says; returns the summary (every rank).

    Args:
        cfg: the run config.
        ctx: this process's place in the job (``distributed.launch.init_distributed``).
        resume: continue from the latest checkpoint in ``<output.dir>/checkpoints`` (a fresh
            start if there is none). Without it an existing checkpoint is an error, so two runs
            never mix in one directory.
        allow_config_change: resume although the model config differs from the run's
            ``config.yaml`` (a warning names the keys).

    Raises:
        ValueError: the dataset does not fit the config (splits, labels); resuming with
            another model config or dataset (``RunMismatchError``, before anything is written).
        FileExistsError: checkpoints exist and ``resume`` is False.
    """
    keep_freed_memory()  # no page faults for each step's activations (train.allocator)
    is_rank0 = ctx.rank == 0
    out_dir = Path(cfg.output.dir)
    schema = SchemaSpec.load(cfg.data.path)
    _check_splits(cfg, schema)

    checkpoints = CheckpointManager(
        out_dir / CHECKPOINT_DIR,
        keep_last=cfg.train.keep_checkpoints,
        rank_local_keys=RANK_LOCAL_KEYS,
    )
    latest = checkpoints.latest_step()
    if latest is not None and not resume:
        raise FileExistsError(
            f"{checkpoints.directory} already holds checkpoint step {latest}; pass --resume "
            "(or train.resume=true) to continue it, or choose another output.dir"
        )
    if latest is not None:  # resuming: the run's model and dataset, checked before any write
        check_model_config(out_dir, cfg, allow_change=allow_config_change)
        check_dataset(out_dir, cfg.data.path, schema)
    if is_rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_run_record(out_dir, cfg, schema)

    # Same seed on every rank for building the model (DDP broadcasts rank 0's dense weights
    # anyway); a per-rank seed afterwards so dropout masks differ between ranks.
    seed_everything(cfg.seed)
    train_model = build_meta_train_model(cfg.model, schema, cfg.train.sparse_optimizer)
    configure_dense_arch(train_model.model, cfg.train.precision, cfg.train.compile, ctx.device)
    if is_rank0:
        print(
            f"[start] dense precision {train_model.model.dense_precision} "
            f"(train.precision={cfg.train.precision}), compile {cfg.train.compile}",
            file=sys.stderr,
            flush=True,
        )
    model, plan = build_sharded_model(
        train_model, cfg.sharding, schema, device=ctx.device, batch_size=cfg.data.batch_size
    )
    if is_rank0:
        print(format_plan(plan), file=sys.stderr, flush=True)
        write_json_atomic(out_dir / PLAN_FILE, plan_to_json(plan))
    optimizers = build_dense_optimizer(model, cfg.train.dense_optimizer)
    seed_everything(cfg.seed + ctx.rank)

    train_reader = _reader(cfg, cfg.data.train_split, ctx, train=True)
    eval_readers = {
        split: _reader(cfg, split, ctx, train=False) for split in _eval_splits(cfg, schema)
    }
    reporter = ProgressReporter(
        active=is_rank0, tensorboard_dir=out_dir / "tb" if cfg.output.tensorboard else None
    )
    runner = StepRunner(
        model, optimizers.optimizer, optimizers.scheduler, ctx.device, cfg.train.pipeline
    )
    trainer = Trainer(
        cfg=cfg.train,
        runner=runner,
        train_reader=train_reader,
        evaluator=Evaluator(runner, eval_readers, cfg.model.tasks),
        valid_split=cfg.data.valid_split if cfg.data.valid_split in eval_readers else None,
        reporter=reporter,
        checkpointer=TrainCheckpointer(
            checkpoints, runner, train_reader, ctx.world_size, reporter.message
        ),
    )
    if resume and trainer.restore_latest():
        start = f"[resume] from checkpoint step {trainer.state.step} (epoch {trainer.state.epoch})"
    else:
        start = "[start] no checkpoint to resume from" if resume else "[start] fresh run"
    reporter.start(trainer.total_steps, trainer.state.step)
    reporter.message(
        f"{start}; {ctx.world_size} rank(s), {trainer.steps_per_epoch} steps per epoch, "
        f"running to step {trainer.total_steps}"
    )
    try:
        result = trainer.fit()
    finally:
        reporter.close()

    summary = build_summary(
        selection=result.selection,
        select=cfg.train.select,
        valid_split=trainer.valid_split,
        stopped_early=result.stopped_early,
        train_samples=result.train_samples,
        train_seconds=result.train_seconds,
        world_size=ctx.world_size,
        steps=result.state.step,
        epochs=result.state.epoch,
        resumed_from_step=result.resumed_from_step,
        tasks=cfg.model.tasks,
        history=result.state.history,
        config=run_config_to_dict(cfg),
    )
    if is_rank0:
        path = write_json_atomic(out_dir / SUMMARY_FILE, summary)
        print(f"[done] summary written to {path}", file=sys.stderr, flush=True)
    return summary


def _reader(
    cfg: RunConfig, split: str, ctx: DistributedContext, *, train: bool
) -> ParquetBatchReader:
    return ParquetBatchReader(
        cfg.data.path,
        split,
        cfg.data.batch_size if train else cfg.eval_batch_size,
        rank=ctx.rank,
        world_size=ctx.world_size,
        shuffle=cfg.data.shuffle and train,
        shuffle_buffer_rows=cfg.data.shuffle_buffer_rows,
        seed=cfg.seed,
        drop_last=train,
        use_weights=cfg.data.use_weights,
        prefetch_batches=cfg.data.prefetch_batches,
        workers=cfg.data.reader_workers,
        # Page-locked batches let the pipeline's copy to the GPU run asynchronously.
        pin_memory=ctx.device.type == "cuda",
    )


def _eval_splits(cfg: RunConfig, schema: SchemaSpec) -> List[str]:
    splits = [cfg.data.eval_split]
    if cfg.data.valid_split is not None and cfg.data.valid_split in schema.splits:
        splits.insert(0, cfg.data.valid_split)
    return splits


def _check_splits(cfg: RunConfig, schema: SchemaSpec) -> None:
    for key, split in (
        ("data.train_split", cfg.data.train_split),
        ("data.eval_split", cfg.data.eval_split),
    ):
        if split not in schema.splits:
            raise ValueError(
                f"{key}: split {split!r} is not in {cfg.data.path}/schema.json "
                f"(splits: {sorted(schema.splits)})"
            )
