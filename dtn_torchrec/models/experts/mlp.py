"""The plain MLP expert (the MMoE / PLE baseline expert)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn

from dtn_torchrec.dataclass_config import check_widths
from dtn_torchrec.models.experts.config import EXPERTS, ExpertConfig, check_dropout
from dtn_torchrec.models.experts.layers import DenseStack
from dtn_torchrec.models.pair_hash import PairHashConfig
from dtn_torchrec.models.types import ExpertInputs


class MLPExpert(nn.Module):
    """``ReLU(Dense)`` layers of widths ``hidden_dims + [output_dim]`` on the flat embedding.

    The output layer is ReLU too, as in the reference MMoE/PLE experts (tf.contrib
    ``fully_connected``: ReLU, Glorot-uniform kernel, zero bias): the expert's output is a
    representation fed to gates and towers, not a logit.

    Args:
        input_dim (int): ``F*D``.
        hidden_dims (List[int]): hidden widths.
        output_dim (int): ``H``.
        dropout (float): dropout after each ReLU. Default: 0.
        device (Optional[torch.device]): where the parameters live.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: List[int],
        output_dim: int,
        dropout: float = 0.0,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        self.mlp = DenseStack(
            input_dim,
            list(hidden_dims) + [output_dim],
            dropout=dropout,
            init="glorot_uniform",
            device=device,
        )
        self.output_dim = output_dim

    def forward(self, inputs: ExpertInputs) -> torch.Tensor:
        """Args: inputs: ``flat [B, F*D]`` is read. Returns: ``[B, H]``."""
        return self.mlp(inputs.flat)


@EXPERTS.register("mlp")
@dataclass
class MLPConfig(ExpertConfig):
    """``kind: mlp``: :class:`MLPExpert` on the flat embedding.

    Args:
        output_dim (int): ``H``. Default: 256.
        hidden_dims (List[int]): hidden widths (at least one). Default: [256].
        dropout (float): dropout after each ReLU. Default: 0.
    """

    hidden_dims: List[int] = field(default_factory=lambda: [256])
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_widths("hidden_dims", self.hidden_dims, non_empty=True)
        check_dropout(self.dropout)

    def build(
        self,
        num_fields: int,
        embedding_dim: int,
        *,
        name: str,
        device: Optional[torch.device],
        pair_hash: Optional[PairHashConfig] = None,
    ) -> MLPExpert:
        return MLPExpert(
            num_fields * embedding_dim,
            self.hidden_dims,
            self.output_dim,
            dropout=self.dropout,
            device=device,
        )
