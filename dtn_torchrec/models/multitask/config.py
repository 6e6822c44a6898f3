"""The architecture config family (a base class and the registry mapping ``name`` to a config
class) and the per-task tower config every architecture shares.

Each architecture keeps its config dataclass (its own fields and ``build``) next to its module,
registered with ``@ARCHITECTURES.register("<name>")``. In YAML the settings of the chosen
architecture sit in the section named after it: ``model: {name: mmoe, mmoe: {...}}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List, Optional

import torch
from torch import nn

from dtn_torchrec.dataclass_config import ConfigRegistry, check_one_of, check_widths
from dtn_torchrec.models.experts import ExpertConfig
from dtn_torchrec.models.multitask.expert_group import ExpertFactory

GATE_ACTIVATIONS = ("none", "relu")
TOWER_ACTIVATIONS = ("relu", "gelu", "silu", "tanh")


@dataclass
class TowerConfig:
    """Per-task tower ``in -> hidden_dims (activation) -> 1`` (last layer linear).

    Args:
        hidden_dims (List[int]): hidden widths. Default: [128, 64] (reference).
        activation (str): ``relu | gelu | silu | tanh``. Default: ``relu``.
    """

    hidden_dims: List[int] = field(default_factory=lambda: [128, 64])
    activation: str = "relu"

    def __post_init__(self) -> None:
        check_widths("hidden_dims", self.hidden_dims)
        check_one_of("activation", self.activation, TOWER_ACTIVATIONS)


@dataclass
class ArchitectureConfig:
    """Base of the per-architecture configs."""

    name: ClassVar[str]

    def expert_configs(self) -> List[ExpertConfig]:
        """The expert configs this architecture builds (one per distinct use)."""
        raise NotImplementedError(f"{type(self).__name__}.expert_configs")

    def build(
        self,
        tasks: List[str],
        num_fields: int,
        embedding_dim: int,
        tower: TowerConfig,
        factory: ExpertFactory,
        device: Optional[torch.device] = None,
    ) -> nn.Module:
        """The dense arch: ``forward(ExpertInputs) -> logits [B, len(tasks)]``.

        Args:
            tasks (List[str]): task names, output column order.
            num_fields (int): ``F``.
            embedding_dim (int): ``D``.
            tower (TowerConfig): per-task tower shape.
            factory (ExpertFactory): builds one expert (binds the device and pair hashing).
            device (Optional[torch.device]): where to create the parameters (``meta`` for DMP).
        """
        raise NotImplementedError(f"{type(self).__name__}.build")


ARCHITECTURES: ConfigRegistry[ArchitectureConfig] = ConfigRegistry(
    ArchitectureConfig, "architecture", "name", section=True
)
