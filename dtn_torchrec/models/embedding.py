"""The sparse arch: one TorchRec table per schema field, pooled into ``[B, F, D]``.

All field tables live in ONE ``EmbeddingBagCollection`` so that ``DistributedModelParallel``
shards them together; the module can be built on the meta device (the EBC is then never
materialised unsharded, as in TorchRec's DLRM).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Dict, List, Optional

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dtn_torchrec.data.schema import SchemaSpec
from dtn_torchrec.models.managed_collision import (
    FieldTableConfig,
    build_mch_bags,
    resolve_field_tables,
)
from dtn_torchrec.models.pair_hash import PairHashConfig, PairHasher
from dtn_torchrec.models.types import ExpertInputs

_POOLINGS = ("sum", "mean")
_INPUT_NORMS = ("affine", "none")


def list_lengths(features: KeyedJaggedTensor, names: List[str]) -> torch.Tensor:
    """Number of ids of each named key per row, ``[B, len(names)]`` (any KJT key order).

    Keys are selected by Python int (views, then one stack): indexing with a list of positions
    would build an index tensor from Python data and copy it to the device on every call.
    """
    keys = features.keys()
    per_key = features.lengths().view(len(keys), -1)
    if keys[: len(names)] == names:
        return per_key[: len(names)].t()
    return torch.stack([per_key[keys.index(name)] for name in names], dim=1)


# Reads KJT metadata (keys, lengths); keep it a leaf when the train pipeline fx-traces the model.
torch.fx.wrap("list_lengths")


def init_field_table(weight: torch.Tensor, *, std: float) -> torch.Tensor:
    """``N(0, std^2)`` rows, row 0 (missing / out-of-vocabulary ids) zero.

    Row 0 is never looked up in training when every training id is in the vocabulary, so a
    random row 0 would add a fixed random vector for each unseen id at scoring time (a
    train/test shift). Zero makes an unseen id score like a missing one; when the training
    split does map ids to 0 (``--min-count``), the row is trained like any other, as the
    reference's OOV row is.

    Args:
        weight (torch.Tensor): the table ``[num_embeddings, D]``, or the part of it one rank
            holds; its first row is zeroed. A row-wise shard (offered on GPU) does not know
            its offset, so every row-wise shard zeroes its first row: global row 0 in the
            first shard, one real id's row in each other shard, which then trains from zero
            like any row.
        std (float): standard deviation of the rows.
    """
    nn.init.normal_(weight, mean=0.0, std=std)
    if weight.shape[0] > 0:  # a rank holding none of the table gets an empty part
        with torch.no_grad():
            weight[0].zero_()
    return weight


def table_name(field_name: str) -> str:
    """Name of the embedding table of a schema field."""
    return f"t_{field_name}"


@dataclass
class EmbeddingConfig:
    """Field embedding tables and the normalisation of their concatenation.

    Args:
        embedding_dim (int): ``D``, the same for every field. Default: 64.
        pooling (str): ``"sum"`` (reference) or ``"mean"`` over the ids of a multi-valued field;
            mean keeps long histories from swamping the other fields. Empty lists give zeros.
        use_weights (bool): multiply each id's row by its per-id weight (weighted EBC; the KJT
            must carry weights). ``"mean"`` then gives ``sum_i w_i e_i / n`` (``n`` ids).
        init_std (float): table rows are drawn from ``N(0, init_std^2)``. Default: 0.0625.
        input_norm (str): ``"affine"``: the reference's inference-mode BatchNorm, a learnable
            per-dim ``x * gamma / sqrt(1 + 1e-3) + beta`` over ``F*D``; ``"none"``: identity.
        tables (Dict[str, FieldTableConfig]): per-field table options keyed by field name or
            glob pattern, e.g. ``{"*": {collision: mch, size: 100000, eviction: lfu}}``
            (managed-collision tables, see ``managed_collision.py``). Default: none.
    """

    embedding_dim: int = 64
    pooling: str = "sum"
    use_weights: bool = False
    init_std: float = 0.0625
    input_norm: str = "affine"
    tables: Dict[str, FieldTableConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.embedding_dim < 1:
            raise ValueError(f"embedding_dim: must be >= 1, got {self.embedding_dim}")
        if self.pooling not in _POOLINGS:
            raise ValueError(f"pooling: must be one of {list(_POOLINGS)}, got {self.pooling!r}")
        if self.init_std <= 0:
            raise ValueError(f"init_std: must be > 0, got {self.init_std}")
        if self.input_norm not in _INPUT_NORMS:
            raise ValueError(
                f"input_norm: must be one of {list(_INPUT_NORMS)}, got {self.input_norm!r}"
            )


class InferenceBatchNorm(nn.Module):
    """TF1 ``batch_normalization(training=False)`` with untouched moving stats: a per-dim affine.

    ``y = x * gamma / sqrt(1 + eps) + beta`` (moving mean 0, moving variance 1).

    Args:
        num_features (int): size of the last dim (``F*D``).
        eps (float): TF's default epsilon. Default: 1e-3.
        device (Optional[torch.device]): where the parameters live (meta allowed).
    """

    def __init__(
        self, num_features: int, eps: float = 1e-3, device: Optional[torch.device] = None
    ) -> None:
        super().__init__()
        self.scale = 1.0 / math.sqrt(1.0 + eps)
        self.weight = nn.Parameter(torch.empty(num_features, device=device))
        self.bias = nn.Parameter(torch.empty(num_features, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: ``[B, N]``. Returns: ``[B, N]``."""
        return x * (self.weight * self.scale) + self.bias


