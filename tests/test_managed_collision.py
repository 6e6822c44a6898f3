"""Managed-collision (MCH) field tables for raw 64-bit ids (issue 11, items 2-3).

* config: ``model.embedding.tables`` by field name or glob; a raw-id dataset needs every field
  managed;
* remapping: distinct live ids never share a row until the table is full; LRU / LFU evictions
  keep the recently / frequently used ids;
* DMP row-wise on CPU + gloo: an eviction re-initialises the evicted rows and zeroes their
  optimiser state; 2-rank outputs equal an unsharded model's with the same state; a checkpoint
  resumes exactly and loads exactly on 1 rank after 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_on_ranks
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from dtn_torchrec.data.batch import Batch
from dtn_torchrec.data.schema import FieldSpec, SchemaSpec
from dtn_torchrec.models.builder import build_train_model
from dtn_torchrec.models.config import model_config_from_dict
from dtn_torchrec.models.embedding import EmbeddingConfig, SparseArch
from dtn_torchrec.models.managed_collision import (
    MCH_INPUT_HASH_SIZE,
    FieldTableConfig,
    mix_ids,
    resolve_field_tables,
)

CPU = torch.device("cpu")
RAW_SCHEMA = SchemaSpec(
    fields=[FieldSpec("u", 0, max_length=1), FieldSpec("i", 0, max_length=1)],
    labels=["click", "conversion"],
    id_mapping="raw",
)
BIG = 2**62


def _mch_arch(size: int, eviction: str = "lru", interval: int = 1) -> SparseArch:
    tables = {"*": FieldTableConfig("mch", size, eviction, interval)}
    return SparseArch(RAW_SCHEMA, EmbeddingConfig(embedding_dim=4, tables=tables))


def _kjt(u: List[int], i: List[int]) -> KeyedJaggedTensor:
    """One id per row of each field; ``u`` and ``i`` have the batch size."""
    return KeyedJaggedTensor(
        keys=["u", "i"],
        values=torch.tensor(u + i, dtype=torch.int64),
        lengths=torch.ones(len(u) + len(i), dtype=torch.int32),
    )


def _rows(arch: SparseArch, field: str, ids: List[int]) -> List[int]:
    """Rows the field's MCH module gives ``ids`` now (no profiling: eval mode)."""
    module = arch.mch_bags._managed_collision_collection._managed_collision_modules[f"t_{field}"]
    was_training = module.training
    module.eval()
    jt = JaggedTensor(
        values=torch.tensor(ids, dtype=torch.int64),
        lengths=torch.ones(len(ids), dtype=torch.int32),
    )
    out = module({f"t_{field}": jt})[f"t_{field}"].values().tolist()
    module.train(was_training)
    return out


def test_tables_resolve_by_name_then_glob() -> None:
    tables = {"u": FieldTableConfig("mch", 8), "*": FieldTableConfig("mch", 4, "lfu")}
    resolved = resolve_field_tables(tables, ["u", "i"])
    assert (resolved["u"].size, resolved["i"].size, resolved["i"].eviction) == (8, 4, "lfu")
    assert resolve_field_tables({}, ["u"])["u"].collision == "none"
    with pytest.raises(ValueError, match=r"tables\['x\*'\]: matches no field"):
        resolve_field_tables({"x*": FieldTableConfig("mch", 4)}, ["u"])
    with pytest.raises(ValueError, match="size: an mch table needs >= 2 rows"):
        FieldTableConfig("mch", 1)


def test_config_file_section_builds_mch_tables() -> None:
    section = {
        "name": "mmoe",
        "embedding": {
            "embedding_dim": 4,
            "tables": {"u": {"collision": "mch", "size": 32, "eviction": "lfu"}},
        },
    }
    cfg = model_config_from_dict(section)
    assert cfg.embedding.tables["u"] == FieldTableConfig("mch", 32, "lfu", 100)
    schema = SchemaSpec([FieldSpec("u", 10), FieldSpec("i", 10)], labels=["click", "conversion"])
    arch = build_train_model(cfg, schema).model.sparse_arch
    assert [t.name for t in arch.embedding_bag_collection.embedding_bag_configs()] == ["t_i"]
    assert arch.mch_bags._embedding_module.embedding_bag_configs()[0].num_embeddings == 32


