"""Configuration of one feature-interaction expert."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

EXPERT_KINDS = ("mlp", "gdcn", "masknet", "memonet", "dcn")
GDCN_STRUCTURES = ("projection", "stacked", "parallel")
GDCN_BIAS_INITS = ("zeros", "uniform")
MASKNET_MODES = ("parallel", "serial")
MEMONET_SHRINKS = ("none", "gas")


@dataclass
class ExpertConfig:
    """One expert; defaults are the DTN reference values (dtn-model.md 1.4-1.6).

    Args:
        kind (str): ``"mlp" | "gdcn" | "masknet" | "memonet" | "dcn"``.
        output_dim (int): ``H``, the expert's output width. Default: 256.
        hidden_dims (List[int]): MLP widths (``mlp``; the MLP branch of gdcn stacked/parallel).
        num_cross_layers (int): cross layers of gdcn / dcn. Default: 2.
        gdcn_structure (str): ``"projection"`` (reference: cross net -> linear),
            ``"stacked"`` (cross -> MLP -> linear), ``"parallel"`` ([cross(x); MLP(x)] -> linear).
        gdcn_bias_init (str): cross bias init, ``"zeros"`` (reference) or ``"uniform"`` U(0, 1)
            (official GDCN).
        masknet_mode (str): ``"parallel"`` (reference) or ``"serial"``.
        num_mask_blocks (int): MaskBlocks. Default: 2.
        mask_block_dim (int): MaskBlock output width. Default: 128.
        mask_hidden_dim (int): aggregation width of the instance-guided mask. Default: 256.
        masknet_mlp_dims (List[int]): ReLU MLP after the blocks; the last width must equal
            ``output_dim``. Default: [256, 256].
        masknet_emb_layernorm (bool): per-field LayerNorm on the embedding before masking
            (MaskNet paper / FuxiCTR); off in the reference.
        num_buckets (int): MemoNet codebook rows. Default: 100000.
        num_hash (int): MemoNet hash functions per pair. Default: 2.
        codeword_dim (Optional[int]): MemoNet codeword width; None = embedding dim.
        shrink (str): ``"none"`` (reference: keep all pair vectors) or ``"gas"`` (global
            attentive shrinking to one vector per crossed field).
        memonet_fields (Optional[List[str]]): crossed fields; None = single-valued fields.
        dcn_low_rank (Optional[int]): rank of the DCNv2 cross matrices; None = full rank.
        dropout (float): dropout after each ReLU layer of an MLP part. Default: 0.
    """

    kind: str = "mlp"
    output_dim: int = 256
    hidden_dims: List[int] = field(default_factory=lambda: [256])
    num_cross_layers: int = 2
    gdcn_structure: str = "projection"
    gdcn_bias_init: str = "zeros"
    masknet_mode: str = "parallel"
    num_mask_blocks: int = 2
    mask_block_dim: int = 128
    mask_hidden_dim: int = 256
    masknet_mlp_dims: List[int] = field(default_factory=lambda: [256, 256])
    masknet_emb_layernorm: bool = False
    num_buckets: int = 100000
    num_hash: int = 2
    codeword_dim: Optional[int] = None
    shrink: str = "none"
    memonet_fields: Optional[List[str]] = None
    dcn_low_rank: Optional[int] = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _one_of("kind", self.kind, EXPERT_KINDS)
        _one_of("gdcn_structure", self.gdcn_structure, GDCN_STRUCTURES)
        _one_of("gdcn_bias_init", self.gdcn_bias_init, GDCN_BIAS_INITS)
        _one_of("masknet_mode", self.masknet_mode, MASKNET_MODES)
        _one_of("shrink", self.shrink, MEMONET_SHRINKS)
        _positive("output_dim", self.output_dim)
        _positive("num_cross_layers", self.num_cross_layers)
        _positive("num_mask_blocks", self.num_mask_blocks)
        _positive("mask_block_dim", self.mask_block_dim)
        _positive("mask_hidden_dim", self.mask_hidden_dim)
        _positive("num_buckets", self.num_buckets)
        _positive("num_hash", self.num_hash)
        for name in ("hidden_dims", "masknet_mlp_dims"):
            dims = getattr(self, name)
            if any(d < 1 for d in dims):
                raise ValueError(f"expert.{name} must be positive widths, got {dims}")
        if self.kind == "mlp" or (self.kind == "gdcn" and self.gdcn_structure != "projection"):
            if not self.hidden_dims:
                raise ValueError(f"expert.hidden_dims must be non-empty for kind={self.kind!r}")
        mlp_dims = self.masknet_mlp_dims
        if self.kind == "masknet" and (not mlp_dims or mlp_dims[-1] != self.output_dim):
            raise ValueError(
                f"expert.masknet_mlp_dims must end with output_dim={self.output_dim}, "
                f"got {self.masknet_mlp_dims}"
            )
        if self.codeword_dim is not None:
            _positive("codeword_dim", self.codeword_dim)
        if self.dcn_low_rank is not None:
            _positive("dcn_low_rank", self.dcn_low_rank)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"expert.dropout must be in [0, 1), got {self.dropout}")


def _one_of(name: str, value: str, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"expert.{name} must be one of {list(allowed)}, got {value!r}")


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"expert.{name} must be >= 1, got {value}")
