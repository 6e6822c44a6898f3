"""dtn-prepare: every input format converts, checked against the source text parsed by hand.

Tiny raw Ali-CCP files written here always run; the real samples under
/work/shared/data/aliccp are used when present.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Dict, List

import numpy as np
import pyarrow.parquet as pq
import pytest

from dtn_torchrec.cli.prepare import main as prepare_main
from dtn_torchrec.data.idmap import load_vocab
from dtn_torchrec.data.prepare import PrepareOptions, prepare_dataset
from dtn_torchrec.data.prepare_inputs import split_of_name
from dtn_torchrec.data.prepare_reference import reference_parse_raw
from dtn_torchrec.data.schema import ALICCP_FIELDS, SchemaSpec, weight_column_name

SAMPLES = Path(os.environ.get("DTN_ALICCP_SAMPLES", "/work/shared/data/aliccp"))
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"{SAMPLES} not present")


# --- tiny raw Ali-CCP files --------------------------------------------------------------------


def feat(field: str, fid: int, value: float = 1.0) -> str:
    return f"{field}\x02{fid}\x03{value}"


def skeleton(sid: int, click: int, conv: int, key: str, feats: List[str]) -> str:
    return f"{sid},{click},{conv},{key},{len(feats)},{chr(1).join(feats)}"


def common(key: str, feats: List[str]) -> str:
    return f"{key},{len(feats)},{chr(1).join(feats)}"


def write_raw(root: Path, split: str, skeleton_lines: List[str], common_lines: List[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"sample_skeleton_{split}.csv").write_text("\n".join(skeleton_lines) + "\n")
    (root / f"common_features_{split}.csv").write_text("\n".join(common_lines) + "\n")


COMMON_TRAIN = [
    common(
        "aaaa",
        [
            feat("101", 11),
            feat("109_14", 500, 0.69315),
            feat("109_14", 501, 1.09861),
            feat("109_14", 502, 1.94591),
            feat("124", 0),
            feat("150_14", 700, 0.5),
        ],
    ),
    common("bbbb", [feat("101", 12), feat("109_14", 501, 0.5), feat("109_14", 503, 2.0)]),
]
SKELETON_TRAIN = [
    skeleton(
        1,
        0,
        0,
        "aaaa",
        [
            feat("205", 9000),
            feat("210", 9100),
            feat("210", 9101),
            feat("210", 9100),
            feat("301", 9351665),
            feat("853", 0),
        ],
    ),
    skeleton(2, 1, 0, "bbbb", [feat("205", 9001), feat("210", 9101)]),
    skeleton(3, 0, 1, "aaaa", [feat("205", 9002)]),  # invalid label pair: dropped, not in the vocab
    skeleton(
        4, 1, 1, "bbbb", [feat("205", 9000), feat("109_14", 504, 3.0)]
    ),  # a user field in the skeleton
]
COMMON_TEST = [common("cccc", [feat("101", 11), feat("109_14", 999)])]
SKELETON_TEST = [skeleton(1, 0, 0, "cccc", [feat("205", 9000), feat("205", 12345)])]


@pytest.fixture
def raw_dir(tmp_path: Path) -> Path:
    root = tmp_path / "raw"
    write_raw(root, "train", SKELETON_TRAIN, COMMON_TRAIN)
    write_raw(root, "test", SKELETON_TEST, COMMON_TEST)
    return root


def read_split(out: Path, schema: SchemaSpec, split: str) -> List[dict]:
    return pq.ParquetDataset(schema.split_files(out, split)).read().to_pylist()


def test_raw_rows_by_hand(raw_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    schema = prepare_dataset("aliccp-raw", raw_dir, out, PrepareOptions(valid_fraction=0.0))
    assert json.loads((out / "schema.json").read_text())["splits"]["train"]["rows"] == 3
    assert schema.splits["train"].dropped == {"click0_conversion1": 1}
    assert schema.splits["train"].rows_read == 4 and schema.splits["test"].rows == 1
    assert schema.field_names == ALICCP_FIELDS and schema.labels == ["click", "conversion"]
    assert all(f.weight_column == weight_column_name(f.name) for f in schema.fields)

    # Vocabularies from the written train rows 1, 2, 4 (row 3 dropped), sorted raw ids -> 1..V.
    assert load_vocab(out, "109_14").raw_ids.tolist() == [500, 501, 502, 503, 504]
    assert load_vocab(out, "109_14").counts.tolist() == [
        1,
        3,
        1,
        2,
        1,
    ]  # 500 would be 2 if row 3 counted
    assert load_vocab(out, "205").raw_ids.tolist() == [9000, 9001]
    assert load_vocab(out, "210").counts.tolist() == [2, 2]
    assert schema.field("124").num_embeddings == 1  # only id 0 (missing) was seen
    assert schema.field("109_14").num_embeddings == 6

    rows = read_split(out, schema, "train")
    assert [r["sample_id"] for r in rows] == [1, 2, 4]
    first, last = rows[0], rows[2]
    assert (first["click"], first["conversion"], last["click"], last["conversion"]) == (0, 0, 1, 1)
    assert (
        first["101"] == [1]
        and first["210"] == [1, 2, 1]
        and first["853"] == []
        and first["124"] == []
    )
    assert first["109_14"] == [1, 2, 3]
    assert first[weight_column_name("109_14")] == pytest.approx([0.69315, 1.09861, 1.94591])
    assert first["150_14"] == [1] and first[weight_column_name("150_14")] == pytest.approx([0.5])
    assert last["109_14"] == [5, 2, 4]  # skeleton ids first, then the common ones, in source order
    assert last[weight_column_name("109_14")] == pytest.approx([3.0, 0.5, 2.0])

    test_row = read_split(out, schema, "test")[0]
    assert test_row["205"] == [1, 0]  # 12345 is out of vocabulary
    assert test_row["101"] == [1] and test_row["109_14"] == [0]

    f109 = schema.field("109_14")
    assert (f109.cardinality, f109.max_length) == (5, 3)
    assert f109.mean_length == pytest.approx((3 + 2 + 3) / 3)
    assert schema.field("210").mean_length == pytest.approx((3 + 1 + 0) / 3)


def test_raw_min_count(raw_dir: Path, tmp_path: Path) -> None:
    schema = prepare_dataset(
        "aliccp-raw", raw_dir, tmp_path / "ds", PrepareOptions(valid_fraction=0.0, min_count=2)
    )
    vocab = load_vocab(tmp_path / "ds", "109_14")
    assert vocab.raw_ids.tolist() == [501, 503] and vocab.counts.tolist() == [3, 2]
    assert schema.field("109_14").num_embeddings == 3 and schema.min_count == 2
    rows = read_split(tmp_path / "ds", schema, "train")
    assert rows[0]["109_14"] == [0, 1, 0] and rows[2]["109_14"] == [0, 1, 2]
    assert load_vocab(tmp_path / "ds", "205").raw_ids.tolist() == [9000]
    assert schema.field("109_14").cardinality == 2  # the OOV row 0 is not counted


def test_raw_hash_formula(raw_dir: Path, tmp_path: Path) -> None:
    opts = PrepareOptions(
        valid_fraction=0.0, id_mapping="hash", hash_size=1000, hash_sizes={"101": 7}
    )
    schema = prepare_dataset("aliccp-raw", raw_dir, tmp_path / "ds", opts)
    assert not (tmp_path / "ds" / "vocab").exists()
    assert schema.id_mapping == "hash" and schema.hash_size == 1000
    assert schema.field("101").num_embeddings == 7 and schema.field("205").num_embeddings == 1000

    def h(raw: int, size: int) -> int:
        return 1 + raw % (size - 1)

    first = read_split(tmp_path / "ds", schema, "train")[0]
    assert first["101"] == [h(11, 7)] == [6]
    assert first["109_14"] == [h(500, 1000), h(501, 1000), h(502, 1000)]
    test_row = read_split(tmp_path / "ds", schema, "test")[0]
    assert test_row["205"] == [h(9000, 1000), h(12345, 1000)] == [10, 358]


def random_raw(root: Path, split: str, rows: int, keys: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    common_lines = []
    for k in range(keys):
        feats = [feat("101", k + 1)] + [
            feat(f, int(rng.integers(0, 40)), round(float(rng.random()), 4))
            for f in ("109_14", "110_14", "127_14", "150_14")
            for _ in range(int(rng.integers(0, 6)))
        ]
        common_lines.append(common(f"{k:016x}", feats))
    skeleton_lines = []
    for i in range(rows):
        feats = [feat("205", int(rng.integers(0, 300))), feat("206", int(rng.integers(1, 20)))]
        feats += [feat("210", int(rng.integers(1, 50))) for _ in range(int(rng.integers(0, 4)))]
        click = int(rng.random() < 0.3)
        conv = int(rng.random() < 0.3)  # click 0 / conversion 1 occurs
        skeleton_lines.append(skeleton(i + 1, click, conv, f"{i * keys // rows:016x}", feats))
    write_raw(root, split, skeleton_lines, common_lines)


def test_raw_matches_line_by_line_reference(tmp_path: Path) -> None:
    """Small blocks, row groups and part files; every row equals the plain-Python reader's."""
    src = tmp_path / "raw"
    random_raw(src, "train", 700, 23, seed=1)
    random_raw(src, "test", 300, 11, seed=2)
    opts = PrepareOptions(
        valid_fraction=0.0,
        block_bytes=3000,
        row_group_rows=64,
        max_row_group_values=500,
        rows_per_file=200,
        min_count=2,
    )
    out = tmp_path / "ds"
    schema = prepare_dataset("aliccp-raw", src, out, opts)
    vocab = {
        f: {int(r): i + 1 for i, r in enumerate(load_vocab(out, f).raw_ids)} for f in ALICCP_FIELDS
    }
    for split in ("train", "test"):
        got = read_split(out, schema, split)
        want = list(
            reference_parse_raw(
                str(src / f"sample_skeleton_{split}.csv"),
                str(src / f"common_features_{split}.csv"),
                vocab=vocab,
            )
        )
        assert len(got) == len(want) == schema.splits[split].rows
        text_rows = (src / f"sample_skeleton_{split}.csv").read_text().splitlines()
        invalid = sum(1 for line in text_rows if line.split(",")[1:3] == ["0", "1"])
        assert invalid > 0 and schema.splits[split].dropped == {"click0_conversion1": invalid}
        assert schema.splits[split].rows_read == len(text_rows)
        for g, w in zip(got, want):
            assert (g["sample_id"], g["click"], g["conversion"]) == (
                w.sample_id,
                w.click,
                w.conversion,
            )
            for f in ALICCP_FIELDS:
                assert g[f] == w.ids[f]
                assert g[weight_column_name(f)] == pytest.approx(w.weights[f])
    assert len(schema.splits["train"].files) >= 3
    for path in schema.split_files(out, "train"):
        meta = pq.ParquetFile(path).metadata
        for g in range(meta.num_row_groups):
            assert meta.row_group(g).num_rows <= 64


