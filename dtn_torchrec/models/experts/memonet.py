"""MemoNet / HCNet (Zhang & Zhang, CIKM 2023; docs/model.md, MemoNet).

The codebook is a TorchRec ``EmbeddingBagCollection`` (one table, feature ``"memonet_pairs"``)
addressed by the pair-hash ids the sparse arch computes, one id per bag (a sum over one id is its
row), so ``DistributedModelParallel`` shards it like any other table. Pooled, not a sequence
``EmbeddingCollection``: FBGEMM's CPU backward of a sequence table costs ~3x the pooled one per
row (docs/model.md, MemoNet); a bag of one id gives the same rows and the same fused update.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import List, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import nn
from torchrec.modules import embedding_configs
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dtn_torchrec.dataclass_config import check_at_least, check_one_of
from dtn_torchrec.models.experts.config import EXPERTS, ExpertConfig
from dtn_torchrec.models.experts.layers import Dense
from dtn_torchrec.models.pair_hash import MEMONET_PAIRS_KEY, PairHashConfig, field_pairs
from dtn_torchrec.models.types import ExpertInputs

# Reference codebook init: RandomNormal(0, 0.01).
CODEBOOK_INIT_STD = 0.01


def codebook_table_name(expert_name: str) -> str:
    """Table name of an expert's codebook (unique per expert so every codebook is its own table)."""
    return f"memonet_codebook_{expert_name}"


@torch.compiler.disable
def _lookup(codebook: nn.Module, pair_ids: KeyedJaggedTensor) -> torch.Tensor:
    """Codewords ``[stride, d]`` of ``pair_ids`` (one id per bag). Never compiled
    (``train.compile``): under DMP the codebook is a sharded module whose pipelined forward
    dynamo cannot trace."""
    return codebook(pair_ids)[MEMONET_PAIRS_KEY]


class DistinctIds(NamedTuple):
    """The distinct ids of a pair-id batch: ``ids`` (the same key, the ``U`` distinct ids
    ascending, one per bag: stride ``U``) and ``inverse`` ``[N]``, the position in ``ids`` of
    each of the batch's ``N`` ids."""

    ids: KeyedJaggedTensor
    inverse: torch.Tensor


@torch.fx.wrap  # one node in fx traces: a data-dependent output size
def distinct_ids(pair_ids: KeyedJaggedTensor, num_buckets: int) -> DistinctIds:
    """The distinct ids of ``pair_ids`` (one key, ids in ``[0, num_buckets)``) and the inverse.

    A ``[num_buckets]`` presence mask replaces a sort. On CUDA the number of distinct ids (an
    output size) syncs the host.
    """
    values = pair_ids.values()
    present = torch.zeros(num_buckets, dtype=torch.bool, device=values.device)
    present[values] = True
    distinct = present.nonzero().squeeze(1)  # [U], ascending
    inverse = (torch.cumsum(present, 0) - 1)[values]  # [N]
    num_distinct = distinct.numel()
    ids = KeyedJaggedTensor(
        keys=pair_ids.keys(),
        values=distinct,
        lengths=torch.ones(num_distinct, dtype=torch.int32, device=values.device),
        stride=num_distinct,
        length_per_key=[num_distinct],
        offset_per_key=[0, num_distinct],
    )
    return DistinctIds(ids, inverse)


def pad_bags(ids: KeyedJaggedTensor, num_bags: int) -> KeyedJaggedTensor:
    """``ids`` (one key) with empty bags appended up to a stride of ``num_bags``."""
    pad = num_bags - ids.stride()
    return KeyedJaggedTensor(
        keys=ids.keys(),
        values=ids.values(),
        lengths=torch.cat([ids.lengths(), ids.lengths().new_zeros(pad)]),
        stride=num_bags,
        length_per_key=ids.length_per_key(),
        offset_per_key=ids.offset_per_key(),
    )


class PairIdDedup(nn.Module):
    """The distinct pair ids of a batch (:func:`distinct_ids`), so that the codebook looks
    each row up once.

    FBGEMM's CPU backward costs per bag (one per id); looking up only the distinct ids moves
    the summation of repeated ids' gradients (which the row-wise Adagrad step sums anyway) into
    the backward of :func:`merge_distinct_rows`. The train pipeline (``pipeline_postproc=True``)
    runs this parameter-free module in its data-dist stage, before the codebook's input dist.

    With :attr:`group` set (``shard_model`` does on more than one rank) every rank pads its
    bags with empty ones to the largest count of the group (one all-reduce of a count): the
    ranks' codebook batches then have one size, which row-wise sharding needs (its backward
    all-gathers equal-sized blocks on gloo). The padded rows are zeros and never gathered.

    Args:
        num_buckets (int): codebook rows.

    Call args:
        pair_ids (KeyedJaggedTensor): ``N`` ids of one key.

    Returns:
        DistinctIds: the distinct ids (a KJT of the same key, one id per bag) and the inverse.
    """

    def __init__(self, num_buckets: int) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.group: Optional[dist.ProcessGroup] = None

    @torch.compiler.disable  # data-dependent output size
    def forward(self, pair_ids: KeyedJaggedTensor) -> DistinctIds:
        distinct = distinct_ids(pair_ids, self.num_buckets)
        if self.group is None:
            return distinct
        num_bags = torch.tensor([distinct.ids.stride()])
        dist.all_reduce(num_bags, op=dist.ReduceOp.MAX, group=self.group)
        return DistinctIds(pad_bags(distinct.ids, int(num_bags)), distinct.inverse)


