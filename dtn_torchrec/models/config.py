"""Model configuration: plain (nested) dataclasses, loadable from the ``model:`` section of a YAML file.

Example ``model:`` section::

    name: dtn                       # shared_bottom | mmoe | ple | dtn
    tasks: [click, conversion]      # output columns, in this order
    embedding: {embedding_dim: 64, pooling: sum}
    tower: {hidden_dims: [128, 64]}
    dtn:
      variant: reference            # reference (authors' code) | paper (the figure)
      methods: [{kind: masknet}, {kind: memonet}, {kind: gdcn}]
      modules_per_method: 1
      tsn: {conversion: [click]}
    loss: {pos_weights: {click: 200, conversion: 3000}}

Only the section named by ``name`` is used; the others keep their defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping

from dtn_torchrec.dataclass_config import dataclass_from_dict
from dtn_torchrec.models.embedding import EmbeddingConfig
from dtn_torchrec.models.experts import ExpertConfig

ARCHITECTURES = ("shared_bottom", "mmoe", "ple", "dtn")
GATE_ACTIVATIONS = ("none", "relu")
MMOE_COMBINES = ("sum", "concat")
DTN_VARIANTS = ("reference", "paper")
RELATIONS = ("none", "esmm")
TOWER_ACTIVATIONS = ("relu", "gelu", "silu", "tanh")



def _one_of(key: str, value: str, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{key} must be one of {list(allowed)}, got {value!r}")


def _at_least_one(key: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{key} must be >= 1, got {value}")


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
        if any(d < 1 for d in self.hidden_dims):
            raise ValueError(f"tower.hidden_dims must be positive widths, got {self.hidden_dims}")
        _one_of("tower.activation", self.activation, TOWER_ACTIVATIONS)


@dataclass
class SharedBottomConfig:
    """Args: expert (ExpertConfig): the bottom shared by every task."""

    expert: ExpertConfig = field(default_factory=ExpertConfig)


@dataclass
class MMoEConfig:
    """Args:
    num_experts (int): shared experts. Default: 8 (reference).
    expert (ExpertConfig): every expert's config.
    gate_activation (str): ``none`` (MMoE paper) or ``relu`` (reference TF baseline).
    combine (str): task input = gated ``sum`` (paper, ``[B, H]``) or ``concat`` (reference,
        ``[B, K*H]``).
    """

    num_experts: int = 8
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    gate_activation: str = "none"
    combine: str = "sum"

    def __post_init__(self) -> None:
        _at_least_one("mmoe.num_experts", self.num_experts)
        _one_of("mmoe.gate_activation", self.gate_activation, GATE_ACTIVATIONS)
        _one_of("mmoe.combine", self.combine, MMOE_COMBINES)


@dataclass
class PLEConfig:
    """Args:
    num_levels (int): stacked CGC levels. Default: 2 (reference).
    task_experts (int): task-specific experts per task and level. Default: 3.
    shared_experts (int): shared experts per level. Default: 2.
    expert (ExpertConfig): every expert's config (levels above the first read a ``[B, H]`` vector).
    gate_activation (str): ``none`` (PLE paper) or ``relu`` (reference TF baseline).
    """

    num_levels: int = 2
    task_experts: int = 3
    shared_experts: int = 2
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    gate_activation: str = "none"

    def __post_init__(self) -> None:
        _at_least_one("ple.num_levels", self.num_levels)
        _at_least_one("ple.task_experts", self.task_experts)
        _at_least_one("ple.shared_experts", self.shared_experts)
        _one_of("ple.gate_activation", self.gate_activation, GATE_ACTIVATIONS)


def _reference_dtn_methods() -> List[ExpertConfig]:
    return [ExpertConfig(kind="masknet"), ExpertConfig(kind="memonet"), ExpertConfig(kind="gdcn")]


@dataclass
class DTNConfig:
    """Args:
    variant (str): ``reference`` (authors' code: per-module output gates, two softmaxes, sum) or
        ``paper`` (the figure: input-driven gates, concat of own and other + shared).
    methods (List[ExpertConfig]): the interaction methods of every group (each task and shared).
        Default: MaskNet, MemoNet, GDCN with reference settings.
    modules_per_method (int): ``J``, modules per method and group. Default: 1 (reference).
    tsn (Dict[str, List[str]]): task -> earlier tasks whose modules it sees multiplied by their
        stop-gradient probability, e.g. ``{conversion: [click]}`` or a chain ``{atc: [click],
        purchase: [atc]}``. Default: ``{conversion: [click]}`` (reference).
    gate_activation (str): on gate logits before the softmax; ``relu`` (reference) or ``none``.
    """

    variant: str = "reference"
    methods: List[ExpertConfig] = field(default_factory=_reference_dtn_methods)
    modules_per_method: int = 1
    tsn: Dict[str, List[str]] = field(default_factory=lambda: {"conversion": ["click"]})
    gate_activation: str = "relu"

    def __post_init__(self) -> None:
        _one_of("dtn.variant", self.variant, DTN_VARIANTS)
        if not self.methods:
            raise ValueError("dtn.methods must list at least one interaction method")
        _at_least_one("dtn.modules_per_method", self.modules_per_method)
        _one_of("dtn.gate_activation", self.gate_activation, GATE_ACTIVATIONS)


@dataclass
class LossConfig:
    """Args:
    task_weights (Dict[str, float]): task -> loss weight; 1.0 for tasks not listed.
    pos_weights (Dict[str, float]): task -> positive-class weight of the BCE; plain BCE for
        tasks not listed (reference: ``{click: 200, conversion: 3000}``).
    relation (str): ``none`` or ``esmm`` (outputs become probability products, see
        ``product_of``).
    product_of (Dict[str, List[str]]): for ``esmm``: task -> tasks whose output probabilities
        multiply its head, e.g. ``{conversion: [click]}`` gives pCTCVR = pCTR * pCVR.
    """

    task_weights: Dict[str, float] = field(default_factory=dict)
    pos_weights: Dict[str, float] = field(default_factory=dict)
    relation: str = "none"
    product_of: Dict[str, List[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _one_of("loss.relation", self.relation, RELATIONS)
        for task, w in self.task_weights.items():
            if w < 0:
                raise ValueError(f"loss.task_weights.{task} must be >= 0, got {w}")
        for task, w in self.pos_weights.items():
            if w <= 0:
                raise ValueError(f"loss.pos_weights.{task} must be > 0, got {w}")
        if self.relation == "esmm" and not self.product_of:
            raise ValueError("loss.relation 'esmm' needs loss.product_of, e.g. {conversion: [click]}")


@dataclass
class ModelConfig:
    """A multi-task model.

    Args:
        name (str): ``shared_bottom | mmoe | ple | dtn``.
        tasks (List[str]): task (label) names; the model's output columns in this order.
        embedding (EmbeddingConfig): field tables and input normalisation.
        tower (TowerConfig): per-task towers.
        shared_bottom, mmoe, ple, dtn: architecture settings; only ``name``'s is used.
        loss (LossConfig): task weights, positive weights, task relation.
    """

    name: str = "dtn"
    tasks: List[str] = field(default_factory=lambda: ["click", "conversion"])
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    tower: TowerConfig = field(default_factory=TowerConfig)
    shared_bottom: SharedBottomConfig = field(default_factory=SharedBottomConfig)
    mmoe: MMoEConfig = field(default_factory=MMoEConfig)
    ple: PLEConfig = field(default_factory=PLEConfig)
    dtn: DTNConfig = field(default_factory=DTNConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        _one_of("name", self.name, ARCHITECTURES)
        if len(self.tasks) < 2:
            raise ValueError(f"tasks: a multi-task model needs at least 2 tasks, got {self.tasks}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks: duplicate names in {self.tasks}")
        for key in ("task_weights", "pos_weights"):
            unknown = sorted(set(getattr(self.loss, key)) - set(self.tasks))
            if unknown:
                raise ValueError(f"loss.{key}: unknown task(s) {unknown} (tasks: {self.tasks})")

    def expert_configs(self) -> List[ExpertConfig]:
        """The expert configs the selected architecture builds (one per distinct kind of use)."""
        if self.name == "shared_bottom":
            return [self.shared_bottom.expert]
        if self.name == "mmoe":
            return [self.mmoe.expert]
        if self.name == "ple":
            return [self.ple.expert]
        return list(self.dtn.methods)


def model_config_from_dict(data: Mapping[str, Any]) -> ModelConfig:
    """The ``model:`` section of a config file as a :class:`ModelConfig`.

    Raises:
        ValueError: unknown keys, wrong types or invalid values, naming the dotted key
            (e.g. ``dtn.methods[1].kind``).
    """
    return dataclass_from_dict(ModelConfig, data)
