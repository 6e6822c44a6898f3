"""MaskNet (Wang, She, Zhang, DLP-KDD 2021; docs/model.md, MaskNet)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn

from dtn_torchrec.dataclass_config import check_at_least, check_one_of, check_widths
from dtn_torchrec.models.experts.config import EXPERTS, ExpertConfig, check_dropout
from dtn_torchrec.models.experts.layers import Dense, DenseStack
from dtn_torchrec.models.pair_hash import PairHashConfig
from dtn_torchrec.models.types import ExpertInputs

# tf.contrib.layers.layer_norm's epsilon in the reference MaskBlock.
_BLOCK_LN_EPS = 1e-12


class InstanceGuidedMask(nn.Module):
    """``m = W2 ReLU(W1 v_emb + c1) + c2``; no activation on the mask.

    Args:
        input_dim (int): width of ``v_emb`` (``F*D``).
        hidden_dim (int): aggregation width.
        output_dim (int): width of the masked tensor.
        device (Optional[torch.device]): where the parameters live.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        self.aggregate = Dense(input_dim, hidden_dim, device=device)
        self.project = Dense(hidden_dim, output_dim, device=device)

    def forward(self, v_emb: torch.Tensor) -> torch.Tensor:
        """Args: v_emb: ``[B, F*D]``. Returns: ``[B, output_dim]``."""
        return self.project(torch.relu(self.aggregate(v_emb)))


