"""MemoNet multi-hash addressing: hash every second-order field pair of a row into codebook ids.

The reference (docs/model.md, MemoNet) SipHashes the string ``"{i}_{v_i}_{j}_{v_j}"`` of each unordered
field pair ``i < j`` with two keys. Any deterministic, well-mixed integer hash serves the same
purpose, so this module mixes the integers ``(seed, i, v_i, j, v_j)`` with the SplitMix64
finaliser in vectorised int64 arithmetic (no per-row Python). The ids are emitted as a
``KeyedJaggedTensor`` so that each MemoNet codebook is an ordinary TorchRec table that
``DistributedModelParallel`` shards like the field tables.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dtn_torchrec.data.schema import SchemaSpec

MEMONET_PAIRS_KEY = "memonet_pairs"

_MASK64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15
_MIX_1 = 0xBF58476D1CE4E5B9
_MIX_2 = 0x94D049BB133111EB


def _as_int64(value: int) -> int:
    """Reinterprets an unsigned 64-bit constant as the signed value torch.int64 holds."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right_logical(x: torch.Tensor, bits: int) -> torch.Tensor:
    # torch's >> on int64 is arithmetic; masking off the sign-extended bits makes it logical.
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 step on int64 tensors (wrap-around multiply, logical shifts), elementwise."""
    x = x + _as_int64(_GOLDEN_GAMMA)
    x = (x ^ _shift_right_logical(x, 30)) * _as_int64(_MIX_1)
    x = (x ^ _shift_right_logical(x, 27)) * _as_int64(_MIX_2)
    return x ^ _shift_right_logical(x, 31)


def field_pairs(num_fields: int) -> List[Tuple[int, int]]:
    """All unordered pairs ``(i, j)``, ``i < j``, in the order the pair ids are emitted."""
    return list(itertools.combinations(range(num_fields), 2))


@dataclass
class PairHashConfig:
    """Which fields MemoNet crosses and how pairs are hashed.

    Args:
        fields (Optional[List[str]]): fields whose first id enters the pairs, in this order (the
            index ``i`` of a field in this list is hashed). None = every single-valued schema
            field (``max_length <= 1``) in schema order, as in the reference (17 Ali-CCP fields).
        num_hash (int): hash functions per pair (``K``). Default: 2.
        num_buckets (int): codebook rows; ids lie in ``[0, num_buckets)``. Default: 100000.
        seeds (Optional[List[int]]): one seed per hash function; None = ``0 .. K-1``.
    """

    fields: Optional[List[str]] = None
    num_hash: int = 2
    num_buckets: int = 100000
    seeds: Optional[List[int]] = None

    def __post_init__(self) -> None:
        if self.num_hash < 1:
            raise ValueError(f"PairHashConfig.num_hash must be >= 1, got {self.num_hash}")
        if self.num_buckets < 1:
            raise ValueError(f"PairHashConfig.num_buckets must be >= 1, got {self.num_buckets}")
        if self.seeds is not None and len(self.seeds) != self.num_hash:
            raise ValueError(
                f"PairHashConfig.seeds has {len(self.seeds)} entries, num_hash is {self.num_hash}"
            )
        if self.fields is not None and len(set(self.fields)) != len(self.fields):
            raise ValueError(f"PairHashConfig.fields has duplicates: {self.fields}")

    def resolve(self, schema: SchemaSpec) -> "PairHashConfig":
        """Returns a copy with ``fields`` and ``seeds`` filled in and checked against ``schema``."""
        if self.fields is None:
            fields = [f.name for f in schema.fields if f.max_length <= 1]
        else:
            unknown = [f for f in self.fields if f not in schema.field_names]
            if unknown:
                raise ValueError(
                    f"PairHashConfig.fields {unknown} not in schema (fields: {schema.field_names})"
                )
            fields = list(self.fields)
        if len(fields) < 2:
            raise ValueError(f"MemoNet needs at least 2 fields to cross, got {fields}")
        seeds = list(range(self.num_hash)) if self.seeds is None else list(self.seeds)
        return replace(self, fields=fields, seeds=seeds)

    @property
    def num_pairs(self) -> int:
        """``P = n (n - 1) / 2`` for ``n`` resolved fields."""
        if self.fields is None:
            raise ValueError("PairHashConfig.num_pairs needs resolved fields; call resolve(schema)")
        n = len(self.fields)
        return n * (n - 1) // 2


def first_ids(features: KeyedJaggedTensor, fields: List[str]) -> torch.Tensor:
    """The first id of each listed field per row, 0 where the list is empty.

    Args:
        features (KeyedJaggedTensor): batch of ``B`` rows; must contain every key in ``fields``.
        fields (List[str]): keys to read, looked up by name (KJT key order does not matter).

    Returns:
        torch.Tensor: int64 ``[B, n]``.
    """
    columns = []
    for name in fields:
        jt = features[name]
        lengths = jt.lengths()
        # A trailing 0 makes the gather safe when the whole key is empty.
        values = torch.cat([jt.values().long(), lengths.new_zeros(1, dtype=torch.long)])
        starts = jt.offsets()[:-1].long()
        columns.append(torch.where(lengths > 0, values[starts], torch.zeros_like(starts)))
    return torch.stack(columns, dim=1)


class PairHasher(nn.Module):
    """Hashes every crossed-field pair of every row into ``num_hash`` codebook ids.

    ``id[b, p, k] = mix(seed_k, i, v_i, j, v_j) mod num_buckets`` for pair ``p = (i, j)``
    (``field_pairs`` order), where ``v_i`` is the first id of ``fields[i]`` in row ``b``.
    Each id depends only on its own row, pair and seed.

    The module has no trainable parameters and reads only the batch's KJT, so
    ``TrainPipelineSparseDist(pipeline_postproc=True)`` runs it in the sparse-data-dist stage
    and the codebooks' input all-to-all is pipelined like the field tables'. The hash state of
    ``(seed_k, i)`` is precomputed into a buffer, so the forward builds no tensor from Python
    data (no host-to-device copy in the step).

    Args:
        config (PairHashConfig): resolved addressing (``fields`` and ``seeds`` set).

    Call args:
        features (KeyedJaggedTensor): ``B`` rows holding every key of ``config.fields``.

    Returns:
        KeyedJaggedTensor: one key ``"memonet_pairs"``, one id per bag, ``B * P * K`` bags
        ordered ``[row][pair][hash]`` (the pooled codebook returns each id's row), with its
        per-key lengths set.
    """

    def __init__(self, config: PairHashConfig) -> None:
        super().__init__()
        if config.fields is None or config.seeds is None:
            raise ValueError("PairHasher needs a resolved PairHashConfig; call resolve(schema)")
        self.config = config
        self._ids_per_row = config.num_pairs * config.num_hash
        pairs = torch.tensor(field_pairs(len(config.fields)), dtype=torch.long).reshape(-1, 2)
        seed_state = splitmix64(torch.tensor(config.seeds, dtype=torch.long))  # [K]
        # Built on the host even when the model is built on ``meta``: DMP materialises meta
        # buffers as zeros, while host buffers are moved to the rank's device with the module.
        self.register_buffer("left", pairs[:, 0].contiguous(), persistent=False)  # [P]
        self.register_buffer("right", pairs[:, 1].contiguous(), persistent=False)  # [P]
        self.register_buffer(
            "pair_seed_state", splitmix64(seed_state[None, :] ^ pairs[:, :1]), persistent=False
        )  # [P, K]

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        ids = first_ids(features, self.config.fields)  # [B, n]
        h = splitmix64(self.pair_seed_state[None] ^ ids[:, self.left, None])  # [B, P, K]
        h = splitmix64(h ^ self.right[None, :, None])
        h = splitmix64(h ^ ids[:, self.right, None])
        buckets = torch.remainder(h & _as_int64((1 << 63) - 1), self.config.num_buckets)
        num_ids = ids.shape[0] * self._ids_per_row
        return KeyedJaggedTensor(
            keys=[MEMONET_PAIRS_KEY],
            values=buckets.reshape(-1),
            lengths=torch.ones(num_ids, dtype=torch.int32, device=ids.device),
            stride=num_ids,
            length_per_key=[num_ids],
            offset_per_key=[0, num_ids],
        )
