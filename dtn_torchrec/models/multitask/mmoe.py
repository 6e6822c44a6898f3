"""MMoE (Ma et al., KDD 2018): shared experts, one softmax gate per task."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn

from dtn_torchrec.dataclass_config import check_at_least, check_one_of
from dtn_torchrec.models.experts import ExpertConfig, MLPConfig
from dtn_torchrec.models.multitask.config import (
    ARCHITECTURES,
    GATE_ACTIVATIONS,
    ArchitectureConfig,
    TowerConfig,
)
from dtn_torchrec.models.multitask.expert_group import ExpertFactory, ExpertGroup, check_task_names
from dtn_torchrec.models.multitask.fused import fused_input_gates, fused_towers, towers_fusable
from dtn_torchrec.models.multitask.gates import InputGate, task_mixtures, weighted_sum
from dtn_torchrec.models.multitask.towers import build_towers
from dtn_torchrec.models.types import ExpertInputs


class MMoE(nn.Module):
    """``g_t = softmax(act(W_t x))``; task input ``sum_k g_t,k e_k`` (paper) or
    ``concat_k g_t,k e_k`` (the reference TF baseline); ``logit_t = Tower_t(task input)``.

    Args:
        config (MMoEConfig): number and kind of experts, gate activation, combine mode.
        tasks (List[str]): task names, output column order.
        num_fields (int): ``F``.
        embedding_dim (int): ``D``; gates read the flat input ``[B, F*D]``.
        tower (TowerConfig): per-task tower shape.
        factory (ExpertFactory): builds one expert.
        device (Optional[torch.device]): where to create the parameters.

    Call args:
        inputs (ExpertInputs): ``fields [B, F, D]``, ``flat [B, F*D]``.

    Returns:
        torch.Tensor: logits ``[B, T]`` in ``tasks`` order.
    """

    def __init__(
        self,
        config: MMoEConfig,
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
        self._concat: bool = config.combine == "concat"
        n = config.num_experts
        self.experts = ExpertGroup(
            [config.expert] * n,
            [f"mmoe_expert_{k}" for k in range(n)],
            num_fields,
            embedding_dim,
            factory,
        )
        self.gates = nn.ModuleDict(
            {
                task: InputGate(
                    num_fields * embedding_dim, n, config.gate_activation, device=device
                )
                for task in tasks
            }
        )
        tower_in = n * self.experts.output_dim if self._concat else self.experts.output_dim
        self.towers = build_towers(tasks, tower_in, tower, device=device)
        self._fused_heads: bool = towers_fusable([self.towers[t] for t in tasks])

    def forward(self, inputs: ExpertInputs) -> torch.Tensor:
        experts = self.experts(inputs)  # [B, K, H]
        if self._fused_heads:  # all gates in one GEMM, all towers in batched GEMMs
            weights = fused_input_gates(
                [self.gates[t] for t in self._tasks], inputs.flat
            )  # [T, B, K]
            if self._concat:
                task_inputs = (experts.unsqueeze(0) * weights.unsqueeze(-1)).flatten(
                    2
                )  # [T, B, K*H]
            else:
                task_inputs = task_mixtures(
                    experts.transpose(0, 1), weights, len(self.experts)
                )  # [T, B, H]
            return fused_towers([self.towers[t] for t in self._tasks], task_inputs)
        logits: List[torch.Tensor] = []
        for task in self._tasks:
            weights = self.gates[task](inputs.flat)  # [B, K]
            if self._concat:
                task_input = (experts * weights.unsqueeze(-1)).flatten(1)  # [B, K*H]
            else:
                task_input = weighted_sum(experts, weights)  # [B, H]
            logits.append(self.towers[task](task_input))
        return torch.cat(logits, dim=1)


@ARCHITECTURES.register("mmoe")
@dataclass
class MMoEConfig(ArchitectureConfig):
    """``name: mmoe``: :class:`MMoE`.

    Args:
        num_experts (int): shared experts. Default: 8 (reference).
        expert (ExpertConfig): every expert's config. Default: an MLP expert.
        gate_activation (str): ``none`` (MMoE paper) or ``relu`` (reference TF baseline).
        combine (str): task input = gated ``sum`` (paper, ``[B, H]``) or ``concat`` (reference,
            ``[B, K*H]``).
    """

    num_experts: int = 8
    expert: ExpertConfig = field(default_factory=MLPConfig)
    gate_activation: str = "none"
    combine: str = "sum"

    def __post_init__(self) -> None:
        check_at_least("num_experts", self.num_experts, 1)
        check_one_of("gate_activation", self.gate_activation, GATE_ACTIVATIONS)
        check_one_of("combine", self.combine, ("sum", "concat"))

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
    ) -> MMoE:
        return MMoE(self, tasks, num_fields, embedding_dim, tower, factory, device=device)
