"""MemoNet / HCNet (Zhang & Zhang, CIKM 2023; dtn-model.md 1.6 and 2.3).

The codebook is a TorchRec ``EmbeddingCollection`` (one table, feature ``"memonet_pairs"``)
addressed by the pair-hash ids the sparse arch computes, so ``DistributedModelParallel`` shards it
like any other table (table/row/column-wise; not data-parallel on CPU).
"""

from __future__ import annotations

from functools import partial
from typing import List, Optional

import torch
from torch import nn
from torchrec.modules import embedding_configs
from torchrec.modules.embedding_modules import EmbeddingCollection

from dtn_torchrec.models.experts.layers import Dense
from dtn_torchrec.models.pair_hash import MEMONET_PAIRS_KEY, field_pairs
from dtn_torchrec.models.types import ExpertInputs

# Reference codebook init: RandomNormal(0, 0.01).
CODEBOOK_INIT_STD = 0.01


def codebook_table_name(expert_name: str) -> str:
    """Table name of an expert's codebook (unique per expert so every codebook is its own table)."""
    return f"memonet_codebook_{expert_name}"


class GlobalAttentiveShrink(nn.Module):
    """GAS: one vector per crossed field, an attention-weighted sum of the pairs containing it.

    ``w = W2 ReLU(W1 flatten(e))`` (bit-level squeeze, vector-level excitation, no biases,
    Glorot-normal) gives one weight per pair from the raw field embeddings ``e``; field ``i``
    gets ``sum_{p ∋ i} w_p z_p``.

    Args:
        num_crossed_fields (int): ``n``.
        squeeze_dim (int): width of ``flatten(e)`` (``F*D``).
        device (Optional[torch.device]): where the parameters live.
    """

    def __init__(
        self, num_crossed_fields: int, squeeze_dim: int, device: Optional[torch.device] = None
    ) -> None:
        super().__init__()
        pairs = field_pairs(num_crossed_fields)
        # Pair indices containing each field, in pair order: [n, n - 1]. A host buffer even for a
        # meta model (DMP materialises meta buffers as zeros); it moves with the module.
        pairs_of_field = [
            [p for p, pair in enumerate(pairs) if i in pair] for i in range(num_crossed_fields)
        ]
        self.register_buffer(
            "pairs_of_field", torch.tensor(pairs_of_field, dtype=torch.long), persistent=False
        )
        self.squeeze = Dense(squeeze_dim, squeeze_dim, bias=False, device=device)
        self.excite = Dense(squeeze_dim, len(pairs), bias=False, device=device)

    def forward(self, fields: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        """Args: fields: raw ``[B, F, D]``; pairs: ``[B, P, d]``. Returns: ``[B, n, d]``."""
        weights = self.excite(torch.relu(self.squeeze(fields.flatten(1))))  # [B, P]
        weighted = pairs * weights.unsqueeze(-1)
        return weighted[:, self.pairs_of_field].sum(dim=2)


class MemoNetExpert(nn.Module):
    """HCNet with linear memory restoring, then ``Dense_H([flatten(e); flatten(z')])``.

    ``z_k = codebook[h_k]`` ``[B, P, d]`` for each hash ``k``; ``z' = [z_1; ...; z_K] W_t``
    (``K*d -> d``, no bias); optionally shrunk by GAS to ``[B, n, d]``; the output projection
    (linear, Glorot-normal, zero bias) also reads the raw field embeddings ``e`` ``[B, F*D]``.

    Args:
        num_fields (int): ``F``.
        embedding_dim (int): ``D``.
        num_crossed_fields (int): ``n``; ``P = n (n - 1) / 2``.
        num_hash (int): ``K``.
        num_buckets (int): codebook rows.
        codeword_dim (int): ``d``.
        output_dim (int): ``H``.
        shrink (str): ``"none"`` or ``"gas"``.
        name (str): expert name; the codebook table is ``memonet_codebook_<name>``.
        device (Optional[torch.device]): where the parameters live (meta for DMP).
    """

    def __init__(
        self,
        num_fields: int,
        embedding_dim: int,
        num_crossed_fields: int,
        num_hash: int,
        num_buckets: int,
        codeword_dim: int,
        output_dim: int,
        shrink: str = "none",
        *,
        name: str,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        if shrink not in ("none", "gas"):
            raise ValueError(f"unknown MemoNet shrink {shrink!r}")
        self.num_pairs = num_crossed_fields * (num_crossed_fields - 1) // 2
        self.num_hash = num_hash
        self.codeword_dim = codeword_dim
        self.codebook = EmbeddingCollection(
            tables=[
                embedding_configs.EmbeddingConfig(
                    name=codebook_table_name(name),
                    embedding_dim=codeword_dim,
                    num_embeddings=num_buckets,
                    feature_names=[MEMONET_PAIRS_KEY],
                    init_fn=partial(nn.init.normal_, mean=0.0, std=CODEBOOK_INIT_STD),
                )
            ],
            device=device,
        )
        self.merge = Dense(
            num_hash * codeword_dim, codeword_dim, bias=False, init="glorot_uniform", device=device
        )
        self.shrink: Optional[GlobalAttentiveShrink] = None
        num_vectors = self.num_pairs
        if shrink == "gas":
            self.shrink = GlobalAttentiveShrink(num_crossed_fields, num_fields * embedding_dim, device=device)
            num_vectors = num_crossed_fields
        projection_in = num_fields * embedding_dim + num_vectors * codeword_dim
        self.projection = Dense(projection_in, output_dim, device=device)
        self.output_dim = output_dim

    def forward(self, inputs: ExpertInputs) -> torch.Tensor:
        """Args: inputs: raw ``fields [B, F, D]`` and ``pair_ids`` (``P*K`` ids per row) are read.

        Returns:
            torch.Tensor: ``[B, H]``.
        """
        if inputs.pair_ids is None:
            raise ValueError("MemoNetExpert needs ExpertInputs.pair_ids; build SparseArch with pair_hash")
        codewords = self.codebook(inputs.pair_ids)[MEMONET_PAIRS_KEY].values()  # [B*P*K, d]
        # Ids are ordered [row][pair][hash], so this is the concat over hashes [z_1; ...; z_K].
        z = self.merge(codewords.view(-1, self.num_pairs, self.num_hash * self.codeword_dim))
        if self.shrink is not None:
            z = self.shrink(inputs.fields, z)
        return self.projection(torch.cat([inputs.fields.flatten(1), z.flatten(1)], dim=1))
