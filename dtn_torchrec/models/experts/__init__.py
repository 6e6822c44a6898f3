"""Feature-interaction experts: each maps ``ExpertInputs`` to ``[B, H]`` (``output_dim``)."""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from dtn_torchrec.data.schema import SchemaSpec
from dtn_torchrec.models.experts.config import ExpertConfig
from dtn_torchrec.models.experts.dcn import DCNExpert
from dtn_torchrec.models.experts.gdcn import GDCNExpert
from dtn_torchrec.models.experts.masknet import MaskNetExpert
from dtn_torchrec.models.experts.memonet import MemoNetExpert
from dtn_torchrec.models.experts.mlp import MLPExpert
from dtn_torchrec.models.pair_hash import PairHashConfig

__all__ = [
    "DCNExpert",
    "ExpertConfig",
    "GDCNExpert",
    "MaskNetExpert",
    "MemoNetExpert",
    "MLPExpert",
    "build_expert",
    "memonet_pair_hash",
]


def memonet_pair_hash(configs: Iterable[ExpertConfig], schema: SchemaSpec) -> Optional[PairHashConfig]:
    """The single pair-hash addressing shared by all MemoNet experts, resolved against ``schema``.

    The sparse arch hashes pairs once per batch, so every MemoNet expert must agree on fields,
    ``num_hash`` and ``num_buckets``.

    Returns:
        Optional[PairHashConfig]: None when no expert is a MemoNet.

    Raises:
        ValueError: MemoNet experts with different addressing settings.
    """
    found: Optional[PairHashConfig] = None
    for cfg in configs:
        if cfg.kind != "memonet":
            continue
        candidate = PairHashConfig(
            fields=cfg.memonet_fields, num_hash=cfg.num_hash, num_buckets=cfg.num_buckets
        ).resolve(schema)
        if found is not None and candidate != found:
            raise ValueError(
                "all MemoNet experts must share memonet_fields, num_hash and num_buckets "
                f"(the pair ids are computed once): {found} vs {candidate}"
            )
        found = candidate
    return found


def build_expert(
    cfg: ExpertConfig,
    num_fields: int,
    embedding_dim: int,
    *,
    name: str,
    device: Optional[torch.device],
    pair_hash: Optional[PairHashConfig] = None,
) -> nn.Module:
    """Builds one expert.

    Args:
        cfg (ExpertConfig): kind and hyper-parameters.
        num_fields (int): ``F``.
        embedding_dim (int): ``D``.
        name (str): unique expert name (names the MemoNet codebook table).
        device (Optional[torch.device]): where the parameters live; ``meta`` defers allocation
            to ``DistributedModelParallel`` (every module re-initialises in ``reset_parameters``).
        pair_hash (Optional[PairHashConfig]): resolved addressing (``memonet_pair_hash``);
            required for ``kind="memonet"`` and must match the sparse arch's.

    Returns:
        nn.Module: ``forward(ExpertInputs) -> [B, cfg.output_dim]``, with ``output_dim``.
    """
    flat_dim = num_fields * embedding_dim
    if cfg.kind == "mlp":
        return MLPExpert(flat_dim, cfg.hidden_dims, cfg.output_dim, dropout=cfg.dropout, device=device)
    if cfg.kind == "gdcn":
        return GDCNExpert(
            flat_dim,
            cfg.output_dim,
            num_layers=cfg.num_cross_layers,
            structure=cfg.gdcn_structure,
            hidden_dims=cfg.hidden_dims,
            bias_init=cfg.gdcn_bias_init,
            dropout=cfg.dropout,
            device=device,
        )
    if cfg.kind == "dcn":
        return DCNExpert(
            flat_dim,
            cfg.output_dim,
            num_layers=cfg.num_cross_layers,
            low_rank=cfg.dcn_low_rank,
            device=device,
        )
    if cfg.kind == "masknet":
        return MaskNetExpert(
            num_fields,
            embedding_dim,
            mode=cfg.masknet_mode,
            num_blocks=cfg.num_mask_blocks,
            block_dim=cfg.mask_block_dim,
            mask_hidden_dim=cfg.mask_hidden_dim,
            mlp_dims=cfg.masknet_mlp_dims,
            emb_layernorm=cfg.masknet_emb_layernorm,
            dropout=cfg.dropout,
            device=device,
        )
    if cfg.kind == "memonet":
        if pair_hash is None or pair_hash.fields is None:
            raise ValueError(f"expert {name!r}: a MemoNet expert needs the resolved pair_hash config")
        if (pair_hash.num_hash, pair_hash.num_buckets) != (cfg.num_hash, cfg.num_buckets):
            raise ValueError(
                f"expert {name!r}: num_hash/num_buckets {cfg.num_hash}/{cfg.num_buckets} differ from "
                f"the sparse arch's pair hashing {pair_hash.num_hash}/{pair_hash.num_buckets}"
            )
        if cfg.memonet_fields is not None and list(cfg.memonet_fields) != pair_hash.fields:
            raise ValueError(
                f"expert {name!r}: memonet_fields {cfg.memonet_fields} differ from the sparse arch's "
                f"pair hashing fields {pair_hash.fields}"
            )
        return MemoNetExpert(
            num_fields,
            embedding_dim,
            num_crossed_fields=len(pair_hash.fields),
            num_hash=cfg.num_hash,
            num_buckets=cfg.num_buckets,
            codeword_dim=cfg.codeword_dim or embedding_dim,
            output_dim=cfg.output_dim,
            shrink=cfg.shrink,
            name=name,
            device=device,
        )
    raise ValueError(f"expert {name!r}: unknown kind {cfg.kind!r}")
