"""Output directories: --overwrite replaces only what the same tool wrote (atomic_files)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest

from dtn_torchrec.atomic_files import (
    OUTPUT_MARKER,
    OutputDirError,
    claim_output_dir,
    output_marker_tool,
    publish_output_dir,
    write_output_marker,
)

TOOL = "dtn-predict"


def _own_output(root: Path) -> Path:
    out = root / "out"
    out.mkdir()
    (out / "part-0.parquet").write_text("old")
    write_output_marker(out, TOOL)
    return out


def _run_dir(root: Path) -> Path:
    run = root / "run"
    (run / "checkpoints" / "step_4").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    return run


def _other_tool(root: Path) -> Path:
    out = root / "analysis"
    out.mkdir()
    (out / "importance.csv").write_text("x")
    write_output_marker(out, "dtn-analyze")
    return out


def _file(root: Path) -> Path:
    path = root / "file.txt"
    path.write_text("x")
    return path


def _input_dir(root: Path) -> Path:
    return root / "data"


def _input_parent(root: Path) -> Path:
    return root


@pytest.mark.parametrize(
    "make, reason",
    [
        (_run_dir, f"has no {OUTPUT_MARKER} marker"),
        (_other_tool, "was written by dtn-analyze"),
        (_file, "is a file"),
        (_input_dir, "is or contains this command's input"),
        (_input_parent, "is or contains this command's input"),
    ],
)
@pytest.mark.parametrize("overwrite", [False, True])
def test_claim_refuses_and_deletes_nothing(
    tmp_path: Path, make: Callable[[Path], Path], reason: str, overwrite: bool
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "schema.json").write_text("{}")
    target = make(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(OutputDirError, match=reason) as info:
        claim_output_dir(target, tool=TOOL, overwrite=overwrite, protected=[data])
    assert str(target) in str(info.value) and "\n" not in str(info.value)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_claim_allows_new_empty_and_own_output_with_overwrite(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert claim_output_dir(tmp_path / "new", tool=TOOL, overwrite=False) == tmp_path / "new"
    assert claim_output_dir(empty, tool=TOOL, overwrite=False) == empty
    own = _own_output(tmp_path)
    with pytest.raises(OutputDirError, match="pass --overwrite"):
        claim_output_dir(own, tool=TOOL, overwrite=False)
    assert claim_output_dir(own, tool=TOOL, overwrite=True) == own


def test_claim_refuses_symlink(tmp_path: Path) -> None:
    own = _own_output(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(own)
    with pytest.raises(OutputDirError, match="symbolic link"):
        claim_output_dir(link, tool=TOOL, overwrite=True)


def test_publish_replaces_own_output_and_marks_it(tmp_path: Path) -> None:
    own = _own_output(tmp_path)
    staged = tmp_path / ".out.tmp"
    staged.mkdir()
    (staged / "part-0.parquet").write_text("new")
    assert publish_output_dir(staged, own, tool=TOOL, overwrite=True) == own
    assert (own / "part-0.parquet").read_text() == "new"
    assert output_marker_tool(own) == TOOL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_publish_refuses_foreign_directory_and_keeps_it(tmp_path: Path) -> None:
    run = _run_dir(tmp_path)
    staged = tmp_path / ".run.tmp"
    staged.mkdir()
    with pytest.raises(OutputDirError, match="has no"):
        publish_output_dir(staged, run, tool=TOOL, overwrite=True)
    assert (run / "config.yaml").read_text() == "seed: 0\n"
    assert (run / "checkpoints" / "step_4").is_dir()


def test_unreadable_marker_is_no_marker(tmp_path: Path) -> None:
    (tmp_path / OUTPUT_MARKER).write_text("not json")
    assert output_marker_tool(tmp_path) is None
    (tmp_path / OUTPUT_MARKER).write_text('["dtn-predict"]')
    assert output_marker_tool(tmp_path) is None


def test_export_path_replaces_only_an_earlier_export(tmp_path: Path) -> None:
    from dtn_torchrec.serving.export import EXPORT_FORMAT, check_export_path, report_path

    path = tmp_path / "model.pt"
    check_export_path(path, overwrite=False)  # nothing there
    path.write_text("someone's file")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=f"--export {path} exists and is not an earlier"):
            check_export_path(path, overwrite=overwrite)
    report_path(path).write_text(json.dumps({"format": EXPORT_FORMAT, "file": "model.pt"}))
    with pytest.raises(FileExistsError, match="holds an earlier export; pass --overwrite"):
        check_export_path(path, overwrite=False)
    check_export_path(path, overwrite=True)
    path.unlink()
    report_path(path).write_text("{}")  # a foreign model.pt.json would be replaced too
    with pytest.raises(FileExistsError, match="model.pt.json exists and is not an earlier"):
        check_export_path(path, overwrite=True)
    with pytest.raises(FileExistsError, match="is a directory"):
        check_export_path(tmp_path, overwrite=True)
    assert path.exists() is False and report_path(path).read_text() == "{}"
