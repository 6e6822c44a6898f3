"""The reference: the same model trained the way typical PyTorch recommendation libraries do it.

* Embeddings: one ``nn.EmbeddingBag`` per table (sum pooling, same rows, dims and init;
  ``nn.Embedding`` for sequence tables such as MemoNet's codebooks) with dense gradients, in
  place of the model's TorchRec modules, so the dense part (experts, gates, towers, loss) is the
  very same code.
* Optimiser: one dense ``torch.optim.Adam`` over every parameter, tables included, so each step
  reads and writes every row of every table.
* Data: the whole split read with pyarrow into memory, a ``torch.utils.data.Dataset`` that
  returns one row at a time, and a ``DataLoader`` whose ``collate_fn`` assembles the batch row by
  row in Python.
* Two or more ranks: ``DistributedDataParallel`` over the whole model (table gradients are
  all-reduced densely) and a ``DistributedSampler``.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import replace
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple
from unittest import mock

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from benchmarks.common import TrainRun, rank_record, timed_windows
from dtn_torchrec.data.batch import Batch
from dtn_torchrec.data.schema import SchemaSpec
from dtn_torchrec.models.builder import build_train_model
from dtn_torchrec.models.config import ModelConfig
from dtn_torchrec.models.multitask import MMoE, dtn, expert_group


class PlainEmbeddingBags(nn.Module):
    """Drop-in for an unweighted ``EmbeddingBagCollection``: one ``nn.EmbeddingBag`` per table.

    Args:
        ebc: the collection to imitate (its table configs: rows, dims, features, init).
    """

    def __init__(self, ebc: EmbeddingBagCollection) -> None:
        super().__init__()
        if ebc.is_weighted():
            raise ValueError(
                "the reference has no per-id weights; use a config with use_weights: false"
            )
        self.features: List[Tuple[str, str]] = []
        self.bags = nn.ModuleDict()
        for config in ebc.embedding_bag_configs():
            bag = nn.EmbeddingBag(
                config.num_embeddings, config.embedding_dim, mode="sum", include_last_offset=True
            )
            if config.init_fn is not None:
                with torch.no_grad():
                    config.init_fn(bag.weight)
            self.bags[config.name] = bag
            self.features += [(name, config.name) for name in config.feature_names]

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Returns pooled ``[B, D]`` per feature, as a ``KeyedTensor``."""
        jagged = features.to_dict()
        pooled = [
            self.bags[table](jagged[name].values(), jagged[name].offsets())
            for name, table in self.features
        ]
        return KeyedTensor.from_tensor_list([name for name, _ in self.features], pooled)


class PlainEmbeddings(nn.Module):
    """Drop-in for an ``EmbeddingCollection``: one ``nn.Embedding`` per table (per-id rows)."""

    def __init__(self, ec: EmbeddingCollection) -> None:
        super().__init__()
        self.features: List[Tuple[str, str]] = []
        self.tables = nn.ModuleDict()
        for config in ec.embedding_configs():
            table = nn.Embedding(config.num_embeddings, config.embedding_dim)
            if config.init_fn is not None:
                with torch.no_grad():
                    config.init_fn(table.weight)
            self.tables[config.name] = table
            self.features += [(name, config.name) for name in config.feature_names]

    def forward(self, features: KeyedJaggedTensor) -> Dict[str, JaggedTensor]:
        jagged = features.to_dict()
        return {
            name: JaggedTensor(
                values=self.tables[table](jagged[name].values()), lengths=jagged[name].lengths()
            )
            for name, table in self.features
        }


def build_unfused_train_model(
    model_config: ModelConfig, schema: SchemaSpec, device: torch.device
) -> nn.Module:
    """The train wrapper of ``model_config`` computing its experts, gates and towers module by
    module, in a Python loop, as the PyTorch libraries do (``models/multitask/fused.py`` off:
    the experts are built but never fused). Its ``state_dict`` keys are the fused model's."""
    with (
        mock.patch.object(expert_group, "fuse_experts", lambda experts: None),
        mock.patch.object(dtn, "fuse_experts", lambda experts: None),
    ):
        model = build_train_model(model_config, schema, device=device)
    for sub in model.modules():
        if isinstance(sub, MMoE):
            sub._fused_heads = False
    return model


