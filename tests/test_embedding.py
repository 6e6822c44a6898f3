"""SparseArch pooling / normalisation / key order / meta construction, and MemoNet pair hashing."""

from __future__ import annotations

import itertools
import math
import random
from typing import Dict, List, Optional

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dtn_torchrec.data.schema import ALICCP_FIELDS, FieldSpec, SchemaSpec
from dtn_torchrec.models.embedding import EmbeddingConfig, SparseArch
from dtn_torchrec.models.pair_hash import (
    MEMONET_PAIRS_KEY,
    PairHashConfig,
    PairHasher,
    field_pairs,
    first_ids,
)

D = 4
SCHEMA = SchemaSpec(
    fields=[
        FieldSpec("u", num_embeddings=7, max_length=1),
        FieldSpec("hist", num_embeddings=11, max_length=4),
        FieldSpec("i", num_embeddings=5, max_length=1),
    ],
    labels=["click"],
)
# Row-major lists per field, rows 0..2; row 1 of "hist" and row 2 of "i" are empty.
LISTS: Dict[str, List[List[int]]] = {
    "u": [[3], [6], [0]],
    "hist": [[1, 4, 10], [], [2, 2]],
    "i": [[4], [1], []],
}
WEIGHTS: Dict[str, List[List[float]]] = {
    "u": [[1.5], [0.5], [2.0]],
    "hist": [[0.2, 1.0, 3.0], [], [0.5, 4.0]],
    "i": [[1.0], [2.5], []],
}


def make_kjt(
    lists: Dict[str, List[List[int]]],
    keys: List[str],
    weights: Optional[Dict[str, List[List[float]]]] = None,
) -> KeyedJaggedTensor:
    """Builds a KJT with the given key order (values key-major, as TorchRec lays them out)."""
    values = [v for k in keys for row in lists[k] for v in row]
    lengths = [len(row) for k in keys for row in lists[k]]
    w = None
    if weights is not None:
        w = torch.tensor([x for k in keys for row in weights[k] for x in row], dtype=torch.float32)
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.tensor(values, dtype=torch.long),
        lengths=torch.tensor(lengths),
        weights=w,
    )


def table(arch: SparseArch, field: str) -> torch.Tensor:
    return arch.embedding_bag_collection.embedding_bags[f"t_{field}"].weight.detach()


def manual_fields(arch: SparseArch, pooling: str, weighted: bool) -> torch.Tensor:
    """[B, F, D] pooled by hand from the table rows."""
    rows = []
    for b in range(3):
        per_field = []
        for name in SCHEMA.field_names:
            ids = LISTS[name][b]
            acc = torch.zeros(D)
            for n, idx in enumerate(ids):
                acc = acc + (WEIGHTS[name][b][n] if weighted else 1.0) * table(arch, name)[idx]
            if pooling == "mean" and ids:
                acc = acc / len(ids)
            per_field.append(acc)
        rows.append(torch.stack(per_field))
    return torch.stack(rows)


