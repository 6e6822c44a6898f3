"""DTN (Deep Multiple Task-specific Feature Interactions Network, arXiv 2408.11611).

Each task and a shared group own ``J`` feature-interaction modules per interaction method
(e.g. MaskNet, MemoNet, GDCN). Task ``t`` fuses its own modules and the other + shared modules with
gates; the Task-Sensitive Network (TSN) multiplies the modules of an earlier task ``s`` by
``stop_gradient(p_s)`` before fusing. Two variants (docs/model.md, DTN):

* ``reference`` (the authors' TF code): per-module scalar gates ``a_k = act(w_k^T e_k + b_k)``
  read each module's output; own modules and other + shared modules are softmaxed separately and
  the two weighted sums are added: ``h_t = sum alpha_k e~_k + sum beta_k e_k^(t)`` (``[B, H]``).
* ``paper`` (the figure): gates read the input, ``softmax(act(W x))`` per group, and the tower
  input is ``concat[GN(own), GN/TSN(other + shared)]`` (``[B, 2H]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

from dtn_torchrec.dataclass_config import check_at_least, check_one_of
from dtn_torchrec.models.experts import (
    ExpertConfig,
    GDCNConfig,
    MaskNetConfig,
    MemoNetConfig,
)
from dtn_torchrec.models.multitask.config import (
    ARCHITECTURES,
    GATE_ACTIVATIONS,
    ArchitectureConfig,
    TowerConfig,
)
from dtn_torchrec.models.multitask.expert_group import ExpertFactory, ExpertGroup, check_task_names
from dtn_torchrec.models.multitask.fused import fuse_experts, keep_module_keys
from dtn_torchrec.models.multitask.gates import ExpertOutputGate, InputGate, weighted_sum
from dtn_torchrec.models.multitask.towers import build_towers
from dtn_torchrec.models.task_graph import dependency_order
from dtn_torchrec.models.types import ExpertInputs

SHARED = "shared"


class DTN(nn.Module):
    """Task-specific feature-interaction groups, gates and TSN.

    Args:
        config (DTNConfig): variant, interaction methods, ``J``, TSN map, gate activation.
        tasks (List[str]): task names, output column order.
        num_fields (int): ``F``.
        embedding_dim (int): ``D``; ``paper`` gates read the flat input ``[B, F*D]``.
        tower (TowerConfig): per-task tower shape.
        factory (ExpertFactory): builds one interaction module.
        device (Optional[torch.device]): where to create the parameters.

    Call args:
        inputs (ExpertInputs): ``fields [B, F, D]``, ``flat [B, F*D]``, ``pair_ids`` (MemoNet).

    Returns:
        torch.Tensor: logits ``[B, T]`` in ``tasks`` order (computed in TSN dependency order).
    """

    def __init__(
        self,
        config: DTNConfig,
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
        self._order: List[str] = dependency_order(self._tasks, config.tsn, "dtn.tsn")
        self._tsn: Dict[str, List[str]] = {t: list(config.tsn.get(t, [])) for t in self._tasks}
        self._paper: bool = config.variant == "paper"

        configs = [m for m in config.methods for _ in range(config.modules_per_method)]
        groups = self._tasks + [SHARED]
        self.groups = nn.ModuleDict()
        for group in groups:
            names = [
                f"dtn_{group}_m{i}_{m.kind}_{j}"
                for i, m in enumerate(config.methods)
                for j in range(config.modules_per_method)
            ]
            self.groups[group] = ExpertGroup(
                configs, names, num_fields, embedding_dim, factory, fuse=False
            )
        dim = self.groups[SHARED].output_dim
        num_own = len(configs)
        # Position k of every group is the same method and shape: one fused module owns their
        # weights (taken out of the groups; state_dict keys stay groups.<g>.experts.<k>.*).
        self.fused_positions = nn.ModuleDict()
        for k in range(num_own):
            fused = fuse_experts([self.groups[g].experts[str(k)] for g in groups])
            if fused is None:
                continue
            self.fused_positions[str(k)] = fused
            for g in groups:
                del self.groups[g].experts[str(k)]
            keep_module_keys(
                self, f"fused_positions.{k}", fused, [f"groups.{g}.experts.{k}" for g in groups]
            )
        self._num_positions: int = num_own
        num_other = len(self._tasks) * num_own  # other tasks' modules + the shared ones

        def gate(num_experts: int) -> nn.Module:
            if self._paper:
                flat_dim = num_fields * embedding_dim
                return InputGate(flat_dim, num_experts, config.gate_activation, device=device)
            return ExpertOutputGate(num_experts, dim, config.gate_activation, device=device)

        self.own_gates = nn.ModuleDict({t: gate(num_own) for t in self._tasks})
        self.other_gates = nn.ModuleDict({t: gate(num_other) for t in self._tasks})
        self.towers = build_towers(
            self._tasks, 2 * dim if self._paper else dim, tower, device=device
        )

    def _group_outputs(self, inputs: ExpertInputs) -> Dict[str, torch.Tensor]:
        """Every group's module outputs ``[B, K, H]``; module ``k`` of all groups at once."""
        groups = self._tasks + [SHARED]
        per_position: List[torch.Tensor] = []  # each [G, B, H]
        for k in range(self._num_positions):
            if str(k) in self.fused_positions:
                per_position.append(self.fused_positions[str(k)](inputs.flat))
            else:
                per_position.append(
                    torch.stack([self.groups[g].experts[str(k)](inputs) for g in groups])
                )
        stacked = torch.stack(per_position, dim=2)  # [G, B, K, H]
        return {g: stacked[i] for i, g in enumerate(groups)}

    def forward(self, inputs: ExpertInputs) -> torch.Tensor:
        modules = self._group_outputs(inputs)  # group -> [B, K, H]
        logits: Dict[str, torch.Tensor] = {}
        for task in self._order:
            others: List[torch.Tensor] = []
            for other in self._tasks:
                if other == task:
                    continue
                if other in self._tsn[task]:
                    # TSN: scale by the earlier task's probability; no gradient flows into it.
                    p_other = torch.sigmoid(logits[other]).detach().unsqueeze(-1)  # [B, 1, 1]
                    others.append(modules[other] * p_other)
                else:
                    others.append(modules[other])
            other_shared = torch.cat(others + [modules[SHARED]], dim=1)
            own = modules[task]
            if self._paper:
                h = torch.cat(
                    [
                        weighted_sum(own, self.own_gates[task](inputs.flat)),
                        weighted_sum(other_shared, self.other_gates[task](inputs.flat)),
                    ],
                    dim=1,
                )
            else:
                h = weighted_sum(own, self.own_gates[task](own)) + weighted_sum(
                    other_shared, self.other_gates[task](other_shared)
                )
            logits[task] = self.towers[task](h)
        return torch.cat([logits[t] for t in self._tasks], dim=1)