# Rows of the gradient upcast to fp32 at a time in the gather-sum's backward: 4 MiB at d = 64,
# far below glibc's mmap threshold, so the buffers are reused from the heap instead of being
# mapped and faulted in, zero-filled, every step (``train/allocator.py``).
_UPCAST_ROWS = 16384


class _GatherSum(torch.autograd.Function):
    """``sum_k table[:, k][inverse[:, k]]`` ``[M, d]`` in ``table``'s dtype (``table [U, K, d]``,
    ``inverse [M, K]``); the backward sums the gradients of repeated rows in fp32 (a bf16 sum of
    a head id's hundreds would lose them), one ``[U, d]`` accumulator per hash."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.table_shape, ctx.table_dtype = table.shape, table.dtype
        out = table[:, 0].index_select(0, inverse[:, 0])
        for k in range(1, inverse.shape[1]):
            out.add_(table[:, k].index_select(0, inverse[:, k]))
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        num_rows, num_hash, dim = ctx.table_shape
        table_grad = grad.new_empty(ctx.table_shape, dtype=ctx.table_dtype)
        for k in range(num_hash):
            summed = grad.new_zeros((num_rows, dim), dtype=torch.float32)
            for start in range(0, grad.shape[0], _UPCAST_ROWS):
                rows = slice(start, start + _UPCAST_ROWS)
                summed.index_add_(0, inverse[rows, k], grad[rows].float())
            table_grad[:, k].copy_(summed)
        return table_grad, None


@torch.fx.wrap  # one node for the train pipeline's and the export's fx traces
def merge_distinct_rows(
    rows: torch.Tensor, merge_weight: torch.Tensor, inverse: torch.Tensor
) -> torch.Tensor:
    """Linear memory restoring over a batch's distinct codewords.

    ``z'_n = sum_k rows[inverse[n K + k]] W_k^T``, with ``W_k`` the ``k``-th ``[d, d]`` column
    block of ``merge_weight`` ``[d, K*d]``: the merge is linear, so it runs on the ``U``
    distinct rows (``[U, d] x [d, K*d]``, one GEMM) before the gather, not on the batch's
    ``N = M*K`` codewords; the gather-sum then reads each pair's ``K`` merged rows.

    Args: rows: ``[U, d]``; merge_weight: ``[d, K*d]``; inverse: ``[N]`` positions in ``rows``.
    Returns: ``[M, d]``, in the autocast dtype when autocast is on (the merge GEMM's).
    """
    d_out, d_in = merge_weight.shape[0], rows.shape[1]
    num_hash = merge_weight.shape[1] // d_in
    per_hash = merge_weight.view(d_out, num_hash, d_in).transpose(0, 1).reshape(-1, d_in)
    table = nn.functional.linear(rows, per_hash).view(-1, num_hash, d_out)  # [U, K, d]
    per_pair = inverse.view(-1, num_hash)  # [M, K]
    if torch.jit.is_scripting():  # the export (inference): no autograd Function
        hashes = torch.arange(num_hash, device=inverse.device)
        return table[per_pair, hashes].sum(dim=1)
    return _GatherSum.apply(table, per_pair)


class GlobalAttentiveShrink(nn.Module):
    """GAS: one vector per crossed field, an attention-weighted sum of the pairs containing it.

    ``w = W2 ReLU(W1 flatten(e))`` (bit-level squeeze, vector-level excitation, no biases,
    Glorot-normal) gives one weight per pair from the raw field embeddings ``e``; field ``i``
    gets ``sum_{p ∋ i} w_p z_p``.

    Args:
        num_crossed_fields (int): ``n``.
        squeeze_dim (int): width of ``flatten(e)`` (``F*D``).
        device (Optional[torch.device]): where the parameters live.
    """

    def __init__(
        self, num_crossed_fields: int, squeeze_dim: int, device: Optional[torch.device] = None
    ) -> None:
        super().__init__()
        pairs = field_pairs(num_crossed_fields)
        # Pair indices containing each field, in pair order: [n, n - 1]. A host buffer even for a
        # meta model (DMP materialises meta buffers as zeros); it moves with the module.
        pairs_of_field = [
            [p for p, pair in enumerate(pairs) if i in pair] for i in range(num_crossed_fields)
        ]
        self.register_buffer(
            "pairs_of_field", torch.tensor(pairs_of_field, dtype=torch.long), persistent=False
        )
        self.squeeze = Dense(squeeze_dim, squeeze_dim, bias=False, device=device)
        self.excite = Dense(squeeze_dim, len(pairs), bias=False, device=device)

    def forward(self, fields: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        """Args: fields: raw ``[B, F, D]``; pairs: ``[B, P, d]``. Returns: ``[B, n, d]``."""
        weights = self.excite(torch.relu(self.squeeze(fields.flatten(1))))  # [B, P]
        weighted = pairs * weights.unsqueeze(-1)
        return weighted[:, self.pairs_of_field].sum(dim=2)


class MemoNetExpert(nn.Module):
    """HCNet with linear memory restoring, then ``Dense_H([flatten(e); flatten(z')])``.

    ``z_k = codebook[h_k]`` ``[B, P, d]`` for each hash ``k``; ``z' = [z_1; ...; z_K] W_t``
    (``K*d -> d``, no bias); optionally shrunk by GAS to ``[B, n, d]``; the output projection
    (linear, Glorot-normal, zero bias) also reads the raw field embeddings ``e`` ``[B, F*D]``.

    Args:
        num_fields (int): ``F``.
        embedding_dim (int): ``D``.
        num_crossed_fields (int): ``n``; ``P = n (n - 1) / 2``.
        num_hash (int): ``K``.
        num_buckets (int): codebook rows.
        codeword_dim (int): ``d``.
        output_dim (int): ``H``.
        shrink (str): ``"none"`` or ``"gas"``.
        dedup_ids (bool): look up and merge each batch's distinct ids once (:class:`PairIdDedup`,
            :func:`merge_distinct_rows`).
        name (str): expert name; the codebook table is ``memonet_codebook_<name>``.
        device (Optional[torch.device]): where the parameters live (meta for DMP).
    """

    def __init__(
        self,
        num_fields: int,
        embedding_dim: int,
        num_crossed_fields: int,
        num_hash: int,
        num_buckets: int,
        codeword_dim: int,
        output_dim: int,
        shrink: str = "none",
        dedup_ids: bool = True,
        *,
        name: str,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        if shrink not in ("none", "gas"):
            raise ValueError(f"unknown MemoNet shrink {shrink!r}")
        self.num_pairs = num_crossed_fields * (num_crossed_fields - 1) // 2
        self.num_hash = num_hash
        self.codeword_dim = codeword_dim
        self.codebook = EmbeddingBagCollection(
            tables=[
                embedding_configs.EmbeddingBagConfig(
                    name=codebook_table_name(name),
                    embedding_dim=codeword_dim,
                    num_embeddings=num_buckets,
                    feature_names=[MEMONET_PAIRS_KEY],
                    pooling=embedding_configs.PoolingType.SUM,
                    init_fn=partial(nn.init.normal_, mean=0.0, std=CODEBOOK_INIT_STD),
                )
            ],
            device=device,
        )
        self.dedup: Optional[PairIdDedup] = PairIdDedup(num_buckets) if dedup_ids else None
        self.merge = Dense(
            num_hash * codeword_dim, codeword_dim, bias=False, init="glorot_uniform", device=device
        )
        self.shrink: Optional[GlobalAttentiveShrink] = None
        num_vectors = self.num_pairs
        if shrink == "gas":
            self.shrink = GlobalAttentiveShrink(
                num_crossed_fields, num_fields * embedding_dim, device=device
            )
            num_vectors = num_crossed_fields
        projection_in = num_fields * embedding_dim + num_vectors * codeword_dim
        self.projection = Dense(projection_in, output_dim, device=device)
        self.output_dim = output_dim

    def forward(self, inputs: ExpertInputs) -> torch.Tensor:
        """Args: inputs: raw ``fields [B, F, D]`` and ``pair_ids`` (``P*K`` ids per row) are read.

        Returns:
            torch.Tensor: ``[B, H]``.
        """
        if inputs.pair_ids is None:
            raise ValueError(
                "MemoNetExpert needs ExpertInputs.pair_ids; build SparseArch with pair_hash"
            )
        # Ids are ordered [row][pair][hash]: K consecutive codewords are [z_1; ...; z_K].
        if self.dedup is not None:
            distinct = self.dedup(inputs.pair_ids)
            rows = _lookup(self.codebook, distinct.ids)  # [U, d]
            z = merge_distinct_rows(rows, self.merge.weight, distinct.inverse)
            z = z.view(-1, self.num_pairs, self.codeword_dim)
        else:
            codewords = _lookup(self.codebook, inputs.pair_ids)  # [B*P*K, d]
            z = self.merge(codewords.view(-1, self.num_pairs, self.num_hash * self.codeword_dim))
        if self.shrink is not None:
            z = self.shrink(inputs.fields, z)
        # Dense_H([e; z']) as two GEMMs over the column blocks of its kernel: no [B, F*D + V*d]
        # concatenation (and, under bf16 autocast, no fp32 copy of the bf16 z' to cast back).
        flat, z = inputs.fields.flatten(1), z.flatten(1)
        # One split of the kernel: its backward is one cat (two slices would each zero-fill a
        # kernel-sized gradient and add them).
        w_fields, w_pairs = self.projection.weight.split([flat.shape[1], z.shape[1]], dim=1)
        out = nn.functional.linear(flat, w_fields, self.projection.bias)
        return out + nn.functional.linear(z, w_pairs)


def drop_id_dedup(model: nn.Module) -> None:
    """Every MemoNet expert in ``model`` looks its codebook ids up as they come (no
    :class:`PairIdDedup`): on CUDA the distinct-id count would sync the host every step."""
    for module in model.modules():
        if isinstance(module, MemoNetExpert):
            module.dedup = None


@EXPERTS.register("memonet")
@dataclass
class MemoNetConfig(ExpertConfig):
    """``kind: memonet``: :class:`MemoNetExpert`.

    Every MemoNet expert of a model shares one pair hashing (``fields``, ``num_hash``,
    ``num_buckets``): the pair ids are computed once per batch.

    Args:
        output_dim (int): ``H``. Default: 256.
        fields (Optional[List[str]]): the crossed fields, in hashing order; each must be
            single-valued in the dataset (MemoNet crosses one id per field). None = every
            single-valued schema field; the shipped configs pin them.
        num_buckets (int): codebook rows. Default: 100000.
        num_hash (int): hash functions per pair. Default: 2.
        codeword_dim (Optional[int]): codeword width; None = the embedding dim.
        shrink (str): ``none`` (reference: keep all pair vectors) or ``gas`` (global attentive
            shrinking to one vector per crossed field).
        dedup_ids (bool): look up and merge each batch's distinct pair ids once, then gather
            the merged rows back (same result; the codebook's row-wise Adagrad sums duplicate
            ids' gradients either way). CPU only: on CUDA the distinct-id count would sync the host every step, so
            training there looks the ids up as they come (:func:`drop_id_dedup`). Default: true.
    """

    fields: Optional[List[str]] = None
    num_buckets: int = 100000
    num_hash: int = 2
    codeword_dim: Optional[int] = None
    shrink: str = "none"
    dedup_ids: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fields is not None:
            if len(self.fields) < 2:
                raise ValueError(f"fields: MemoNet crosses at least 2 fields, got {self.fields}")
            if len(set(self.fields)) != len(self.fields):
                raise ValueError(f"fields: duplicate names in {self.fields}")
        check_at_least("num_buckets", self.num_buckets, 1)
        check_at_least("num_hash", self.num_hash, 1)
        if self.codeword_dim is not None:
            check_at_least("codeword_dim", self.codeword_dim, 1)
        check_one_of("shrink", self.shrink, ("none", "gas"))

    def build(
        self,
        num_fields: int,
        embedding_dim: int,
        *,
        name: str,
        device: Optional[torch.device],
        pair_hash: Optional[PairHashConfig] = None,
    ) -> MemoNetExpert:
        if pair_hash is None or pair_hash.fields is None:
            raise ValueError(f"expert {name!r}: a MemoNet expert needs the resolved pair hashing")
        if (pair_hash.num_hash, pair_hash.num_buckets) != (self.num_hash, self.num_buckets):
            raise ValueError(
                f"expert {name!r}: num_hash/num_buckets {self.num_hash}/{self.num_buckets} differ "
                f"from the sparse arch's pair hashing {pair_hash.num_hash}/{pair_hash.num_buckets}"
            )
        if self.fields is not None and list(self.fields) != pair_hash.fields:
            raise ValueError(
                f"expert {name!r}: fields {self.fields} differ from the sparse arch's pair "
                f"hashing fields {pair_hash.fields}"
            )
        return MemoNetExpert(
            num_fields,
            embedding_dim,
            num_crossed_fields=len(pair_hash.fields),
            num_hash=self.num_hash,
            num_buckets=self.num_buckets,
            codeword_dim=self.codeword_dim or embedding_dim,
            output_dim=self.output_dim,
            shrink=self.shrink,
            dedup_ids=self.dedup_ids,
            name=name,
            device=device,
        )
