"""A one-rank gloo process group in the test process, and small sharded models on it.

For tests that need ``DistributedModelParallel`` and ``TrainPipelineSparseDist`` but not several
processes (a world of one still runs the sharded modules' input / output dists).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dtn_torchrec.data.batch import Batch
from dtn_torchrec.data.schema import FieldSpec, SchemaSpec
from dtn_torchrec.distributed.build import build_meta_train_model, build_sharded_model
from dtn_torchrec.distributed.config import (
    DenseOptimizerConfig,
    ShardingConfig,
    SparseOptimizerConfig,
)
from dtn_torchrec.distributed.optimizers import build_dense_optimizer
from dtn_torchrec.models.config import model_config_from_dict

CPU = torch.device("cpu")
BATCH_SIZE = 16
# Schema order differs from nothing in particular; "hist" is multi-valued (mean pooling).
SCHEMA = SchemaSpec(
    fields=[
        FieldSpec("u", num_embeddings=50, max_length=1),
        FieldSpec("hist", num_embeddings=60, max_length=4),
        FieldSpec("i", num_embeddings=40, max_length=1),
        FieldSpec("c", num_embeddings=30, max_length=1),
    ],
    labels=["click", "conversion"],
)
# Tasks in the reverse of the schema's label order: the wrapper reorders label columns.
TASKS = ["conversion", "click"]


def model_section(name: str) -> Dict[str, Any]:
    """A small ``model:`` section: DTN with MemoNet (GAS) and GDCN, or MMoE; mean pooling."""
    raw: Dict[str, Any] = {
        "name": name,
        "tasks": TASKS,
        "embedding": {"embedding_dim": 8, "pooling": "mean"},
        "tower": {"hidden_dims": [8]},
    }
    if name == "dtn":
        raw["dtn"] = {
            "methods": [
                {"kind": "memonet", "output_dim": 8, "num_buckets": 100, "shrink": "gas"},
                {"kind": "gdcn", "output_dim": 8},
            ],
            "tsn": {"conversion": ["click"]},
        }
    return raw


def sharded_train_model(
    name: str, sharding: Optional[ShardingConfig] = None
) -> DistributedModelParallel:
    """The product build path (meta model -> fused row-wise Adagrad -> plan -> DMP) on the CPU
    ranks of the default group."""
    torch.manual_seed(0)
    cfg = model_config_from_dict(model_section(name))
    module = build_meta_train_model(cfg, SCHEMA, SparseOptimizerConfig())
    sharded = build_sharded_model(
        module, sharding or ShardingConfig(), SCHEMA, device=CPU, batch_size=BATCH_SIZE
    )
    return sharded.model


def sparse_dist_pipeline(model: DistributedModelParallel) -> TrainPipelineSparseDist:
    """The training pipeline as the trainer builds it, with the dense Adam optimizer."""
    optimizer = build_dense_optimizer(model, DenseOptimizerConfig()).optimizer
    return TrainPipelineSparseDist(
        model, optimizer, CPU, execute_all_batches=True, pipeline_postproc=True
    )


def random_batch(seed: int, batch_size: int = BATCH_SIZE) -> Batch:
    """A batch shaped like the reader's: schema-order keys, per-key lengths set."""
    g = torch.Generator().manual_seed(seed)
    lengths: List[torch.Tensor] = []
    values: List[torch.Tensor] = []
    for f in SCHEMA.fields:
        if f.max_length == 1:
            n = torch.ones(batch_size, dtype=torch.int32)
        else:
            n = torch.randint(0, f.max_length + 1, (batch_size,), generator=g, dtype=torch.int32)
        lengths.append(n)
        values.append(torch.randint(1, f.num_embeddings, (int(n.sum()),), generator=g))
    features = KeyedJaggedTensor(
        keys=SCHEMA.field_names,
        values=torch.cat(values),
        lengths=torch.cat(lengths),
        stride=batch_size,
        length_per_key=[int(v.numel()) for v in values],
    )
    labels = torch.randint(0, 2, (batch_size, len(SCHEMA.labels)), generator=g).float()
    return Batch(features, labels, torch.arange(batch_size))
