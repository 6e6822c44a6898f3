"""ParquetBatchReader: sharding, batch counts, shuffle, KJT contents, resume, prefetch, bad input."""

from __future__ import annotations

import collections
import gc
import threading
from pathlib import Path
from typing import List, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dtn_torchrec.data.batch import Batch
from dtn_torchrec.data.reader import ParquetBatchReader
from dtn_torchrec.data.reader_columns import JaggedColumn
from dtn_torchrec.data.reader_prefetch import PREFETCH_THREAD_NAME, WORKER_THREAD_PREFIX
from dtn_torchrec.data.schema import FieldSpec, SchemaSpec, SplitSpec, weight_column_name

FIELDS = ["a", "b", "c"]
LABELS = ["click", "conversion"]
SID0 = 1000


def ids_a(i: int) -> List[int]:
    return [i * 10 + j for j in range(i % 3)]  # lengths 0, 1, 2: empty bags included


def ids_b(i: int) -> List[int]:
    return [i + 7 * j for j in range(1 + i % 4)]


def weights_b(i: int) -> List[float]:
    return [float(np.float32(i / 100 + j)) for j in range(1 + i % 4)]


def ids_c(i: int) -> List[int]:
    return [i % 7]


def labels_of(i: int) -> List[float]:
    return [float(i % 2), float(i % 10 == 1)]


def rows_table(rows: Sequence[int]) -> pa.Table:
    return pa.table(
        {
            "sample_id": pa.array([SID0 + i for i in rows], pa.int64()),
            "a": pa.array([ids_a(i) for i in rows], pa.list_(pa.int64())),
            "b": pa.array([ids_b(i) for i in rows], pa.list_(pa.int64())),
            "b__weight": pa.array([weights_b(i) for i in rows], pa.list_(pa.float32())),
            "c": pa.array([ids_c(i) for i in rows], pa.list_(pa.int64())),
            "click": pa.array([int(labels_of(i)[0]) for i in rows], pa.int8()),
            "conversion": pa.array([int(labels_of(i)[1]) for i in rows], pa.int8()),
        }
    )


def write_dataset(root: Path, files: Sequence[Sequence[int]], split: str = "train") -> int:
    """files: row-group sizes per file; rows are numbered 0.. across files. Returns the row count."""
    (root / split).mkdir(parents=True, exist_ok=True)
    names, next_row = [], 0
    for k, groups in enumerate(files):
        name = f"{split}/part-{k:03d}.parquet"
        with pq.ParquetWriter(root / name, rows_table([]).schema) as writer:
            for size in groups:
                writer.write_table(rows_table(range(next_row, next_row + size)))
                next_row += size
        names.append(name)
    fields = [
        FieldSpec("a", 1000),
        FieldSpec("b", 1000, weight_column=weight_column_name("b")),
        FieldSpec("c", 7),
    ]
    SchemaSpec(
        fields=fields, labels=LABELS, splits={split: SplitSpec(rows=next_row, files=names)}
    ).save(root)
    return next_row


UNEVEN = [[3, 4], [1], [5, 5, 2], [], [2]]  # 22 rows, one empty file


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    write_dataset(tmp_path, UNEVEN)
    return tmp_path


def read_all(root: Path, world: int, **kw) -> List[List[Batch]]:
    return [
        list(ParquetBatchReader(str(root), "train", rank=r, world_size=world, **kw))
        for r in range(world)
    ]


def ids_of(batches: List[Batch]) -> List[int]:
    return [int(x) for b in batches for x in b.sample_ids]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [3, 4])
