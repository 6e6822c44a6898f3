"""dtn-prepare on bad inputs, table-driven: each case gives input files and asserts the exact
outcome through the command line: a one-line error naming file, line and field (and nothing
written), or a count / note in schema.json, or a documented fallback.

The number of cases here plus the per-line cases of test_prepare_bad_input.py is the README's
"bad inputs handled" figure.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pyarrow.parquet as pq
import pytest

from dtn_torchrec.cli.prepare import main as prepare_main


def feat(field_name: str, fid: object, value: object = 1.0) -> str:
    return f"{field_name}\x02{fid}\x03{value}"


def skeleton(sid: int, click: int, conv: int, feats: List[str], key: str = "aaaa") -> str:
    return f"{sid},{click},{conv},{key},{len(feats)},{chr(1).join(feats)}"


RAW_COMMON = "aaaa,1," + feat("101", 11) + "\n"
RAW_GOOD = [skeleton(i, i % 2, 0, [feat("205", 9000 + i)]) for i in range(1, 6)]
CSV_HEADER = "click,purchase,101,205"
CSV_GOOD = ["1,0,5,6", "0,0,7,0", "1,1,0,8"]
FDN_FIELDS = ["101", "205"]
PADDLE_GOOD = ["1,0,0,101:3,205:4", "2,1,0,101:5,205:6"]


def lines(*rows: str, end: str = "\n") -> bytes:
    return ("\n".join(rows) + end).encode()


def raw_files(skeleton_rows: List[str], end: str = "\n") -> Dict[str, bytes]:
    return {
        "sample_skeleton_train.csv": lines(*skeleton_rows, end=end),
        "common_features_train.csv": RAW_COMMON.encode(),
    }


@dataclass
class Case:
    """One bad input: files written under ``in/``, the format, extra flags and the outcome.

    ``error``: (file name under ``in/``, line or None, field, reason) of the one-line error;
    otherwise ``check(schema_json, output_dir)`` asserts the accepted result.
    """

    files: Dict[str, bytes]
    fmt: str = "csv"
    args: List[str] = field(default_factory=list)
    error: Optional[tuple] = None
    check: Optional[Callable[[dict, Path], None]] = None


def rows_of(out: Path, split: str, column: str) -> list:
    return (
        pq.ParquetDataset(sorted(str(p) for p in (out / split).glob("*.parquet")))
        .read()
        .column(column)
        .to_pylist()
    )


def _check_csv_zero_kept(schema: dict, out: Path) -> None:
    assert schema["summary"]["missing_id"] is None
    vocab = pq.read_table(out / "vocab" / "101.parquet").column("raw_id").to_pylist()
    assert vocab == [0, 5, 7] and rows_of(out, "train", "101") == [[2], [3], [1]]


def _check_csv_missing_zero(schema: dict, out: Path) -> None:
    assert schema["summary"]["missing_id"] == 0
    assert rows_of(out, "train", "101") == [[1], [2], []] and rows_of(out, "train", "205") == [
        [1],
        [],
        [2],
    ]


def _check_csv_zero_hashed(schema: dict, out: Path) -> None:
    assert rows_of(out, "train", "205") == [
        [1 + 6 % 6],
        [1],
        [1 + 8 % 6],
    ]  # hash size 7: 1 + raw mod 6


def _check_missing_minus_one(schema: dict, out: Path) -> None:
    assert rows_of(out, "train", "101") == [[1], [], [2]]


def _check_skip_non_utf8(schema: dict, out: Path) -> None:
    split = schema["splits"]["train"]
    assert (
        split["dropped"] == {"bad_encoding": 1} and split["rows"] == 3 and split["rows_read"] == 4
    )
    assert any(
        "line 3" in e and "bad_encoding" in e for e in schema["summary"]["bad_line_examples"]
    )


def _check_skip_non_utf8_common(schema: dict, out: Path) -> None:
    assert schema["summary"]["common_features"]["train"]["dropped"] == {"bad_encoding": 1}
    assert schema["splits"]["train"]["rows"] == len(RAW_GOOD)


def _check_unterminated_kept(schema: dict, out: Path) -> None:
    assert schema["splits"]["train"]["rows"] == 3
    notes = schema["summary"]["unterminated_last_lines"]
    assert len(notes) == 1 and notes[0].endswith("train.csv, line 4")


def _check_bom(schema: dict, out: Path) -> None:
    assert schema["labels"] == ["click", "conversion"] and [
        f["name"] for f in schema["fields"]
    ] == ["101", "205"]
    assert rows_of(out, "train", "click") == [1, 0, 1]


def _check_only_data_files(schema: dict, out: Path) -> None:
    taken = {s: [Path(p).name for p in files] for s, files in schema["summary"]["sources"].items()}
    assert taken == {"train": ["train.csv.gz"], "test": ["test.txt"]}
    assert sorted(Path(p).name for p in schema["summary"]["ignored_inputs"]) == [
        "train.csv.bak",
        "train.parquet",
    ]
    assert schema["splits"]["train"]["rows"] == 3 and schema["splits"]["test"]["rows"] == 3


def _check_empty_lists_kept(schema: dict, out: Path) -> None:
    assert (
        rows_of(out, "train", "205") == [[], [], []] and schema["fields"][1]["num_embeddings"] == 1
    )


def _check_skip_bad_counts(*reasons: str) -> Callable[[dict, Path], None]:
    def check(schema: dict, out: Path) -> None:
        split = schema["splits"]["train"]
        assert split["dropped"] == {reason: 1 for reason in reasons}
        assert split["rows"] == 2 and split["rows_read"] == 2 + len(reasons)
        assert rows_of(out, "train", "click") == [1, 1]

    return check


def _check_raw_backup_ignored(schema: dict, out: Path) -> None:
    taken = [Path(p).name for p in schema["summary"]["sources"]["train"]]
    assert taken == ["sample_skeleton_train.csv"]
    assert [Path(p).name for p in schema["summary"]["ignored_inputs"]] == [
        "sample_skeleton_train.csv.bak"
    ]
    assert schema["splits"]["train"]["rows"] == len(RAW_GOOD)


CSV = {"train.csv": lines(CSV_HEADER, *CSV_GOOD)}
CASES: Dict[str, Case] = {
    # --- 0 is an id in csv; --missing-id says which raw id means missing --------------------
    "csv_id_0_is_an_ordinary_id": Case(CSV, check=_check_csv_zero_kept),
    "csv_missing_id_0": Case(CSV, args=["--missing-id", "0"], check=_check_csv_missing_zero),
    "csv_id_0_hash_row_not_0": Case(
        CSV, args=["--id-mapping", "hash", "--hash-size", "7"], check=_check_csv_zero_hashed
    ),
    "csv_missing_id_minus_1": Case(
        {"train.csv": lines(CSV_HEADER, "1,0,5,6", "0,0,-1,6", "1,1,7,6")},
        args=["--missing-id", "-1"],
        check=_check_missing_minus_one,
    ),
    "csv_all_missing_field": Case(
        {"train.csv": lines(CSV_HEADER, "1,0,5,", "0,0,6,", "1,1,7,")},
        check=_check_empty_lists_kept,
    ),
    # --- negative ids ---------------------------------------------------------------------
    "negative_id_csv": Case(
        {"train.csv": lines(CSV_HEADER, "1,0,5,6", "0,0,-3,6")},
        error=("train.csv", 3, "101", "negative_id"),
    ),
    "negative_id_and_cut_last_line_skip_bad": Case(
        {"train.csv": lines(CSV_HEADER, "1,0,5,6", "0,0,-3,6", "1,1,7,8", "0,0,9", end="")},
        args=["--skip-bad"],
        check=_check_skip_bad_counts("negative_id", "wrong_column_count"),
    ),
    "negative_id_raw": Case(
        raw_files(RAW_GOOD[:2] + [skeleton(3, 0, 0, [feat("205", -7)])]),
        fmt="aliccp-raw",
        error=("sample_skeleton_train.csv", 3, "205", "negative_id"),
    ),
    "negative_id_fdn": Case(
        {"train.txt": lines("1,0,0,101:3,205:4", "2,0,0,101:3#-4,205:4")},
        fmt="fdn",
        args=["--fields", ",".join(FDN_FIELDS)],
        error=("train.txt", 2, "101", "negative_id"),
    ),
    "negative_id_paddlerec": Case(
        {"train.txt": lines(PADDLE_GOOD[0], "2,1,0,101:5,205:-6")},
        fmt="paddlerec",
        error=("train.txt", 2, "205", "negative_id"),
    ),
    # --- empty files and splits -------------------------------------------------------------
    "empty_csv_file": Case({"train.csv": b""}, error=("train.csv", None, "file", "empty_file")),
    "blank_lines_only": Case(
        {"train.txt": b"\n\n\r\n"}, fmt="paddlerec", error=("train.txt", None, "file", "empty_file")
    ),
    "header_only_csv": Case(
        {"train.csv": lines(CSV_HEADER)}, error=("train.csv", None, "file", "empty_file")
    ),
    "empty_test_file": Case(
        {**CSV, "test.csv": b""}, error=("test.csv", None, "file", "empty_file")
    ),
    "empty_raw_common_file": Case(
        {**raw_files(RAW_GOOD), "common_features_train.csv": b""},
        fmt="aliccp-raw",
        error=("common_features_train.csv", None, "file", "empty_file"),
    ),
    "test_split_empty_after_filtering": Case(
        {**CSV, "test.csv": lines(CSV_HEADER, "0,1,5,6", "0,1,7,8")},
        error=("test.csv", None, "split 'test'", "click0_conversion1=2"),
    ),
    "train_split_empty_after_skip_bad": Case(
        {"train.csv": lines(CSV_HEADER, "2,0,5,6", "x,0,5,6")},
        args=["--skip-bad"],
        error=("train.csv", None, "split 'train'", "bad_label=2"),
    ),
    "carved_valid_split_empty": Case(
        CSV,
        args=["--valid-fraction", "0.01"],
        error=(None, None, "valid split", "--valid-fraction 0"),
    ),
    # --- a cut last line --------------------------------------------------------------------
    "last_line_cut_inside_a_field": Case(
        {"train.csv": lines(CSV_HEADER, "1,0,5,6", "0,0,7", end="")},
        error=("train.csv", 3, "205", "wrong_column_count", "cut short"),
    ),
    "raw_last_line_cut_inside_a_feature": Case(
        raw_files(
            RAW_GOOD[:2] + [skeleton(3, 0, 0, [feat("205", 1), feat("210", 5)])[:-5]], end=""
        ),
        fmt="aliccp-raw",
        error=("sample_skeleton_train.csv", 3, "feature_list", "bad_separator", "cut short"),
    ),
    "last_line_without_newline_that_parses": Case(
        {"train.csv": lines(CSV_HEADER, *CSV_GOOD, end="")}, check=_check_unterminated_kept
    ),
    # --- encodings and compression -----------------------------------------------------------
    "non_utf8_line": Case(
        {"train.csv": lines(CSV_HEADER, "1,0,5,6") + b"0,0,\xff\xfe,6\n" + lines(*CSV_GOOD)},
        error=("train.csv", 3, "line", "bad_encoding"),
    ),
    "non_utf8_line_skip_bad": Case(
        {"train.csv": lines(CSV_HEADER, "1,0,5,6") + b"0,0,\xff\xfe,6\n" + lines(*CSV_GOOD[1:])},
        args=["--skip-bad"],
        check=_check_skip_non_utf8,
    ),
    "non_utf8_common_line_skip_bad": Case(
        {
            **raw_files(RAW_GOOD),
            "common_features_train.csv": RAW_COMMON.encode()
            + b"bb\xffbb,1,"
            + feat("101", 3).encode()
            + b"\n",
        },
        fmt="aliccp-raw",
        args=["--skip-bad"],
        check=_check_skip_non_utf8_common,
    ),
    "utf8_bom_stripped": Case(
        {"train.csv": b"\xef\xbb\xbf" + lines(CSV_HEADER, *CSV_GOOD)}, check=_check_bom
    ),
    "corrupt_gzip": Case(
        {"train.csv.gz": gzip.compress(lines(CSV_HEADER, *CSV_GOOD))[:30]},
        error=("train.csv.gz", None, "file", "unreadable_file"),
    ),
    "not_gzip_at_all": Case(
        {"train.csv.gz": lines(CSV_HEADER, *CSV_GOOD)},
        error=("train.csv.gz", None, "file", "unreadable_file"),
    ),
    # --- which files --input DIR takes ---------------------------------------------------------
    "input_dir_takes_data_files_only": Case(
        {
            "train.csv.gz": gzip.compress(lines(CSV_HEADER, *CSV_GOOD)),
            "train.csv.bak": b"garbage\n",
            "train.parquet": b"PAR1",
            "test.txt": lines(*CSV_GOOD),
        },
        check=_check_only_data_files,
    ),
    "raw_input_dir_ignores_a_backup_skeleton": Case(
        {**raw_files(RAW_GOOD), "sample_skeleton_train.csv.bak": b"junk\n"},
        fmt="aliccp-raw",
        check=_check_raw_backup_ignored,
    ),
    "input_dir_without_data_files": Case(
        {"train.csv.bak": lines(CSV_HEADER, *CSV_GOOD)},
        error=(None, None, "no input files", "ignored"),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    case = CASES[name]
    src = tmp_path / "in"
    src.mkdir()
    for file_name, data in case.files.items():
        (src / file_name).write_bytes(data)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    out = tmp_path / "ds"
    args = ["--format", case.fmt, "--input", str(src), "--output", str(out), "--quiet"]
    if "--valid-fraction" not in case.args:
        args += ["--valid-fraction", "0"]
    code = prepare_main(args + case.args)
    stderr = capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before, "the input was changed"
    if case.error is None:
        assert code == 0, stderr
        assert case.check is not None
        case.check(json.loads((out / "schema.json").read_text()), out)
        return
    file_name, line, field_name, *words = case.error
    assert code == 1 and stderr.startswith("dtn-prepare: error: ") and stderr.count("\n") == 1, (
        stderr
    )
    if file_name is not None:
        assert str(src / file_name) in stderr
    if line is not None:
        assert f"line {line}," in stderr
    assert (repr(field_name) if line is not None or field_name == "file" else field_name) in stderr
    for word in words:
        assert word in stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in"]


# --- output directories -------------------------------------------------------------------------


def _prepare(src: Path, out: Path, *extra: str) -> int:
    return prepare_main(
        [
            "--format",
            "csv",
            "--input",
            str(src),
            "--output",
            str(out),
            "--quiet",
            "--valid-fraction",
            "0",
            *extra,
        ]
    )


@pytest.fixture
def csv_input(tmp_path: Path) -> Path:
    src = tmp_path / "in"
    src.mkdir()
    (src / "train.csv").write_bytes(lines(CSV_HEADER, *CSV_GOOD))
    return src


def test_overwrite_refuses_the_input_and_its_parent(
    csv_input: Path, capsys: pytest.CaptureFixture
) -> None:
    for target in (csv_input, csv_input.parent):
        assert _prepare(csv_input, target, "--overwrite") == 1
        assert "input" in capsys.readouterr().err
        assert (csv_input / "train.csv").read_bytes() == lines(CSV_HEADER, *CSV_GOOD)


def test_overwrite_refuses_a_directory_dtn_prepare_did_not_write(
    csv_input: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    other = tmp_path / "run"
    other.mkdir()
    (other / "checkpoint.pt").write_bytes(b"weeks of compute")
    (other / "schema.json").write_text("{}")  # looks like a dataset, but carries no marker
    assert _prepare(csv_input, other, "--overwrite") == 1
    assert "dtn-prepare replaces only its own output" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["checkpoint.pt", "schema.json"]
    dataset = tmp_path / "ds"
    assert _prepare(csv_input, dataset) == 0
    assert _prepare(csv_input, dataset) == 1  # an earlier dataset: only with --overwrite
    assert "pass --overwrite" in capsys.readouterr().err
    assert _prepare(csv_input, dataset, "--overwrite", "--id-mapping", "hash") == 0
    assert json.loads((dataset / "schema.json").read_text())["id_mapping"] == "hash"


def test_stale_temporary_directories_are_removed(csv_input: Path, tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)  # that process has exited
    stale = [tmp_path / f".ds.tmp-{dead_pid}-0123abcd", tmp_path / f".ds.old-{dead_pid}"]
    kept = [
        tmp_path / f".ds.tmp-{os.getppid()}-0123abcd",  # a live process: maybe a running conversion
        tmp_path / ".ds.tmp-notmine",
        tmp_path / f".other.tmp-{dead_pid}-0123abcd",
    ]
    for path in stale + kept:
        path.mkdir()
        (path / "part-00000.parquet").write_bytes(b"x")
    assert _prepare(csv_input, tmp_path / "ds") == 0
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


@pytest.mark.parametrize("umask,mode", [(0o022, 0o755), (0o077, 0o700), (0o002, 0o775)])
def test_dataset_modes_follow_the_umask(
    csv_input: Path, tmp_path: Path, umask: int, mode: int
) -> None:
    previous = os.umask(umask)
    try:
        assert _prepare(csv_input, tmp_path / "ds") == 0
    finally:
        os.umask(previous)
    out = tmp_path / "ds"
    assert out.stat().st_mode & 0o777 == mode
    assert (out / "schema.json").stat().st_mode & 0o777 == mode & 0o666
    assert (out / "train").stat().st_mode & 0o777 == mode


def test_vocab_from_a_corrupt_vocabulary_names_the_file(
    csv_input: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base = tmp_path / "base"
    assert _prepare(csv_input, base) == 0
    vocab_file = base / "vocab" / "205.parquet"
    vocab_file.write_bytes(b"not parquet")
    new = tmp_path / "new"
    assert _prepare(csv_input, new, "--vocab-from", str(base)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(vocab_file) in err
    assert not new.exists()
    # The --vocab-from dataset is an input: never replaced, even with --overwrite.
    assert _prepare(csv_input, base, "--vocab-from", str(base), "--overwrite") == 1
    assert "input" in capsys.readouterr().err and vocab_file.read_bytes() == b"not parquet"