class MaskBlock(nn.Module):
    """``h = ReLU(LN(W3 (v * m) + c3))`` with ``m`` the instance-guided mask of ``v_emb``.

    Args:
        emb_dim (int): width of ``v_emb`` (mask input).
        input_dim (int): width of the masked input ``v`` (``v_emb`` or the previous block).
        hidden_dim (int): mask aggregation width.
        output_dim (int): block width.
        device (Optional[torch.device]): where the parameters live.
    """

    def __init__(
        self,
        emb_dim: int,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        self.mask = InstanceGuidedMask(emb_dim, hidden_dim, input_dim, device=device)
        self.hidden = Dense(input_dim, output_dim, device=device)
        self.norm = nn.LayerNorm(output_dim, eps=_BLOCK_LN_EPS, device=device)

    def forward(self, v_emb: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Args: v_emb: ``[B, F*D]``; v: ``[B, input_dim]``. Returns: ``[B, output_dim]``."""
        return torch.relu(self.norm(self.hidden(v * self.mask(v_emb))))


class MaskNetExpert(nn.Module):
    """Parallel or serial MaskNet on the flat embedding, followed by a ReLU MLP.

    Parallel (reference): ``MLP([block_1(x, x); ...; block_K(x, x)])``. Serial:
    ``MLP(block_K(x, ... block_1(x, x)))``, every mask computed from ``x``. With
    ``emb_layernorm`` the masked input of the first block(s) is ``LN_D`` of each field's slice of
    ``x`` (one LayerNorm shared by the fields, as in FuxiCTR); masks still read ``x``.

    Args:
        num_fields (int): ``F``.
        embedding_dim (int): ``D``.
        mode (str): ``"parallel"`` or ``"serial"``.
        num_blocks (int): ``K``. Default: 2.
        block_dim (int): MaskBlock width. Default: 128.
        mask_hidden_dim (int): mask aggregation width. Default: 256.
        mlp_dims (List[int]): ReLU MLP widths; the last is the output width ``H``.
        emb_layernorm (bool): per-field LayerNorm before masking. Default: False.
        dropout (float): dropout after each MLP ReLU.
        device (Optional[torch.device]): where the parameters live.
    """

    def __init__(
        self,
        num_fields: int,
        embedding_dim: int,
        mode: str = "parallel",
        num_blocks: int = 2,
        block_dim: int = 128,
        mask_hidden_dim: int = 256,
        mlp_dims: Optional[List[int]] = None,
        emb_layernorm: bool = False,
        dropout: float = 0.0,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        if mode not in ("parallel", "serial"):
            raise ValueError(f"unknown MaskNet mode {mode!r}")
        mlp_dims = [256, 256] if mlp_dims is None else list(mlp_dims)
        emb_dim = num_fields * embedding_dim
        self.mode = mode
        self.num_fields = num_fields
        self.embedding_dim = embedding_dim
        self.emb_norm: Optional[nn.LayerNorm] = (
            nn.LayerNorm(embedding_dim, device=device) if emb_layernorm else None
        )
        if mode == "parallel":
            block_inputs = [emb_dim] * num_blocks
            mlp_in = block_dim * num_blocks
        else:
            block_inputs = [emb_dim] + [block_dim] * (num_blocks - 1)
            mlp_in = block_dim
        self.blocks = nn.ModuleList(
            MaskBlock(emb_dim, d_in, mask_hidden_dim, block_dim, device=device)
            for d_in in block_inputs
        )
        self.mlp = DenseStack(mlp_in, mlp_dims, dropout=dropout, device=device)
        self.output_dim = mlp_dims[-1]

    def forward(self, inputs: ExpertInputs) -> torch.Tensor:
        """Args: inputs: ``flat [B, F*D]`` is read. Returns: ``[B, H]``."""
        x = inputs.flat
        v = x
        if self.emb_norm is not None:
            v = self.emb_norm(x.view(-1, self.num_fields, self.embedding_dim)).flatten(1)
        if self.mode == "parallel":
            h = torch.cat([block(x, v) for block in self.blocks], dim=1)
        else:
            h = v
            for block in self.blocks:
                h = block(x, h)
        return self.mlp(h)


@EXPERTS.register("masknet")
@dataclass
class MaskNetConfig(ExpertConfig):
    """``kind: masknet``: :class:`MaskNetExpert`.

    Args:
        output_dim (int): ``H``; must equal the last of ``mlp_dims``. Default: 256.
        mode (str): ``parallel`` (reference) or ``serial``.
        num_mask_blocks (int): MaskBlocks. Default: 2.
        mask_block_dim (int): MaskBlock output width. Default: 128.
        mask_hidden_dim (int): aggregation width of the instance-guided mask. Default: 256.
        mlp_dims (List[int]): ReLU MLP after the blocks. Default: [256, 256].
        emb_layernorm (bool): per-field LayerNorm on the embedding before masking (MaskNet
            paper / FuxiCTR); off in the reference.
        dropout (float): dropout after each MLP ReLU. Default: 0.
    """

    mode: str = "parallel"
    num_mask_blocks: int = 2
    mask_block_dim: int = 128
    mask_hidden_dim: int = 256
    mlp_dims: List[int] = field(default_factory=lambda: [256, 256])
    emb_layernorm: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_one_of("mode", self.mode, ("parallel", "serial"))
        check_at_least("num_mask_blocks", self.num_mask_blocks, 1)
        check_at_least("mask_block_dim", self.mask_block_dim, 1)
        check_at_least("mask_hidden_dim", self.mask_hidden_dim, 1)
        check_widths("mlp_dims", self.mlp_dims, non_empty=True)
        if self.mlp_dims[-1] != self.output_dim:
            raise ValueError(
                f"mlp_dims: must end with output_dim={self.output_dim}, got {self.mlp_dims}"
            )
        check_dropout(self.dropout)

    def build(
        self,
        num_fields: int,
        embedding_dim: int,
        *,
        name: str,
        device: Optional[torch.device],
        pair_hash: Optional[PairHashConfig] = None,
    ) -> MaskNetExpert:
        return MaskNetExpert(
            num_fields,
            embedding_dim,
            mode=self.mode,
            num_blocks=self.num_mask_blocks,
            block_dim=self.mask_block_dim,
            mask_hidden_dim=self.mask_hidden_dim,
            mlp_dims=self.mlp_dims,
            emb_layernorm=self.emb_layernorm,
            dropout=self.dropout,
            device=device,
        )
