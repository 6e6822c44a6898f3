"""Scoring a Parquet split with a trained checkpoint on 1..N ranks (``dtn-predict``).

Every rank scores its shard of the split (the reader's rank sharding: each row exactly once) with
the sharded model and writes its own part file into one staging directory; after all ranks
succeeded, rank 0 writes ``metrics.json`` (labelled tasks only) and ``predict.json`` and renames
the staging directory to ``--output``. Output layout::

    <output>/predictions/part-<rank>-of-<world>.parquet  sample_id, p_<task>..., <label>...
    <output>/metrics.json      {"<split>": {"<task>": {"auc", "logloss", ...}}}
    <output>/predict.json      rows, throughput, checkpoint, files, ...

Failures never leave a partial ``--output`` and never hang a rank: before each sharded forward
(a collective) the ranks agree that every one of them read its next batch, so an unreadable file
on one rank stops all of them with that rank's message.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from dtn_torchrec.atomic_files import claim_output_dir, publish_output_dir, write_json_atomic
from dtn_torchrec.data.batch import Batch
from dtn_torchrec.data.reader import ParquetBatchReader
from dtn_torchrec.data.schema import SAMPLE_ID_COLUMN, SchemaSpec
from dtn_torchrec.distributed.launch import DistributedContext
from dtn_torchrec.serving.loading import (
    check_run_config,
    load_sharded_model,
    model_schema,
    resolve_checkpoint,
)
from dtn_torchrec.serving.output import make_staging_dir
from dtn_torchrec.train.config import RunConfig
from dtn_torchrec.train.metrics import EvalAccumulator

TOOL = "dtn-predict"
PREDICTIONS_DIR = "predictions"
METRICS_FILE = "metrics.json"
PREDICT_SUMMARY_FILE = "predict.json"
_ROWS_PER_ROW_GROUP = 65536

# Per-step states the ranks agree on (all_reduce of [state, -state] with MAX gives max and min).
_FAILED, _DONE, _READY = 0, 1, 2


def probability_column(task: str) -> str:
    """Name of the output column holding ``sigmoid(logit)`` of ``task``."""
    return f"p_{task}"


def part_file(rank: int, world_size: int) -> str:
    """Path of rank ``rank``'s predictions, relative to the output directory."""
    return f"{PREDICTIONS_DIR}/part-{rank:05d}-of-{world_size:05d}.parquet"


@dataclass
class PredictionSummary:
    """What one ``dtn-predict`` run did (``predict.json``; ``metrics`` also in ``metrics.json``)."""

    split: str
    rows: int
    world_size: int
    batch_size: int
    checkpoint: str
    step: int
    tasks: List[str]
    labelled_tasks: List[str]
    files: List[str]
    seconds: float
    rows_per_s: float
    metrics: Optional[Dict[str, Dict[str, Any]]]

    def to_json(self) -> Dict[str, Any]:
        return {
            "split": self.split,
            "rows": self.rows,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "checkpoint": self.checkpoint,
            "step": self.step,
            "tasks": self.tasks,
            "labelled_tasks": self.labelled_tasks,
            "files": self.files,
            "throughput": {"rows_per_s": self.rows_per_s, "seconds": self.seconds},
        }


