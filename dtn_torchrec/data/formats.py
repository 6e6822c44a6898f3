"""Input formats of `dtn-prepare`: one vectorised parser per format.

Every parser turns a block of lines into ``ParsedRows`` (sample ids, 0/1 labels, one ragged id
list per field, and for raw Ali-CCP the row of the common-features table to join). The raw id
``missing_id`` means "missing" and is removed from the lists (a field with no ids is an empty
list): by default 0 for ``aliccp-raw``, ``fdn`` and ``paddlerec`` (their documented encoding),
none for ``csv`` (0-based encoded CSVs use 0 as an ordinary id; an empty cell is missing).
Negative ids are rejected (``negative_id``) unless they are the ``missing_id``.

``aliccp-raw`` (Tianchi files)
    skeleton ``sample_id,click,conversion,common_feature_index,feature_num,feature_list`` and
    common features ``common_feature_index,feature_num,feature_list``; a feature list is
    features separated by ``\\x01``, each ``field\\x02id\\x03value``. A row is its skeleton
    features followed by the common features of its ``common_feature_index`` (per field, in
    source order). ``value`` becomes the field's weight list (all fields are weighted).
``fdn`` (mrchor/FDN, rec-dtn/dtn-model)
    ``sample_id,click,purchase`` then one column per field in field order, ``field:id#id#...``;
    ``0`` is a missing field. No weights.
``paddlerec`` (PaddleRec ESMM/ESCM2 joined lines)
    ``sample_id,click,purchase,field:id,field:id,...``; a field repeats for each of its ids.
``csv`` (AITM, torch-rechub, your own logs)
    a header names the columns. Labels: ``--labels`` (in task order), else ``click`` and
    ``conversion`` (``purchase`` is read as ``conversion``). A ``sample_id`` column, if
    present, is the sample id; otherwise the sample id is the line number minus the header.
    A column ``<prefix><name>`` (prefix ``D`` by default, ``--weight-prefix``) where ``<name>``
    is another column is the weight of field ``<name>`` (torch-rechub's dense columns hold the
    ``feature_value`` of the same occurrence). Every other column is a single-valued sparse
    field. An empty cell is missing (no id, no weight). A file whose first line is all numbers
    has no header and uses the header of the first train file. No quoting.

Labels must be ``0`` or ``1``. Lines are comma-separated; blank lines are skipped.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dtn_torchrec.data.idmap import check_field_name
from dtn_torchrec.data.prepare_inputs import SourceFile
from dtn_torchrec.data.prepare_lines import (
    BAD_FEATURE_NUM,
    BAD_ID,
    BAD_LABEL,
    BAD_SAMPLE_ID,
    BAD_SEPARATOR,
    BAD_VALUE,
    DUPLICATE_COMMON_KEY,
    EMPTY_FILE,
    MISSING_COMMON_KEY,
    NEGATIVE_ID,
    UNKNOWN_FIELD,
    WRONG_COLUMN_COUNT,
    BadLineLog,
    PrepareError,
    iter_line_blocks,
    parse_block,
    read_first_line,
    reject_mask,
    snippet,
    to_float32,
    to_int64,
)
from dtn_torchrec.data.prepare_ragged import Ragged, concat_blocks, group_by_field
from dtn_torchrec.data.schema import ALICCP_FIELDS, ALICCP_LABELS, SAMPLE_ID_COLUMN

FORMATS = ("aliccp-raw", "fdn", "paddlerec", "csv")
# The raw id that means "missing" unless --missing-id says otherwise.
DEFAULT_MISSING_ID: Dict[str, Optional[int]] = {
    "aliccp-raw": 0,
    "fdn": 0,
    "paddlerec": 0,
    "csv": None,
}
SKELETON_COLUMNS = [
    "sample_id",
    "click",
    "conversion",
    "common_feature_index",
    "feature_num",
    "feature_list",
]
COMMON_COLUMNS = ["common_feature_index", "feature_num", "feature_list"]
_BINARY = pa.array(["0", "1"], pa.large_string())


@dataclass
class ParsedRows:
    """N parsed rows.

    Args:
        sample_ids: int64 ``[N]``.
        labels: int8 ``[N, T]``, 0/1, columns in label order.
        fields: one Ragged over the N rows per field, in field order (raw ids, none 0).
        common_rows: int64 ``[N]`` row of ``CommonTable`` whose lists follow each row's own
            lists, or None.
    """

    sample_ids: np.ndarray
    labels: np.ndarray
    fields: List[Ragged]
    common_rows: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.sample_ids)

    def take(self, rows: np.ndarray) -> "ParsedRows":
        return ParsedRows(
            self.sample_ids[rows],
            self.labels[rows],
            [f.take(rows) for f in self.fields],
            None if self.common_rows is None else self.common_rows[rows],
        )


@dataclass
class CommonTable:
    """Raw Ali-CCP common features of one split: K keys, one Ragged over the K rows per field."""

    keys: Dict[str, int]
    fields: List[Ragged]

    @property
    def num_keys(self) -> int:
        return len(self.keys)


@dataclass
class Block:
    """What one line block produced: rows (None if every line was bad), lines read, bytes."""

    rows: Optional[ParsedRows]
    lines: int
    nbytes: int


class InputFormat(ABC):
    """A parser: the fields and labels it produces and the rows of each input file."""

    name: str
    fields: List[str]
    weighted: List[bool]
    labels: List[str]

    def __init__(self, block_bytes: int, missing_id: Optional[int]) -> None:
        self.block_bytes = block_bytes
        self.missing_id = missing_id

    def load_common(
        self, source: SourceFile, skip_bad: bool, log: BadLineLog, on_bytes: Callable[[int], None]
    ) -> Optional[CommonTable]:
        """The table joined into the rows of ``source`` (raw Ali-CCP only)."""
        return None

    def read(
        self, source: SourceFile, common: Optional[CommonTable], skip_bad: bool, log: BadLineLog
    ) -> Iterator[Block]:
        """The parsed blocks of ``source``; bad lines raise, or go to ``log`` with ``skip_bad``."""
        parse = self.block_parser(source, common)
        for block in iter_line_blocks(source.path, self.block_bytes, self.header_lines(source)):
            yield Block(parse_block(block, parse, skip_bad, log), block.num_lines, block.nbytes)

    def header_lines(self, source: SourceFile) -> int:
        """Lines at the top of ``source`` that are not data (a csv header)."""
        return 0

    @abstractmethod
    def block_parser(
        self, source: SourceFile, common: Optional[CommonTable]
    ) -> Callable[[pa.Array, np.ndarray], ParsedRows]:
        """``parse(lines, line_numbers) -> ParsedRows``; raises BlockRejection for bad lines."""


def resolve_missing_id(name: str, missing_id: "int | str") -> Optional[int]:
    """The raw id meaning "missing" for format ``name``: ``"default"`` (the format's own),
    ``"none"`` (every id is an ordinary id) or an integer."""
    if missing_id == "default":
        return DEFAULT_MISSING_ID[name]
    if missing_id == "none":
        return None
    if isinstance(missing_id, int) and not isinstance(missing_id, bool):
        return missing_id
    raise ValueError(f"--missing-id {missing_id!r}: expected an integer, 'none' or 'default'")


def make_format(
    name: str,
    sources: Sequence[SourceFile],
    fields: Optional[List[str]] = None,
    labels: Optional[List[str]] = None,
    weight_prefix: str = "D",
    block_bytes: int = 8 << 20,
    missing_id: "int | str" = "default",
) -> InputFormat:
    """The parser for format ``name`` over ``sources`` (csv reads the headers)."""
    if name not in FORMATS:
        raise ValueError(f"unknown format {name!r}; choose from {', '.join(FORMATS)}")
    missing = resolve_missing_id(name, missing_id)
    if name == "csv":
        if fields:
            raise ValueError("--fields does not apply to --format csv: the header names the fields")
        return CsvFormat(sources, labels, weight_prefix, block_bytes, missing)
    if labels:
        raise ValueError(
            f"--labels applies to --format csv only; {name} has labels {ALICCP_LABELS}"
        )
    field_names = [check_field_name(f) for f in (fields or ALICCP_FIELDS)]
    if len(set(field_names)) != len(field_names):
        raise ValueError(f"--fields has duplicates: {field_names}")
    if name == "aliccp-raw":
        return RawAliccpFormat(field_names, block_bytes, missing)
    if name == "fdn":
        return FdnFormat(field_names, block_bytes, missing)
    return PaddleRecFormat(field_names, block_bytes, missing)


# ---------------------------------------------------------------------------------------------
# Vectorised pieces shared by the parsers.


def split_columns(lines: pa.Array, names: Sequence[str], sep: str = ",") -> List[pa.Array]:
    """Splits lines into exactly ``len(names)`` columns; rejects lines with another count."""
    cols = pc.split_pattern(lines, sep)
    counts = pc.list_value_length(cols).to_numpy(zero_copy_only=False)
    n = len(names)

    def describe(row: int) -> Tuple[str, str]:
        found = int(counts[row])
        expected = f"expected {n} {sep!r}-separated columns ({','.join(names)}), found {found}"
        if found < n:
            return names[found], f"{expected}: column {names[found]!r} is missing"
        return names[-1], f"{expected}: extra text after column {names[-1]!r}"

    reject_mask(counts != n, WRONG_COLUMN_COUNT, describe)
    return [pc.list_element(cols, j) for j in range(n)]


def parse_sample_ids(col: pa.Array, name: str = SAMPLE_ID_COLUMN) -> np.ndarray:
    return to_int64(
        col,
        BAD_SAMPLE_ID,
        lambda i: (name, f"sample id {snippet(col[i].as_py())} is not an integer"),
    )


def parse_labels(cols: Sequence[pa.Array], names: Sequence[str]) -> np.ndarray:
    """0/1 label columns -> int8 ``[N, T]``; rejects any other value."""
    out = np.empty((len(cols[0]), len(cols)), dtype=np.int8)
    for t, (col, name) in enumerate(zip(cols, names)):
        ok = pc.is_in(col, value_set=_BINARY).to_numpy(zero_copy_only=False)
        reject_mask(
            ~ok,
            BAD_LABEL,
            lambda i, c=col, n=name: (n, f"label {snippet(c[i].as_py())} is not 0 or 1"),
        )
        out[:, t] = pc.equal(col, "1").to_numpy(zero_copy_only=False)
    return out


def field_codes(names: pa.Array, index: Dict[str, int], row_of: Optional[np.ndarray]) -> np.ndarray:
    """Field name strings -> field indices; rejects unknown names."""
    encoded = pc.dictionary_encode(names)
    lookup = np.array([index.get(n, -1) for n in encoded.dictionary.to_pylist()], dtype=np.int64)
    codes = lookup[encoded.indices.to_numpy(zero_copy_only=False)]
    known = ", ".join(index)
    reject_mask(
        codes < 0,
        UNKNOWN_FIELD,
        lambda i: (
            str(names[i].as_py()),
            f"unknown field name {snippet(names[i].as_py())} (known: {known})",
        ),
        row_of,
    )
    return codes


def split_pairs(
    values: pa.Array,
    sep: str,
    row_of: Optional[np.ndarray],
    describe: Callable[[int], Tuple[str, str]],
) -> Tuple[pa.Array, pa.Array]:
    """Splits each entry at ``sep`` into exactly two parts; rejects the rows of other entries."""
    parts = pc.split_pattern(values, sep)
    counts = pc.list_value_length(parts).to_numpy(zero_copy_only=False)
    reject_mask(counts != 2, BAD_SEPARATOR, describe, row_of)
    return pc.list_element(parts, 0), pc.list_element(parts, 1)


def split_lists(col: pa.Array, sep: str) -> Tuple[pa.Array, np.ndarray]:
    """Splits every entry at ``sep``: flat items ``[m]`` and the number per row ``[N]`` (an empty
    entry has no items)."""
    lists = pc.split_pattern(col, sep)
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = lists.flatten()
    empty = pc.equal(pc.binary_length(col), 0).to_numpy(zero_copy_only=False)
    if empty.any():
        flat = flat.filter(pa.array(np.repeat(~empty, lengths)))
        lengths[empty] = 0
    return flat, lengths


def reject_negative(
    ids: np.ndarray,
    missing_id: Optional[int],
    row_of: Optional[np.ndarray],
    describe: Callable[[int], Tuple[str, str]],
) -> None:
    """Rejects the rows holding a negative id other than ``missing_id``."""
    bad = ids < 0
    if missing_id is not None and missing_id < 0:
        bad &= ids != missing_id
    reject_mask(bad, NEGATIVE_ID, describe, row_of)


def parse_feature_list(
    col: pa.Array,
    index: Dict[str, int],
    num_rows: int,
    counts: Optional[np.ndarray],
    missing_id: Optional[int],
    column: str = "feature_list",
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Raw Ali-CCP feature lists ``field\\x02id\\x03value`` joined by ``\\x01``.

    Returns ``row_of``, ``field_of``, ``ids`` (int64 ``[m]``) and ``values`` (float32 ``[m]``);
    ``counts`` (int64 ``[N]``, the ``feature_num`` column) must match the list lengths.
    """
    flat, lengths = split_lists(col, "\x01")
    row_of = np.repeat(np.arange(num_rows, dtype=np.int64), lengths)
    first_of_row = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)

    def where(i: int) -> str:
        return f"feature {i - first_of_row[row_of[i]] + 1} {snippet(flat[i].as_py())}"

    names, rest = split_pairs(
        flat,
        "\x02",
        row_of,
        lambda i: (column, f"{where(i)} is not field\\x02id\\x03value (no single \\x02)"),
    )
    id_text, value_text = split_pairs(
        rest,
        "\x03",
        row_of,
        lambda i: (column, f"{where(i)} is not field\\x02id\\x03value (no single \\x03)"),
    )
    field_of = field_codes(names, index, row_of)
    ids = to_int64(
        id_text, BAD_ID, lambda i: (names[i].as_py(), f"{where(i)}: id is not an integer"), row_of
    )
    reject_negative(
        ids,
        missing_id,
        row_of,
        lambda i: (names[i].as_py(), f"{where(i)}: id {ids[i]} is negative"),
    )
    values = to_float32(
        value_text,
        BAD_VALUE,
        lambda i: (names[i].as_py(), f"{where(i)}: value is not a number"),
        row_of,
    )
    if counts is not None:
        reject_mask(
            counts != lengths,
            BAD_FEATURE_NUM,
            lambda r: (
                "feature_num",
                f"feature_num {counts[r]} but the list has {lengths[r]} features",
            ),
        )
    return row_of, field_of, ids, values


