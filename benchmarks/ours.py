"""Our training path, as ``dtn-train`` runs it, one step at a time for the benchmarks.

``ParquetBatchReader`` -> ``TrainPipelineSparseDist`` -> ``DistributedModelParallel`` (sharded
EBC/EC with the sparse optimiser fused into the TBE backward) + dense optimiser (DDP). The model
is built on ``meta``, so no table is ever allocated unsharded.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import replace
from typing import Any, Callable, Dict, Iterator, NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.modules.embedding_configs import DataType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from benchmarks.common import TrainRun, rank_record, timed_windows
from dtn_torchrec.data.batch import Batch
from dtn_torchrec.data.reader import ParquetBatchReader
from dtn_torchrec.distributed.build import build_sharded_model
from dtn_torchrec.distributed.config import ShardingConfig
from dtn_torchrec.distributed.optimizers import apply_sparse_optimizer, build_dense_optimizer
from dtn_torchrec.distributed.planning import plan_to_json
from dtn_torchrec.models.builder import build_train_model
from dtn_torchrec.models.multitask.precision import configure_dense_arch
from dtn_torchrec.train.allocator import keep_freed_memory

_PRECISIONS = {"fp32": DataType.FP32, "fp16": DataType.FP16}


def with_table_precision(model: nn.Module, precision: str) -> nn.Module:
    """Rebuilds every EBC / EC of a ``meta`` model with ``precision`` weights (fp16 halves the
    tables; FBGEMM's TBE then stores and updates them in fp16)."""
    data_type = _PRECISIONS[precision]
    if data_type == DataType.FP32:
        return model
    meta = torch.device("meta")
    swaps = [
        (path, sub)
        for path, sub in model.named_modules()
        if isinstance(sub, (EmbeddingBagCollection, EmbeddingCollection))
    ]
    for path, sub in swaps:
        if isinstance(sub, EmbeddingBagCollection):
            tables = [replace(c, data_type=data_type) for c in sub.embedding_bag_configs()]
            new: nn.Module = EmbeddingBagCollection(
                tables=tables, is_weighted=sub.is_weighted(), device=meta
            )
        else:
            tables = [replace(c, data_type=data_type) for c in sub.embedding_configs()]
            new = EmbeddingCollection(tables=tables, device=meta)
        model.set_submodule(path, new)
    return model


def endless(reader: ParquetBatchReader) -> Iterator[Batch]:
    """The reader's batches, epoch after epoch."""
    for epoch in itertools.count():
        reader.set_epoch(epoch)
        yield from reader


class OursStep(NamedTuple):
    """One pipelined training step of our path (returns the samples it trained) and the
    sharding type of every table."""

    step: Callable[[], int]
    sharding: Dict[str, str]


def ours_step(run: TrainRun) -> OursStep:
    """Builds our path for ``run`` on this rank, as ``dtn-train`` does (dense precision and
    compile from ``train.*``)."""
    cfg, schema = run.load()
    keep_freed_memory()
    torch.manual_seed(cfg.seed)
    device = torch.device("cpu")
    model = build_train_model(cfg.model, schema, device=torch.device("meta"))
    configure_dense_arch(model.model, cfg.train.precision, cfg.train.compile, device)
    model = with_table_precision(model, run.table_precision)
    apply_sparse_optimizer(model, cfg.train.sparse_optimizer)
    sharding: ShardingConfig = cfg.sharding
    if run.sharding_types is not None:
        sharding = ShardingConfig(sharding_types=list(run.sharding_types))
    dmp, plan = build_sharded_model(
        model, sharding, schema, device=device, batch_size=run.batch_size
    )
    optimizers = build_dense_optimizer(dmp, cfg.train.dense_optimizer)
    pipeline = TrainPipelineSparseDist(
        dmp, optimizers.optimizer, device, execute_all_batches=True, pipeline_postproc=True
    )
    reader = ParquetBatchReader(
        run.data,
        "train",
        run.batch_size,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        shuffle=cfg.data.shuffle,
        shuffle_buffer_rows=cfg.data.shuffle_buffer_rows,
        seed=cfg.seed,
        drop_last=True,
        prefetch_batches=cfg.data.prefetch_batches,
    )
    batches = endless(reader)

    def step() -> int:
        _, _, labels = pipeline.progress(batches)
        return int(labels.shape[0])

    shardings = {
        table: info["sharding_type"]
        for tables in plan_to_json(plan).values()
        for table, info in tables.items()
    }
    return OursStep(step, shardings)


def ours_rank(run: TrainRun) -> Dict[str, Any]:
    """One rank of our path: build, shard, then time ``run.timing`` windows of pipelined steps."""
    start = time.perf_counter()
    ours = ours_step(run)
    setup_s = time.perf_counter() - start
    return rank_record(timed_windows(ours.step, run.timing), setup_s, sharding=ours.sharding)
