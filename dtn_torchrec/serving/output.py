"""Output directories that appear complete or not at all: stage in a sibling temp dir, rename.

Which directories may be written or replaced is decided by ``atomic_files.claim_output_dir``
(only a tool's own earlier output, never an input or a checkpoint).
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from dtn_torchrec.atomic_files import claim_output_dir, publish_output_dir


def make_staging_dir(final: str | os.PathLike) -> Path:
    """A new empty directory beside ``final`` (same file system, so the rename is atomic)."""
    p = Path(final)
    p.parent.mkdir(parents=True, exist_ok=True)
    staged = p.with_name(f".{p.name}.tmp-{uuid.uuid4().hex[:12]}")
    staged.mkdir()  # plain mkdir: the umask's permissions, as the published directory should have
    return staged


@contextmanager
def staged_directory(
    final: str | os.PathLike,
    *,
    tool: str,
    overwrite: bool,
    protected: Sequence[str | os.PathLike] = (),
) -> Iterator[Path]:
    """One process writes ``tool``'s output directory atomically.

    Example::

        with staged_directory(out, tool="dtn-analyze", overwrite=False) as tmp:
            (tmp / "table.csv").write_text(...)
        # out/ now holds table.csv and the tool's marker; had the block raised, out/ is untouched

    Raises:
        OutputDirError: see :func:`atomic_files.claim_output_dir` (checked before anything is
            written).
    """
    claim_output_dir(final, tool=tool, overwrite=overwrite, protected=protected)
    staged = make_staging_dir(final)
    try:
        yield staged
        publish_output_dir(staged, final, tool=tool, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