def _parse_count(col: pa.Array) -> np.ndarray:
    return to_int64(
        col,
        BAD_FEATURE_NUM,
        lambda i: ("feature_num", f"{snippet(col[i].as_py())} is not an integer"),
    )


# ---------------------------------------------------------------------------------------------
# The formats.


class RawAliccpFormat(InputFormat):
    name = "aliccp-raw"

    def __init__(self, fields: List[str], block_bytes: int, missing_id: Optional[int]) -> None:
        super().__init__(block_bytes, missing_id)
        self.fields = fields
        self.weighted = [True] * len(fields)
        self.labels = list(ALICCP_LABELS)
        self._index = {f: i for i, f in enumerate(fields)}

    def load_common(
        self, source: SourceFile, skip_bad: bool, log: BadLineLog, on_bytes: Callable[[int], None]
    ) -> Optional[CommonTable]:
        """Reads the whole common-features file into per-field numpy ragged arrays (a Python
        dict only maps the keys to rows)."""
        assert source.common_path is not None
        keys: Dict[str, int] = {}
        per_field: List[List[Ragged]] = [[] for _ in self.fields]

        def parse(lines: pa.Array, line_numbers: np.ndarray) -> Tuple[List[str], List[Ragged]]:
            cols = split_columns(lines, COMMON_COLUMNS)
            block_keys = cols[0].to_pylist()
            seen_here: Dict[str, int] = {}
            dup = np.zeros(len(block_keys), dtype=bool)
            for i, key in enumerate(block_keys):
                dup[i] = key in keys or key in seen_here
                seen_here.setdefault(key, i)
            reject_mask(
                dup,
                DUPLICATE_COMMON_KEY,
                lambda i: ("common_feature_index", f"key {snippet(block_keys[i])} appeared before"),
            )
            counts = _parse_count(cols[1])
            row_of, field_of, ids, values = parse_feature_list(
                cols[2], self._index, len(lines), counts, self.missing_id
            )
            return block_keys, group_by_field(
                row_of, field_of, ids, values, len(lines), len(self.fields), self.missing_id
            )

        for block in iter_line_blocks(source.common_path, self.block_bytes):
            parsed = parse_block(block, parse, skip_bad, log)
            on_bytes(block.nbytes)
            if parsed is None:
                continue
            block_keys, ragged = parsed
            keys.update(zip(block_keys, range(len(keys), len(keys) + len(block_keys))))
            for pieces, piece in zip(per_field, ragged):
                pieces.append(piece)
        fields = []
        for f, pieces in enumerate(per_field):
            fields.append(concat_blocks(pieces) if pieces else Ragged.empty(0, weighted=True))
            per_field[f] = []  # free this field's blocks before joining the next field
        return CommonTable(keys, fields)

    def block_parser(
        self, source: SourceFile, common: Optional[CommonTable]
    ) -> Callable[[pa.Array, np.ndarray], ParsedRows]:
        assert common is not None
        common_path = source.common_path

        def parse(lines: pa.Array, line_numbers: np.ndarray) -> ParsedRows:
            cols = split_columns(lines, SKELETON_COLUMNS)
            sample_ids = parse_sample_ids(cols[0])
            labels = parse_labels(cols[1:3], ALICCP_LABELS)
            encoded = pc.dictionary_encode(cols[3])
            lookup = np.array(
                [common.keys.get(k, -1) for k in encoded.dictionary.to_pylist()], dtype=np.int64
            )
            common_rows = lookup[encoded.indices.to_numpy(zero_copy_only=False)]
            reject_mask(
                common_rows < 0,
                MISSING_COMMON_KEY,
                lambda i: (
                    "common_feature_index",
                    f"key {snippet(cols[3][i].as_py())} is not in {common_path}",
                ),
            )
            counts = _parse_count(cols[4])
            row_of, field_of, ids, values = parse_feature_list(
                cols[5], self._index, len(lines), counts, self.missing_id
            )
            fields = group_by_field(
                row_of, field_of, ids, values, len(lines), len(self.fields), self.missing_id
            )
            return ParsedRows(sample_ids, labels, fields, common_rows)

        return parse


