"""Model configuration: plain (nested) dataclasses, loadable from the ``model:`` section of a YAML file.

Example ``model:`` section::

    name: dtn                       # shared_bottom | mmoe | ple | dtn
    tasks: [click, conversion]      # output columns, in this order
    embedding: {embedding_dim: 64, pooling: sum}
    tower: {hidden_dims: [128, 64]}
    dtn:                            # the section named by ``name``, and only that one
      variant: reference            # reference (authors' code) | paper (the figure)
      methods: [{kind: masknet}, {kind: memonet, fields: [...]}, {kind: gdcn}]
      modules_per_method: 1
      tsn: {conversion: [click]}
    loss: {pos_weights: {click: 200, conversion: 3000}}

``name`` picks the architecture config class from :data:`ARCHITECTURES` and ``kind`` each
expert's from :data:`EXPERTS` (tagged unions, see ``dataclass_config``): a key of another kind,
or a section of another architecture, is an error that names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping

from dtn_torchrec.dataclass_config import check_one_of, dataclass_from_dict
from dtn_torchrec.models.embedding import EmbeddingConfig
from dtn_torchrec.models.experts import ExpertConfig
from dtn_torchrec.models.multitask import ARCHITECTURES, ArchitectureConfig, DTNConfig, TowerConfig

RELATIONS = ("none", "esmm")


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
        check_one_of("relation", self.relation, RELATIONS)
        for task, w in self.task_weights.items():
            if w < 0:
                raise ValueError(f"task_weights: {task} must be >= 0, got {w}")
        for task, w in self.pos_weights.items():
            if w <= 0:
                raise ValueError(f"pos_weights: {task} must be > 0, got {w}")
        if self.relation == "esmm" and not self.product_of:
            raise ValueError("product_of: relation 'esmm' needs it, e.g. {conversion: [click]}")


@dataclass
class ModelConfig:
    """A multi-task model.

    Args:
        architecture (ArchitectureConfig): the architecture and its settings; in YAML
            ``name: <architecture>`` plus the section named after it. Default: DTN (reference).
        tasks (List[str]): task (label) names; the model's output columns in this order.
        embedding (EmbeddingConfig): field tables and input normalisation.
        tower (TowerConfig): per-task towers.
        loss (LossConfig): task weights, positive weights, task relation.
    """

    architecture: ArchitectureConfig = field(default_factory=DTNConfig)
    tasks: List[str] = field(default_factory=lambda: ["click", "conversion"])
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    tower: TowerConfig = field(default_factory=TowerConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        if len(self.tasks) < 2:
            raise ValueError(f"tasks: a multi-task model needs at least 2 tasks, got {self.tasks}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks: duplicate names in {self.tasks}")
        for key in ("task_weights", "pos_weights"):
            unknown = sorted(set(getattr(self.loss, key)) - set(self.tasks))
            if unknown:
                raise ValueError(f"loss.{key}: unknown task(s) {unknown} (tasks: {self.tasks})")

    @property
    def name(self) -> str:
        """The architecture's registered name (``dtn``, ``mmoe``, ...)."""
        return ARCHITECTURES.name_of(type(self.architecture))

    def expert_configs(self) -> List[ExpertConfig]:
        """The expert configs the architecture builds (one per distinct kind of use)."""
        return self.architecture.expert_configs()


def model_config_from_dict(data: Mapping[str, Any]) -> ModelConfig:
    """The ``model:`` section of a config file as a :class:`ModelConfig`.

    Raises:
        ConfigError: unknown keys, keys of another expert kind or architecture, wrong types or
            invalid values, naming the dotted key (e.g. ``dtn.methods[1].kind``).
    """
    return dataclass_from_dict(ModelConfig, data)
