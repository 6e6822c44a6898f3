"""The multi-task model (sparse arch -> multi-task dense arch -> task relation) and its train wrapper."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dtn_torchrec.data.batch import Batch
from dtn_torchrec.models.embedding import SparseArch
from dtn_torchrec.models.losses import MultiTaskLoss, ProductRelation
from dtn_torchrec.models.multitask.precision import Precision, dense_autocast


class MultiTaskModel(nn.Module):
    """Embeddings, a multi-task architecture (shared-bottom, MMoE, PLE, DTN) and a task relation.

    Args:
        sparse_arch (SparseArch): KJT -> ``ExpertInputs``.
        dense_arch (nn.Module): ``ExpertInputs`` -> head logits ``[B, T]``.
        tasks (List[str]): task names, the output columns.
        relation (Optional[ProductRelation]): ESMM-style products of head probabilities, or None.

    Example::

        model = build_model(ModelConfig(MMoEConfig()), schema)
        probs = torch.sigmoid(model(batch.sparse_features))  # [B, T]
    """

    def __init__(
        self,
        sparse_arch: SparseArch,
        dense_arch: nn.Module,
        tasks: List[str],
        relation: Optional[ProductRelation] = None,
    ) -> None:
        super().__init__()
        self.sparse_arch = sparse_arch
        self.dense_arch = dense_arch
        self.relation = relation
        self.tasks: List[str] = list(tasks)
        self.dense_precision: Precision = "fp32"
        self._autocast_device: str = "cpu"

    def set_dense_precision(self, precision: Precision, device_type: str) -> None:
        """Runs ``dense_arch`` in ``precision`` while training: ``bf16`` = autocast on
        ``device_type`` (its logits come back as fp32; the embeddings and the relation stay
        fp32). In eval mode the dense arch runs in fp32, so the metrics a run reports are those
        of the fp32 model that dtn-predict and the export score. The device is fixed here
        because the train pipeline fx-traces ``forward``."""
        self.dense_precision = precision
        self._autocast_device = device_type

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Args: features: one KJT key per schema field. Returns: logits ``[B, T]`` in task order."""
        inputs = self.sparse_arch(features)
        if self.dense_precision == "fp32" or not self.training:
            logits = self.dense_arch(inputs)
        else:
            with dense_autocast(self._autocast_device, self.dense_precision):
                logits = self.dense_arch(inputs)
            logits = logits.float()
        if self.relation is not None:
            logits = self.relation(logits)
        return logits


def select_columns(x: torch.Tensor, columns: List[int]) -> torch.Tensor:
    """``x[:, columns]`` (``[B, C] -> [B, len(columns)]``) without an index tensor built from
    Python data (a host-to-device copy per call): a view when ``columns`` is a leading range,
    else one stack of column views."""
    if columns == list(range(len(columns))):
        return x[:, : len(columns)]
    return torch.stack([x[:, c] for c in columns], dim=1)


class MultiTaskTrainWrapper(nn.Module):
    """Loss around :class:`MultiTaskModel` in TorchRec's ``DLRMTrain`` convention.

    ``forward(batch) -> (loss, (loss.detach(), logits.detach(), labels))``, what
    ``TrainPipelineSparseDist.progress`` expects (it returns the second element).

    Args:
        model (MultiTaskModel): the model.
        loss (MultiTaskLoss): per-task weighted BCE.
        label_columns (List[int]): for each task, its column in ``batch.labels`` (schema label
            order); the returned labels are in task order.
    """

    def __init__(
        self, model: MultiTaskModel, loss: MultiTaskLoss, label_columns: List[int]
    ) -> None:
        super().__init__()
        if len(label_columns) != len(model.tasks):
            raise ValueError(f"need one label column per task {model.tasks}, got {label_columns}")
        self.model = model
        self.loss = loss
        self._label_columns: List[int] = list(label_columns)

    def forward(
        self, batch: Batch
    ) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Args: batch: ``sparse_features`` KJT, ``labels [B, L]``.

        Returns:
            the weighted total loss, and ``(loss.detach(), logits.detach() [B, T], labels [B, T])``.
        """
        logits = self.model(batch.sparse_features)
        labels = select_columns(batch.labels, self._label_columns)
        loss, _ = self.loss(logits, labels)
        return loss, (loss.detach(), logits.detach(), labels)
