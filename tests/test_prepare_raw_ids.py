"""dtn-prepare --id-mapping raw: raw 64-bit ids kept exactly, missing ids still removed, no
vocabulary, per-field distinct-id estimates (KMV sketch) in schema.json; the model refuses it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dtn_torchrec.cli.prepare import main as prepare_main
from dtn_torchrec.data.distinct import DistinctSketch
from dtn_torchrec.data.schema import FieldSpec, SchemaSpec
from dtn_torchrec.models.embedding import EmbeddingConfig, SparseArch

MAX_ID = 2**63 - 1


def column(out: Path, split: str, name: str) -> list:
    files = sorted(str(p) for p in (out / split).glob("*.parquet"))
    return pq.ParquetDataset(files).read().column(name).to_pylist()


def prepare(src: Path, out: Path, fmt: str, *extra: str) -> dict:
    assert (
        prepare_main(
            [
                "--format",
                fmt,
                "--input",
                str(src),
                "--output",
                str(out),
                "--quiet",
                "--valid-fraction",
                "0",
                "--id-mapping",
                "raw",
                *extra,
            ]
        )
        == 0
    )
    return json.loads((out / "schema.json").read_text())


def test_csv_raw_ids_up_to_int64_max_survive(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "train.csv").write_text(
        f"click,purchase,user,item\n1,0,{MAX_ID},0\n0,0,0,{2**62 + 3}\n1,1,{MAX_ID - 1},{MAX_ID}\n"
    )
    (src / "test.csv").write_text(f"click,purchase,user,item\n0,0,{2**40},1\n")
    schema = prepare(src, tmp_path / "ds", "csv", "--missing-id", "0")
    assert (
        schema["id_mapping"] == "raw"
        and schema["hash_size"] == 0
        and schema["summary"]["vocab_files"] == {}
    )
    assert not (tmp_path / "ds" / "vocab").exists()
    assert column(tmp_path / "ds", "train", "user") == [[MAX_ID], [], [MAX_ID - 1]]
    assert column(tmp_path / "ds", "train", "item") == [[], [2**62 + 3], [MAX_ID]]
    assert column(tmp_path / "ds", "test", "user") == [[2**40]]  # no vocabulary: unseen ids stay
    fields = {f["name"]: f for f in schema["fields"]}
    assert [
        (fields[n]["num_embeddings"], fields[n]["cardinality"], fields[n]["cardinality_rse"])
        for n in ("user", "item")
    ] == [(0, 2, 0.0), (0, 2, 0.0)]


def test_aliccp_raw_ids_joined_exactly(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    big = [
        MAX_ID,
        MAX_ID - 7,
        2**53 + 1,
    ]  # 2**53 + 1 is not a float64: a float round trip would show
    f = "{}\x02{}\x031.0".format
    (src / "sample_skeleton_train.csv").write_text(
        f"1,1,0,k1,2,{f('205', big[0])}\x01{f('210', 0)}\n2,0,0,k1,1,{f('205', big[2])}\n"
    )
    (src / "common_features_train.csv").write_text(
        f"k1,2,{f('101', big[1])}\x01{f('109_14', big[2])}\n"
    )
    schema = prepare(src, tmp_path / "ds", "aliccp-raw")
    assert column(tmp_path / "ds", "train", "205") == [[big[0]], [big[2]]]
    assert column(tmp_path / "ds", "train", "210") == [[], []]  # raw id 0 is still missing
    assert column(tmp_path / "ds", "train", "101") == [[big[1]], [big[1]]]
    assert column(tmp_path / "ds", "train", "109_14") == [[big[2]], [big[2]]]
    assert {f["name"]: f["cardinality"] for f in schema["fields"]}["205"] == 2


def test_raw_cardinality_is_a_sketch_estimate(tmp_path: Path) -> None:
    n = 20000
    ids = np.random.default_rng(0).choice(2**62, size=n, replace=False)
    src = tmp_path / "in"
    src.mkdir()
    rows = "\n".join(
        f"{i % 2},0,{x},{x % 5}" for i, x in enumerate(np.concatenate([ids, ids[:5000]]))
    )
    (src / "train.csv").write_text("click,purchase,user,item\n" + rows + "\n")
    schema = prepare(src, tmp_path / "ds", "csv")
    fields = {f["name"]: f for f in schema["fields"]}
    rse = fields["user"]["cardinality_rse"]
    assert rse == pytest.approx(1 / math.sqrt(4096 - 2))
    assert abs(fields["user"]["cardinality"] - n) < 4 * rse * n
    assert (fields["item"]["cardinality"], fields["item"]["cardinality_rse"]) == (5, 0.0)


def test_distinct_sketch_exact_below_k_estimate_above_and_merge() -> None:
    small = DistinctSketch(k=64)
    small.add(np.array([5, 5, 9, -1, MAX_ID], dtype=np.int64))
    assert small.exact and small.estimate() == 4 and small.relative_standard_error() == 0.0
    ids = np.arange(200_000, dtype=np.int64) * 7919
    whole, left, right = DistinctSketch(k=1024), DistinctSketch(k=1024), DistinctSketch(k=1024)
    for chunk in np.array_split(ids, 7):
        whole.add(chunk)
        whole.add(chunk[:100])  # repeats do not count
    left.add(ids[:120_000])
    right.add(ids[80_000:])
    left.merge(right)
    assert not whole.exact and whole.estimate() == left.estimate()
    assert abs(whole.estimate() - len(ids)) < 4 * whole.relative_standard_error() * len(ids)


def test_model_refuses_a_raw_id_dataset() -> None:
    schema = SchemaSpec(fields=[FieldSpec("user", 0)], labels=["click"], id_mapping="raw")
    with pytest.raises(ValueError, match="--id-mapping raw"):
        SparseArch(schema, EmbeddingConfig(embedding_dim=4))
