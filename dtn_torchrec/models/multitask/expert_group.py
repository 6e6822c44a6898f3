"""A set of experts that read the same input and whose outputs are stacked for gating."""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
from torch import nn

from dtn_torchrec.models.experts import ExpertConfig
from dtn_torchrec.models.multitask.fused import fuse_experts, keep_module_keys
from dtn_torchrec.models.types import ExpertInputs

# (config, unique name, num_fields, embedding_dim) -> expert module with ``.output_dim`` whose
# forward maps ExpertInputs to [B, output_dim]. The builder binds ``ExpertConfig.build``, the
# device and the pair hashing.
ExpertFactory = Callable[[ExpertConfig, str, int, int], nn.Module]


class ExpertGroup(nn.Module):
    """``K`` experts over one input, outputs stacked to ``[B, K, H]``.

    Experts of one fusable kind and shape are replaced by one fused module
    (:func:`~dtn_torchrec.models.multitask.fused.fuse_experts`) that owns their stacked weights;
    ``state_dict`` keys stay ``experts.<k>.<param>`` either way.

    Args:
        configs (Sequence[ExpertConfig]): one config per expert.
        names (Sequence[str]): one unique name per expert (MemoNet names its codebook table after it).
        num_fields (int): ``F`` of the expert input.
        embedding_dim (int): ``D`` of the expert input.
        factory (ExpertFactory): builds one expert.
        fuse (bool): fuse the experts when they can be (DTN fuses across groups instead).

    Call args:
        inputs (ExpertInputs): ``fields [B, F, D]``, ``flat [B, F*D]``.

    Returns:
        torch.Tensor: ``[B, K, H]``, experts in ``configs`` order.
    """

    def __init__(
        self,
        configs: Sequence[ExpertConfig],
        names: Sequence[str],
        num_fields: int,
        embedding_dim: int,
        factory: ExpertFactory,
        fuse: bool = True,
    ) -> None:
        super().__init__()
        if len(configs) != len(names) or not configs:
            raise ValueError(
                "need at least one expert and one name per expert, got "
                f"{len(configs)} configs, {len(names)} names"
            )
        experts = [
            factory(cfg, name, num_fields, embedding_dim) for cfg, name in zip(configs, names)
        ]
        dims = {name: int(e.output_dim) for name, e in zip(names, experts)}
        if len(set(dims.values())) != 1:
            raise ValueError(f"experts fused by one gate must share output_dim, got {dims}")
        self.output_dim: int = next(iter(dims.values()))
        self._num_experts: int = len(experts)
        # Expert k under key "k" (the keys of an nn.ModuleList): DTN takes fused ones out.
        self.experts = nn.ModuleDict({str(k): e for k, e in enumerate(experts)})
        self.fused: Optional[nn.Module] = fuse_experts(experts) if fuse else None
        if self.fused is not None:  # experts of one kind and shape: batched GEMMs
            self.experts = nn.ModuleDict()
            keep_module_keys(
                self, "fused", self.fused, [f"experts.{k}" for k in range(len(experts))]
            )

    def __len__(self) -> int:
        return self._num_experts

    def forward(self, inputs: ExpertInputs) -> torch.Tensor:
        if self.fused is not None:
            return self.fused(inputs.flat).transpose(0, 1)
        return torch.stack([expert(inputs) for expert in self.experts.values()], dim=1)


def dense_expert_inputs(x: torch.Tensor) -> ExpertInputs:
    """Wrap a dense ``[B, H]`` representation as a one-field expert input (PLE levels above the first)."""
    return ExpertInputs(fields=x.unsqueeze(1), flat=x, pair_ids=None)


def check_task_names(tasks: List[str], reserved: Sequence[str] = ()) -> None:
    """Task names key module dicts and metric names: they must be unique identifiers."""
    if len(tasks) < 2:
        raise ValueError(f"multi-task models need at least 2 tasks, got {tasks}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"duplicate task names in {tasks}")
    for task in tasks:
        if not task.isidentifier():
            raise ValueError(
                f"task name {task!r} must be an identifier (letters, digits, underscore)"
            )
        if task in reserved:
            raise ValueError(f"task name {task!r} is reserved here ({list(reserved)})")
