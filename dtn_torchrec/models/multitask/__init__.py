"""Multi-task architectures: ``ExpertInputs`` -> per-task logits ``[B, T]``."""

from dtn_torchrec.models.multitask.dtn import DTN
from dtn_torchrec.models.multitask.mmoe import MMoE
from dtn_torchrec.models.multitask.ple import PLE
from dtn_torchrec.models.multitask.shared_bottom import SharedBottom

__all__ = ["DTN", "MMoE", "PLE", "SharedBottom"]
