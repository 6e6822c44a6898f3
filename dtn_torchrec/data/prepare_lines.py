"""Line blocks and bad-line bookkeeping shared by the `dtn-prepare` format parsers.

Input files are read in blocks of whole lines (``iter_line_blocks``) and every block is parsed
with vectorised ``pyarrow.compute`` kernels. A parser that finds bad lines in a block raises
``BlockRejection`` with the positions of those lines; ``parse_block`` then either turns the first
of them into a ``PrepareError`` that names file, line and field, or (``skip_bad``) counts them,
drops them and parses the rest of the block again. Exact line numbers therefore cost nothing on
clean input.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Reasons a line is rejected; the keys of SplitSpec.dropped besides the label-pair rule.
WRONG_COLUMN_COUNT = "wrong_column_count"
BAD_SEPARATOR = "bad_separator"
BAD_SAMPLE_ID = "bad_sample_id"
BAD_ID = "bad_id"
BAD_VALUE = "bad_value"
BAD_LABEL = "bad_label"
BAD_FEATURE_NUM = "bad_feature_num"
UNKNOWN_FIELD = "unknown_field"
MISSING_COMMON_KEY = "missing_common_key"
DUPLICATE_COMMON_KEY = "duplicate_common_key"
BAD_ENCODING = "bad_encoding"
NEGATIVE_ID = "negative_id"
# Whole-file problems: never counted, always an error.
EMPTY_FILE = "empty_file"
UNREADABLE_FILE = "unreadable_file"

_BOM = b"\xef\xbb\xbf"

_INT_PATTERN = r"^-?[0-9]+$"
_FLOAT_PATTERN = r"(?i)^[+-]?(([0-9]+\.?[0-9]*|\.[0-9]+)(e[+-]?[0-9]+)?|nan|inf|infinity)$"
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_MAX_EXAMPLES = 20

Describe = Callable[[int], Tuple[str, str]]
T = TypeVar("T")


class PrepareError(ValueError):
    """Bad input: names the file, the 1-based line, the field and what is wrong with it."""

    def __init__(
        self, path: str, line: Optional[int], field: str, reason: str, detail: str
    ) -> None:
        self.path, self.line, self.field, self.reason, self.detail = (
            path,
            line,
            field,
            reason,
            detail,
        )
        where = f"{path}, line {line}" if line is not None else path
        super().__init__(f"{where}, field {field!r}: {detail} ({reason})")


class BlockRejection(Exception):
    """Raised by a block parser: the lines at ``rows`` (positions in the block, sorted) are bad.

    ``describe(row)`` returns ``(field, detail)`` for one of them, for the error message.
    """

    def __init__(self, rows: np.ndarray, reason: str, describe: Describe) -> None:
        super().__init__(reason)
        self.rows = np.unique(np.asarray(rows, dtype=np.int64))
        self.reason = reason
        self.describe = describe


@dataclass
class LineBlock:
    """Consecutive non-blank lines of one file.

    Args:
        path: the file.
        lines: ``[n]`` strings without the line break (nor a trailing ``\\r``).
        line_numbers: int64 ``[n]``, the 1-based line number of each entry of ``lines``.
        nbytes: bytes of the file this block covers (for progress).
        not_utf8: ``(line number, detail)`` of the lines left out of ``lines`` because they
            are not UTF-8 text.
        unterminated: the last entry of ``lines`` is the file's last line and has no line
            break (the file may have been cut short).
    """

    path: str
    lines: pa.Array
    line_numbers: np.ndarray
    nbytes: int
    not_utf8: List[Tuple[int, str]] = field(default_factory=list)
    unterminated: bool = False

    def __len__(self) -> int:
        return len(self.lines)

    @property
    def num_lines(self) -> int:
        """Non-blank lines of the block, including the ones that are not UTF-8."""
        return len(self.lines) + len(self.not_utf8)


@dataclass
class BadLineLog:
    """Lines skipped under ``--skip-bad``: counts per reason and the first few messages; and
    the files whose last line had no line break (kept, since it parsed completely)."""

    counts: Dict[str, int] = field(default_factory=dict)
    examples: List[str] = field(default_factory=list)
    unterminated: List[str] = field(default_factory=list)

    def add(self, reason: str, count: int, example: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + count
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(example)

    def merge(self, other: "BadLineLog") -> None:
        for reason, count in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + count
        self.examples.extend(other.examples[: max(0, _MAX_EXAMPLES - len(self.examples))])
        self.unterminated.extend(other.unterminated)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class _Reader:
    """``pa.input_stream`` whose read errors (a corrupt or cut gzip, ...) name the file."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.stream = pa.input_stream(path, compression="detect")
        except (OSError, pa.ArrowException) as e:
            raise PrepareError(path, None, "file", UNREADABLE_FILE, f"cannot open: {e}") from None
        self.started = False

    def read(self, nbytes: int) -> bytes:
        try:
            data = self.stream.read(nbytes)
        except (OSError, pa.ArrowException) as e:
            raise PrepareError(
                self.path, None, "file", UNREADABLE_FILE, f"cannot read: {e}"
            ) from None
        if not self.started:  # a UTF-8 byte order mark is not part of the first line
            self.started = True
            if data.startswith(_BOM):
                data = data[len(_BOM) :]
        return data

    def __enter__(self) -> "_Reader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stream.close()


