"""The plain MLP expert (the MMoE / PLE baseline expert)."""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from dtn_torchrec.models.experts.layers import DenseStack
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
            input_dim, list(hidden_dims) + [output_dim], dropout=dropout, init="glorot_uniform", device=device
        )
        self.output_dim = output_dim

    def forward(self, inputs: ExpertInputs) -> torch.Tensor:
        """Args: inputs: ``flat [B, F*D]`` is read. Returns: ``[B, H]``."""
        return self.mlp(inputs.flat)
