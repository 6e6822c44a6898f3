"""`dtn-prepare`: streams Ali-CCP (or logs in the same shapes) into the canonical Parquet dataset
described in ``schema.py``, plus ``schema.json`` and, for the ``vocab`` id mapping, ``vocab/``.

Passes: (1) ``vocab`` only: count raw ids over the rows that will be written to ``train``
(after the label rule and the valid split); (2) per input file: parse blocks, drop rows, route
``train``/``valid``, map ids, join raw Ali-CCP common features, write Parquet row groups.
Memory follows block size, vocabulary size and (raw Ali-CCP) one split's common-features table,
never the number of rows; ``raw`` ids (no vocabulary) are counted by fixed-size sketches.

Rows dropped, counted per split in ``schema.json["splits"][split]["dropped"][reason]``:

* ``click0_conversion1``: click = 0 with conversion = 1, the label pair Ali-CCP marks invalid
  (applied when the labels include ``click`` and ``conversion``);
* with ``skip_bad``, bad lines by reason (``prepare_lines``); counted in the split of the file
  they are in. Bad lines of a common-features file are not rows: they appear in
  ``summary["common_features"][split]["dropped"]``, and skeleton rows pointing at a key lost
  that way are dropped as ``missing_common_key``.

``valid_fraction`` (default ``DEFAULT_VALID_FRACTION`` when the input has a train split and no
valid split) moves the train rows whose seeded hash of the sample id falls below the fraction
to ``valid`` (Ali-CCP files are grouped by user, so a prefix would be biased); each split's
``rows_read`` counts the rows routed to it, so ``rows_read == rows + sum(dropped)``. A split
left with 0 rows is an error.

The dataset is written to a hidden temporary directory ``.<name>.tmp-<pid>-<hex>`` next to
``output`` (mode from the umask) and renamed at the end: a failed or interrupted run leaves
nothing at ``output``, and the next run removes the temporary directories of runs whose process
is gone. ``overwrite`` replaces only a dataset dtn-prepare wrote (its output marker, see
``atomic_files``), never a directory holding the input or the ``vocab_from`` dataset.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from dtn_torchrec.atomic_files import claim_output_dir, publish_output_dir
from dtn_torchrec.data.distinct import DistinctSketch, splitmix64
from dtn_torchrec.data.formats import CommonTable, InputFormat, ParsedRows, make_format
from dtn_torchrec.data.idmap import (
    DEFAULT_HASH_SIZE,
    HashIdMap,
    IdCounter,
    IdMap,
    RawIdMap,
    build_vocab,
    load_id_maps,
    map_in_place,
    save_vocab,
)
from dtn_torchrec.data.prepare_inputs import SourceFile, Sources, discover_sources
from dtn_torchrec.data.prepare_lines import BadLineLog
from dtn_torchrec.data.prepare_ragged import Ragged
from dtn_torchrec.data.schema import (
    SAMPLE_ID_COLUMN,
    FieldSpec,
    SchemaSpec,
    SplitSpec,
    weight_column_name,
)

PREPARE_TOOL = "dtn-prepare"
INVALID_LABEL_PAIR = "click0_conversion1"
ID_MAPPINGS = ("vocab", "hash", "raw")
DEFAULT_VALID_FRACTION = 0.1


@dataclass
class PrepareOptions:
    """Options of ``prepare_dataset`` (the ``dtn-prepare`` flags).

    Args:
        split: read only this split (a directory) or name the split of a single input file.
        id_mapping: ``vocab``, ``hash`` or ``raw`` (see ``idmap``).
        min_count: ``vocab``: keep raw ids seen at least this often in the train split.
        hash_size: ``hash``: table size of every field (row 0 reserved).
        hash_sizes: ``hash``: per-field table sizes overriding ``hash_size``.
        vocab_from: reuse the fields and id mapping of this existing dataset.
        valid_fraction: share of train rows moved to ``valid`` by a hash of the sample id; None:
            ``DEFAULT_VALID_FRACTION`` if the input has a train and no valid split, else 0.
        seed: seed of that hash.
        missing_id: the raw id meaning "missing": ``"default"`` (the format's, see
            ``formats``), ``"none"`` or an integer.
        labels: ``csv``: label columns, in task order.
        fields: non-csv formats: the known field names (default: the 23 Ali-CCP fields).
        weight_prefix: ``csv``: prefix of weight columns (``""``: none).
        skip_bad: skip and count malformed lines instead of stopping.
        overwrite: replace an existing ``output``.
        block_bytes: bytes of input parsed at once.
        row_group_rows: most rows per Parquet row group.
        max_row_group_values: most ids per Parquet row group (long lists make smaller groups).
        rows_per_file: start a new part file after this many rows.
        progress: True: tqdm bar on stderr; None: bar on a terminal, else a line every 30 s;
            False: silent.
    """

    split: Optional[str] = None
    id_mapping: str = "vocab"
    min_count: int = 1
    hash_size: int = DEFAULT_HASH_SIZE
    hash_sizes: Dict[str, int] = field(default_factory=dict)
    vocab_from: Optional[str] = None
    valid_fraction: Optional[float] = None
    seed: int = 0
    missing_id: int | str = "default"
    labels: Optional[List[str]] = None
    fields: Optional[List[str]] = None
    weight_prefix: str = "D"
    skip_bad: bool = False
    overwrite: bool = False
    block_bytes: int = 8 << 20
    row_group_rows: int = 65536
    max_row_group_values: int = 1 << 23
    rows_per_file: int = 1 << 20
    progress: Optional[bool] = False

    def validate(self) -> None:
        if self.id_mapping not in ID_MAPPINGS:
            raise ValueError(
                f"id mapping {self.id_mapping!r}: choose from {', '.join(ID_MAPPINGS)}"
            )
        if self.min_count < 1:
            raise ValueError(f"--min-count must be >= 1, got {self.min_count}")
        if self.valid_fraction is not None and not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"--valid-fraction must be in [0, 1), got {self.valid_fraction}")
        for name, size in [("--hash-size", self.hash_size)] + [
            (f"--hash-sizes {k}", v) for k, v in self.hash_sizes.items()
        ]:
            if size < 2:
                raise ValueError(f"{name} must be >= 2 (row 0 is reserved), got {size}")
        for name, value in (
            ("block bytes", self.block_bytes),
            ("row group rows", self.row_group_rows),
            ("row group values", self.max_row_group_values),
            ("rows per file", self.rows_per_file),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")


def valid_mask(sample_ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """True for the rows that go to ``valid``: splitmix64(sample_id + seed * golden) / 2**64 <
    fraction. Deterministic per sample id, independent of row order. bool ``[N]``."""
    with np.errstate(over="ignore"):
        x = sample_ids.astype(np.uint64) + np.uint64(seed % 2**64) * np.uint64(0x9E3779B97F4A7C15)
        x = splitmix64(x)
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53)) < fraction


def prepare_dataset(
    fmt: str,
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    options: Optional[PrepareOptions] = None,
) -> SchemaSpec:
    """Converts ``input_path`` (format ``fmt``) into a dataset at ``output``; returns its schema."""
    options = options or PrepareOptions()
    options.validate()
    sources = discover_sources(fmt, os.fspath(input_path), options.split)
    parser = make_format(
        fmt,
        [s for files in sources.files.values() for s in files],
        options.fields,
        options.labels,
        options.weight_prefix,
        options.block_bytes,
        options.missing_id,
    )
    protected = [input_path] + ([options.vocab_from] if options.vocab_from else [])
    out = claim_output_dir(
        output, tool=PREPARE_TOOL, overwrite=options.overwrite, protected=protected
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out)
    tmp = _make_temporary(out)
    try:
        schema = _Preparation(fmt, os.fspath(input_path), parser, sources, options, tmp).run()
        publish_output_dir(tmp, out, tool=PREPARE_TOOL, overwrite=options.overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return schema


def _make_temporary(out: Path) -> Path:
    """A new hidden directory next to ``out`` named ``.<name>.tmp-<pid>-<8 hex>``; created with
    ``os.mkdir`` so that its mode follows the umask (the published dataset keeps it)."""
    path = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    os.mkdir(path)
    return path


def _remove_stale_temporaries(out: Path) -> None:
    """Removes the directories of earlier runs for ``out`` whose process is gone: this module's
    ``.<name>.tmp-<pid>-<hex>`` and ``publish_output_dir``'s ``.<name>.old-<pid>``."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?:tmp-(\d+)-[0-9a-f]{{8}}|old-(\d+))$")
    for path in out.parent.iterdir():
        match = pattern.match(path.name)
        if (
            match
            and path.is_dir()
            and not path.is_symlink()
            and not _process_alive(int(match.group(1) or match.group(2)))
        ):
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class _FieldStats:
    """Statistics of one field over the stats split: distinct ids counted exactly, or for raw
    ids (an open id space) estimated by a sketch in fixed memory."""

    distinct: Union[IdCounter, DistinctSketch]
    values: int = 0
    max_length: int = 0

    def cardinality(self) -> Tuple[int, float]:
        """Distinct ids (mapped id 0, missing/OOV, left out) and the estimate's relative error."""
        if isinstance(self.distinct, DistinctSketch):
            return self.distinct.estimate(), self.distinct.relative_standard_error()
        return int(np.count_nonzero(self.distinct.result()[0])), 0.0


