"""dtn-synth -> dtn-prepare (vocab and hash, default flags: a valid split carved from train) ->
ParquetBatchReader reproduces every id list, weight and label of the raw text, which the test
parses by hand."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest

from dtn_torchrec.cli.prepare import main as prepare_main
from dtn_torchrec.cli.synth import main as synth_main
from dtn_torchrec.data.prepare import DEFAULT_VALID_FRACTION, valid_mask
from dtn_torchrec.data.reader import ParquetBatchReader
from dtn_torchrec.data.schema import ALICCP_FIELDS, SchemaSpec

HASH_SIZE = 1009

Row = Tuple[int, int, Dict[str, List[int]], Dict[str, List[float]]]


def parse_split(raw: Path, split: str) -> Dict[int, Row]:
    """sample_id -> (click, conversion, raw ids per field, values per field), skeleton features
    first then the common ones, each in file order; (click=0, conversion=1) rows left out."""
    common = {}
    for line in (raw / f"common_features_{split}.csv").read_text().split("\n")[:-1]:
        key, _, features = line.split(",", 2)
        common[key] = features
    rows = {}
    for line in (raw / f"sample_skeleton_{split}.csv").read_text().split("\n")[:-1]:
        sid, click, conv, key, _, features = line.split(",", 5)
        if (click, conv) == ("0", "1"):
            continue
        ids: Dict[str, List[int]] = defaultdict(list)
        values: Dict[str, List[float]] = defaultdict(list)
        for token in (features + "\x01" + common[key]).split("\x01"):
            field, rest = token.split("\x02")
            fid, value = rest.split("\x03")
            ids[field].append(int(fid))
            values[field].append(float(value))
        rows[int(sid)] = (int(click), int(conv), ids, values)
    return rows


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("roundtrip") / "raw"
    assert (
        synth_main(
            [
                "--output",
                str(out),
                "--train-rows",
                "1500",
                "--test-rows",
                "700",
                "--seed",
                "21",
                "--id-scale",
                "0.01",
                "--history-scale",
                "0.03",
                "--rows-per-user",
                "15",
                "--invalid-rows",
                "2",
            ]
        )
        == 0
    )
    return out


def read_rows(
    dataset: Path, split: str
) -> Dict[int, Tuple[List[float], Dict[str, List[int]], Dict[str, List[float]]]]:
    out = {}
    for rank in range(2):
        reader = ParquetBatchReader(
            str(dataset),
            split,
            64,
            rank=rank,
            world_size=2,
            shuffle=True,
            shuffle_buffer_rows=200,
            seed=1,
            use_weights=True,
        )
        for batch in reader:
            per_key = batch.sparse_features.to_dict()
            dense_ids = {f: jt.to_dense() for f, jt in per_key.items()}
            dense_w = {f: jt.to_dense_weights() for f, jt in per_key.items()}
            for pos, sid in enumerate(batch.sample_ids.tolist()):
                assert sid not in out
                out[sid] = (
                    batch.labels[pos].tolist(),
                    {f: dense_ids[f][pos].tolist() for f in ALICCP_FIELDS},
                    {f: dense_w[f][pos].tolist() for f in ALICCP_FIELDS},
                )
    return out


@pytest.mark.slow  # synthesises and converts a dataset per mapping
@pytest.mark.parametrize("mapping", ["vocab", "hash"])
def test_synth_prepare_reader_roundtrip(raw: Path, tmp_path: Path, mapping: str) -> None:
    dataset = tmp_path / mapping
    args = [
        "--format",
        "aliccp-raw",
        "--input",
        str(raw),
        "--output",
        str(dataset),
        "--id-mapping",
        mapping,
        "--quiet",
        "--row-group-rows",
        "300",
    ]
    if mapping == "hash":
        args += ["--hash-size", str(HASH_SIZE)]
    assert prepare_main(args) == 0
    schema = SchemaSpec.load(dataset)
    truth = json.loads((raw / "truth.json").read_text())
    train_file = parse_split(raw, "train")
    file_ids = np.array(sorted(train_file), dtype=np.int64)
    valid_ids = set(file_ids[valid_mask(file_ids, DEFAULT_VALID_FRACTION, 0)].tolist())
    assert 0 < len(valid_ids) < len(file_ids) // 5
    train = {sid: row for sid, row in train_file.items() if sid not in valid_ids}
    valid = {sid: row for sid, row in train_file.items() if sid in valid_ids}
    if (
        mapping == "vocab"
    ):  # vocabulary rebuilt from the raw train text: sorted distinct ids -> 1..V
        vocab = {
            f: {
                r: i + 1
                for i, r in enumerate(
                    sorted({x for row in train.values() for x in row[2].get(f, [])})
                )
            }
            for f in ALICCP_FIELDS
        }
        assert [schema.field(f).num_embeddings for f in ALICCP_FIELDS] == [
            len(vocab[f]) + 1 for f in ALICCP_FIELDS
        ]

        def mapped(field: str, ids: List[int]) -> List[int]:
            return [vocab[field].get(x, 0) for x in ids]
    else:

        def mapped(field: str, ids: List[int]) -> List[int]:
            return [1 + x % (HASH_SIZE - 1) for x in ids]

    assert (
        schema.splits["train"].rows + schema.splits["valid"].rows
        == truth["counts"]["train"]["valid_rows"]
    )
    assert schema.splits["test"].rows == truth["counts"]["test"]["valid_rows"]
    assert (
        sum(schema.splits[s].dropped.get("click0_conversion1", 0) for s in ("train", "valid")) == 2
    )
    assert schema.splits["test"].dropped == {"click0_conversion1": 2}
    for split in ("train", "valid", "test"):
        expected = {"train": train, "valid": valid}.get(split) or parse_split(raw, split)
        assert schema.splits[split].rows == len(expected)
        got = read_rows(dataset, split)
        assert sorted(got) == sorted(expected)
        for sid, (click, conv, ids, values) in expected.items():
            labels, got_ids, got_w = got[sid]
            assert labels == [float(click), float(conv)]
            for f in ALICCP_FIELDS:
                assert got_ids[f] == mapped(f, ids.get(f, [])), (split, sid, f)
                assert got_w[f] == [float(np.float32(v)) for v in values.get(f, [])], (
                    split,
                    sid,
                    f,
                )