class FdnFormat(InputFormat):
    name = "fdn"

    def __init__(self, fields: List[str], block_bytes: int, missing_id: Optional[int]) -> None:
        super().__init__(block_bytes, missing_id)
        self.fields = fields
        self.weighted = [False] * len(fields)
        self.labels = list(ALICCP_LABELS)
        self._columns = ["sample_id", "click", "purchase"] + fields

    def block_parser(
        self, source: SourceFile, common: Optional[CommonTable]
    ) -> Callable[[pa.Array, np.ndarray], ParsedRows]:
        def parse(lines: pa.Array, line_numbers: np.ndarray) -> ParsedRows:
            cols = split_columns(lines, self._columns)
            sample_ids = parse_sample_ids(cols[0])
            labels = parse_labels(cols[1:3], ["click", "purchase"])
            fields = [self._parse_field(j, name, cols[3 + j]) for j, name in enumerate(self.fields)]
            return ParsedRows(sample_ids, labels, fields)

        return parse

    def _parse_field(self, j: int, name: str, col: pa.Array) -> Ragged:
        prefix = f"{name}:"
        ok = pc.starts_with(col, prefix).to_numpy(zero_copy_only=False)
        if not ok.all():
            text = col.to_pylist()
            colon = np.array([":" in t for t in text])
            reject_mask(
                ~ok & ~colon,
                BAD_SEPARATOR,
                lambda i: (name, f"column {j + 4} {snippet(text[i])} is not {name}:id#id..."),
            )
            reject_mask(
                ~ok,
                UNKNOWN_FIELD,
                lambda i: (
                    text[i].split(":", 1)[0],
                    f"column {j + 4} holds field {snippet(text[i].split(':', 1)[0])}, expected {name!r}",
                ),
            )
        flat, lengths = split_lists(pc.utf8_slice_codeunits(col, len(prefix)), "#")
        row_of = np.repeat(np.arange(len(col), dtype=np.int64), lengths)
        ids = to_int64(
            flat,
            BAD_ID,
            lambda i: (name, f"id {snippet(flat[i].as_py())} is not an integer"),
            row_of,
        )
        reject_negative(ids, self.missing_id, row_of, lambda i: (name, f"id {ids[i]} is negative"))
        return Ragged.from_lengths(lengths, ids).drop_missing(self.missing_id)


