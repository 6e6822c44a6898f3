"""Builds a :class:`MultiTaskModel` (and its train wrapper) from a :class:`ModelConfig` and a schema."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from dtn_torchrec.data.schema import SchemaSpec
from dtn_torchrec.models.config import ModelConfig
from dtn_torchrec.models.embedding import SparseArch
from dtn_torchrec.models.experts import ExpertConfig, memonet_pair_hash
from dtn_torchrec.models.losses import MultiTaskLoss, ProductRelation
from dtn_torchrec.models.model import MultiTaskModel, MultiTaskTrainWrapper


def build_model(
    cfg: ModelConfig, schema: SchemaSpec, device: Optional[torch.device] = None
) -> MultiTaskModel:
    """The model of ``cfg.architecture`` with one embedding table per ``schema`` field.

    Args:
        cfg (ModelConfig): architecture, tasks, embedding, towers, relation.
        schema (SchemaSpec): fields (table sizes) in model order.
        device (Optional[torch.device]): ``meta`` defers allocation to ``DistributedModelParallel``
            (every module re-initialises itself in ``reset_parameters``); None = CPU.

    Returns:
        MultiTaskModel: ``forward(KJT) -> logits [B, len(cfg.tasks)]``.
    """
    pair_hash = memonet_pair_hash(cfg.expert_configs(), schema)
    sparse_arch = SparseArch(schema, cfg.embedding, pair_hash=pair_hash, device=device)

    def make_expert(
        expert: ExpertConfig, name: str, num_fields: int, embedding_dim: int
    ) -> nn.Module:
        return expert.build(
            num_fields, embedding_dim, name=name, device=device, pair_hash=pair_hash
        )

    dense_arch = cfg.architecture.build(
        cfg.tasks,
        sparse_arch.num_fields,
        sparse_arch.embedding_dim,
        cfg.tower,
        make_expert,
        device=device,
    )
    relation = (
        ProductRelation(cfg.tasks, cfg.loss.product_of) if cfg.loss.relation == "esmm" else None
    )
    return MultiTaskModel(sparse_arch, dense_arch, cfg.tasks, relation)


def build_train_model(
    cfg: ModelConfig, schema: SchemaSpec, device: Optional[torch.device] = None
) -> MultiTaskTrainWrapper:
    """:func:`build_model` wrapped with the configured loss; tasks are matched to schema labels.

    Raises:
        ValueError: a task that is not a label of the dataset.
    """
    missing = [t for t in cfg.tasks if t not in schema.labels]
    if missing:
        raise ValueError(
            f"tasks {missing} are not labels of the dataset (schema labels: {schema.labels})"
        )
    model = build_model(cfg, schema, device)
    loss = MultiTaskLoss(cfg.tasks, cfg.loss.task_weights, cfg.loss.pos_weights)
    return MultiTaskTrainWrapper(model, loss, [schema.labels.index(t) for t in cfg.tasks])
