"""Files written whole or not at all: a temporary file in the same directory, then a rename.

Every JSON and text output of the project (``schema.json``, ``summary.json``, ``plan.json``,
prediction metrics, analysis and benchmark results) goes through these, so a crash never leaves a
half-written file behind. Output directories carry a marker naming the tool that wrote them
(:func:`claim_output_dir`, :func:`publish_output_dir`): ``--overwrite`` replaces only those.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Sequence


def json_safe(obj: Any) -> Any:
    """Replaces NaN/inf floats (not valid JSON) by None, recursively."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Writes ``obj`` as indented JSON to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(json_safe(obj), f, indent=2, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Writes ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


# -- output directories a tool may replace ---------------------------------------------------------

OUTPUT_MARKER = ".dtn-output.json"
"""File a tool writes into every output directory it publishes: ``{"tool": "<name>"}``. Only a
directory holding the marker of the same tool is ever replaced by ``--overwrite``."""


class OutputDirError(FileExistsError):
    """An ``--output`` directory that this tool must not write to or replace."""


def write_output_marker(directory: str | os.PathLike, tool: str) -> Path:
    """Marks ``directory`` as an output of ``tool`` (call it before publishing the directory)."""
    return write_json_atomic(Path(directory) / OUTPUT_MARKER, {"tool": tool})


def output_marker_tool(directory: str | os.PathLike) -> str | None:
    """The tool named by ``directory``'s marker, or None when there is no readable marker."""
    marker = Path(directory) / OUTPUT_MARKER
    try:
        tool = json.loads(marker.read_text()).get("tool")
    except (OSError, ValueError, AttributeError):
        return None
    return tool if isinstance(tool, str) else None


def _is_same_or_ancestor(path: Path, other: Path) -> bool:
    return path == other or path in other.parents


def claim_output_dir(
    path: str | os.PathLike,
    *,
    tool: str,
    overwrite: bool,
    protected: Sequence[str | os.PathLike] = (),
) -> Path:
    """Checks that ``tool`` may publish its output at ``path``; writes and deletes nothing.

    Allowed: a path that does not exist, an empty directory, and, with ``overwrite``, a directory
    that ``tool`` itself published (its :data:`OUTPUT_MARKER` names ``tool``). Refused whatever
    ``overwrite`` says: a file, a symbolic link, a directory without ``tool``'s marker (a training
    run, a dataset, anything else), and a path that is or contains one of ``protected`` (the
    command's inputs and checkpoints).

    Returns:
        ``path`` made absolute (symbolic links in its parents resolved).

    Raises:
        OutputDirError: one line naming the path and the reason.
    """
    given = Path(path)
    if given.is_symlink():
        raise OutputDirError(f"--output {given} is a symbolic link; give the directory itself")
    out = given.resolve()
    for other in protected:
        if _is_same_or_ancestor(out, Path(other).resolve()):
            raise OutputDirError(
                f"--output {given} is or contains this command's input {other}; choose another"
                " directory"
            )
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"--output {given} is a file, not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return out
    owner = output_marker_tool(out)
    if owner != tool:
        written_by = f"was written by {owner}" if owner else f"has no {OUTPUT_MARKER} marker"
        raise OutputDirError(
            f"--output {given} is not empty and {written_by}, not {tool}; {tool} replaces only"
            " its own output, choose another directory"
        )
    if not overwrite:
        raise OutputDirError(
            f"--output {given} holds an earlier {tool} output; pass --overwrite to replace it"
        )
    return out


def publish_output_dir(
    staged: str | os.PathLike, final: str | os.PathLike, *, tool: str, overwrite: bool
) -> Path:
    """Marks the complete directory ``staged`` as ``tool``'s output and renames it to ``final``.

    ``final`` is checked again (:func:`claim_output_dir`); an earlier output of ``tool`` there is
    moved aside, and deleted only after the rename succeeded. ``staged`` must be a sibling of
    ``final`` (same file system).

    Raises:
        OutputDirError: ``final`` may not be replaced (``staged`` is left for the caller).
    """
    staged = Path(staged)
    final = claim_output_dir(final, tool=tool, overwrite=overwrite)
    write_output_marker(staged, tool)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.rename(final, old)
    os.rename(staged, final)
    if old is not None:
        shutil.rmtree(old)
    return final