@dataclass
class _SplitState:
    name: str
    spec: SplitSpec = field(default_factory=SplitSpec)
    writer: Optional["_SplitWriter"] = None


class _Preparation:
    """One run of ``prepare_dataset`` writing into ``root`` (the temporary directory)."""

    def __init__(
        self,
        fmt: str,
        input_path: str,
        parser: InputFormat,
        sources: Sources,
        options: PrepareOptions,
        root: Path,
    ) -> None:
        self.fmt, self.input_path, self.parser = fmt, input_path, parser
        self.options, self.root = options, root
        self.sources, self.ignored_inputs = sources.files, sources.ignored
        self.valid_fraction = self._valid_fraction()
        self.out_splits = self._output_splits()
        self.stats_split = "train" if "train" in self.out_splits else self.out_splits[0]
        self.labels = parser.labels
        self.invalid_pair = (
            (parser.labels.index("click"), parser.labels.index("conversion"))
            if {"click", "conversion"} <= set(parser.labels)
            else None
        )
        self.splits = {s: _SplitState(s) for s in self.out_splits}
        self.common_info: Dict[str, Dict[str, object]] = {}
        self.bad_examples: List[str] = []
        self.unterminated: List[str] = []
        self._common_cache: Optional[Tuple[str, CommonTable, Optional[_ArrowCommon]]] = None
        self.arrow_schema = self._arrow_schema()

    def _valid_fraction(self) -> float:
        if self.options.valid_fraction is not None:
            return self.options.valid_fraction
        own_valid = "valid" in self.sources
        return DEFAULT_VALID_FRACTION if "train" in self.sources and not own_valid else 0.0

    def _output_splits(self) -> List[str]:
        splits = list(self.sources)
        if self.valid_fraction > 0:
            if "train" not in self.sources:
                raise ValueError("--valid-fraction needs a train split")
            if "valid" in self.sources:
                raise ValueError(
                    f"--valid-fraction given, but the input already has a valid split: "
                    f"{[s.path for s in self.sources['valid']]}"
                )
            splits.append("valid")
        return [s for s in ("train", "valid", "test") if s in splits]

    def _arrow_schema(self) -> pa.Schema:
        columns = [pa.field(SAMPLE_ID_COLUMN, pa.int64())]
        for name, weighted in zip(self.parser.fields, self.parser.weighted):
            columns.append(pa.field(name, pa.list_(pa.int64())))
            if weighted:
                columns.append(pa.field(weight_column_name(name), pa.list_(pa.float32())))
        columns += [pa.field(label, pa.int8()) for label in self.labels]
        return pa.schema(columns)

    # --- the run -------------------------------------------------------------------------------

    def run(self) -> SchemaSpec:
        start = time.perf_counter()
        self.id_maps, vocab_files = self._id_maps()
        raw = self.id_mapping == "raw"
        self.field_stats = [
            _FieldStats(DistinctSketch() if raw else IdCounter()) for _ in self.parser.fields
        ]
        for split in ("train", "valid", "test"):
            for source in self.sources.get(split, []):
                self._write_source(source)
        for state in self.splits.values():
            if state.writer is None:
                state.writer = self._open_writer(state)
            state.spec.files = state.writer.close()
        self._check_splits_not_empty()
        schema = self._schema(vocab_files, time.perf_counter() - start)
        schema.save(self.root)
        return schema

    def _check_splits_not_empty(self) -> None:
        for name, state in self.splits.items():
            if state.spec.rows:
                continue
            dropped = ", ".join(f"{k}={v}" for k, v in sorted(state.spec.dropped.items())) or "none"
            if name == "valid" and "valid" not in self.sources:
                raise ValueError(
                    f"the valid split carved from train (--valid-fraction "
                    f"{self.valid_fraction}) has 0 rows; pass --valid-fraction 0 or "
                    f"a larger fraction"
                )
            files = ", ".join(s.path for s in self.sources[name])
            raise ValueError(
                f"split {name!r} has 0 rows after filtering "
                f"({state.spec.rows_read} read, dropped: {dropped}) from {files}"
            )

    def _id_maps(self) -> Tuple[List[IdMap], Dict[str, str]]:
        opts, fields = self.options, self.parser.fields
        if opts.vocab_from:
            source = SchemaSpec.load(opts.vocab_from)
            if sorted(source.field_names) != sorted(fields):
                raise ValueError(
                    f"--vocab-from {opts.vocab_from}: fields {source.field_names} differ from the "
                    f"input's {fields}"
                )
            sizes = {f.name: f.num_embeddings for f in source.fields}
            maps = load_id_maps(opts.vocab_from, source.id_mapping, sizes)
            self.id_mapping, self.min_count, self.hash_size = (
                source.id_mapping,
                source.min_count,
                source.hash_size,
            )
            files = {}
            if source.id_mapping == "vocab":
                files = {f: save_vocab(self.root, f, maps[f]) for f in fields}  # type: ignore[arg-type]
            return [maps[f] for f in fields], files
        self.id_mapping, self.min_count = opts.id_mapping, opts.min_count
        self.hash_size = opts.hash_size if opts.id_mapping == "hash" else 0
        if opts.hash_sizes and opts.id_mapping != "hash":
            raise ValueError("--hash-sizes needs --id-mapping hash")
        if opts.id_mapping == "raw":
            return [RawIdMap() for _ in fields], {}
        if opts.id_mapping == "hash":
            unknown = sorted(set(opts.hash_sizes) - set(fields))
            if unknown:
                raise ValueError(f"--hash-sizes names unknown fields {unknown} (fields: {fields})")
            return [HashIdMap(opts.hash_sizes.get(f, opts.hash_size)) for f in fields], {}
        if "train" not in self.sources:
            raise ValueError(
                "--id-mapping vocab builds the vocabulary from the train split, and the input has "
                "none; pass --vocab-from DATASET or --id-mapping hash"
            )
        counters = [IdCounter() for _ in fields]
        for source in self.sources["train"]:
            self._count_source(source, counters)
        vocabs = [build_vocab(c, opts.min_count) for c in counters]
        files = {f: save_vocab(self.root, f, v) for f, v in zip(fields, vocabs)}
        return list(vocabs), files

    def _count_source(self, source: SourceFile, counters: List[IdCounter]) -> None:
        common, _ = self._common(source, mapped=False)
        key_refs = np.zeros(common.num_keys if common else 0, dtype=np.int64)
        with _Progress(self.options.progress, f"{source.split} vocab", source.path) as progress:
            for block in self.parser.read(source, common, self.options.skip_bad, BadLineLog()):
                progress.update(block.nbytes)
                if block.rows is None:
                    continue
                for dest, rows in self._route(source.split, block.rows):
                    if dest != "train":
                        continue
                    rows = self._drop_invalid(rows)[0]
                    for counter, ragged in zip(counters, rows.fields):
                        counter.add(ragged.ids)
                    if common is not None:
                        key_refs += np.bincount(rows.common_rows, minlength=common.num_keys)
        if common is not None:
            for counter, table in zip(counters, common.fields):
                _count_common_ids(counter, table, key_refs)

    def _write_source(self, source: SourceFile) -> None:
        common, joined = self._common(source, mapped=True)
        key_used = np.zeros(common.num_keys if common else 0, dtype=bool)
        log = BadLineLog()
        with _Progress(self.options.progress, f"{source.split} write", source.path) as progress:
            for block in self.parser.read(source, common, self.options.skip_bad, log):
                progress.update(block.nbytes)
                parsed = 0 if block.rows is None else len(block.rows)
                self.splits[source.split].spec.rows_read += block.lines - parsed
                if block.rows is None:
                    continue
                for dest, rows in self._route(source.split, block.rows):
                    state = self.splits[dest]
                    state.spec.rows_read += len(rows)
                    rows, dropped = self._drop_invalid(rows)
                    if dropped:
                        state.spec.dropped[INVALID_LABEL_PAIR] = (
                            state.spec.dropped.get(INVALID_LABEL_PAIR, 0) + dropped
                        )
                    if len(rows):
                        self._write_rows(dest, rows, joined, key_used)
        spec = self.splits[source.split].spec
        for reason, count in log.counts.items():
            spec.dropped[reason] = spec.dropped.get(reason, 0) + count
        self.bad_examples.extend(log.examples)
        self.unterminated.extend(log.unterminated)
        if common is not None and source.split == self.stats_split:
            for stats, table in zip(self.field_stats, common.fields):
                _count_common_ids(stats.distinct, table, key_used.astype(np.int64))

    def _common(
        self, source: SourceFile, mapped: bool
    ) -> Tuple[Optional[CommonTable], Optional["_ArrowCommon"]]:
        """The common-features table of ``source`` (raw Ali-CCP), kept for the next pass; with
        ``mapped``, its ids mapped and its Arrow views for joining."""
        if source.common_path is None:
            return None, None
        cached = self._common_cache
        if cached is None or cached[0] != source.common_path:
            self._common_cache = None  # release the previous split's table before loading
            log = BadLineLog()
            with _Progress(
                self.options.progress, f"{source.split} common", source.common_path
            ) as progress:
                table = self.parser.load_common(source, self.options.skip_bad, log, progress.update)
            assert table is not None
            self.common_info[source.split] = {
                "path": source.common_path,
                "keys": table.num_keys,
                "dropped": dict(log.counts),
            }
            self.bad_examples.extend(log.examples)
            self.unterminated.extend(log.unterminated)
            cached = (source.common_path, table, None)
        path, table, joined = cached
        if mapped and joined is None:
            for ragged, id_map in zip(table.fields, self.id_maps):
                map_in_place(id_map, ragged.ids)
            joined = _ArrowCommon(table)
        self._common_cache = (path, table, joined)
        return table, joined

    def _route(self, split: str, rows: ParsedRows) -> List[Tuple[str, ParsedRows]]:
        if split != "train" or self.valid_fraction <= 0:
            return [(split, rows)]
        to_valid = valid_mask(rows.sample_ids, self.valid_fraction, self.options.seed)
        return [
            ("train", rows.take(np.flatnonzero(~to_valid))),
            ("valid", rows.take(np.flatnonzero(to_valid))),
        ]

    def _drop_invalid(self, rows: ParsedRows) -> Tuple[ParsedRows, int]:
        if self.invalid_pair is None:
            return rows, 0
        click, conversion = self.invalid_pair
        bad = (rows.labels[:, click] == 0) & (rows.labels[:, conversion] == 1)
        if not bad.any():
            return rows, 0
        return rows.take(np.flatnonzero(~bad)), int(bad.sum())

    def _write_rows(
        self, dest: str, rows: ParsedRows, joined: Optional["_ArrowCommon"], key_used: np.ndarray
    ) -> None:
        state = self.splits[dest]
        if state.writer is None:
            state.writer = self._open_writer(state)
        own = [r.with_ids(m.map(r.ids)) for r, m in zip(rows.fields, self.id_maps)]
        lengths = [r.lengths for r in own]
        if joined is not None:
            lengths = [
                n + common_lengths[rows.common_rows]
                for n, common_lengths in zip(lengths, joined.lengths)
            ]
        if dest == self.stats_split:
            for stats, ragged, n in zip(self.field_stats, own, lengths):
                stats.distinct.add(ragged.ids)
                stats.values += int(n.sum())
                stats.max_length = max(stats.max_length, int(n.max(initial=0)))
            if joined is not None:
                key_used[rows.common_rows] = True
        row_values = sum(lengths)
        for lo, hi in _slices(
            row_values, self.options.row_group_rows, self.options.max_row_group_values
        ):
            columns: List[Tuple[pa.Array, Optional[pa.Array]]] = []
            for f, ragged in enumerate(own):
                part = ragged.slice_rows(lo, hi)
                if joined is None or not joined.has_ids[f]:
                    columns.append(part.arrow_lists())
                elif part.offsets[-1] == 0:
                    columns.append(joined.take(f, rows.common_rows[lo:hi]))
                else:
                    columns.append(
                        part.concat_rows(
                            joined.table.fields[f].take(rows.common_rows[lo:hi])
                        ).arrow_lists()
                    )
            batch = self._batch(rows.sample_ids[lo:hi], rows.labels[lo:hi], columns)
            state.writer.write(batch, int(row_values[lo:hi].sum()))
        state.spec.rows += len(rows)

    def _batch(
        self,
        sample_ids: np.ndarray,
        labels: np.ndarray,
        columns: List[Tuple[pa.Array, Optional[pa.Array]]],
    ) -> pa.RecordBatch:
        arrays: List[pa.Array] = [pa.array(sample_ids, pa.int64())]
        for (ids, weights), weighted in zip(columns, self.parser.weighted):
            arrays.append(ids)
            if weighted:
                arrays.append(weights)
        arrays += [pa.array(labels[:, t], pa.int8()) for t in range(labels.shape[1])]
        return pa.RecordBatch.from_arrays(arrays, schema=self.arrow_schema)

    def _open_writer(self, state: _SplitState) -> "_SplitWriter":
        return _SplitWriter(self.root, state.name, self.arrow_schema, self.options)

    # --- the schema ----------------------------------------------------------------------------

    def _schema(self, vocab_files: Dict[str, str], elapsed: float) -> SchemaSpec:
        rows = self.splits[self.stats_split].spec.rows
        fields = []
        for name, weighted, stats, id_map in zip(
            self.parser.fields, self.parser.weighted, self.field_stats, self.id_maps
        ):
            cardinality, cardinality_rse = stats.cardinality()
            fields.append(
                FieldSpec(
                    name=name,
                    num_embeddings=id_map.num_embeddings,
                    weight_column=weight_column_name(name) if weighted else None,
                    cardinality=cardinality,
                    cardinality_rse=cardinality_rse,
                    mean_length=stats.values / rows if rows else 0.0,
                    max_length=stats.max_length,
                )
            )
        summary = {
            "input": self.input_path,
            "sources": {split: [s.path for s in files] for split, files in self.sources.items()},
            "ignored_inputs": self.ignored_inputs,
            "stats_split": self.stats_split,
            "valid_fraction": self.valid_fraction,
            "missing_id": self.parser.missing_id,
            "unterminated_last_lines": self.unterminated,
            "seed": self.options.seed,
            "skip_bad": self.options.skip_bad,
            "vocab_from": self.options.vocab_from,
            "vocab_files": vocab_files,
            "common_features": self.common_info,
            "bad_line_examples": self.bad_examples[:20],
            "elapsed_s": round(elapsed, 3),
        }
        return SchemaSpec(
            fields=fields,
            labels=list(self.labels),
            splits={s: st.spec for s, st in self.splits.items()},
            id_mapping=self.id_mapping,
            source_format=self.fmt,
            min_count=self.min_count,
            hash_size=self.hash_size,
            summary=summary,
        )