class PaddleRecFormat(InputFormat):
    name = "paddlerec"

    def __init__(self, fields: List[str], block_bytes: int, missing_id: Optional[int]) -> None:
        super().__init__(block_bytes, missing_id)
        self.fields = fields
        self.weighted = [False] * len(fields)
        self.labels = list(ALICCP_LABELS)
        self._index = {f: i for i, f in enumerate(fields)}

    def block_parser(
        self, source: SourceFile, common: Optional[CommonTable]
    ) -> Callable[[pa.Array, np.ndarray], ParsedRows]:
        head = ["sample_id", "click", "purchase"]

        def parse(lines: pa.Array, line_numbers: np.ndarray) -> ParsedRows:
            cols = pc.split_pattern(lines, ",")
            counts = pc.list_value_length(cols).to_numpy(zero_copy_only=False).astype(np.int64)
            reject_mask(
                counts < 3,
                WRONG_COLUMN_COUNT,
                lambda r: (
                    head[counts[r]],
                    f"expected at least 3 ','-separated columns "
                    f"({','.join(head)},field:id,...), found {counts[r]}",
                ),
            )
            sample_ids = parse_sample_ids(pc.list_element(cols, 0))
            labels = parse_labels(
                [pc.list_element(cols, 1), pc.list_element(cols, 2)], ["click", "purchase"]
            )
            tokens = pc.list_slice(cols, 3).flatten()
            row_of = np.repeat(np.arange(len(lines), dtype=np.int64), counts - 3)
            first_of_row = np.concatenate([[0], np.cumsum(counts - 3)[:-1]]).astype(np.int64)

            def where(i: int) -> str:
                return f"column {i - first_of_row[row_of[i]] + 4} {snippet(tokens[i].as_py())}"

            names, id_text = split_pairs(
                tokens, ":", row_of, lambda i: ("features", f"{where(i)} is not field:id")
            )
            field_of = field_codes(names, self._index, row_of)
            ids = to_int64(
                id_text,
                BAD_ID,
                lambda i: (names[i].as_py(), f"{where(i)}: id is not an integer"),
                row_of,
            )
            reject_negative(
                ids,
                self.missing_id,
                row_of,
                lambda i: (names[i].as_py(), f"{where(i)}: id {ids[i]} is negative"),
            )
            fields = group_by_field(
                row_of, field_of, ids, None, len(lines), len(self.fields), self.missing_id
            )
            return ParsedRows(sample_ids, labels, fields)

        return parse