@pytest.mark.parametrize("pooling", ["sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True])
def test_fields_equal_manual_pooling(pooling: str, weighted: bool) -> None:
    torch.manual_seed(0)
    arch = SparseArch(
        SCHEMA, EmbeddingConfig(embedding_dim=D, pooling=pooling, use_weights=weighted)
    )
    kjt = make_kjt(LISTS, SCHEMA.field_names, WEIGHTS if weighted else None)
    out = arch(kjt)
    torch.testing.assert_close(out.fields, manual_fields(arch, pooling, weighted))
    assert out.fields[1, 1].abs().sum() == 0 and out.fields[2, 2].abs().sum() == 0  # empty lists
    assert out.pair_ids is None


def test_flat_is_reference_inference_batchnorm() -> None:
    torch.manual_seed(0)
    arch = SparseArch(SCHEMA, EmbeddingConfig(embedding_dim=D))
    with torch.no_grad():
        arch.input_norm.weight.uniform_(0.5, 2.0)
        arch.input_norm.bias.uniform_(-1.0, 1.0)
    out = arch(make_kjt(LISTS, SCHEMA.field_names))
    gamma, beta = arch.input_norm.weight.detach(), arch.input_norm.bias.detach()
    expected = out.fields.detach().reshape(3, -1) * gamma / math.sqrt(1.0 + 1e-3) + beta
    torch.testing.assert_close(out.flat.detach(), expected)

    plain = SparseArch(SCHEMA, EmbeddingConfig(embedding_dim=D, input_norm="none"))
    plain_out = plain(make_kjt(LISTS, SCHEMA.field_names))
    torch.testing.assert_close(plain_out.flat, plain_out.fields.reshape(3, -1))


def test_key_order_does_not_change_output() -> None:
    torch.manual_seed(0)
    arch = SparseArch(
        SCHEMA,
        EmbeddingConfig(embedding_dim=D, pooling="mean", use_weights=True),
        pair_hash=PairHashConfig(),
    )
    ref = arch(make_kjt(LISTS, SCHEMA.field_names, WEIGHTS))
    for keys in itertools.permutations(SCHEMA.field_names):
        out = arch(make_kjt(LISTS, list(keys), WEIGHTS))
        torch.testing.assert_close(out.fields, ref.fields)
        torch.testing.assert_close(out.flat, ref.flat)
        assert torch.equal(out.pair_ids.values(), ref.pair_ids.values())


def test_gradients_reach_used_table_rows_only() -> None:
    torch.manual_seed(0)
    arch = SparseArch(SCHEMA, EmbeddingConfig(embedding_dim=D))
    out = arch(make_kjt(LISTS, SCHEMA.field_names))
    (out.flat.sum() + out.fields.pow(2).sum()).backward()
    for name in SCHEMA.field_names:
        grad = arch.embedding_bag_collection.embedding_bags[f"t_{name}"].weight.grad
        used = {i for row in LISTS[name] for i in row}
        for r in range(grad.shape[0]):
            assert (grad[r].abs().sum() > 0) == (r in used), (name, r)
    assert arch.input_norm.weight.grad.abs().sum() > 0 and arch.input_norm.bias.grad.abs().sum() > 0


def test_tables_follow_schema_and_init_std() -> None:
    schema = SchemaSpec(
        fields=[FieldSpec("big", num_embeddings=20000), FieldSpec("small", 3)], labels=["y"]
    )
    torch.manual_seed(0)
    arch = SparseArch(schema, EmbeddingConfig(embedding_dim=32, init_std=0.0625))
    configs = arch.embedding_bag_collection.embedding_bag_configs()
    assert [(c.name, c.feature_names, c.num_embeddings, c.embedding_dim) for c in configs] == [
        ("t_big", ["big"], 20000, 32),
        ("t_small", ["small"], 3, 32),
    ]
    w = table(arch, "big")
    assert abs(float(w.std()) - 0.0625) < 0.001 and abs(float(w.mean())) < 0.001


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_row_zero_is_zero_so_an_unseen_id_pools_like_a_missing_one(pooling: str) -> None:
    torch.manual_seed(0)
    arch = SparseArch(SCHEMA, EmbeddingConfig(embedding_dim=D, pooling=pooling))
    for name in SCHEMA.field_names:
        assert torch.equal(table(arch, name)[0], torch.zeros(D))
        assert bool((table(arch, name)[1:].abs().sum(1) > 0).all())
    # Row 1 of "u" and of "hist" hold id 0 (out of vocabulary) instead of nothing.
    unseen = {k: [list(row) for row in rows] for k, rows in LISTS.items()}
    unseen["u"][1] = [0]
    unseen["hist"][1] = [0]
    missing = {k: [list(row) for row in rows] for k, rows in LISTS.items()}
    missing["u"][1] = []
    missing["hist"][1] = []
    got = arch(make_kjt(unseen, SCHEMA.field_names)).fields
    torch.testing.assert_close(got, arch(make_kjt(missing, SCHEMA.field_names)).fields)
    assert torch.equal(got[1, 0], torch.zeros(D))


def test_meta_construction_allocates_nothing() -> None:
    meta = torch.device("meta")
    arch = SparseArch(
        SCHEMA, EmbeddingConfig(embedding_dim=D), pair_hash=PairHashConfig(), device=meta
    )
    assert all(p.is_meta for p in arch.parameters())
    # The init function travels with the config, so sharding can apply it to the real shards.
    weight = torch.empty(1000, D)
    arch.embedding_bag_collection.embedding_bag_configs()[0].init_fn(weight)
    assert abs(float(weight.std()) - 0.0625) < 0.005


def test_missing_weights_is_a_clear_error() -> None:
    arch = SparseArch(SCHEMA, EmbeddingConfig(embedding_dim=D, use_weights=True))
    with pytest.raises(ValueError, match="use_weights"):
        arch(make_kjt(LISTS, SCHEMA.field_names))


@pytest.mark.parametrize(
    "kwargs",
    [{"pooling": "max"}, {"input_norm": "batch"}, {"embedding_dim": 0}, {"init_std": 0.0}],
)
def test_embedding_config_rejects_bad_values(kwargs: dict) -> None:
    # "<field>: ..." so that the config loader prefixes the dotted key (model.embedding.<field>)
    with pytest.raises(ValueError, match=f"^{next(iter(kwargs))}: must be"):
        EmbeddingConfig(**kwargs)


# ---------------------------------------------------------------------------------------------
# Pair hashing

_M64 = (1 << 64) - 1


def _splitmix_py(x: int) -> int:
    """SplitMix64 on Python ints (the published constants), independent of the torch version."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def pair_hash_ids(
    features: KeyedJaggedTensor, fields: List[str], num_buckets: int, seeds: List[int]
) -> KeyedJaggedTensor:
    config = PairHashConfig(
        fields=fields, num_hash=len(seeds), num_buckets=num_buckets, seeds=seeds
    )
    return PairHasher(config)(features)


def reference_pair_id(seed: int, i: int, vi: int, j: int, vj: int, num_buckets: int) -> int:
    h = _splitmix_py(seed & _M64)
    for part in (i, vi, j, vj):
        h = _splitmix_py(h ^ (part & _M64))
    return (h & ((1 << 63) - 1)) % num_buckets


def test_pair_ids_match_scalar_reference_and_range() -> None:
    rng = random.Random(0)
    fields = ["f0", "f1", "f2", "f3"]
    lists = {
        f: [[rng.randrange(0, 10**12)] if rng.random() > 0.2 else [] for _ in range(5)]
        for f in fields
    }
    # A multi-valued list: only its first id enters the pairs.
    lists["f1"][0] = [17, 99, 3]
    kjt = make_kjt(lists, fields)
    num_buckets, seeds = 1000, [0, 1, 42]
    out = pair_hash_ids(kjt, fields, num_buckets, seeds)
    assert out.keys() == [MEMONET_PAIRS_KEY]
    per_row = 6 * len(seeds)
    assert out.lengths().tolist() == [1] * (5 * per_row)  # one id per bag
    got = out.values().view(5, 6, len(seeds))
    assert got.min() >= 0 and got.max() < num_buckets
    for b in range(5):
        first = [lists[f][b][0] if lists[f][b] else 0 for f in fields]
        for p, (i, j) in enumerate(field_pairs(len(fields))):
            for k, seed in enumerate(seeds):
                expected = reference_pair_id(seed, i, first[i], j, first[j], num_buckets)
                assert int(got[b, p, k]) == expected, (b, p, k)


def test_pair_ids_are_deterministic_and_row_independent() -> None:
    fields = ["a", "b", "c"]
    lists = {"a": [[5], [6], [7]], "b": [[1], [], [2]], "c": [[9], [9], [9]]}
    batch = pair_hash_ids(make_kjt(lists, fields), fields, 97, [0, 1])
    again = pair_hash_ids(make_kjt(lists, fields), fields, 97, [0, 1])
    assert torch.equal(batch.values(), again.values())
    per_row = batch.values().view(3, -1)
    for b in range(3):
        alone = {f: [lists[f][b]] for f in fields}
        assert torch.equal(
            pair_hash_ids(make_kjt(alone, fields), fields, 97, [0, 1]).values(), per_row[b]
        )


def test_pair_ids_depend_on_field_positions_not_only_values() -> None:
    # Same two values, swapped between fields: a different cross feature, different ids.
    fields = ["a", "b"]
    ab = pair_hash_ids(make_kjt({"a": [[5]], "b": [[7]]}, fields), fields, 10**6, [0, 1]).values()
    ba = pair_hash_ids(make_kjt({"a": [[7]], "b": [[5]]}, fields), fields, 10**6, [0, 1]).values()
    assert not torch.equal(ab, ba)
    assert ab[0] != ab[1]  # the two hash functions differ


def test_pair_ids_spread_over_buckets() -> None:
    g = torch.Generator().manual_seed(0)
    n_rows, fields = 4000, ["a", "b"]
    kjt = KeyedJaggedTensor(
        keys=fields,
        values=torch.randint(0, 50, (2 * n_rows,), generator=g),
        lengths=torch.ones(2 * n_rows, dtype=torch.long),
    )
    ids = pair_hash_ids(kjt, fields, 8, [0])
    counts = torch.bincount(ids.values(), minlength=8).float()
    # Multinomial(4000, 1/8): sd ~ 21; a bad mix (e.g. ids mod 8) piles up far beyond 5 sd.
    assert (counts - 500).abs().max() < 105


def test_first_ids_uses_zero_for_empty_lists() -> None:
    kjt = make_kjt(LISTS, SCHEMA.field_names)
    assert first_ids(kjt, ["hist", "i"]).tolist() == [[1, 4], [0, 1], [2, 0]]


def test_aliccp_default_pairs_are_the_17_single_valued_fields() -> None:
    multi = {"109_14", "110_14", "127_14", "150_14", "210", "853"}
    schema = SchemaSpec(
        fields=[FieldSpec(f, 100, max_length=50 if f in multi else 1) for f in ALICCP_FIELDS],
        labels=["click"],
    )
    cfg = PairHashConfig().resolve(schema)
    # The reference's index order (docs/model.md, MemoNet).
    assert (
        cfg.fields == "101 121 122 124 125 126 127 128 129 205 206 207 216 508 509 702 301".split()
    )
    assert cfg.num_pairs == 136
    arch = SparseArch(schema, EmbeddingConfig(embedding_dim=2), pair_hash=PairHashConfig())
    lists = {f: [[1, 2]] if f in multi else [[3]] for f in ALICCP_FIELDS}
    out = arch(make_kjt(lists, ALICCP_FIELDS))
    assert out.pair_ids.lengths().tolist() == [1] * (136 * 2)


def test_pair_hash_config_errors() -> None:
    with pytest.raises(ValueError, match="not in schema"):
        PairHashConfig(fields=["u", "nope"]).resolve(SCHEMA)
    with pytest.raises(ValueError, match="seeds"):
        PairHashConfig(num_hash=2, seeds=[1])
    with pytest.raises(ValueError, match="at least 2 fields"):
        PairHashConfig(fields=["u"]).resolve(SCHEMA)
