"""PLE (Tang et al., RecSys 2020): stacked CGC levels with task-specific and shared experts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

from dtn_torchrec.dataclass_config import check_at_least, check_one_of
from dtn_torchrec.models.experts import ExpertConfig, MemoNetConfig, MLPConfig
from dtn_torchrec.models.multitask.config import (
    ARCHITECTURES,
    GATE_ACTIVATIONS,
    ArchitectureConfig,
    TowerConfig,
)
from dtn_torchrec.models.multitask.expert_group import (
    ExpertFactory,
    ExpertGroup,
    check_task_names,
    dense_expert_inputs,
)
from dtn_torchrec.models.multitask.gates import InputGate, gated_sum
from dtn_torchrec.models.multitask.towers import build_towers
from dtn_torchrec.models.types import ExpertInputs

SHARED = "shared"


class PLE(nn.Module):
    """Progressive Layered Extraction.

    At level ``l`` with task inputs ``x_t`` and shared input ``x_s`` (all the embedding at
    ``l = 0``):

    * ``y_t = sum softmax(act(W_t x_t)) * [E_t(x_t) ; E_s(x_s)]`` (own + shared experts),
    * below the last level also ``y_s = sum softmax(act(W_s x_s)) * [E_1 ; .. ; E_T ; E_s]``
      (every expert of the level),

    and ``y_t`` / ``y_s`` are the next level's inputs. ``logit_t = Tower_t(y_t)`` of the last
    level. The softmaxes run over the expert axis (the reference TF code softmaxes an axis of size
    1, which makes every gate weight 1; see docs/model.md, Baselines).

    Args:
        config (PLEConfig): levels, experts per task and shared, expert kind, gate activation.
        tasks (List[str]): task names, output column order.
        num_fields (int): ``F`` of the embedding input.
        embedding_dim (int): ``D`` of the embedding input.
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
        config: PLEConfig,
        tasks: List[str],
        num_fields: int,
        embedding_dim: int,
        tower: TowerConfig,
        factory: ExpertFactory,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        check_task_names(tasks, reserved=(SHARED,))
        self._tasks: List[str] = list(tasks)
        self._num_levels: int = config.num_levels
        self.task_experts = nn.ModuleList()
        self.shared_experts = nn.ModuleList()
        self.task_gates = nn.ModuleList()
        self.shared_gates = nn.ModuleList()
        in_fields, in_dim = num_fields, embedding_dim
        n_task, n_shared = config.task_experts, config.shared_experts
        for level in range(config.num_levels):
            groups = {
                group: ExpertGroup(
                    [config.expert] * (n_shared if group == SHARED else n_task),
                    [
                        f"ple_l{level}_{group}_{k}"
                        for k in range(n_shared if group == SHARED else n_task)
                    ],
                    in_fields,
                    in_dim,
                    factory,
                )
                for group in self._tasks + [SHARED]
            }
            dims = {group: g.output_dim for group, g in groups.items()}
            if len(set(dims.values())) != 1:
                raise ValueError(f"PLE level {level}: experts must share output_dim, got {dims}")
            gate_in = in_fields * in_dim
            self.task_experts.append(nn.ModuleDict({t: groups[t] for t in self._tasks}))
            self.shared_experts.append(groups[SHARED])
            self.task_gates.append(
                nn.ModuleDict(
                    {
                        t: InputGate(
                            gate_in, n_task + n_shared, config.gate_activation, device=device
                        )
                        for t in self._tasks
                    }
                )
            )
            if level < config.num_levels - 1:
                self.shared_gates.append(
                    InputGate(
                        gate_in,
                        len(self._tasks) * n_task + n_shared,
                        config.gate_activation,
                        device=device,
                    )
                )
            in_fields, in_dim = 1, dims[SHARED]
        self.towers = build_towers(self._tasks, in_dim, tower, device=device)

    def forward(self, inputs: ExpertInputs) -> torch.Tensor:
        task_inputs: Dict[str, ExpertInputs] = {t: inputs for t in self._tasks}
        shared_input = inputs
        task_outputs: Dict[str, torch.Tensor] = {}
        for level in range(self._num_levels):
            own = {
                t: self.task_experts[level][t](task_inputs[t]) for t in self._tasks
            }  # [B, n_t, H]
            shared = self.shared_experts[level](shared_input)  # [B, n_s, H]
            n_own, n_shared = (
                len(self.task_experts[level][self._tasks[0]]),
                len(self.shared_experts[level]),
            )
            for t in self._tasks:
                weights = self.task_gates[level][t](task_inputs[t].flat)
                task_outputs[t] = gated_sum([own[t], shared], weights, n_own + n_shared)
            if level < self._num_levels - 1:
                every = [own[t] for t in self._tasks] + [shared]
                shared_input = dense_expert_inputs(
                    gated_sum(
                        every,
                        self.shared_gates[level](shared_input.flat),
                        len(self._tasks) * n_own + n_shared,
                    )
                )
                task_inputs = {t: dense_expert_inputs(task_outputs[t]) for t in self._tasks}
        return torch.cat([self.towers[t](task_outputs[t]) for t in self._tasks], dim=1)


@ARCHITECTURES.register("ple")
@dataclass
class PLEConfig(ArchitectureConfig):
    """``name: ple``: :class:`PLE`.

    Args:
        num_levels (int): stacked CGC levels. Default: 2 (reference).
        task_experts (int): task-specific experts per task and level. Default: 3.
        shared_experts (int): shared experts per level. Default: 2.
        expert (ExpertConfig): every expert's config (levels above the first read a ``[B, H]``
            vector). Default: an MLP expert.
        gate_activation (str): ``none`` (PLE paper) or ``relu`` (reference TF baseline).
    """

    num_levels: int = 2
    task_experts: int = 3
    shared_experts: int = 2
    expert: ExpertConfig = field(default_factory=MLPConfig)
    gate_activation: str = "none"

    def __post_init__(self) -> None:
        check_at_least("num_levels", self.num_levels, 1)
        check_at_least("task_experts", self.task_experts, 1)
        check_at_least("shared_experts", self.shared_experts, 1)
        check_one_of("gate_activation", self.gate_activation, GATE_ACTIVATIONS)
        if self.num_levels > 1 and isinstance(self.expert, MemoNetConfig):
            raise ValueError(
                "expert: a memonet expert hashes raw field pairs and cannot read the dense output "
                "of a lower PLE level; use num_levels: 1 or another expert kind"
            )

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
    ) -> PLE:
        return PLE(self, tasks, num_fields, embedding_dim, tower, factory, device=device)