@dataclass
class _CsvLayout:
    """Header of one csv file: its column names and whether line 1 is that header."""

    columns: List[str]
    has_header: bool


class CsvFormat(InputFormat):
    name = "csv"

    def __init__(
        self,
        sources: Sequence[SourceFile],
        labels: Optional[List[str]],
        weight_prefix: str,
        block_bytes: int,
        missing_id: Optional[int],
    ) -> None:
        super().__init__(block_bytes, missing_id)
        reference = next((s for s in sources if s.split == "train"), sources[0])
        first = read_first_line(reference.path)
        if not first.strip():
            raise PrepareError(
                reference.path,
                None,
                "file",
                EMPTY_FILE,
                f"no header line (an empty file?); the first {reference.split} "
                "file of --format csv must name its columns",
            )
        if _all_numbers(first):
            raise ValueError(
                f"{reference.path}: line 1 is not a header (all numbers); the first "
                f"{reference.split} file of --format csv must name its columns"
            )
        self.columns = first.split(",")
        repeated = sorted({c for c in self.columns if self.columns.count(c) > 1})
        if repeated:
            raise ValueError(
                f"{reference.path}: line 1 is not a usable header: columns {repeated} repeat"
            )
        self._layouts = {s.path: self._layout_of(s.path) for s in sources}
        self._label_columns, self.labels = self._choose_labels(labels, reference.path)
        taken = set(self._label_columns) | {SAMPLE_ID_COLUMN}
        candidates = [c for c in self.columns if c not in taken]
        weight_of = {}
        if weight_prefix:
            weight_of = {
                c[len(weight_prefix) :]: c
                for c in candidates
                if c.startswith(weight_prefix) and c[len(weight_prefix) :] in candidates
            }
        weight_columns = set(weight_of.values())
        self.fields = [check_field_name(c) for c in candidates if c not in weight_columns]
        if not self.fields:
            raise ValueError(
                f"{reference.path}: no sparse field columns besides the labels {self._label_columns}"
            )
        self.weighted = [f in weight_of for f in self.fields]
        self._weight_columns = {f: weight_of[f] for f in self.fields if f in weight_of}

    def _layout_of(self, path: str) -> _CsvLayout:
        first = read_first_line(path)
        if _all_numbers(first):
            return _CsvLayout(self.columns, has_header=False)
        columns = first.split(",")
        if sorted(columns) != sorted(self.columns):
            raise ValueError(
                f"{path}: header columns {columns} differ from the train header {self.columns}"
            )
        return _CsvLayout(columns, has_header=True)

    def _choose_labels(self, labels: Optional[List[str]], path: str) -> Tuple[List[str], List[str]]:
        if labels:
            missing = [c for c in labels if c not in self.columns]
            if missing:
                raise ValueError(
                    f"{path}: --labels {missing} are not columns of the header {self.columns}"
                )
            return list(labels), list(labels)
        columns, names = [], []
        if "click" in self.columns:
            columns.append("click")
            names.append("click")
        conversion = [c for c in ("conversion", "purchase") if c in self.columns]
        if len(conversion) > 1:
            raise ValueError(f"{path}: both 'conversion' and 'purchase' columns; pass --labels")
        if conversion:
            columns.append(conversion[0])
            names.append("conversion")
        if not columns:
            raise ValueError(f"{path}: no click/conversion/purchase column; pass --labels a,b,...")
        return columns, names

    def header_lines(self, source: SourceFile) -> int:
        return 1 if self._layouts[source.path].has_header else 0

    def block_parser(
        self, source: SourceFile, common: Optional[CommonTable]
    ) -> Callable[[pa.Array, np.ndarray], ParsedRows]:
        columns = self._layouts[source.path].columns
        header_lines = self.header_lines(source)
        position = {c: j for j, c in enumerate(columns)}

        def parse(lines: pa.Array, line_numbers: np.ndarray) -> ParsedRows:
            cols = split_columns(lines, columns)
            if SAMPLE_ID_COLUMN in position:
                sample_ids = parse_sample_ids(cols[position[SAMPLE_ID_COLUMN]])
            else:
                sample_ids = line_numbers - header_lines
            labels = parse_labels(
                [cols[position[c]] for c in self._label_columns], self._label_columns
            )
            fields = []
            for name in self.fields:
                col = cols[position[name]]
                ids = _cells(col, "0", to_int64, BAD_ID, name, "id is not an integer")
                keep = pc.not_equal(col, "").to_numpy(zero_copy_only=False)
                if self.missing_id is not None:
                    keep &= ids != self.missing_id
                reject_negative(
                    np.where(keep, ids, 0),
                    None,
                    None,
                    lambda i, n=name, v=ids: (n, f"id {v[i]} is negative"),
                )
                weights = None
                if name in self._weight_columns:
                    column = self._weight_columns[name]
                    weights = _cells(
                        cols[position[column]],
                        "0",
                        to_float32,
                        BAD_VALUE,
                        column,
                        "weight is not a number",
                    )[keep]
                fields.append(Ragged.from_lengths(keep.astype(np.int64), ids[keep], weights))
            return ParsedRows(sample_ids, labels, fields)

        return parse


def _cells(
    col: pa.Array, empty: str, convert: Callable[..., np.ndarray], reason: str, name: str, what: str
) -> np.ndarray:
    filled = pc.if_else(pc.equal(col, ""), empty, col)
    return convert(filled, reason, lambda i: (name, f"{snippet(col[i].as_py())}: {what}"))


def _all_numbers(line: str) -> bool:
    try:
        for cell in line.split(","):
            if cell:
                float(cell)
    except ValueError:
        return False
    return True
