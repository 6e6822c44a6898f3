"""Feature-interaction experts: each maps ``ExpertInputs`` to ``[B, H]`` (``output_dim``).

Each kind's module holds the expert and its config dataclass (``kind: <name>`` in YAML,
registered in :data:`EXPERTS`); importing the module registers the kind.
"""

from __future__ import annotations

from typing import Iterable, Optional

from dtn_torchrec.data.schema import SchemaSpec
from dtn_torchrec.models.experts.config import EXPERTS, ExpertConfig
from dtn_torchrec.models.experts.dcn import DCNConfig, DCNExpert
from dtn_torchrec.models.experts.gdcn import GDCNConfig, GDCNExpert
from dtn_torchrec.models.experts.masknet import MaskNetConfig, MaskNetExpert
from dtn_torchrec.models.experts.memonet import MemoNetConfig, MemoNetExpert
from dtn_torchrec.models.experts.mlp import MLPConfig, MLPExpert
from dtn_torchrec.models.pair_hash import PairHashConfig

__all__ = [
    "DCNConfig",
    "DCNExpert",
    "EXPERTS",
    "ExpertConfig",
    "GDCNConfig",
    "GDCNExpert",
    "MaskNetConfig",
    "MaskNetExpert",
    "MemoNetConfig",
    "MemoNetExpert",
    "MLPConfig",
    "MLPExpert",
    "memonet_pair_hash",
]


def memonet_pair_hash(
    configs: Iterable[ExpertConfig], schema: SchemaSpec
) -> Optional[PairHashConfig]:
    """The single pair-hash addressing shared by all MemoNet experts, resolved against ``schema``.

    The sparse arch hashes pairs once per batch, so every MemoNet expert must agree on
    ``fields``, ``num_hash`` and ``num_buckets``.

    Returns:
        Optional[PairHashConfig]: None when no expert is a MemoNet.

    Raises:
        ValueError: MemoNet experts with different addressing settings, or a crossed field that
            is not in the schema or is multi-valued there.
    """
    found: Optional[PairHashConfig] = None
    for cfg in configs:
        if not isinstance(cfg, MemoNetConfig):
            continue
        for name in cfg.fields or []:
            if name in schema.field_names and schema.field(name).multi_valued:
                raise ValueError(
                    f"MemoNet fields: {name!r} is multi-valued in the dataset (schema.json: "
                    f"longest list {schema.field(name).max_length}); MemoNet crosses one id per "
                    "field: remove it from the memonet expert's fields"
                )
        candidate = PairHashConfig(
            fields=cfg.fields, num_hash=cfg.num_hash, num_buckets=cfg.num_buckets
        ).resolve(schema)
        if found is not None and candidate != found:
            raise ValueError(
                "all MemoNet experts must share fields, num_hash and num_buckets "
                f"(the pair ids are computed once): {found} vs {candidate}"
            )
        found = candidate
    return found