def read_first_line(path: str) -> str:
    """The first line of a file (without its line break and byte order mark); '' for an empty
    file."""
    with _Reader(path) as f:
        head = b""
        while b"\n" not in head:
            piece = f.read(1 << 16)
            if not piece:
                break
            head += piece
    return head.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", errors="replace")


def iter_line_blocks(
    path: str, block_bytes: int = 8 << 20, skip_lines: int = 0
) -> Iterator[LineBlock]:
    """Reads ``path`` (plain, or compressed with a suffix pyarrow knows: .gz, .bz2, .zst, .lz4)
    in blocks of about ``block_bytes`` bytes cut at line breaks; blank lines are skipped.

    Raises ``PrepareError`` when the file has no data line after its ``skip_lines`` header
    lines, or cannot be read or decompressed.
    """
    path = os.fspath(path)
    next_line = 1
    carry = b""
    data_lines = 0
    with _Reader(path) as f:
        while True:
            data = f.read(block_bytes)
            eof = not data
            data = carry + data
            if eof:
                if not data:
                    break
                chunk, carry = data, b""
            else:
                cut = data.rfind(b"\n")
                if cut < 0:
                    carry = data
                    continue
                chunk, carry = data[:cut], data[cut + 1 :]
            block = _lines_of(path, chunk, next_line, nbytes=len(chunk) + (0 if eof else 1))
            next_line += chunk.count(b"\n") + 1
            if skip_lines:
                drop = int(np.searchsorted(block.line_numbers, skip_lines + 1))
                block = LineBlock(
                    path,
                    block.lines[drop:],
                    block.line_numbers[drop:],
                    block.nbytes,
                    [bad for bad in block.not_utf8 if bad[0] > skip_lines],
                )
            last_line = next_line - 1
            block.unterminated = eof and len(block) > 0 and int(block.line_numbers[-1]) == last_line
            data_lines += block.num_lines
            if block.num_lines:
                yield block
            if eof:
                break
    if data_lines == 0:
        what = "only a header line" if skip_lines else "no data lines (empty file)"
        raise PrepareError(path, None, "file", EMPTY_FILE, f"{what}; an input file must hold rows")


