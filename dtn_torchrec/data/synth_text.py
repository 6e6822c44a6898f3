"""Vectorised formatting of raw Ali-CCP lines (``field\\x02id\\x03value`` features joined by
``\\x01``) with numpy byte-string arrays: no Python loop over rows or features."""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import numpy as np

FEATURE_SEP = b"\x01"
ONE_HOT_VALUE = b"\x031.0"
# Counts of history / combination features are written as ln(1 + count), 5 decimals, as in the
# real files (0.69315, 1.09861, 1.94591, ...).
MAX_FEATURE_COUNT = 255
_COUNT_VALUES = np.array([b"\x03%.5f" % math.log1p(c) for c in range(MAX_FEATURE_COUNT + 1)])


def count_values(counts: np.ndarray) -> np.ndarray:
    """``\\x03<ln(1+count)>`` byte strings for counts in [1, MAX_FEATURE_COUNT]."""
    return _COUNT_VALUES[counts]


def feature_tokens(field: str, raw_ids: np.ndarray, values: object = ONE_HOT_VALUE) -> np.ndarray:
    """``field\\x02id\\x03value`` byte strings, one per id; ``values`` a byte string or an array
    of ``\\x03value`` byte strings aligned with ``raw_ids``."""
    head = np.strings.add(
        np.bytes_(field.encode() + b"\x02"), np.asarray(raw_ids, dtype=np.int64).astype("S")
    )
    return np.strings.add(
        head, np.asarray(values) if not isinstance(values, bytes) else np.bytes_(values)
    )


def decimal(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.int64).astype("S")


def join_lines(prefixes: np.ndarray, parts: Sequence[Tuple[np.ndarray, np.ndarray]]) -> bytes:
    """One text line per row: ``prefixes[r]`` followed by row ``r``'s feature tokens joined by
    ``\\x01`` and a newline.

    Args:
        prefixes: byte strings [n], e.g. ``b"1,0,0,bacff91692951881,9,"``.
        parts: (row index [m] ascending, tokens [m]) per field, in the order the fields are written
            within a line.
    """
    n = len(prefixes)
    rows = np.concatenate([np.arange(n, dtype=np.int64)] + [r for r, _ in parts])
    items: List[np.ndarray] = [prefixes] + [t for _, t in parts]
    # Prefix entries sort before their row's tokens (rank -1), tokens keep their field order.
    order_key = np.concatenate(
        [np.full(n, -1, dtype=np.int64)]
        + [np.full(len(r), i, dtype=np.int64) for i, (r, _) in enumerate(parts)]
    )
    order = np.lexsort((order_key, rows))
    entries = np.concatenate(items)[order]
    rows = rows[order]
    is_prefix = order_key[order] < 0
    is_last = np.ones(len(rows), dtype=bool)
    is_last[:-1] = rows[1:] != rows[:-1]
    sep = np.full(len(rows), FEATURE_SEP, dtype="S1")
    sep[is_prefix] = b""
    sep[is_last] = b"\n"
    return b"".join(np.strings.add(entries, sep).tolist())