def test_raw_dataset_needs_every_field_managed() -> None:
    tables = {"u": FieldTableConfig("mch", 8)}
    with pytest.raises(ValueError, match=r"--id-mapping raw.*\(fields \['i'\]\)"):
        SparseArch(RAW_SCHEMA, EmbeddingConfig(tables=tables))


def test_mix_ids_keeps_distinct_ids_distinct() -> None:
    ids = torch.cat(
        [
            torch.arange(0, 5000),
            torch.tensor([2**63 - 2, 2**63 - 3, BIG, BIG + 1]),
            torch.randint(0, 2**63 - 1, (5000,), generator=torch.Generator().manual_seed(0)),
        ]
    ).unique()
    mixed = mix_ids(ids, MCH_INPUT_HASH_SIZE)
    assert mixed.unique().numel() == ids.numel()
    assert bool((mixed >= 0).all()) and bool((mixed < MCH_INPUT_HASH_SIZE).all())
    # Small ids land in both halves of the id space (both ranks' buckets).
    low_half = mix_ids(torch.arange(1000), MCH_INPUT_HASH_SIZE) < 2**62
    assert 0.3 < float(low_half.float().mean()) < 0.7


def test_live_ids_get_distinct_rows_until_the_table_is_full() -> None:
    arch = _mch_arch(size=8)  # 7 rows of their own + the shared row 7
    first = [BIG + 11, 5, 2**63 - 2, 0, 77]
    arch(_kjt(first, first))  # eviction interval 1: admitted at this step
    rows = _rows(arch, "u", first)
    assert len(set(rows)) == len(first) and 7 not in rows
    arch(_kjt([101, 102], [1, 1]))  # fills the 7 rows
    rows = _rows(arch, "u", first + [101, 102])
    assert sorted(rows) == list(range(7))
    # Full: a new id takes a row only by evicting (LRU: one of the least recently used).
    assert _rows(arch, "u", [999]) == [7]


def test_lru_evicts_the_least_recently_used_id() -> None:
    arch = _mch_arch(size=4, eviction="lru")  # 3 own rows
    arch(_kjt([1, 2, 3], [1, 2, 3]))
    arch(_kjt([2, 3, 2], [1, 1, 1]))  # 1 is now the least recently used
    before = dict(zip([1, 2, 3], _rows(arch, "u", [1, 2, 3])))
    arch(_kjt([4], [1]))
    after = _rows(arch, "u", [1, 2, 3, 4])
    assert after == [3, before[2], before[3], before[1]]  # 4 took 1's row; 1 now shares row 3


def test_lfu_evicts_the_least_frequently_used_id() -> None:
    arch = _mch_arch(size=4, eviction="lfu")
    arch(_kjt([1, 1, 1, 2, 3, 3], [1] * 6))  # counts: 1 -> 3, 2 -> 1, 3 -> 2
    before = dict(zip([1, 2, 3], _rows(arch, "u", [1, 2, 3])))
    arch(_kjt([4, 4], [1, 1]))  # 4 (count 2) beats 2 (count 1) only
    after = _rows(arch, "u", [1, 2, 3, 4])
    assert after == [before[1], 3, before[3], before[2]]


# --- DMP row-wise (CPU + gloo) ---------------------------------------------------------------

GLOBAL_BATCH = 8


def _raw_model_section(size: int, interval: int) -> Dict[str, Any]:
    table = {"collision": "mch", "size": size, "eviction": "lru", "eviction_interval": interval}
    return {
        "name": "mmoe",
        "embedding": {"embedding_dim": 4, "tables": {"*": table}},
        "tower": {"hidden_dims": [4]},
    }


def _sharded_raw_model(size: int, interval: int, sparse: str = "rowwise_adagrad") -> Any:
    """The raw-id MMoE on meta -> fused optimiser -> plan -> DMP on the default group's ranks."""
    from dtn_torchrec.distributed.config import ShardingConfig, SparseOptimizerConfig
    from dtn_torchrec.distributed.optimizers import apply_sparse_optimizer
    from dtn_torchrec.distributed.parallel import shard_model
    from dtn_torchrec.distributed.planning import plan_model
    from dtn_torchrec.distributed.topology import topology_from_env

    torch.manual_seed(0)
    cfg = model_config_from_dict(_raw_model_section(size, interval))
    module = build_train_model(cfg, RAW_SCHEMA, device=torch.device("meta"))
    apply_sparse_optimizer(module, SparseOptimizerConfig(name=sparse, lr=0.1))
    sharding = ShardingConfig()
    plan = plan_model(
        module,
        sharding,
        topology=topology_from_env("cpu", sharding),
        batch_size=GLOBAL_BATCH // dist.get_world_size(),
        pg=dist.group.WORLD,
    )
    return shard_model(module, device=CPU, plan=plan)


