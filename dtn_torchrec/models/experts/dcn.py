"""DCNv2 cross network (Wang et al., WWW 2021), full or low rank, with a linear projection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from dtn_torchrec.dataclass_config import check_at_least
from dtn_torchrec.models.experts.config import EXPERTS, ExpertConfig
from dtn_torchrec.models.experts.layers import Dense
from dtn_torchrec.models.pair_hash import PairHashConfig
from dtn_torchrec.models.types import ExpertInputs


class CrossLayer(nn.Module):
    """``x_{l+1} = x_0 * (W x_l + b) + x_l`` with ``W = U V`` when ``low_rank`` is set.

    Args:
        dim (int): ``N``, width of ``x_0`` and ``x_l``.
        low_rank (Optional[int]): rank ``r`` of ``W`` (``V: N -> r``, ``U: r -> N``); None =
            full ``N x N``.
        device (Optional[torch.device]): where the parameters live.
    """

    def __init__(
        self, dim: int, low_rank: Optional[int] = None, device: Optional[torch.device] = None
    ) -> None:
        super().__init__()
        self.down: Optional[Dense] = None
        if low_rank is None:
            self.up = Dense(dim, dim, bias=True, init="glorot_normal", device=device)
        else:
            self.down = Dense(dim, low_rank, bias=False, init="glorot_normal", device=device)
            self.up = Dense(low_rank, dim, bias=True, init="glorot_normal", device=device)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Args: x0, x: ``[B, N]``. Returns: ``[B, N]``."""
        h = x if self.down is None else self.down(x)
        return x0 * self.up(h) + x


class DCNExpert(nn.Module):
    """``Dense_H(cross^L(x))`` on the flat embedding; the projection is linear.

    Args:
        input_dim (int): ``N = F*D``.
        output_dim (int): ``H``.
        num_layers (int): cross layers. Default: 2.
        low_rank (Optional[int]): rank of each cross matrix; None = full rank.
        device (Optional[torch.device]): where the parameters live.
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        num_layers: int = 2,
        low_rank: Optional[int] = None,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        self.cross_layers = nn.ModuleList(
            CrossLayer(input_dim, low_rank=low_rank, device=device) for _ in range(num_layers)
        )
        self.projection = Dense(input_dim, output_dim, device=device)
        self.output_dim = output_dim

    def forward(self, inputs: ExpertInputs) -> torch.Tensor:
        """Args: inputs: ``flat [B, N]`` is read. Returns: ``[B, H]``."""
        x = inputs.flat
        c = x
        for layer in self.cross_layers:
            c = layer(x, c)
        return self.projection(c)


@EXPERTS.register("dcn")
@dataclass
class DCNConfig(ExpertConfig):
    """``kind: dcn``: :class:`DCNExpert` (DCNv2 cross network, linear projection).

    Args:
        output_dim (int): ``H``. Default: 256.
        num_cross_layers (int): cross layers. Default: 2.
        low_rank (Optional[int]): rank of the cross matrices; None = full rank.
    """

    num_cross_layers: int = 2
    low_rank: Optional[int] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least("num_cross_layers", self.num_cross_layers, 1)
        if self.low_rank is not None:
            check_at_least("low_rank", self.low_rank, 1)

    def build(
        self,
        num_fields: int,
        embedding_dim: int,
        *,
        name: str,
        device: Optional[torch.device],
        pair_hash: Optional[PairHashConfig] = None,
    ) -> DCNExpert:
        return DCNExpert(
            num_fields * embedding_dim,
            self.output_dim,
            num_layers=self.num_cross_layers,
            low_rank=self.low_rank,
            device=device,
        )