def _lines_of(path: str, chunk: bytes, first_line: int, nbytes: int) -> LineBlock:
    offsets = pa.py_buffer(np.array([0, len(chunk)], dtype=np.int64).tobytes())
    whole = pa.LargeStringArray.from_buffers(1, offsets, pa.py_buffer(chunk))
    not_utf8: List[Tuple[int, str]] = []
    try:
        whole.validate(full=True)
        lines = pc.split_pattern(whole, "\n").flatten()
    except pa.ArrowInvalid:
        # Rare: decode line by line and set the lines that are not UTF-8 aside.
        texts = []
        for i, raw in enumerate(chunk.split(b"\n")):
            try:
                texts.append(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                texts.append("")
                not_utf8.append((first_line + i, f"not UTF-8 text: {e}"))
        lines = pa.array(texts, pa.large_string())
    if b"\r" in chunk:
        lines = pc.utf8_rtrim(lines, characters="\r")
    line_numbers = first_line + np.arange(len(lines), dtype=np.int64)
    blank = pc.equal(pc.binary_length(lines), 0)
    if pc.any(blank).as_py():
        keep = pc.invert(blank)
        lines = lines.filter(keep)
        line_numbers = line_numbers[keep.to_numpy(zero_copy_only=False)]
    return LineBlock(path, lines, line_numbers, nbytes, not_utf8)


def parse_block(
    block: LineBlock, parse: Callable[[pa.Array, np.ndarray], T], skip_bad: bool, log: BadLineLog
) -> Optional[T]:
    """Runs ``parse(lines, line_numbers)`` on a block, dropping rejected lines until it succeeds.

    Returns None when every line of the block was bad (``skip_bad``). Without ``skip_bad`` the
    first rejected line becomes a ``PrepareError``. A file's last line without a line break is
    kept when it parses, and noted in ``log.unterminated``; when it does not, the error says
    that the file looks cut short.
    """
    if block.not_utf8:
        line, detail = block.not_utf8[0]
        error = PrepareError(block.path, line, "line", BAD_ENCODING, detail)
        if not skip_bad:
            raise error
        log.add(BAD_ENCODING, len(block.not_utf8), str(error))
    lines, line_numbers = block.lines, block.line_numbers
    last = len(lines) - 1 if block.unterminated else -1
    while len(lines):
        try:
            parsed = parse(lines, line_numbers)
        except BlockRejection as rejection:
            first = int(rejection.rows[0])
            field_name, detail = rejection.describe(first)
            if first == last:
                detail += "; it is the last line and has no line break: the file looks cut short"
            # Rejected rows are sorted, and ``last`` is the block's final row.
            last = -1 if rejection.rows[-1] == last else last - len(rejection.rows)
            error = PrepareError(
                block.path, int(line_numbers[first]), field_name, rejection.reason, detail
            )
            if not skip_bad:
                raise error from None
            log.add(rejection.reason, len(rejection.rows), str(error))
            keep = np.ones(len(lines), dtype=bool)
            keep[rejection.rows] = False
            lines = lines.filter(pa.array(keep))
            line_numbers = line_numbers[keep]
            continue
        if last >= 0:
            log.unterminated.append(f"{block.path}, line {int(line_numbers[-1])}")
        return parsed
    return None


def snippet(text: Optional[str], limit: int = 60) -> str:
    """A short printable excerpt of a value for an error message."""
    if text is None:
        return "<missing>"
    shown = text if len(text) <= limit else text[:limit] + "..."
    return repr(shown)


def rows_of_positions(positions: np.ndarray, row_of: Optional[np.ndarray]) -> np.ndarray:
    return positions if row_of is None else row_of[positions]


def to_int64(
    values: pa.Array,
    reason: str,
    describe_position: Callable[[int], Tuple[str, str]],
    row_of: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Parses decimal integers; rejects the rows of the entries that are not int64 integers.

    Args:
        values: ``[m]`` strings.
        reason: rejection reason.
        describe_position: ``(field, detail)`` for an entry position.
        row_of: int64 ``[m]`` block row of each entry (None: entries are rows).
    """
    try:
        return pc.cast(values, pa.int64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        bad_positions = _bad_positions(values, _INT_PATTERN, _python_int_ok)
        if len(bad_positions):
            _reject_positions(bad_positions, reason, describe_position, row_of)
        raise


def to_float32(
    values: pa.Array,
    reason: str,
    describe_position: Callable[[int], Tuple[str, str]],
    row_of: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Parses decimal floats like ``to_int64``."""
    try:
        return pc.cast(values, pa.float32()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        bad_positions = _bad_positions(values, _FLOAT_PATTERN, _arrow_float_ok)
        if len(bad_positions):
            _reject_positions(bad_positions, reason, describe_position, row_of)
        raise


def reject_mask(
    bad: np.ndarray,
    reason: str,
    describe_position: Callable[[int], Tuple[str, str]],
    row_of: Optional[np.ndarray] = None,
) -> None:
    """Rejects the rows of the entries where ``bad`` (bool ``[m]``) is set, if any."""
    positions = np.flatnonzero(bad)
    if len(positions):
        _reject_positions(positions, reason, describe_position, row_of)


def _reject_positions(
    positions: np.ndarray,
    reason: str,
    describe_position: Callable[[int], Tuple[str, str]],
    row_of: Optional[np.ndarray],
) -> None:
    rows = rows_of_positions(positions, row_of)
    first_position_of_row = dict(zip(rows[::-1].tolist(), positions[::-1].tolist()))
    raise BlockRejection(rows, reason, lambda row: describe_position(first_position_of_row[row]))


def _bad_positions(
    values: pa.Array, pattern: str, exact_check: Callable[[str], bool]
) -> np.ndarray:
    ok = pc.fill_null(pc.match_substring_regex(values, pattern), False).to_numpy(
        zero_copy_only=False
    )
    bad = np.flatnonzero(~ok)
    if len(bad):
        return bad
    # Every entry looks numeric, so some are out of range: check them one by one.
    return np.array(
        [i for i, s in enumerate(values.to_pylist()) if not exact_check(s)], dtype=np.int64
    )


def _python_int_ok(text: str) -> bool:
    return re.fullmatch(_INT_PATTERN, text) is not None and _INT64_MIN <= int(text) <= _INT64_MAX


def _arrow_float_ok(text: str) -> bool:
    try:
        pc.cast(pa.array([text]), pa.float32())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False
    return True