def _batch(u: List[int], i: List[int]) -> Batch:
    labels = torch.tensor([[float(k % 2), float(k % 3 == 0)] for k in range(len(u))])
    return Batch(_kjt(u, i), labels, torch.arange(len(u)))


def _rank_batch(seed: int) -> Batch:
    """This rank's part of global batch ``seed``: ids from a pool of 6 raw ids per field."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor([3, 17, BIG + 5, 2**63 - 2, 123456789012, 42])
    u = pool[torch.randint(0, 6, (GLOBAL_BATCH,), generator=g)].tolist()
    i = pool[torch.randint(0, 6, (GLOBAL_BATCH,), generator=g)].tolist()
    if dist.get_world_size() == 2:
        half = GLOBAL_BATCH // 2
        lo = dist.get_rank() * half
        u, i = u[lo : lo + half], i[lo : lo + half]
    return _batch(u, i)


def _table_state(dmp: Any, table: str) -> Any:
    """This rank's rows ``[R, D]`` and row-wise Adagrad state ``[R]`` (views into the TBE)."""
    mch = dmp.module.model.sparse_arch.mch_bags
    tbe, index = mch._table_to_tbe_and_index[table]
    position = int(index.item())
    return tbe.split_embedding_weights()[position], tbe.split_optimizer_states()[position][0]


def _step(dmp: Any, batch: Batch) -> None:
    loss, _ = dmp(batch)
    loss.backward()  # the fused sparse optimiser updates the rows here


def test_eviction_reinitialises_rows_and_resets_optimizer_state(one_rank: None) -> None:
    dmp = _sharded_raw_model(size=4, interval=2)  # 3 own rows + shared row 3
    arch = dmp.module.model.sparse_arch
    _step(dmp, _batch([1, 2, 3], [1, 2, 3]))
    _step(dmp, _batch([1, 2, 3], [1, 2, 3]))  # eviction 1: ids 1, 2, 3 get rows and train
    weight, state = _table_state(dmp, "t_u")
    mch = arch.mch_bags._managed_collision_collection._managed_collision_modules["t_u"]
    mch.eval()
    row_of = dict(
        zip(
            [1, 2, 3],
            mch(
                {
                    "t_u": JaggedTensor(
                        values=torch.tensor([1, 2, 3]), lengths=torch.ones(3, dtype=torch.int32)
                    )
                }
            )["t_u"]
            .values()
            .tolist(),
        )
    )
    mch.train()
    trained = weight.clone()
    assert bool((state[list(row_of.values())] > 0).all())
    _step(dmp, _batch([9, 2, 3], [1, 2, 3]))  # 9 seen (shared row until admitted)
    before = weight.clone()
    _step(dmp, _batch([2, 3, 2], [1, 2, 3]))  # eviction 2 (LRU): 9 takes 1's row
    evicted = row_of[1]
    # 9 is not in the evicting batch, so its row holds exactly the re-initialised values.
    assert not torch.equal(weight[evicted], before[evicted])
    assert not torch.equal(weight[evicted], trained[evicted])
    assert float(weight[evicted].abs().max()) < 0.0625 * 6  # drawn from N(0, init_std^2)
    assert float(state[evicted]) == 0.0
    # Rows of ids still held and not in the batch are untouched; used ones keep training.
    assert float(state[row_of[2]]) > 0 and float(state[row_of[3]]) > 0
    rows = dict(zip([1, 2, 3, 9], [r for r in _mapped(mch, [1, 2, 3, 9])]))
    assert rows[9] == evicted and rows[1] == 3


def _mapped(mch: Any, ids: List[int]) -> List[int]:
    mch.eval()
    jt = JaggedTensor(values=torch.tensor(ids), lengths=torch.ones(len(ids), dtype=torch.int32))
    out = mch({"t": jt})["t"].values().tolist()
    mch.train()
    return out


