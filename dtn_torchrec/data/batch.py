"""The unit the reader yields and the training pipeline moves between devices."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


@dataclass
class Batch(Pipelineable):
    """A batch of B rows.

    Args:
        sparse_features: one key per schema field (schema order), ids already mapped; carries
            per-id weights when the reader was asked for them.
        labels: float32 ``[B, T]``, columns in ``schema.labels`` order.
        sample_ids: int64 ``[B]``, the ``sample_id`` of each row.
    """

    sparse_features: KeyedJaggedTensor
    labels: torch.Tensor
    sample_ids: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(
            sparse_features=self.sparse_features.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
            sample_ids=self.sample_ids.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.sparse_features.record_stream(stream)
        self.labels.record_stream(stream)
        self.sample_ids.record_stream(stream)

    def pin_memory(self) -> "Batch":
        return Batch(
            sparse_features=self.sparse_features.pin_memory(),
            labels=self.labels.pin_memory(),
            sample_ids=self.sample_ids.pin_memory(),
        )

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])