def python_valid(sample_id: int, fraction: float, seed: int) -> bool:
    """The documented valid-split rule, restated with Python integers (splitmix64)."""
    mask = 2**64 - 1
    x = (sample_id + seed * 0x9E3779B97F4A7C15) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    x ^= x >> 31
    return (x >> 11) / 2**53 < fraction


def test_valid_split_by_sample_id_hash(tmp_path: Path) -> None:
    n = 400
    src = tmp_path / "raw"
    # Every row has its own item id 100000 + sample_id, so the vocab shows which rows were counted.
    write_raw(
        src,
        "train",
        [skeleton(i, 1, 0, "k", [feat("205", 100000 + i)]) for i in range(1, n + 1)],
        [common("k", [feat("101", 5)])],
    )
    opts = PrepareOptions(valid_fraction=0.25, seed=7)
    schema = prepare_dataset("aliccp-raw", src, tmp_path / "a", opts)
    expected_valid = [i for i in range(1, n + 1) if python_valid(i, 0.25, 7)]
    valid_rows = read_split(tmp_path / "a", schema, "valid")
    assert [r["sample_id"] for r in valid_rows] == expected_valid
    assert 0.15 * n < len(expected_valid) < 0.35 * n
    assert expected_valid != list(range(1, len(expected_valid) + 1))  # not a prefix
    assert expected_valid != list(range(n - len(expected_valid) + 1, n + 1))  # nor a suffix
    assert schema.splits["valid"].rows == len(expected_valid)
    assert schema.splits["train"].rows == n - len(expected_valid)
    assert schema.splits["valid"].rows_read + schema.splits["train"].rows_read == n
    # The vocabulary comes from the train rows only; valid ids are out of vocabulary.
    train_ids = [100000 + i for i in range(1, n + 1) if i not in set(expected_valid)]
    assert load_vocab(tmp_path / "a", "205").raw_ids.tolist() == train_ids
    assert all(r["205"] == [0] for r in valid_rows)
    # Deterministic for a seed, different for another.
    again = prepare_dataset("aliccp-raw", src, tmp_path / "b", opts)
    assert [r["sample_id"] for r in read_split(tmp_path / "b", again, "valid")] == expected_valid
    other = prepare_dataset(
        "aliccp-raw", src, tmp_path / "c", PrepareOptions(valid_fraction=0.25, seed=8)
    )
    assert [r["sample_id"] for r in read_split(tmp_path / "c", other, "valid")] != expected_valid