@pytest.mark.parametrize("shuffle", [False, True])
def test_every_row_exactly_once_and_equal_batch_counts(
    dataset: Path, world: int, batch_size: int, shuffle: bool
) -> None:
    readers = [
        ParquetBatchReader(
            str(dataset),
            "train",
            batch_size,
            rank=r,
            world_size=world,
            shuffle=shuffle,
            shuffle_buffer_rows=5,
            seed=3,
        )
        for r in range(world)
    ]
    per_rank = [list(r) for r in readers]
    all_ids = sorted(i for batches in per_rank for i in ids_of(batches))
    assert all_ids == [SID0 + i for i in range(22)]
    expected_batches = -(-(-(-22 // world)) // batch_size)
    assert [len(b) for b in per_rank] == [expected_batches] * world
    assert [len(r) for r in readers] == [expected_batches] * world
    assert sorted(r.num_rows for r in readers) in (
        [22 // world] * world,
        [22 // world] * (world - 22 % world) + [22 // world + 1] * (22 % world),
    )
    assert all(r.total_rows == 22 for r in readers)
    for batches in per_rank:
        assert all(b.batch_size == batch_size for b in batches[:-1])


def test_rank_with_fewer_rows_gets_a_zero_row_batch(tmp_path: Path) -> None:
    write_dataset(tmp_path, [[4], [6]])  # 10 rows over 3 ranks: 3, 3, 4 rows; B = 3
    per_rank = read_all(tmp_path, 3, batch_size=3)
    assert [len(b) for b in per_rank] == [2, 2, 2]
    assert [[b.batch_size for b in batches] for batches in per_rank] == [[3, 0], [3, 0], [3, 1]]
    empty = per_rank[0][1]
    kjt = empty.sparse_features
    assert kjt.stride() == 0 and kjt.keys() == FIELDS
    assert kjt.values().numel() == 0 and kjt.lengths().numel() == 0
    assert tuple(empty.labels.shape) == (0, 2) and empty.labels.dtype == torch.float32
    assert empty.sample_ids.dtype == torch.int64 and empty.sample_ids.numel() == 0
    assert all(jt.lengths().numel() == 0 for jt in kjt.to_dict().values())
    assert sorted(ids_of([b for batches in per_rank for b in batches])) == [
        SID0 + i for i in range(10)
    ]


def test_fewer_rows_than_ranks(tmp_path: Path) -> None:
    write_dataset(tmp_path, [[2]])
    per_rank = read_all(tmp_path, 3, batch_size=4)
    assert [[b.batch_size for b in batches] for batches in per_rank] == [[0], [1], [1]]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_drop_last_drops_the_final_partial_global_step(dataset: Path, world: int) -> None:
    readers = [
        ParquetBatchReader(
            str(dataset), "train", 3, rank=r, world_size=world, drop_last=True, shuffle=True, seed=1
        )
        for r in range(world)
    ]
    per_rank = [list(r) for r in readers]
    steps = (22 // world) // 3
    assert [len(b) for b in per_rank] == [steps] * world
    assert all(b.batch_size == 3 for batches in per_rank for b in batches)
    ids = ids_of([b for batches in per_rank for b in batches])
    assert len(ids) == len(set(ids)) == steps * 3 * world
    assert readers[0].dropped_rows == 22 - steps * 3 * world


def test_shuffle_is_deterministic_and_permutes(dataset: Path) -> None:
    def order(epoch: int, seed: int = 5, shuffle: bool = True) -> List[int]:
        r = ParquetBatchReader(
            str(dataset), "train", 4, shuffle=shuffle, shuffle_buffer_rows=6, seed=seed
        )
        r.set_epoch(epoch)
        return ids_of(list(r))

    plain = order(0, shuffle=False)
    assert plain == [SID0 + i for i in range(22)]
    e0 = order(0)
    assert e0 == order(0)
    assert sorted(e0) == plain and e0 != plain
    assert order(1) != e0 and sorted(order(1)) == plain
    assert order(0, seed=6) != e0
    # rank shares move between epochs when the row-group order is shuffled
    shares = [set(ids_of(list(_epoch_reader(dataset, e, rank=0)))) for e in range(4)]
    assert len({frozenset(s) for s in shares}) > 1


def _epoch_reader(root: Path, epoch: int, rank: int) -> ParquetBatchReader:
    r = ParquetBatchReader(str(root), "train", 4, rank=rank, world_size=2, shuffle=True, seed=9)
    r.set_epoch(epoch)
    return r


@pytest.mark.parametrize("use_weights", [False, True])
def test_kjt_contents_equal_the_parquet_lists(dataset: Path, use_weights: bool) -> None:
    batches = list(
        ParquetBatchReader(
            str(dataset),
            "train",
            5,
            shuffle=True,
            shuffle_buffer_rows=8,
            seed=2,
            use_weights=use_weights,
            rank=1,
            world_size=2,
        )
    )
    seen = 0
    for batch in batches:
        kjt = batch.sparse_features
        assert kjt.keys() == FIELDS and kjt.stride() == batch.batch_size
        assert kjt.values().dtype == torch.int64 and kjt.lengths().dtype == torch.int32
        # key-major layout: lengths are [key0 rows..., key1 rows..., key2 rows...]
        rows = [int(s) - SID0 for s in batch.sample_ids]
        expected_lengths = [len(f(i)) for f in (ids_a, ids_b, ids_c) for i in rows]
        assert kjt.lengths().tolist() == expected_lengths
        expected_values = [v for f in (ids_a, ids_b, ids_c) for i in rows for v in f(i)]
        assert kjt.values().tolist() == expected_values
        if use_weights:
            assert kjt.weights().dtype == torch.float32
            expected_w = (
                [1.0] * sum(len(ids_a(i)) for i in rows)
                + [w for i in rows for w in weights_b(i)]
                + [1.0] * len(rows)
            )
            assert kjt.weights().tolist() == expected_w
        else:
            assert kjt.weights_or_none() is None
        assert batch.labels.dtype == torch.float32
        assert batch.labels.tolist() == [labels_of(i) for i in rows]
        by_key = kjt.to_dict()
        for pos, i in enumerate(rows):
            assert by_key["b"].to_dense()[pos].tolist() == ids_b(i)
        seen += len(rows)
    assert seen == 11


def test_fields_subset_sets_kjt_keys(dataset: Path) -> None:
    batch = next(iter(ParquetBatchReader(str(dataset), "train", 4, fields=["c", "a"])))
    assert batch.sparse_features.keys() == ["c", "a"]
    assert batch.sparse_features.lengths().tolist() == [1, 1, 1, 1] + [0, 1, 2, 0]
    with pytest.raises(KeyError, match="'zz'"):
        ParquetBatchReader(str(dataset), "train", 4, fields=["zz"])


@pytest.mark.parametrize("world,drop_last", [(1, False), (2, False), (3, True)])
def test_resume_yields_exactly_the_remaining_batches(
    dataset: Path, world: int, drop_last: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    kw = dict(world_size=world, shuffle=True, shuffle_buffer_rows=5, seed=4, drop_last=drop_last)
    for rank in range(world):
        full_reader = ParquetBatchReader(str(dataset), "train", 2, rank=rank, **kw)
        full_reader.set_epoch(3)
        full = list(full_reader)
        for k in range(len(full) + 1):
            first = ParquetBatchReader(str(dataset), "train", 2, rank=rank, **kw)
            first.set_epoch(3)
            it = iter(first)
            for _ in range(k):
                next(it)
            state = first.state_dict()
            it.close()
            assert state == {"epoch": 3, "batches": k}

            resumed = ParquetBatchReader(str(dataset), "train", 2, rank=rank, **kw)
            built = collections.Counter()
            original = resumed._to_batch

            def counting(table, original=original):
                built["n"] += 1
                return original(table)

            monkeypatch.setattr(resumed, "_to_batch", counting)
            resumed.load_state_dict(state)
            resumed.set_epoch(3)  # setting the loaded epoch keeps the position
            rest = list(resumed)
            assert [b.sample_ids.tolist() for b in rest] == [
                b.sample_ids.tolist() for b in full[k:]
            ]
            for got, want in zip(rest, full[k:]):
                assert torch.equal(got.sparse_features.values(), want.sparse_features.values())
                assert torch.equal(got.labels, want.labels)
            # skipped batches are never built
            assert built["n"] == sum(1 for b in full[k:] if b.batch_size > 0)
            assert resumed.state_dict() == {"epoch": 3, "batches": len(full)}


def test_set_epoch_to_another_epoch_forgets_the_loaded_position(dataset: Path) -> None:
    r = ParquetBatchReader(str(dataset), "train", 4)
    r.load_state_dict({"epoch": 2, "batches": 3})
    r.set_epoch(3)
    assert r.state_dict() == {"epoch": 3, "batches": 0}
    assert len(list(r)) == len(r) == 6
    with pytest.raises(ValueError, match="outside"):
        r.load_state_dict({"epoch": 0, "batches": 7})


def _prefetch_threads() -> List[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == PREFETCH_THREAD_NAME and t.is_alive()]


def test_prefetch_thread_stops_when_the_consumer_stops_early(dataset: Path) -> None:
    reader = ParquetBatchReader(str(dataset), "train", 1, prefetch_batches=2)
    it = iter(reader)
    next(it)
    assert len(_prefetch_threads()) == 1
    it.close()
    assert _prefetch_threads() == []
    for i, _ in enumerate(reader):
        if i == 2:
            break
    gc.collect()
    assert _prefetch_threads() == []
    assert reader.state_dict()["batches"] == 3


def test_prefetch_propagates_read_errors(dataset: Path) -> None:
    reader = ParquetBatchReader(str(dataset), "train", 2, prefetch_batches=2)
    victim = dataset / "train" / "part-002.parquet"
    victim.unlink()
    got = []
    with pytest.raises(ValueError, match="part-002.parquet"):
        for b in reader:
            got.extend(b.sample_ids.tolist())
    assert got == [SID0 + i for i in range(8)]  # the rows before the missing file arrived
    assert _prefetch_threads() == []


def test_without_prefetch_thread(dataset: Path) -> None:
    reader = ParquetBatchReader(str(dataset), "train", 4, prefetch_batches=0)
    assert ids_of(list(reader)) == [SID0 + i for i in range(22)]


def test_missing_schema(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="schema.json"):
        ParquetBatchReader(str(tmp_path), "train", 4)


def test_missing_split(dataset: Path) -> None:
    with pytest.raises(ValueError, match="'valid'"):
        ParquetBatchReader(str(dataset), "valid", 4)


def test_missing_file(dataset: Path) -> None:
    (dataset / "train" / "part-001.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="part-001.parquet"):
        ParquetBatchReader(str(dataset), "train", 4)


def test_corrupt_file(dataset: Path) -> None:
    (dataset / "train" / "part-001.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match="part-001.parquet.*not a readable Parquet"):
        ParquetBatchReader(str(dataset), "train", 4)


def _rewrite(path: Path, table: pa.Table) -> None:
    pq.write_table(table, path)


def test_file_missing_a_column(dataset: Path) -> None:
    path = dataset / "train" / "part-001.parquet"
    _rewrite(path, pq.read_table(path).drop_columns(["b__weight"]))
    with pytest.raises(ValueError, match=r"part-001.parquet: column 'b__weight' .* missing"):
        ParquetBatchReader(str(dataset), "train", 4)


def test_file_with_an_extra_column(dataset: Path) -> None:
    path = dataset / "train" / "part-002.parquet"
    table = pq.read_table(path)
    _rewrite(path, table.append_column("zz", pa.array([1] * table.num_rows)))
    with pytest.raises(ValueError, match=r"part-002.parquet: column 'zz' is not in schema.json"):
        ParquetBatchReader(str(dataset), "train", 4)


def test_file_with_a_wrong_column_type(dataset: Path) -> None:
    path = dataset / "train" / "part-000.parquet"
    table = pq.read_table(path)
    i = table.schema.get_field_index("c")
    _rewrite(path, table.set_column(i, "c", pa.array(list(range(table.num_rows)), pa.int64())))
    with pytest.raises(ValueError, match=r"part-000.parquet: column 'c' has type int64"):
        ParquetBatchReader(str(dataset), "train", 4)


def test_row_count_disagreeing_with_schema(dataset: Path) -> None:
    schema = SchemaSpec.load(dataset)
    schema.splits["train"].rows = 23
    schema.save(dataset)
    with pytest.raises(ValueError, match="declares 23 rows but its files hold 22"):
        ParquetBatchReader(str(dataset), "train", 4)


def test_weights_misaligned_with_ids(dataset: Path) -> None:
    path = dataset / "train" / "part-001.parquet"
    table = pq.read_table(path)
    i = table.schema.get_field_index("b__weight")
    _rewrite(
        path,
        table.set_column(
            i, "b__weight", pa.array([[1.0, 2.0, 3.0, 4.0, 5.0]], pa.list_(pa.float32()))
        ),
    )
    reader = ParquetBatchReader(str(dataset), "train", 4, use_weights=True)
    with pytest.raises(
        ValueError, match=r"part-001.parquet: row group 0, row 0: column 'b__weight'"
    ):
        list(reader)


def test_zero_row_batch_passes_through_an_embedding_bag_collection(tmp_path: Path) -> None:
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    write_dataset(tmp_path, [[4], [6]])
    empty = list(
        ParquetBatchReader(str(tmp_path), "train", 3, rank=0, world_size=3, use_weights=True)
    )[-1]
    assert empty.batch_size == 0
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name=f"t_{f}", embedding_dim=4, num_embeddings=1000, feature_names=[f]
            )
            for f in FIELDS
        ],
        is_weighted=True,
    )
    assert tuple(ebc(empty.sparse_features).values().shape) == (0, 12)


def _same_batches(got: List[Batch], want: List[Batch]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.equal(g.sample_ids, w.sample_ids)
        assert torch.equal(g.labels, w.labels)
        for key in FIELDS:
            assert torch.equal(g.sparse_features[key].values(), w.sparse_features[key].values())
            assert torch.equal(g.sparse_features[key].lengths(), w.sparse_features[key].lengths())
            assert torch.equal(g.sparse_features[key].weights(), w.sparse_features[key].weights())


@pytest.mark.parametrize("workers", [2, 3])
@pytest.mark.parametrize("shuffle_buffer_rows", [0, 5])
def test_workers_yield_the_batches_of_one_worker(
    dataset: Path, workers: int, shuffle_buffer_rows: int
) -> None:
    kw = dict(
        world_size=2,
        shuffle=True,
        shuffle_buffer_rows=shuffle_buffer_rows,
        seed=5,
        use_weights=True,
    )
    for rank in range(2):
        for epoch in (0, 1):
            readers = []
            for n in (1, workers):
                reader = ParquetBatchReader(str(dataset), "train", 3, rank=rank, workers=n, **kw)
                reader.set_epoch(epoch)
                readers.append(reader)
            _same_batches(list(readers[1]), list(readers[0]))


def test_workers_resume_exactly(dataset: Path) -> None:
    kw = dict(world_size=3, shuffle=True, shuffle_buffer_rows=4, seed=6, drop_last=True)
    full = list(ParquetBatchReader(str(dataset), "train", 2, rank=1, **kw))
    for k in range(len(full) + 1):
        first = ParquetBatchReader(str(dataset), "train", 2, rank=1, workers=3, **kw)
        it = iter(first)
        for _ in range(k):
            next(it)
        state = first.state_dict()
        it.close()
        resumed = ParquetBatchReader(str(dataset), "train", 2, rank=1, workers=3, **kw)
        resumed.load_state_dict(state)
        assert [b.sample_ids.tolist() for b in resumed] == [b.sample_ids.tolist() for b in full[k:]]


def _worker_threads() -> List[threading.Thread]:
    return [
        t for t in threading.enumerate() if t.name.startswith(WORKER_THREAD_PREFIX) and t.is_alive()
    ]


def test_worker_errors_arrive_in_stream_order_and_threads_stop(dataset: Path) -> None:
    reader = ParquetBatchReader(str(dataset), "train", 2, prefetch_batches=2, workers=3)
    stopped_early = ParquetBatchReader(str(dataset), "train", 1, workers=2)
    (dataset / "train" / "part-004.parquet").unlink()
    got = []
    with pytest.raises(ValueError, match="part-004.parquet"):
        for b in reader:
            got.extend(b.sample_ids.tolist())
    assert got == [SID0 + i for i in range(20)]  # every batch before the missing file's rows
    assert _prefetch_threads() == [] and _worker_threads() == []
    it = iter(stopped_early)
    next(it)
    it.close()
    assert _worker_threads() == []


@pytest.mark.parametrize("prefetch_batches,workers", [(2, 1), (0, 2)])
def test_pinned_batches_are_pinned_off_the_consumer_thread(
    dataset: Path, monkeypatch: pytest.MonkeyPatch, prefetch_batches: int, workers: int
) -> None:
    pinned_in: List[str] = []

    def pin(batch: Batch) -> Batch:  # CPU-only torch cannot page-lock: record, then copy
        pinned_in.append(threading.current_thread().name)
        return Batch(batch.sparse_features, batch.labels.clone(), batch.sample_ids.clone())

    monkeypatch.setattr(Batch, "pin_memory", pin)
    kw = dict(prefetch_batches=prefetch_batches, workers=workers)
    pinned = list(ParquetBatchReader(str(dataset), "train", 4, pin_memory=True, **kw))
    assert len(pinned_in) == len(pinned) == 6
    assert threading.main_thread().name not in pinned_in
    unpinned = list(ParquetBatchReader(str(dataset), "train", 4, use_weights=True))
    assert len(pinned_in) == 6  # nothing pinned without pin_memory
    pinned = list(
        ParquetBatchReader(str(dataset), "train", 4, pin_memory=True, use_weights=True, **kw)
    )
    _same_batches(pinned, unpinned)


def test_single_valued_column_gathers_ids_and_weights_of_the_rows() -> None:
    ids = pa.array([[5], [6], [7], [8]], pa.list_(pa.int64()))
    weights = pa.array([[0.5], [0.6], [0.7], [0.8]], pa.list_(pa.float32()))
    column = JaggedColumn.from_arrow(ids.slice(1), weights.slice(1))  # offsets not from 0
    assert column.single_valued
    lengths, got_ids, got_weights = column.gather(np.array([2, 0, 2]))
    assert lengths.tolist() == [1, 1, 1] and lengths.dtype == np.int32
    assert got_ids.tolist() == [8, 6, 8]
    assert got_weights.tolist() == pytest.approx([0.8, 0.6, 0.8])
    ragged = JaggedColumn.from_arrow(pa.array([[1], [], [2, 3]], pa.list_(pa.int64())))
    assert not ragged.single_valued
    assert ragged.gather(np.array([2, 0]))[1].tolist() == [2, 3, 1]
