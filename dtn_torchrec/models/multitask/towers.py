"""Per-task towers: an MLP over the fused expert representation, ending in one logit."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from dtn_torchrec.models.experts.layers import Dense
from dtn_torchrec.models.multitask.config import TowerConfig

TOWER_ACTIVATIONS: Dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}


class Tower(nn.Module):
    """``in_dim -> hidden_dims (activation) -> 1``; the last layer is linear.

    Reference DTN: ``256 -> 128 -> 64 (ReLU) -> 1``, every layer a TF ``fully_connected``
    (Glorot-uniform kernel, zero bias), which :class:`Dense` reproduces, also when DMP
    re-initialises a meta-device model through ``reset_parameters``.

    Args:
        in_dim (int): size of the fused task representation.
        config (TowerConfig): hidden sizes and activation.
        device (Optional[torch.device]): where to create the parameters.

    Call args:
        x (torch.Tensor): ``[B, in_dim]``.

    Returns:
        torch.Tensor: logits ``[B, 1]``.
    """

    def __init__(
        self, in_dim: int, config: TowerConfig, device: Optional[torch.device] = None
    ) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        for width in config.hidden_dims:
            layers.append(Dense(in_dim, width, init="glorot_uniform", device=device))
            layers.append(TOWER_ACTIVATIONS[config.activation]())
            in_dim = width
        self.mlp = nn.Sequential(*layers)
        self.output = Dense(in_dim, 1, init="glorot_uniform", device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.mlp(x))


def build_towers(
    tasks: List[str], in_dim: int, config: TowerConfig, device: Optional[torch.device] = None
) -> nn.ModuleDict:
    """One :class:`Tower` per task, keyed by task name."""
    return nn.ModuleDict({task: Tower(in_dim, config, device=device) for task in tasks})
