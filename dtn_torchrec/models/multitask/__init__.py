"""Multi-task architectures: ``ExpertInputs`` -> per-task logits ``[B, T]``.

Importing this package registers every architecture's config in :data:`ARCHITECTURES`.
"""

from dtn_torchrec.models.multitask.config import ARCHITECTURES, ArchitectureConfig, TowerConfig
from dtn_torchrec.models.multitask.dtn import DTN, DTNConfig
from dtn_torchrec.models.multitask.mmoe import MMoE, MMoEConfig
from dtn_torchrec.models.multitask.ple import PLE, PLEConfig
from dtn_torchrec.models.multitask.shared_bottom import SharedBottom, SharedBottomConfig

__all__ = [
    "ARCHITECTURES",
    "ArchitectureConfig",
    "DTN",
    "DTNConfig",
    "MMoE",
    "MMoEConfig",
    "PLE",
    "PLEConfig",
    "SharedBottom",
    "SharedBottomConfig",
    "TowerConfig",
]