def _count_common_ids(
    counter: Union[IdCounter, DistinctSketch],
    table: Ragged,
    key_counts: np.ndarray,
    keys_per_chunk: int = 8192,
) -> None:
    """Adds the ids of every common-table key ``k`` to ``counter`` ``key_counts[k]`` times, a
    chunk of keys at a time so that memory stays small next to the table."""
    for lo in range(0, table.num_rows, keys_per_chunk):
        part = table.slice_rows(lo, min(lo + keys_per_chunk, table.num_rows))
        per_id = np.repeat(key_counts[lo : lo + keys_per_chunk], part.lengths)
        used = per_id > 0
        counter.add(part.ids[used], per_id[used])


def _slices(row_values: np.ndarray, max_rows: int, max_values: int) -> List[Tuple[int, int]]:
    """Consecutive row ranges of at most ``max_rows`` rows and ``max_values`` ids (a single row
    with more ids still gets its own range)."""
    cum = np.concatenate([[0], np.cumsum(row_values)])
    out, lo, n = [], 0, len(row_values)
    while lo < n:
        hi = min(
            n, lo + max_rows, int(np.searchsorted(cum, cum[lo] + max_values, side="right")) - 1
        )
        hi = max(hi, lo + 1)
        out.append((lo, hi))
        lo = hi
    return out