class SparseArch(nn.Module):
    """Embeds every schema field and, when MemoNet is configured, hashes its field pairs.

    Args:
        schema (SchemaSpec): fields (name, ``num_embeddings``) in model order.
        config (EmbeddingConfig): dim, pooling, weights, init, input normalisation.
        pair_hash (Optional[PairHashConfig]): MemoNet addressing, or None when no MemoNet
            expert exists; resolved against ``schema`` here.
        device (Optional[torch.device]): ``meta`` to defer table allocation to DMP sharding.

    Example::

        arch = SparseArch(schema, EmbeddingConfig(), device=torch.device("meta"))
        inputs = arch(kjt)  # ExpertInputs(fields [B, F, D], flat [B, F*D], pair_ids)
    """

    def __init__(
        self,
        schema: SchemaSpec,
        config: EmbeddingConfig,
        pair_hash: Optional[PairHashConfig] = None,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        if not schema.fields:
            raise ValueError("SparseArch: schema has no fields")
        self.config = config
        self.feature_names: List[str] = schema.field_names
        field_tables = resolve_field_tables(config.tables, self.feature_names)
        mch_fields = [name for name in self.feature_names if field_tables[name].collision == "mch"]
        if schema.id_mapping == "raw" and len(mch_fields) < len(self.feature_names):
            # Raw 64-bit ids index no plain table: they need tables that remap ids themselves.
            plain = [name for name in self.feature_names if name not in mch_fields]
            raise ValueError(
                "the dataset keeps raw ids (dtn-prepare --id-mapping raw), which a plain embedding"
                f" table cannot look up (fields {plain}); give them managed-collision tables"
                " (model.embedding.tables.<field>.collision: mch) or prepare the data with"
                " --id-mapping vocab or hash"
            )
        tables = [
            EmbeddingBagConfig(
                name=table_name(f.name),
                embedding_dim=config.embedding_dim,
                num_embeddings=(
                    field_tables[f.name].size if f.name in mch_fields else f.num_embeddings
                ),
                feature_names=[f.name],
                # Mean is the sum divided by the list length in forward: torch's unsharded
                # EmbeddingBag rejects per-id weights with mode="mean", and one code path keeps
                # sharded and unsharded results identical.
                pooling=PoolingType.SUM,
                # Applied by EBC.reset_parameters and by the sharded EBC after DMP allocates
                # the shards, so meta construction still gets the reference init. An mch table
                # has no missing-id row (its rows change owners), and re-initialises evicted
                # rows with the same function.
                init_fn=(
                    partial(nn.init.normal_, mean=0.0, std=config.init_std)
                    if f.name in mch_fields
                    else partial(init_field_table, std=config.init_std)
                ),
            )
            for f in schema.fields
        ]
        plain_tables = [t for t in tables if t.feature_names[0] not in mch_fields]
        mch_tables = [t for t in tables if t.feature_names[0] in mch_fields]
        self._mch_fields: List[str] = mch_fields
        self.embedding_bag_collection: Optional[EmbeddingBagCollection] = (
            EmbeddingBagCollection(
                tables=plain_tables, is_weighted=config.use_weights, device=device
            )
            if plain_tables
            else None
        )
        self.mch_bags: Optional[nn.Module] = (
            build_mch_bags(mch_tables, field_tables, is_weighted=config.use_weights, device=device)
            if mch_tables
            else None
        )
        flat_dim = len(self.feature_names) * config.embedding_dim
        self.input_norm: nn.Module = (
            InferenceBatchNorm(flat_dim, device=device)
            if config.input_norm == "affine"
            else nn.Identity()
        )
        self.pair_hasher: Optional[PairHasher] = (
            PairHasher(pair_hash.resolve(schema)) if pair_hash is not None else None
        )

    @property
    def pair_hash(self) -> Optional[PairHashConfig]:
        """The resolved MemoNet addressing, or None without a MemoNet expert."""
        return self.pair_hasher.config if self.pair_hasher is not None else None

    @property
    def num_fields(self) -> int:
        return len(self.feature_names)

    @property
    def embedding_dim(self) -> int:
        return self.config.embedding_dim

    def forward(self, features: KeyedJaggedTensor) -> ExpertInputs:
        """Args:
            features (KeyedJaggedTensor): one key per schema field, any key order; carries
                per-id weights iff ``config.use_weights``.

        Returns:
            ExpertInputs: ``fields [B, F, D]`` (raw pooled), ``flat [B, F*D]`` (normalised),
            ``pair_ids`` (KJT ``"memonet_pairs"``) or None.
        """
        if self.config.use_weights and features.weights_or_none() is None:
            raise ValueError(
                "SparseArch: embedding.use_weights is set but the batch carries no per-id weights"
            )
        # Field -> its module's output dict, looked up by name, never by position (a sharded EBC
        # orders its output keys by plan). Only indexed, never iterated: the train pipeline
        # fx-traces this forward, where the dicts are proxies.
        plain_pooled = (
            self.embedding_bag_collection(features).to_dict()
            if self.embedding_bag_collection is not None
            else None
        )
        mch_pooled = self.mch_bags(features)[0].to_dict() if self.mch_bags is not None else None
        fields = torch.stack(
            [
                (mch_pooled if name in self._mch_fields else plain_pooled)[name]
                for name in self.feature_names
            ],
            dim=1,
        )
        if self.config.pooling == "mean":
            lengths = list_lengths(features, self.feature_names).clamp(min=1)
            fields = fields / lengths.unsqueeze(-1).to(fields.dtype)
        flat = self.input_norm(fields.flatten(1))
        pair_ids = self.pair_hasher(features) if self.pair_hasher is not None else None
        return ExpertInputs(fields=fields, flat=flat, pair_ids=pair_ids)
