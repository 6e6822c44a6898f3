"""How much each DTN task relies on each feature-interaction module: mean gate weights.

DTN (``models.multitask.dtn``) gives every task two gates, each a softmax over a set of modules:
``own`` over the task's own modules, ``other_shared`` over the other tasks' modules (in task
order, TSN-scaled where configured) followed by the shared group's. Forward hooks on the gate
modules record their ``[B, K]`` outputs, so the model runs unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from dtn_torchrec.analysis.rows import EvalRows, score_rows
from dtn_torchrec.models.model import MultiTaskModel
from dtn_torchrec.models.multitask import ArchitectureConfig
from dtn_torchrec.models.multitask.dtn import DTN, SHARED, DTNConfig

GATE_KINDS = ("own", "other_shared")


@dataclass
class GateUsage:
    """Mean softmax weight of each module in one gate over the evaluation rows.

    Args:
        task: the task whose gate it is.
        gate: ``own`` or ``other_shared``.
        experts: module labels ``<group>/<method>`` in gate order.
        mean: ``[K]`` mean weights (sum to 1).
        std: ``[K]`` standard deviation of the weights over rows.
    """

    task: str
    gate: str
    experts: List[str]
    mean: List[float]
    std: List[float]


def module_labels(config: DTNConfig, group: str) -> List[str]:
    """Labels of a group's modules in DTN's order (method-major, then the ``J`` copies)."""
    kinds = [m.kind for m in config.methods]
    labels = []
    for i, kind in enumerate(kinds):
        for j in range(config.modules_per_method):
            name = kind if kinds.count(kind) == 1 else f"m{i}_{kind}"
            labels.append(f"{group}/{name}" + (f"_{j}" if config.modules_per_method > 1 else ""))
    return labels


def _gate_labels(config: DTNConfig, tasks: List[str], task: str, gate: str) -> List[str]:
    if gate == "own":
        return module_labels(config, task)
    groups = [t for t in tasks if t != task] + [SHARED]
    return [label for g in groups for label in module_labels(config, g)]


class _WeightStats:
    def __init__(self) -> None:
        self.total: Optional[torch.Tensor] = None
        self.squares: Optional[torch.Tensor] = None
        self.rows = 0

    def __call__(self, module: torch.nn.Module, inputs: object, output: torch.Tensor) -> None:
        weights = output.detach().double()
        total, squares = weights.sum(0), (weights * weights).sum(0)
        self.total = total if self.total is None else self.total + total
        self.squares = squares if self.squares is None else self.squares + squares
        self.rows += int(weights.shape[0])


def gate_usage(
    model: MultiTaskModel, config: ArchitectureConfig, rows: EvalRows, batch_size: int
) -> Optional[List[GateUsage]]:
    """Mean gate weights of every DTN task over ``rows``; None when the model is not a DTN.

    Args:
        model: the trained model (eval mode).
        config: its architecture config (``model.dtn``: module labels).
        rows: the evaluation rows.
        batch_size: rows per forward.
    """
    dense = model.dense_arch
    if not isinstance(dense, DTN) or not isinstance(config, DTNConfig):
        return None
    gates = {"own": dense.own_gates, "other_shared": dense.other_gates}
    stats: Dict[tuple, _WeightStats] = {}
    handles = []
    for task in model.tasks:
        for kind in GATE_KINDS:
            stats[(task, kind)] = _WeightStats()
            handles.append(gates[kind][task].register_forward_hook(stats[(task, kind)]))
    try:
        score_rows(model, rows, batch_size)
    finally:
        for handle in handles:
            handle.remove()
    usages = []
    for (task, kind), s in stats.items():
        assert s.total is not None and s.squares is not None
        mean = s.total / s.rows
        std = (s.squares / s.rows - mean * mean).clamp(min=0).sqrt()
        labels = _gate_labels(config, model.tasks, task, kind)
        if len(labels) != mean.numel():
            raise RuntimeError(
                f"gate {task}/{kind} weighs {mean.numel()} modules, expected {labels}"
            )
        usages.append(GateUsage(task, kind, labels, mean.tolist(), std.tolist()))
    return usages
