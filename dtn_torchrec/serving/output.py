"""Output directories that appear complete or not at all: stage in a sibling temp dir, rename."""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> None:
    """Refuses an ``--output`` that is a file, or a non-empty directory without ``overwrite``.

    Raises:
        FileExistsError: naming the path.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise FileExistsError(f"--output {p} is a file, not a directory")
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        raise FileExistsError(
            f"--output {p} exists and is not empty; pass --overwrite to replace it"
        )


def make_staging_dir(final: str | os.PathLike) -> Path:
    """A new empty directory beside ``final`` (same file system, so the rename is atomic)."""
    p = Path(final)
    p.parent.mkdir(parents=True, exist_ok=True)
    staged = p.with_name(f".{p.name}.tmp-{uuid.uuid4().hex[:12]}")
    staged.mkdir()  # plain mkdir: the umask's permissions, as the published directory should have
    return staged


def replace_directory(staged: str | os.PathLike, final: str | os.PathLike) -> None:
    """Renames ``staged`` to ``final``; an existing ``final`` is moved aside first, then deleted."""
    staged, final = Path(staged), Path(final)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.rename(final, old)
    os.rename(staged, final)
    if old is not None:
        shutil.rmtree(old)


@contextmanager
def staged_directory(final: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """One process writes a directory atomically.

    Example::

        with staged_directory(out, overwrite=False) as tmp:
            (tmp / "table.csv").write_text(...)
        # out/ now holds table.csv; had the block raised, out/ would be untouched

    Raises:
        FileExistsError: see :func:`check_output_dir` (checked before anything is written).
    """
    check_output_dir(final, overwrite)
    staged = make_staging_dir(final)
    try:
        yield staged
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    replace_directory(staged, final)
