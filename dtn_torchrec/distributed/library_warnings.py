"""Known-harmless library warnings, silenced where they arise; ``--verbose`` brings them back.

Each silenced line is named here by its logger and message (or, for Python warnings, at the call
that triggers it) with why it is harmless, so every other warning, ours or a library's, shows.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from typing import Dict, Iterator, Pattern

SHOW_ENV = "DTN_LIBRARY_WARNINGS"

# logger -> the harmless lines it logs (regex on the message). Why each is harmless:
HARMLESS_LOG_LINES: Dict[str, Pattern[str]] = {
    # Constructing TorchRec's KeyedJaggedTensor (a torch.fx proxyable class) calls torch.fx's
    # is_fx_tracing(), deprecated in favour of finer checks; the answer is unchanged.
    "torch.fx._symbolic_trace": re.compile(r"is_fx_tracing will return true"),
    # TrainPipelineSparseDist creates CUDA streams only on CUDA; on CPU every stage runs in
    # order on the host, so a postproc module (MemoNet's pair ids) has no stream to race with.
    "torchrec.distributed.train_pipeline.postproc": re.compile(
        r"Postproc module \S+ has no (default|dist) stream\."
    ),
}


class _DropLines(logging.Filter):
    def __init__(self, pattern: Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.match(record.getMessage()) is None


def show_library_warnings() -> None:
    """Shows the known-harmless lines too (the CLIs' ``--verbose``), here and in the processes
    this one starts."""
    os.environ[SHOW_ENV] = "1"


def library_warnings_shown() -> bool:
    return os.environ.get(SHOW_ENV) == "1"


def quiet_harmless_log_lines() -> None:
    """Drops the :data:`HARMLESS_LOG_LINES` (once per logger), unless
    :func:`show_library_warnings` was called."""
    if library_warnings_shown():
        return
    for name, pattern in HARMLESS_LOG_LINES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) for f in logger.filters):
            logger.addFilter(_DropLines(pattern))


@contextlib.contextmanager
def harmless_warnings(*message_starts: str, reason: str) -> Iterator[None]:
    """Ignores the Python warnings whose text starts with one of ``message_starts`` in the block.

    Args:
        message_starts: the warnings' first words (matched literally).
        reason: why they are harmless (stated at the call site; not printed).
    """
    del reason  # documentation at the call site
    if library_warnings_shown():
        yield
        return
    with warnings.catch_warnings():
        for start in message_starts:
            warnings.filterwarnings("ignore", message=re.escape(start))
        yield