class _RankAgreement:
    """Lock-step agreement of all ranks on "each of us is ready / done / failed".

    Args:
        device: where the collective's tensor lives (the rank's GPU under nccl, CPU for gloo).
    """

    def __init__(self, device: torch.device) -> None:
        self._device = device

    def agree(self, state: int, error: Optional[BaseException]) -> int:
        """Returns the lowest state over the ranks (``_DONE`` only when every rank is done).

        Raises:
            BaseException: when any rank failed: the failing rank re-raises its own error, the
                others raise RuntimeError with the first failing rank's message.
            RuntimeError: some ranks are done while others still have batches.
        """
        flags = torch.tensor([state, -state], dtype=torch.int64, device=self._device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        highest, lowest = int(flags[0]), -int(flags[1])
        if lowest == _FAILED:
            reports: List[Optional[str]] = [None] * dist.get_world_size()
            dist.all_gather_object(reports, str(error) if error is not None else None)
            if error is not None:
                raise error
            rank, message = next((r, m) for r, m in enumerate(reports) if m is not None)
            raise RuntimeError(f"rank {rank}: {message}")
        if lowest == _DONE and highest == _READY:
            raise RuntimeError(
                "ranks ran out of batches at different steps (reader contract broken)"
            )
        return lowest


class _PartWriter:
    """Buffers one rank's predictions and writes them as row groups of one Parquet file."""

    def __init__(self, path: Path, tasks: List[str], label_names: List[str]) -> None:
        fields = [pa.field(SAMPLE_ID_COLUMN, pa.int64())]
        fields += [pa.field(probability_column(t), pa.float32()) for t in tasks]
        fields += [pa.field(name, pa.float32()) for name in label_names]
        self._schema = pa.schema(fields)
        self._writer = pq.ParquetWriter(path, self._schema)
        self._tasks = tasks
        self._label_names = label_names
        self._pending: List[Dict[str, torch.Tensor]] = []
        self._pending_rows = 0

    def add(self, sample_ids: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor) -> None:
        """Args: sample_ids ``[B]``, probs ``[B, T]``, labels ``[B, len(label_names)]``."""
        self._pending.append({"ids": sample_ids, "probs": probs, "labels": labels})
        self._pending_rows += int(sample_ids.shape[0])
        if self._pending_rows >= _ROWS_PER_ROW_GROUP:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        ids = torch.cat([p["ids"] for p in self._pending]).numpy()
        probs = torch.cat([p["probs"] for p in self._pending]).numpy()
        labels = torch.cat([p["labels"] for p in self._pending]).numpy()
        columns = [pa.array(ids, pa.int64())]
        columns += [pa.array(probs[:, i], pa.float32()) for i in range(len(self._tasks))]
        columns += [pa.array(labels[:, i], pa.float32()) for i in range(len(self._label_names))]
        self._writer.write_table(pa.Table.from_arrays(columns, schema=self._schema))
        self._pending, self._pending_rows = [], 0

    def close(self) -> None:
        self.flush()
        self._writer.close()


def _agreed_batches(batches: Iterator[Batch], agreement: _RankAgreement) -> Iterator[Batch]:
    """The batches of this rank, each yielded only once every rank holds its next one."""
    while True:
        batch: Optional[Batch] = None
        error: Optional[BaseException] = None
        try:
            batch = next(batches)
            state = _READY
        except StopIteration:
            state = _DONE
        except Exception as e:  # noqa: BLE001 - agreed with the other ranks, then re-raised
            state, error = _FAILED, e
        if agreement.agree(state, error) == _DONE:
            return
        assert batch is not None
        yield batch


def _stage_output(
    output: Path,
    overwrite: bool,
    protected: List[str | os.PathLike],
    ctx: DistributedContext,
    agreement: _RankAgreement,
) -> Path:
    """Rank 0 checks ``output`` and creates the staging directory; every rank gets its path."""
    staged: List[Optional[str]] = [None]
    error: Optional[BaseException] = None
    if ctx.rank == 0:
        try:
            claim_output_dir(output, tool=TOOL, overwrite=overwrite, protected=protected)
            staged[0] = os.fspath(make_staging_dir(output))
            (Path(staged[0]) / PREDICTIONS_DIR).mkdir()
        except OSError as e:
            error = e
    agreement.agree(_FAILED if error else _READY, error)
    dist.broadcast_object_list(staged, src=0)
    return Path(str(staged[0]))


def predict(
    cfg: RunConfig,
    checkpoint: str | os.PathLike,
    input_dir: str | os.PathLike,
    output: str | os.PathLike,
    ctx: DistributedContext,
    *,
    split: str = "test",
    batch_size: Optional[int] = None,
    overwrite: bool = False,
    allow_config_change: bool = False,
) -> PredictionSummary:
    """Scores ``split`` of ``input_dir`` with the checkpoint; every rank of the job calls it.

    Args:
        cfg: the run config the checkpoint was trained with (model, sharding, data options).
        checkpoint: see :func:`serving.loading.resolve_checkpoint`.
        input_dir: a ``dtn-prepare`` dataset.
        output: directory to create (see the module docstring).
        ctx: this process's place in the job (``init_distributed``).
        split: the split to score.
        batch_size: rows per batch and rank; None = ``data.eval_batch_size`` (or ``batch_size``).
        overwrite: replace an earlier ``dtn-predict`` output at ``output`` (nothing else: see
            ``atomic_files.claim_output_dir``; the input, the checkpoint and the training data
            are always refused).
        allow_config_change: score although the model config differs from the training run's
            ``config.yaml`` (default: refuse, naming the keys).

    Raises:
        FileNotFoundError, FileExistsError (``OutputDirError``), ValueError
        (``SchemaMismatchError``, ``CheckpointMismatchError``, ``RunMismatchError``,
        ``CorruptCheckpointError``), RuntimeError: with nothing written.
    """
    output = Path(output)
    data = SchemaSpec.load(input_dir)
    if split not in data.splits:
        raise ValueError(
            f"{input_dir}/schema.json: no split {split!r} (splits: {sorted(data.splits)})"
        )
    ref = resolve_checkpoint(checkpoint)
    check_run_config(cfg, ref, allow_change=allow_config_change)
    schema = model_schema(cfg, data, input_dir)
    tasks = list(cfg.model.tasks)
    labelled = [t for t in tasks if t in data.labels]
    batch_size = batch_size or cfg.eval_batch_size
    agreement = _RankAgreement(ctx.device)
    protected = [input_dir, cfg.data.path, ref.path]
    staged = _stage_output(output, overwrite, protected, ctx, agreement)
    try:
        model = load_sharded_model(cfg, schema, ref, ctx.device, batch_size, input_dir)
        reader = ParquetBatchReader(
            os.fspath(input_dir),
            split,
            batch_size,
            rank=ctx.rank,
            world_size=ctx.world_size,
            use_weights=cfg.data.use_weights,
            prefetch_batches=cfg.data.prefetch_batches,
            fields=schema.field_names,
        )
        rows, seconds, metrics = _score(
            model, reader, tasks, labelled, data.labels, staged, ctx, agreement
        )
        summary = PredictionSummary(
            split=split,
            rows=rows,
            world_size=ctx.world_size,
            batch_size=batch_size,
            checkpoint=os.fspath(ref.path.resolve()),
            step=ref.step,
            tasks=tasks,
            labelled_tasks=labelled,
            files=[part_file(r, ctx.world_size) for r in range(ctx.world_size)],
            seconds=seconds,
            rows_per_s=rows / seconds if seconds > 0 else 0.0,
            metrics=metrics,
        )
        error: Optional[BaseException] = None
        if ctx.rank == 0:
            try:
                if summary.metrics is not None:
                    write_json_atomic(staged / METRICS_FILE, {split: summary.metrics})
                write_json_atomic(staged / PREDICT_SUMMARY_FILE, summary.to_json())
                publish_output_dir(staged, output, tool=TOOL, overwrite=overwrite)
            except OSError as e:
                error = e
        agreement.agree(_FAILED if error else _READY, error)
    except BaseException:
        if ctx.rank == 0:
            shutil.rmtree(staged, ignore_errors=True)
        raise
    return summary


def _score(
    model: torch.nn.Module,
    reader: ParquetBatchReader,
    tasks: List[str],
    labelled: List[str],
    label_names: List[str],
    staged: Path,
    ctx: DistributedContext,
    agreement: _RankAgreement,
) -> Tuple[int, float, Optional[Dict[str, Dict[str, Any]]]]:
    """The scoring loop of one rank.

    Returns:
        rows scored by all ranks, seconds of the slowest rank, metrics of the labelled tasks
        over all rows (None without labels).
    """
    task_columns = [tasks.index(t) for t in labelled]
    label_columns = [label_names.index(t) for t in labelled]
    accumulator = EvalAccumulator(labelled) if labelled else None
    writer: Optional[_PartWriter] = None
    rows = 0
    start = time.perf_counter()
    error: Optional[BaseException] = None
    try:
        writer = _PartWriter(staged / part_file(ctx.rank, ctx.world_size), tasks, label_names)
    except OSError as e:
        error = e
    agreement.agree(_FAILED if error else _READY, error)
    assert writer is not None
    with torch.no_grad():
        for batch in _agreed_batches(iter(reader), agreement):
            logits = model(batch.sparse_features.to(ctx.device)).float().cpu()
            writer.add(batch.sample_ids, torch.sigmoid(logits), batch.labels)
            if accumulator is not None:
                accumulator.update(logits[:, task_columns], batch.labels[:, label_columns])
            rows += batch.batch_size
    try:
        writer.close()
    except OSError as e:
        error = e
    agreement.agree(_FAILED if error else _READY, error)
    seconds = time.perf_counter() - start
    total_rows = torch.tensor([rows], dtype=torch.int64, device=ctx.device)
    slowest = torch.tensor([seconds], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(total_rows, op=dist.ReduceOp.SUM)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    metrics = None
    if accumulator is not None:  # the gather runs on the collective's device, as in training
        metrics = accumulator.compute(device=ctx.device if ctx.device.type != "cpu" else None)
    return int(total_rows), float(slowest), metrics