def _optimizer(dmp: Any) -> Any:
    from dtn_torchrec.distributed.config import DenseOptimizerConfig
    from dtn_torchrec.distributed.optimizers import build_dense_optimizer

    return build_dense_optimizer(dmp, DenseOptimizerConfig(name="adam", lr=0.01)).optimizer


def _train(dmp: Any, optimizer: Any, seeds: range) -> None:
    for seed in seeds:
        _step(dmp, _rank_batch(seed))
        optimizer.step()
        optimizer.zero_grad()


def _eval_logits(dmp: Any) -> torch.Tensor:
    dmp.eval()  # no profiling: scoring never changes the remapping
    with torch.no_grad():
        _, (_, logits, _) = dmp(_rank_batch(9999))
    dmp.train()
    return logits


def _run(directory: str, save_at: int, load: bool, steps: int) -> Dict[str, Any]:
    """Trains to ``steps`` (from checkpoint ``save_at`` when ``load``), saving at ``save_at``;
    returns this rank's eval logits (and, on one rank, an unsharded copy's)."""
    from dtn_torchrec.distributed.checkpoint import (
        CheckpointManager,
        capture_rng_state,
        restore_rng_state,
    )

    dmp = _sharded_raw_model(size=16, interval=1)
    optimizer = _optimizer(dmp)
    # Per-rank RNG state as the trainer keeps it: evicted rows are re-drawn from it.
    manager = CheckpointManager(directory, rank_local_keys=("rng",))
    if load:
        extra = manager.load(dmp, optimizer, step=save_at)
        if "rng" in extra:  # dropped when loading at another world size
            restore_rng_state(extra["rng"])
        _train(dmp, optimizer, range(save_at, steps))
    else:
        _train(dmp, optimizer, range(save_at))
        manager.save(save_at, model=dmp, optimizer=optimizer, extra={"rng": capture_rng_state()})
        _train(dmp, optimizer, range(save_at, steps))
    result: Dict[str, Any] = {"logits": _eval_logits(dmp)}
    if dist.get_world_size() == 1:
        result["unsharded"] = _unsharded_logits(dmp)
    return result


def _unsharded_logits(dmp: Any) -> torch.Tensor:
    """The model built without DMP, given the sharded model's whole state, scores the batch."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    state = {
        key: value.local_shards()[0].tensor if isinstance(value, ShardedTensor) else value
        for key, value in dmp.state_dict().items()
    }
    torch.manual_seed(1)
    cfg = model_config_from_dict(_raw_model_section(size=16, interval=1))
    plain = build_train_model(cfg, RAW_SCHEMA, device=CPU)
    plain.load_state_dict(state)
    plain.eval()
    with torch.no_grad():
        _, (_, logits, _) = plain(_rank_batch(9999))
    return logits


@pytest.mark.slow
def test_two_ranks_resume_and_reshard_to_one_exactly(tmp_path: Path) -> None:
    straight = run_on_ranks(_run, 2, directory=str(tmp_path / "a"), save_at=3, load=False, steps=6)
    resumed = run_on_ranks(_run, 2, directory=str(tmp_path / "a"), save_at=3, load=True, steps=6)
    for a, b in zip(straight, resumed):
        assert torch.equal(a["logits"], b["logits"])
    # 2 -> 1: the checkpoint written at step 3 on two ranks, continued on one.
    one = run_on_ranks(_run, 1, directory=str(tmp_path / "a"), save_at=3, load=True, steps=3)[0]
    at_save = run_on_ranks(_run, 2, directory=str(tmp_path / "b"), save_at=3, load=False, steps=3)
    two = torch.cat([r["logits"] for r in at_save])
    torch.testing.assert_close(one["logits"], two, rtol=0, atol=1e-6)
    # Sharded and unsharded models with the same remapping state agree.
    torch.testing.assert_close(one["unsharded"], one["logits"], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_one_rank_remapping_refused_on_two_ranks(tmp_path: Path) -> None:
    """Rows are owned per rank's id range, so a 1-rank remapping cannot be split (TorchRec's
    load hook refuses it)."""
    run_on_ranks(_run, 1, directory=str(tmp_path), save_at=3, load=False, steps=3)
    with pytest.raises(AssertionError, match=r"shard within range \[0, 8\] cannot be built"):
        run_on_ranks(_run, 2, directory=str(tmp_path), save_at=3, load=True, steps=3)
