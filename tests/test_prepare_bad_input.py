"""dtn-prepare on malformed input: errors name file, line and field; --skip-bad counts per reason;
a failed or interrupted run leaves no dataset behind."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import pytest

from dtn_torchrec.cli.prepare import main as prepare_main
from dtn_torchrec.data import prepare as prepare_module
from dtn_torchrec.data.prepare import PrepareOptions, prepare_dataset
from dtn_torchrec.data.prepare_lines import PrepareError
from dtn_torchrec.data.schema import ALICCP_FIELDS


def feat(field: str, fid: object, value: object = 1.0) -> str:
    return f"{field}\x02{fid}\x03{value}"


def skeleton(
    sid: object, click: object, conv: object, key: str, feats: List[str], num: Optional[int] = None
) -> str:
    return f"{sid},{click},{conv},{key},{len(feats) if num is None else num},{chr(1).join(feats)}"


GOOD = [
    skeleton(i, i % 2, 0, "aaaa" if i % 3 else "bbbb", [feat("205", 9000 + i), feat("210", 5)])
    for i in range(1, 9)
]
COMMON = [
    "aaaa,2," + "\x01".join([feat("101", 11), feat("109_14", 500, 0.5)]),
    "bbbb,1," + feat("101", 12),
]


def write_raw(root: Path, skeleton_lines: List[str], common_lines: List[str] = COMMON) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "sample_skeleton_train.csv").write_text("\n".join(skeleton_lines) + "\n")
    (root / "common_features_train.csv").write_text("\n".join(common_lines) + "\n")
    return root


def with_bad(line: str, at: int = 3) -> List[str]:
    """GOOD with ``line`` as line number ``at``."""
    return GOOD[: at - 1] + [line] + GOOD[at - 1 :]


RAW_CASES = {
    "wrong_column_count": ("5,0,0,aaaa,1", "feature_list"),
    "bad_separator": (skeleton(5, 0, 0, "aaaa", ["205:9000"]), "feature_list"),
    "bad_separator_value": (skeleton(5, 0, 0, "aaaa", ["205\x029000"]), "feature_list"),
    "bad_id": (skeleton(5, 0, 0, "aaaa", [feat("210", 1), feat("205", "12x")]), "205"),
    "bad_value": (skeleton(5, 0, 0, "aaaa", [feat("205", 1, "one")]), "205"),
    "bad_label": (skeleton(5, 2, 0, "aaaa", [feat("205", 1)]), "click"),
    "bad_label_conversion": (skeleton(5, 1, "yes", "aaaa", [feat("205", 1)]), "conversion"),
    "missing_common_key": (skeleton(5, 0, 0, "zzzz", [feat("205", 1)]), "common_feature_index"),
    "unknown_field": (skeleton(5, 0, 0, "aaaa", [feat("999", 1)]), "999"),
    "bad_feature_num": (skeleton(5, 0, 0, "aaaa", [feat("205", 1)], num=3), "feature_num"),
    "bad_sample_id": (skeleton("s5", 0, 0, "aaaa", [feat("205", 1)]), "sample_id"),
}


def assert_nothing_written(parent: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(".")], (
        "temporary directory left behind"
    )


@pytest.mark.parametrize("case", sorted(RAW_CASES))
def test_raw_bad_line_names_file_line_field(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    line, field = RAW_CASES[case]
    src = write_raw(tmp_path / "raw", with_bad(line, at=3))
    out = tmp_path / "ds"
    with pytest.raises(PrepareError) as info:
        prepare_dataset(
            "aliccp-raw", src, out, PrepareOptions(valid_fraction=0.0, id_mapping="hash")
        )
    error = info.value
    skeleton_path = str(src / "sample_skeleton_train.csv")
    assert (error.path, error.line, error.field) == (skeleton_path, 3, field)
    assert error.reason == case.split("_conversion")[0].replace(
        "bad_separator_value", "bad_separator"
    )
    message = str(error)
    assert skeleton_path in message and "line 3" in message and repr(field) in message
    assert_nothing_written(tmp_path, out)

    code = prepare_main(
        [
            "--valid-fraction",
            "0",
            "--format",
            "aliccp-raw",
            "--input",
            str(src),
            "--output",
            str(out),
            "--quiet",
        ]
    )
    stderr = capsys.readouterr().err
    assert code != 0
    assert stderr.count("\n") == 1 and stderr.startswith("dtn-prepare: error: ")
    assert skeleton_path in stderr and "line 3" in stderr and repr(field) in stderr
    assert_nothing_written(tmp_path, out)


def test_line_number_in_a_later_block(tmp_path: Path) -> None:
    lines = [skeleton(i, 0, 0, "aaaa", [feat("205", i)]) for i in range(1, 200)]
    lines[136] = skeleton(137, 0, 0, "aaaa", [feat("205", "x")])
    src = write_raw(tmp_path / "raw", lines)
    with pytest.raises(PrepareError) as info:
        prepare_dataset(
            "aliccp-raw", src, tmp_path / "ds", PrepareOptions(valid_fraction=0.0, block_bytes=300)
        )
    assert (info.value.line, info.value.field, info.value.reason) == (137, "205", "bad_id")


def test_common_file_errors(tmp_path: Path) -> None:
    common_path = None
    for name, common_lines, field, reason in [
        ("bad_id", [COMMON[0], "bbbb,1," + feat("101", "1.5")], "101", "bad_id"),
        (
            "duplicate",
            [COMMON[0], COMMON[1], COMMON[0]],
            "common_feature_index",
            "duplicate_common_key",
        ),
        ("columns", [COMMON[0], "bbbb," + feat("101", 12)], "feature_list", "wrong_column_count"),
    ]:
        src = write_raw(tmp_path / name, GOOD, common_lines)
        common_path = str(src / "common_features_train.csv")
        with pytest.raises(PrepareError) as info:
            prepare_dataset(
                "aliccp-raw", src, tmp_path / f"{name}_ds", PrepareOptions(valid_fraction=0.0)
            )
        line = 3 if name == "duplicate" else 2
        assert (info.value.path, info.value.line, info.value.field, info.value.reason) == (
            common_path,
            line,
            field,
            reason,
        )
        assert_nothing_written(tmp_path, tmp_path / f"{name}_ds")


def test_skip_bad_counts_per_reason(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = [
        RAW_CASES[c][0]
        for c in (
            "bad_id",
            "bad_label",
            "missing_common_key",
            "unknown_field",
            "bad_id",
            "wrong_column_count",
        )
    ]
    lines = (
        GOOD[:2]
        + bad[:3]
        + GOOD[2:5]
        + bad[3:]
        + GOOD[5:]
        + [skeleton(99, 0, 1, "aaaa", [feat("205", 1)])]
    )
    # Line 2 of the common file is bad: key bbbb is lost and its 2 skeleton rows are dropped.
    src = write_raw(tmp_path / "raw", lines, [COMMON[0], "bbbb,1," + feat("101", "?")])
    out = tmp_path / "ds"
    assert (
        prepare_main(
            [
                "--valid-fraction",
                "0",
                "--format",
                "aliccp-raw",
                "--input",
                str(src),
                "--output",
                str(out),
                "--skip-bad",
            ]
        )
        == 0
    )
    saved = json.loads((out / "schema.json").read_text())["splits"]["train"]
    bbbb_rows = sum(1 for line in GOOD if ",bbbb," in line)
    assert bbbb_rows == 2
    assert saved["dropped"] == {
        "bad_id": 2,
        "bad_label": 1,
        "missing_common_key": 1 + bbbb_rows,
        "unknown_field": 1,
        "wrong_column_count": 1,
        "click0_conversion1": 1,
    }
    assert saved["rows"] == len(GOOD) - bbbb_rows
    assert saved["rows_read"] == len(lines) == saved["rows"] + sum(saved["dropped"].values())
    printed = capsys.readouterr().out
    assert (
        "bad_id=2" in printed
        and "missing_common_key=3" in printed
        and "bad lines dropped: bad_id=1" in printed
    )
    schema = json.loads((out / "schema.json").read_text())
    assert schema["summary"]["common_features"]["train"]["dropped"] == {"bad_id": 1}
    assert any("line 3" in e for e in schema["summary"]["bad_line_examples"])


def test_skip_bad_every_line_bad_is_an_empty_split_error(tmp_path: Path) -> None:
    src = write_raw(tmp_path / "raw", [RAW_CASES["bad_label"][0]] * 3)
    with pytest.raises(
        ValueError,
        match=r"split 'train' has 0 rows after filtering \(3 read, dropped: bad_label=3\)",
    ):
        prepare_dataset(
            "aliccp-raw", src, tmp_path / "ds", PrepareOptions(valid_fraction=0.0, skip_bad=True)
        )
    assert_nothing_written(tmp_path, tmp_path / "ds")


FDN_GOOD = "7,1,0," + ",".join(f"{f}:{i + 1}" for i, f in enumerate(ALICCP_FIELDS))


@pytest.mark.parametrize(
    "fmt,line,field,reason",
    [
        ("fdn", FDN_GOOD.replace("109_14:2", "109_14:2#x"), "109_14", "bad_id"),
        ("fdn", FDN_GOOD.replace("110_14:3", "111_14:3"), "111_14", "unknown_field"),
        ("fdn", FDN_GOOD.replace("122:7", "122=7"), "122", "bad_separator"),
        ("fdn", FDN_GOOD.rsplit(",", 1)[0], "301", "wrong_column_count"),
        ("fdn", FDN_GOOD.replace("7,1,0,", "7,1,-1,", 1), "purchase", "bad_label"),
        ("paddlerec", "3,0,0,205:1,210:2,2103", "features", "bad_separator"),
        ("paddlerec", "3,0,0,205:1,777:2", "777", "unknown_field"),
        ("paddlerec", "3,0,0,205:1,210:1e3", "210", "bad_id"),
        ("paddlerec", "3,0", "purchase", "wrong_column_count"),
        ("csv", "1,0,5,6", "D205", "wrong_column_count"),
        ("csv", "1,0,5,6,0.5,9", "D205", "wrong_column_count"),
        ("csv", "1,0,5,x,0.5", "205", "bad_id"),
        ("csv", "1,0,5,6,half", "D205", "bad_value"),
        ("csv", "1,0.5,5,6,0.5", "purchase", "bad_label"),
    ],
)
def test_other_formats_bad_line(
    fmt: str, line: str, field: str, reason: str, tmp_path: Path
) -> None:
    good = {"fdn": FDN_GOOD, "paddlerec": "3,0,0,205:1,210:2,210:3", "csv": "1,0,5,6,0.5"}[fmt]
    body = [good, good, line, good]
    if fmt == "csv":
        body = ["click,purchase,101,205,D205"] + body
    path = tmp_path / ("train.csv" if fmt == "csv" else "train.txt")
    path.write_text("\n".join(body) + "\n")
    with pytest.raises(PrepareError) as info:
        prepare_dataset(fmt, tmp_path, tmp_path / "ds", PrepareOptions(valid_fraction=0.0))
    bad_line = 4 if fmt == "csv" else 3
    assert (info.value.path, info.value.line, info.value.field, info.value.reason) == (
        str(path),
        bad_line,
        field,
        reason,
    )
    assert_nothing_written(tmp_path, tmp_path / "ds")
    schema = prepare_dataset(
        fmt, tmp_path, tmp_path / "ds", PrepareOptions(valid_fraction=0.0, skip_bad=True)
    )
    assert schema.splits["train"].dropped == {reason: 1} and schema.splits["train"].rows == 3


def test_invalid_utf8(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_bytes(b"1,0,0,205:1\n2,0,0,205:\xff\xfe\n")
    with pytest.raises(PrepareError) as info:
        prepare_dataset("paddlerec", tmp_path, tmp_path / "ds", PrepareOptions(valid_fraction=0.0))
    assert (info.value.line, info.value.reason) == (2, "bad_encoding")


def test_failed_overwrite_keeps_the_old_dataset(tmp_path: Path) -> None:
    good = write_raw(tmp_path / "good", GOOD)
    out = tmp_path / "ds"
    prepare_dataset("aliccp-raw", good, out, PrepareOptions(valid_fraction=0.0))
    before = (out / "schema.json").read_text()
    bad = write_raw(tmp_path / "bad", with_bad(RAW_CASES["bad_id"][0]))
    assert (
        prepare_main(
            [
                "--valid-fraction",
                "0",
                "--format",
                "aliccp-raw",
                "--input",
                str(bad),
                "--output",
                str(out),
                "--overwrite",
                "--quiet",
            ]
        )
        == 1
    )
    assert (out / "schema.json").read_text() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert (
        prepare_main(
            [
                "--valid-fraction",
                "0",
                "--format",
                "aliccp-raw",
                "--input",
                str(good),
                "--output",
                str(out),
                "--quiet",
            ]
        )
        == 1
    )


def test_interrupted_run_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = write_raw(tmp_path / "raw", GOOD)

    def interrupt(self: object, batch: object, values: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module._SplitWriter, "write", interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset("aliccp-raw", src, tmp_path / "ds", PrepareOptions(valid_fraction=0.0))
    assert_nothing_written(tmp_path, tmp_path / "ds")


def test_crlf_and_blank_lines_keep_line_numbers(tmp_path: Path) -> None:
    lines = GOOD[:2] + ["", RAW_CASES["bad_value"][0]] + GOOD[2:]
    src = write_raw(tmp_path / "raw", [line + "\r" for line in lines])
    with pytest.raises(PrepareError) as info:
        prepare_dataset("aliccp-raw", src, tmp_path / "ds", PrepareOptions(valid_fraction=0.0))
    assert (info.value.line, info.value.field, info.value.reason) == (4, "205", "bad_value")
    schema = prepare_dataset(
        "aliccp-raw", src, tmp_path / "ds", PrepareOptions(valid_fraction=0.0, skip_bad=True)
    )
    assert (
        schema.splits["train"].rows == len(GOOD)
        and schema.splits["train"].rows_read == len(GOOD) + 1
    )