def test_raw_layouts_single_file_gzip_and_cli(
    raw_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # One skeleton file: its common-features sibling is found, the split comes from the name.
    schema = prepare_dataset(
        "aliccp-raw",
        raw_dir / "sample_skeleton_test.csv",
        tmp_path / "one",
        PrepareOptions(valid_fraction=0.0, id_mapping="hash"),
    )
    assert list(schema.splits) == ["test"] and schema.splits["test"].rows == 1
    # The Merlin layout DIR/<split>/ with gzip-compressed files.
    merlin = tmp_path / "merlin"
    for split in ("train", "test"):
        (merlin / split).mkdir(parents=True)
        for name in (f"sample_skeleton_{split}.csv", f"common_features_{split}.csv"):
            with gzip.open(merlin / split / f"{name}.gz", "wb") as f:
                f.write((raw_dir / name).read_bytes())
    schema = prepare_dataset(
        "aliccp-raw", merlin, tmp_path / "merlin_ds", PrepareOptions(valid_fraction=0.0)
    )
    assert schema.splits["train"].rows == 3 and schema.splits["test"].rows == 1
    # The command line: exit 0, the summary on stdout, the contract's schema.json keys.
    out = tmp_path / "cli"
    assert (
        prepare_main(
            [
                "--valid-fraction",
                "0",
                "--format",
                "aliccp-raw",
                "--input",
                str(raw_dir),
                "--output",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    assert (
        prepare_main(
            [
                "--valid-fraction",
                "0",
                "--format",
                "aliccp-raw",
                "--input",
                str(raw_dir),
                "--output",
                str(out),
                "--overwrite",
                "--min-count",
                "2",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "click0_conversion1=1" in printed and "109_14" in printed
    saved = json.loads((out / "schema.json").read_text())
    assert saved["splits"]["train"]["rows"] == 3 and saved["splits"]["train"]["dropped"] == {
        "click0_conversion1": 1
    }
    assert saved["min_count"] == 2
    assert sorted(p.name for p in out.iterdir()) == [
        ".dtn-output.json",
        "schema.json",
        "test",
        "train",
        "vocab",
    ]
    assert not [
        p for p in tmp_path.iterdir() if p.name.startswith(".")
    ]  # no temporary directory left


def test_vocab_from_reuses_the_mapping(raw_dir: Path, tmp_path: Path) -> None:
    base = prepare_dataset(
        "aliccp-raw", raw_dir, tmp_path / "base", PrepareOptions(valid_fraction=0.0)
    )
    schema = prepare_dataset(
        "aliccp-raw",
        raw_dir / "sample_skeleton_test.csv",
        tmp_path / "new",
        PrepareOptions(valid_fraction=0.0, vocab_from=str(tmp_path / "base")),
    )
    assert [f.num_embeddings for f in schema.fields] == [f.num_embeddings for f in base.fields]
    assert read_split(tmp_path / "new", schema, "test") == read_split(
        tmp_path / "base", base, "test"
    )
    assert load_vocab(tmp_path / "new", "205").raw_ids.tolist() == [9000, 9001]


def test_split_names() -> None:
    assert split_of_name("ali_ccp_train_sample.csv") == "train"
    assert split_of_name("ali_ccp_val_sample.csv") == "valid"
    assert split_of_name("ctr_cvr.dev") == "valid"
    assert split_of_name("test_small.txt") == "test"
    assert split_of_name("interval.csv") is None and split_of_name("README.md") is None
    with pytest.raises(ValueError, match="several splits"):
        split_of_name("train_test.csv")


# --- the real samples --------------------------------------------------------------------------


def vocab_from_text(ids_per_row: List[Dict[str, List[int]]]) -> Dict[str, Dict[int, int]]:
    """Sorted distinct raw ids per field -> 1..V, computed from hand-parsed rows."""
    seen: Dict[str, set] = {}
    for row in ids_per_row:
        for f, ids in row.items():
            seen.setdefault(f, set()).update(ids)
    return {f: {raw: i + 1 for i, raw in enumerate(sorted(ids))} for f, ids in seen.items()}


@needs_samples
def test_fdn_sample(tmp_path: Path) -> None:
    path = SAMPLES / "fdn_format" / "sample.csv"
    lines = path.read_text().splitlines()
    parsed = []
    for line in lines:
        cols = line.split(",")
        row = {}
        for j, f in enumerate(ALICCP_FIELDS):
            name, ids = cols[3 + j].split(":")
            assert name == f
            row[f] = [int(x) for x in ids.split("#") if x != "0"]
        parsed.append(row)
    vocab = vocab_from_text(parsed)
    out = tmp_path / "fdn"
    assert (
        prepare_main(
            [
                "--valid-fraction",
                "0",
                "--format",
                "fdn",
                "--input",
                str(path),
                "--split",
                "train",
                "--output",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    schema = SchemaSpec.load(out)
    rows = read_split(out, schema, "train")
    assert len(rows) == len(lines) == 6 and schema.splits["train"].dropped == {}
    assert all(f.weight_column is None for f in schema.fields)
    for k in (0, 1, 5):
        cols = lines[k].split(",")
        assert (rows[k]["sample_id"], rows[k]["click"], rows[k]["conversion"]) == tuple(
            int(c) for c in cols[:3]
        )
        for f in ALICCP_FIELDS:
            assert rows[k][f] == [vocab[f][raw] for raw in parsed[k][f]], f
    assert (
        len(rows[1]["109_14"]) == 138 and len(rows[1]["110_14"]) == 973 and len(rows[1]["853"]) == 6
    )
    assert rows[0]["126"] == [] and rows[0]["509"] == []  # "126:0", "509:0" are missing
    for f in ALICCP_FIELDS:
        assert load_vocab(out, f).raw_ids.tolist() == sorted(vocab.get(f, {}))
        assert schema.field(f).num_embeddings == len(vocab.get(f, {})) + 1


@needs_samples
def test_paddlerec_sample(tmp_path: Path) -> None:
    folder = SAMPLES / "paddlerec_joined"

    def parse(line: str) -> Dict[str, List[int]]:
        row: Dict[str, List[int]] = {f: [] for f in ALICCP_FIELDS}
        for token in line.split(",")[3:]:
            name, raw = token.split(":")
            if raw != "0":
                row[name].append(int(raw))
        return row

    train_lines = (folder / "train_small.txt").read_text().splitlines()
    test_lines = (folder / "test_small.txt").read_text().splitlines()
    kept = [line for line in train_lines if line.split(",")[1:3] != ["0", "1"]]
    vocab = vocab_from_text([parse(line) for line in kept])
    out = tmp_path / "paddle"
    schema = prepare_dataset("paddlerec", folder, out, PrepareOptions(valid_fraction=0.0))
    assert (
        schema.splits["train"].rows == len(kept)
        and schema.splits["test"].rows == len(test_lines) == 10
    )
    assert schema.splits["train"].dropped.get("click0_conversion1", 0) == len(train_lines) - len(
        kept
    )
    for split, lines in (("train", kept), ("test", test_lines)):
        rows = read_split(out, schema, split)
        for k in (0, 2, 9):
            cols = lines[k].split(",")
            assert (rows[k]["sample_id"], rows[k]["click"], rows[k]["conversion"]) == tuple(
                int(c) for c in cols[:3]
            )
            want = parse(lines[k])
            for f in ALICCP_FIELDS:
                assert rows[k][f] == [vocab.get(f, {}).get(raw, 0) for raw in want[f]], (
                    split,
                    k,
                    f,
                )
    row = read_split(out, schema, "train")[2]
    assert len(row["150_14"]) == 191 and len(row["210"]) == 11 and row["126"] == []


@needs_samples
def test_aitm_csv_sample_headerless_test(tmp_path: Path) -> None:
    folder = SAMPLES / "aitm_preprocessed"
    train_lines = (folder / "train.csv").read_text().splitlines()
    test_lines = (folder / "test.csv").read_text().splitlines()
    header = train_lines[0].split(",")
    fields = header[2:]
    assert header[:2] == ["click", "purchase"] and not test_lines[0].startswith("click")

    def parse(line: str) -> Dict[str, List[int]]:
        return {f: [int(v)] if v != "0" else [] for f, v in zip(fields, line.split(",")[2:])}

    kept_train = [line for line in train_lines[1:] if not line.startswith("0,1,")]
    vocab = vocab_from_text([parse(line) for line in kept_train])
    out = tmp_path / "aitm"
    # AITM encodes ids from 1 with 0 = missing/OOV: say so (csv keeps 0 as an id by default).
    schema = prepare_dataset("csv", folder, out, PrepareOptions(valid_fraction=0.0, missing_id=0))
    assert schema.field_names == fields and schema.labels == ["click", "conversion"]
    assert schema.splits["train"].rows == len(kept_train)
    assert schema.splits["train"].dropped == {
        "click0_conversion1": len(train_lines) - 1 - len(kept_train)
    }
    kept_test = [
        (n, line) for n, line in enumerate(test_lines, start=1) if not line.startswith("0,1,")
    ]
    assert schema.splits["test"].rows == len(kept_test)
    assert schema.splits["test"].dropped == {"click0_conversion1": len(test_lines) - len(kept_test)}
    rows = read_split(out, schema, "test")
    for k in (0, 7, len(kept_test) - 1):
        line_number, line = kept_test[k]
        assert rows[k]["sample_id"] == line_number  # no header in test.csv: the line number
        assert [rows[k]["click"], rows[k]["conversion"]] == [int(c) for c in line.split(",")[:2]]
        want = parse(line)
        for f in fields:
            assert rows[k][f] == [vocab.get(f, {}).get(raw, 0) for raw in want[f]], f
    assert read_split(out, schema, "train")[0]["sample_id"] == 1  # line 2, after the header


@needs_samples
def test_rechub_csv_sample_with_weights(tmp_path: Path) -> None:
    folder = SAMPLES / "rechub_preprocessed"
    schema = prepare_dataset(
        "csv", folder, tmp_path / "rechub", PrepareOptions(valid_fraction=0.0, missing_id=0)
    )
    lines = {
        s: (folder / f"ali_ccp_{n}_sample.csv").read_text().splitlines()
        for s, n in (("train", "train"), ("valid", "val"), ("test", "test"))
    }
    header = lines["train"][0].split(",")
    weighted = [c[1:] for c in header if c.startswith("D")]
    assert sorted(weighted) == sorted(
        ["109_14", "110_14", "127_14", "150_14", "508", "509", "702", "853"]
    )
    assert len(schema.fields) == 23 and set(schema.field_names) == set(ALICCP_FIELDS)
    assert {f.name for f in schema.fields if f.weight_column} == set(weighted)
    for split in ("train", "valid", "test"):
        assert schema.splits[split].rows == len(lines[split]) - 1
    rows = read_split(tmp_path / "rechub", schema, "valid")
    train_values = [dict(zip(header, line.split(","))) for line in lines["train"][1:]]
    for k in (0, 13, 49):
        cells = dict(zip(header, lines["valid"][k + 1].split(",")))
        assert rows[k]["sample_id"] == k + 1
        for f in schema.field_names:
            raw = int(cells[f])
            known = sorted({int(r[f]) for r in train_values} - {0})
            want = [] if raw == 0 else [known.index(raw) + 1 if raw in known else 0]
            assert rows[k][f] == want, f
            if f in weighted:
                assert rows[k][weight_column_name(f)] == pytest.approx(
                    [float(cells["D" + f])] if raw else []
                )
    assert Counter(len(r["508"]) for r in rows)[1] > 0


@needs_samples
def test_rechub_single_file_by_name(tmp_path: Path) -> None:
    shutil.copy(
        SAMPLES / "rechub_preprocessed" / "ali_ccp_train_sample.csv",
        tmp_path / "ali_ccp_train_sample.csv",
    )
    schema = prepare_dataset(
        "csv",
        tmp_path / "ali_ccp_train_sample.csv",
        tmp_path / "ds",
        PrepareOptions(valid_fraction=0.0, id_mapping="hash", labels=["purchase", "click"]),
    )
    assert list(schema.splits) == ["train"] and schema.labels == ["purchase", "click"]
    assert "conversion" not in schema.field_names and "purchase" not in schema.field_names
    assert schema.splits["train"].dropped == {}  # the click/conversion rule needs both names


def test_user_csv_with_three_tasks(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text(
        "sample_id,like,share,buy,user,item,Ditem\n"
        "70,1,0,1,5,8,0.25\n71,0,0,0,6,0,0\n72,0,1,0,5,9,1.5\n"
    )
    (tmp_path / "test.csv").write_text(
        "sample_id,like,share,buy,user,item,Ditem\n80,1,1,1,7,9,2.0\n"
    )
    schema = prepare_dataset(
        "csv",
        tmp_path,
        tmp_path / "ds",
        PrepareOptions(valid_fraction=0.0, labels=["buy", "like", "share"]),
    )
    assert schema.labels == ["buy", "like", "share"] and schema.field_names == ["user", "item"]
    assert (
        schema.field("item").weight_column == weight_column_name("item")
        and schema.field("user").weight_column is None
    )
    rows = read_split(tmp_path / "ds", schema, "train")
    assert [r["sample_id"] for r in rows] == [70, 71, 72]
    assert [(r["buy"], r["like"], r["share"]) for r in rows] == [(1, 1, 0), (0, 0, 0), (0, 0, 1)]
    # csv keeps id 0 as an ordinary id: item vocabulary [0, 8, 9] -> rows 1, 2, 3.
    assert [r["user"] for r in rows] == [[1], [2], [1]] and [r["item"] for r in rows] == [
        [2],
        [1],
        [3],
    ]
    assert [r[weight_column_name("item")] for r in rows] == [[0.25], [0.0], [1.5]]
    test_row = read_split(tmp_path / "ds", schema, "test")[0]
    assert test_row["user"] == [0] and test_row["item"] == [3] and test_row["sample_id"] == 80
