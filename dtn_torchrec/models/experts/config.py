"""The expert config family: a base class and the registry that maps ``kind`` to a config class.

Each expert kind keeps its config dataclass (its own fields and ``build``) next to its module
(``mlp.py``, ``gdcn.py``, ...), registered with ``@EXPERTS.register("<kind>")``; the package
``__init__`` imports every kind. Adding an expert = one new file + one import there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from dtn_torchrec.dataclass_config import ConfigRegistry, check_at_least
from dtn_torchrec.models.pair_hash import PairHashConfig


@dataclass
class ExpertConfig:
    """Base of the per-kind expert configs; in YAML ``{kind: <kind>, ...its own fields}``.

    Args:
        output_dim (int): ``H``, the expert's output width. Default: 256 (reference).
    """

    kind: ClassVar[str]
    output_dim: int = 256

    def __post_init__(self) -> None:
        check_at_least("output_dim", self.output_dim, 1)

    def build(
        self,
        num_fields: int,
        embedding_dim: int,
        *,
        name: str,
        device: Optional[torch.device],
        pair_hash: Optional[PairHashConfig] = None,
    ) -> nn.Module:
        """The expert module: ``forward(ExpertInputs) -> [B, output_dim]``, with ``.output_dim``.

        Args:
            num_fields (int): ``F``.
            embedding_dim (int): ``D``.
            name (str): unique expert name (names the MemoNet codebook table).
            device (Optional[torch.device]): ``meta`` defers allocation to
                ``DistributedModelParallel`` (every module re-initialises in ``reset_parameters``).
            pair_hash (Optional[PairHashConfig]): the sparse arch's resolved pair hashing
                (MemoNet only).
        """
        raise NotImplementedError(f"{type(self).__name__}.build")


EXPERTS: ConfigRegistry[ExpertConfig] = ConfigRegistry(ExpertConfig, "expert", "kind")


def check_dropout(rate: float) -> None:
    """``__post_init__`` helper for the experts' ``dropout`` field."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout: must be in [0, 1), got {rate}")
