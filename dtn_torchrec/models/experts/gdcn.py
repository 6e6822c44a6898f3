"""GDCN, the gated cross network (Wang et al., CIKM 2023; docs/model.md, GDCN)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn

from dtn_torchrec.dataclass_config import check_at_least, check_one_of, check_widths
from dtn_torchrec.models.experts.config import EXPERTS, ExpertConfig, check_dropout
from dtn_torchrec.models.experts.layers import Dense, DenseStack
from dtn_torchrec.models.pair_hash import PairHashConfig
from dtn_torchrec.models.types import ExpertInputs


class GatedCrossLayer(nn.Module):
    """``c_{l+1} = c_0 * (W_c c_l + b) * sigmoid(W_g c_l) + c_l``; the gate has no bias.

    Args:
        dim (int): ``N``, width of ``c_0`` and ``c_l``.
        bias_init (str): ``"zeros"`` (DTN reference) or ``"uniform"`` U(0, 1) (official GDCN).
        device (Optional[torch.device]): where the parameters live.
    """

    def __init__(
        self, dim: int, bias_init: str = "zeros", device: Optional[torch.device] = None
    ) -> None:
        super().__init__()
        self.bias_init = bias_init
        self.cross = Dense(dim, dim, bias=False, init="glorot_uniform", device=device)
        self.gate = Dense(dim, dim, bias=False, init="glorot_uniform", device=device)
        self.bias = nn.Parameter(torch.empty(dim, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.bias_init == "uniform":
            nn.init.uniform_(self.bias, 0.0, 1.0)
        else:
            nn.init.zeros_(self.bias)

    def forward(self, c0: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Args: c0, c: ``[B, N]``. Returns: ``[B, N]``."""
        return c0 * (self.cross(c) + self.bias) * torch.sigmoid(self.gate(c)) + c


class GDCNExpert(nn.Module):
    """Gated cross network on the flat embedding, with a linear output projection.

    Structures: ``"projection"`` (reference) ``Dense_H(cross(x))``; ``"stacked"``
    ``Dense_H(MLP(cross(x)))``; ``"parallel"`` ``Dense_H([cross(x); MLP(x)])``. The MLP is ReLU
    layers of widths ``hidden_dims``; the final projection is linear (Glorot-normal, zero bias).

    Args:
        input_dim (int): ``N = F*D``.
        output_dim (int): ``H``.
        num_layers (int): gated cross layers. Default: 2.
        structure (str): ``"projection" | "stacked" | "parallel"``.
        hidden_dims (Optional[List[int]]): MLP widths (stacked / parallel only).
        bias_init (str): cross-layer bias init.
        dropout (float): dropout after each MLP ReLU.
        device (Optional[torch.device]): where the parameters live.
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        num_layers: int = 2,
        structure: str = "projection",
        hidden_dims: Optional[List[int]] = None,
        bias_init: str = "zeros",
        dropout: float = 0.0,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        self.structure = structure
        self.cross_layers = nn.ModuleList(
            GatedCrossLayer(input_dim, bias_init=bias_init, device=device)
            for _ in range(num_layers)
        )
        self.mlp: Optional[DenseStack] = None
        projection_in = input_dim
        if structure in ("stacked", "parallel"):
            if not hidden_dims:
                raise ValueError(f"GDCN structure {structure!r} needs hidden_dims")
            self.mlp = DenseStack(input_dim, hidden_dims, dropout=dropout, device=device)
            projection_in = hidden_dims[-1] + (input_dim if structure == "parallel" else 0)
        elif structure != "projection":
            raise ValueError(f"unknown GDCN structure {structure!r}")
        self.projection = Dense(projection_in, output_dim, device=device)
        self.output_dim = output_dim

    def forward(self, inputs: ExpertInputs) -> torch.Tensor:
        """Args: inputs: ``flat [B, N]`` is read. Returns: ``[B, H]``."""
        x = inputs.flat
        c = x
        for layer in self.cross_layers:
            c = layer(x, c)
        if self.mlp is None:
            h = c
        elif self.structure == "stacked":
            h = self.mlp(c)
        else:
            h = torch.cat([c, self.mlp(x)], dim=1)
        return self.projection(h)


@EXPERTS.register("gdcn")
@dataclass
class GDCNConfig(ExpertConfig):
    """``kind: gdcn``: :class:`GDCNExpert`.

    Args:
        output_dim (int): ``H``. Default: 256.
        num_cross_layers (int): gated cross layers. Default: 2.
        structure (str): ``projection`` (reference: cross net -> linear), ``stacked``
            (cross -> MLP -> linear) or ``parallel`` ([cross(x); MLP(x)] -> linear).
        hidden_dims (List[int]): MLP widths of ``stacked`` / ``parallel``. Default: [256].
        bias_init (str): cross bias init, ``zeros`` (reference) or ``uniform`` U(0, 1)
            (official GDCN).
        dropout (float): dropout after each MLP ReLU. Default: 0.
    """

    num_cross_layers: int = 2
    structure: str = "projection"
    hidden_dims: List[int] = field(default_factory=lambda: [256])
    bias_init: str = "zeros"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least("num_cross_layers", self.num_cross_layers, 1)
        check_one_of("structure", self.structure, ("projection", "stacked", "parallel"))
        check_widths("hidden_dims", self.hidden_dims, non_empty=self.structure != "projection")
        check_one_of("bias_init", self.bias_init, ("zeros", "uniform"))
        check_dropout(self.dropout)

    def build(
        self,
        num_fields: int,
        embedding_dim: int,
        *,
        name: str,
        device: Optional[torch.device],
        pair_hash: Optional[PairHashConfig] = None,
    ) -> GDCNExpert:
        return GDCNExpert(
            num_fields * embedding_dim,
            self.output_dim,
            num_layers=self.num_cross_layers,
            structure=self.structure,
            hidden_dims=self.hidden_dims,
            bias_init=self.bias_init,
            dropout=self.dropout,
            device=device,
        )