def reference_model(model_config: ModelConfig, schema: SchemaSpec) -> nn.Module:
    """The train wrapper of ``model_config`` on CPU with plain embedding tables, fp32, its
    dense part module by module (:func:`build_unfused_train_model`).

    The TorchRec tables are never allocated: the dense part is built on CPU over a schema of
    2-row tables, and every EBC / EC is then replaced by a plain twin sized from a ``meta``
    build over the real ``schema``.
    """
    sized = build_train_model(model_config, schema, device=torch.device("meta"))
    tiny = replace(
        schema, fields=[replace(f, num_embeddings=min(f.num_embeddings, 2)) for f in schema.fields]
    )
    model = build_unfused_train_model(model_config, tiny, device=torch.device("cpu"))
    for path, sub in sized.named_modules():
        if isinstance(sub, EmbeddingBagCollection):
            model.set_submodule(path, PlainEmbeddingBags(sub))
        elif isinstance(sub, EmbeddingCollection):
            model.set_submodule(path, PlainEmbeddings(sub))
    return model


class ParquetRows(Dataset):
    """A split read whole with pyarrow; ``dataset[i]`` is row ``i``: ``({field: ids}, labels)``."""

    def __init__(self, root: str, schema: SchemaSpec, split: str) -> None:
        table = pq.read_table(
            schema.split_files(root, split), columns=schema.field_names + schema.labels
        )
        self.fields = schema.field_names
        self.offsets: Dict[str, np.ndarray] = {}
        self.values: Dict[str, np.ndarray] = {}
        for name in self.fields:
            column = table.column(name).combine_chunks()
            self.offsets[name] = column.offsets.to_numpy()
            self.values[name] = column.values.to_numpy()
        self.labels = np.stack(
            [table.column(label).to_numpy() for label in schema.labels], axis=1
        ).astype(np.float32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
        row = {
            name: self.values[name][self.offsets[name][index] : self.offsets[name][index + 1]]
            for name in self.fields
        }
        return row, self.labels[index]


def collate_rows(
    rows: Sequence[Tuple[Dict[str, np.ndarray], np.ndarray]], fields: Sequence[str]
) -> Batch:
    """Stacks rows into a ``Batch``, field by field and row by row."""
    values: List[np.ndarray] = []
    lengths: List[int] = []
    for name in fields:
        for row, _ in rows:
            ids = row[name]
            values.append(ids)
            lengths.append(len(ids))
    labels = torch.from_numpy(np.stack([label for _, label in rows]))
    kjt = KeyedJaggedTensor(
        keys=list(fields),
        values=torch.from_numpy(np.concatenate(values)),
        lengths=torch.tensor(lengths, dtype=torch.int32),
    )
    return Batch(sparse_features=kjt, labels=labels, sample_ids=torch.arange(len(rows)))


class _Collate:
    """Picklable ``collate_fn`` bound to the field order."""

    def __init__(self, fields: Sequence[str]) -> None:
        self.fields = list(fields)

    def __call__(self, rows: Sequence[Tuple[Dict[str, np.ndarray], np.ndarray]]) -> Batch:
        return collate_rows(rows, self.fields)


def reference_batches(
    root: str, schema: SchemaSpec, split: str, batch_size: int, seed: int, workers: int = 0
) -> Iterator[Batch]:
    """Endless shuffled batches of this rank's share of ``split`` (a new order every epoch)."""
    dataset = ParquetRows(root, schema, split)
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    sampler = DistributedSampler(
        dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
    )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=_Collate(schema.field_names),
        drop_last=True,
        num_workers=workers,
    )
    if len(loader) == 0:
        raise ValueError(f"{root}: split {split!r} has fewer than {batch_size} rows per rank")
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        yield from loader


class ReferenceTrainer:
    """One training step of the reference: forward, backward, ``Adam.step`` over everything.

    Args:
        train_model: the ``MultiTaskTrainWrapper`` with plain embeddings (CPU).
        lr: Adam's learning rate.
    """

    def __init__(self, train_model: nn.Module, lr: float) -> None:
        distributed = dist.is_initialized() and dist.get_world_size() > 1
        self.model = DistributedDataParallel(train_model) if distributed else train_model
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.model.train()

    def step(self, batch: Batch) -> int:
        self.optimizer.zero_grad()
        loss, _ = self.model(batch)
        loss.backward()
        self.optimizer.step()
        return batch.batch_size


def reference_step(run: TrainRun, workers: int = 0) -> Callable[[], int]:
    """Builds the reference for ``run`` on this rank; returns one training step (returns the
    samples it trained)."""
    cfg, schema = run.load()
    torch.manual_seed(cfg.seed)
    trainer = ReferenceTrainer(reference_model(cfg.model, schema), lr=cfg.train.dense_optimizer.lr)
    batches = reference_batches(
        run.data, schema, "train", run.batch_size, seed=cfg.seed, workers=workers
    )
    return lambda: trainer.step(next(batches))


def reference_rank(run: TrainRun, workers: int = 0) -> Dict[str, Any]:
    """One rank of the reference: build, load the data, then time ``run.timing`` windows."""
    start = time.perf_counter()
    step = reference_step(run, workers)
    setup_s = time.perf_counter() - start
    return rank_record(timed_windows(step, run.timing), setup_s)
