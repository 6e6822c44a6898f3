"""Tensors passed from the embedding layer to the dense experts (the sparse -> dense boundary)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


@dataclass
class ExpertInputs:
    """What every expert and multi-task architecture receives.

    Args:
        fields: pooled field embeddings ``[B, F, D]`` in schema field order (before any
            normalisation; MemoNet concatenates these raw).
        flat: the normalised flat embedding ``[B, F*D]`` (the reference code's inference-mode
            BatchNorm, i.e. a learnable per-dim affine map); input of GDCN, MaskNet, DCN, MLP.
        pair_ids: MemoNet addressing ids, one KJT key ``"memonet_pairs"`` with ``P * num_hash``
            ids per row (``P`` = number of hashed field pairs), or None when no MemoNet expert
            is configured.
    """

    fields: torch.Tensor
    flat: torch.Tensor
    pair_ids: Optional[KeyedJaggedTensor] = None

    @property
    def batch_size(self) -> int:
        return int(self.fields.shape[0])