class _ArrowCommon:
    """Arrow views of a mapped common-features table, so joining is one C++ ``take`` per field."""

    def __init__(self, table: CommonTable) -> None:
        self.table = table
        self.has_ids = [t.offsets[-1] > 0 for t in table.fields]
        self.lengths = [t.lengths for t in table.fields]
        self.lists = [t.arrow_lists(large=True) for t in table.fields]

    def take(self, f: int, rows: np.ndarray) -> Tuple[pa.Array, Optional[pa.Array]]:
        """Lists of field ``f`` for common-table ``rows`` (int64 ``[M]``), as ``list`` arrays."""
        index = pa.array(rows)
        ids, weights = self.lists[f]
        return (
            ids.take(index).cast(pa.list_(pa.int64())),
            None if weights is None else weights.take(index).cast(pa.list_(pa.float32())),
        )


class _SplitWriter:
    """Writes ``<root>/<split>/part-NNNNN.parquet``: row groups bounded by rows and ids, a new
    part file every ``rows_per_file`` rows."""

    def __init__(self, root: Path, split: str, schema: pa.Schema, options: PrepareOptions) -> None:
        self.root, self.split, self.schema, self.options = root, split, schema, options
        (root / split).mkdir(parents=True, exist_ok=True)
        self.files: List[str] = []
        self._writer: Optional[pq.ParquetWriter] = None
        self._file_rows = 0
        self._pending: List[pa.RecordBatch] = []
        self._pending_rows = self._pending_values = 0

    def write(self, batch: pa.RecordBatch, values: int) -> None:
        if self._pending and (
            self._pending_rows + batch.num_rows > self.options.row_group_rows
            or self._pending_values + values > self.options.max_row_group_values
        ):
            self._flush()
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        self._pending_values += values

    def close(self) -> List[str]:
        self._flush()
        if self._writer is None:  # an empty split still gets one (row-less) file with the schema
            self._open()
        assert self._writer is not None
        self._writer.close()
        return self.files

    def _open(self) -> None:
        relative = f"{self.split}/part-{len(self.files):05d}.parquet"
        # Statistics of list columns cost a third of the write time and help no reader; without a
        # dictionary, LZ4 compresses the repeated user histories of Ali-CCP better and faster.
        self._writer = pq.ParquetWriter(
            self.root / relative,
            self.schema,
            compression="lz4",
            use_dictionary=False,
            write_statistics=[SAMPLE_ID_COLUMN],
        )
        self.files.append(relative)
        self._file_rows = 0

    def _flush(self) -> None:
        if not self._pending:
            return
        if self._writer is not None and self._file_rows >= self.options.rows_per_file:
            self._writer.close()
            self._writer = None
        if self._writer is None:
            self._open()
        assert self._writer is not None
        table = pa.Table.from_batches(self._pending, schema=self.schema)
        self._writer.write_table(table, row_group_size=table.num_rows)
        self._file_rows += table.num_rows
        self._pending, self._pending_rows, self._pending_values = [], 0, 0


