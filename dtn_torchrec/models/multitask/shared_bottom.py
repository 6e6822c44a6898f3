"""Shared-bottom: one expert shared by all tasks, one tower per task."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn

from dtn_torchrec.models.experts import ExpertConfig, MLPConfig
from dtn_torchrec.models.multitask.config import ARCHITECTURES, ArchitectureConfig, TowerConfig
from dtn_torchrec.models.multitask.expert_group import ExpertFactory, check_task_names
from dtn_torchrec.models.multitask.towers import build_towers
from dtn_torchrec.models.types import ExpertInputs


class SharedBottom(nn.Module):
    """``logit_t = Tower_t(bottom(x))``.

    Args:
        config (SharedBottomConfig): the bottom expert.
        tasks (List[str]): task names, output column order.
        num_fields (int): ``F``.
        embedding_dim (int): ``D``.
        tower (TowerConfig): per-task tower shape.
        factory (ExpertFactory): builds the bottom.
        device (Optional[torch.device]): where to create the parameters.

    Call args:
        inputs (ExpertInputs): ``fields [B, F, D]``, ``flat [B, F*D]``.

    Returns:
        torch.Tensor: logits ``[B, T]`` in ``tasks`` order.
    """

    def __init__(
        self,
        config: SharedBottomConfig,
        tasks: List[str],
        num_fields: int,
        embedding_dim: int,
        tower: TowerConfig,
        factory: ExpertFactory,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        check_task_names(tasks)
        self._tasks: List[str] = list(tasks)
        self.bottom: nn.Module = factory(config.expert, "shared_bottom", num_fields, embedding_dim)
        self.towers = build_towers(tasks, int(self.bottom.output_dim), tower, device=device)

    def forward(self, inputs: ExpertInputs) -> torch.Tensor:
        h = self.bottom(inputs)
        return torch.cat([self.towers[task](h) for task in self._tasks], dim=1)


@ARCHITECTURES.register("shared_bottom")
@dataclass
class SharedBottomConfig(ArchitectureConfig):
    """``name: shared_bottom``: :class:`SharedBottom`.

    Args:
        expert (ExpertConfig): the bottom shared by every task. Default: an MLP expert.
    """

    expert: ExpertConfig = field(default_factory=MLPConfig)

    def expert_configs(self) -> List[ExpertConfig]:
        return [self.expert]

    def build(
        self,
        tasks: List[str],
        num_fields: int,
        embedding_dim: int,
        tower: TowerConfig,
        factory: ExpertFactory,
        device: Optional[torch.device] = None,
    ) -> SharedBottom:
        return SharedBottom(self, tasks, num_fields, embedding_dim, tower, factory, device=device)