def _reference_methods() -> List[ExpertConfig]:
    return [MaskNetConfig(), MemoNetConfig(), GDCNConfig()]


@ARCHITECTURES.register("dtn")
@dataclass
class DTNConfig(ArchitectureConfig):
    """``name: dtn``: :class:`DTN`.

    Args:
        variant (str): ``reference`` (authors' code: per-module output gates, two softmaxes,
            sum) or ``paper`` (the figure: input-driven gates, concat of own and other + shared).
        methods (List[ExpertConfig]): the interaction methods of every group (each task and
            shared). Default: MaskNet, MemoNet, GDCN with reference settings.
        modules_per_method (int): ``J``, modules per method and group. Default: 1 (reference).
        tsn (Dict[str, List[str]]): task -> earlier tasks whose modules it sees multiplied by
            their stop-gradient probability, e.g. ``{conversion: [click]}`` or a chain
            ``{atc: [click], purchase: [atc]}``. Default: ``{conversion: [click]}`` (reference).
        gate_activation (str): on gate logits before the softmax; ``relu`` (reference) or
            ``none``.
    """

    variant: str = "reference"
    methods: List[ExpertConfig] = field(default_factory=_reference_methods)
    modules_per_method: int = 1
    tsn: Dict[str, List[str]] = field(default_factory=lambda: {"conversion": ["click"]})
    gate_activation: str = "relu"

    def __post_init__(self) -> None:
        check_one_of("variant", self.variant, ("reference", "paper"))
        if not self.methods:
            raise ValueError("methods: must list at least one interaction method")
        check_at_least("modules_per_method", self.modules_per_method, 1)
        check_one_of("gate_activation", self.gate_activation, GATE_ACTIVATIONS)

    def expert_configs(self) -> List[ExpertConfig]:
        return list(self.methods)

    def build(
        self,
        tasks: List[str],
        num_fields: int,
        embedding_dim: int,
        tower: TowerConfig,
        factory: ExpertFactory,
        device: Optional[torch.device] = None,
    ) -> DTN:
        return DTN(self, tasks, num_fields, embedding_dim, tower, factory, device=device)