class _Progress:
    """Progress of one pass over one file, by bytes: a tqdm bar on stderr, or a line every 30 s."""

    def __init__(self, mode: Optional[bool], what: str, path: str) -> None:
        self.what, self.path = what, path
        total = _file_size(path)
        self.bar = None
        self.lines = False
        if mode is True or (mode is None and sys.stderr.isatty()):
            self.bar = tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc=f"{what} {Path(path).name}",
                file=sys.stderr,
                leave=False,
            )
        elif mode is None:
            self.lines = True
        self.total, self.done, self.start = total, 0, time.monotonic()
        self.last = self.start

    def update(self, nbytes: int) -> None:
        self.done += nbytes
        if self.bar is not None:
            self.bar.update(nbytes)
        elif self.lines and time.monotonic() - self.last >= 30:
            self.last = time.monotonic()
            share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
            print(
                f"dtn-prepare: {self.what} {self.path}: {self.done / 1e6:.0f} MB{share}, "
                f"{self.last - self.start:.0f} s",
                file=sys.stderr,
                flush=True,
            )

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def _file_size(path: str) -> Optional[int]:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def format_summary(schema: SchemaSpec, output: str | os.PathLike) -> str:
    """The human-readable summary ``dtn-prepare`` prints."""
    mapping = schema.id_mapping
    if mapping == "vocab":
        mapping = f"vocab, min_count {schema.min_count}"
    lines = [
        f"dtn-prepare: {schema.source_format} -> {output} ({mapping}); "
        f"labels {', '.join(schema.labels)}; {schema.summary.get('elapsed_s', 0):.1f} s",
        f"{'split':<6} {'rows_read':>12} {'rows':>12}  dropped",
    ]
    sources = schema.summary.get("sources", {})
    inputs = [f"{split} <- {', '.join(files)}" for split, files in sources.items()]
    lines[1:1] = [f"inputs: {'; '.join(inputs)}"] if inputs else []
    if schema.summary.get("ignored_inputs"):
        ignored = ", ".join(schema.summary["ignored_inputs"])
        lines.insert(2, f"ignored (not a data file name): {ignored}")
    for name, split in schema.splits.items():
        dropped = ", ".join(f"{k}={v}" for k, v in sorted(split.dropped.items())) or "-"
        lines.append(f"{name:<6} {split.rows_read:>12} {split.rows:>12}  {dropped}")
    for split, info in schema.summary.get("common_features", {}).items():
        dropped = ", ".join(f"{k}={v}" for k, v in sorted(info["dropped"].items())) or "none"
        lines.append(
            f"common features ({split}): {info['keys']} keys, bad lines dropped: {dropped}"
        )
    lines.append(f"fields (statistics of {schema.summary.get('stats_split', 'train')}):")
    lines.append(
        f"  {'field':<10} {'num_embeddings':>14} {'cardinality':>12} {'mean_len':>9} {'max_len':>8}  weights"
    )
    for f in schema.fields:
        cardinality = f"~{f.cardinality}" if f.cardinality_rse else str(f.cardinality)
        lines.append(
            f"  {f.name:<10} {f.num_embeddings:>14} {cardinality:>12} "
            f"{f.mean_length:>9.2f} "
            f"{f.max_length:>8}  {'yes' if f.weight_column else 'no'}"
        )
    for example in schema.summary.get("bad_line_examples", [])[:5]:
        lines.append(f"skipped: {example}")
    for where in schema.summary.get("unterminated_last_lines", []):
        lines.append(
            f"warning: {where} has no line break; kept because it parsed completely "
            f"(check that the file is whole)"
        )
    return "\n".join(lines)
