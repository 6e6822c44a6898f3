"""Synthetic Parquet datasets in the canonical layout (``dtn_torchrec/data/schema.py``).

Written directly (numpy + pyarrow) instead of through ``dtn-synth`` + ``dtn-prepare``: throughput
does not depend on planted signal, and the vocabulary-scaling benchmark needs schemas (20
log-spaced single-valued fields, up to 10^8 rows per table) that Ali-CCP does not have. Every
dataset is cached under its parameters' hash and written atomically (temp dir + rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dtn_torchrec.data.schema import (
    ALICCP_FIELDS,
    ALICCP_LABELS,
    SAMPLE_ID_COLUMN,
    FieldSpec,
    SchemaSpec,
    SplitSpec,
)
from dtn_torchrec.models.stats import ALICCP_VOCAB_LINES

ID_DISTRIBUTIONS = ("uniform", "zipf")
TRAIN_SPLIT = "train"
_CLICK_RATE = 0.10
_CONVERSION_GIVEN_CLICK = 0.20

# Ali-CCP list lengths per row (docs/data-formats.md): history fields (scaled by history_scale),
# the item's intention nodes, and the combination fields present on part of the rows.
_HISTORY_LENGTHS = {
    "109_14": (117, 138),
    "110_14": (342, 973),
    "127_14": (209, 587),
    "150_14": (191, 200),
}
_OTHER_LENGTHS = {"210": (3, 14), "853": (1, 6)}
_PRESENT = {"508": 0.55, "509": 0.15, "702": 0.35, "853": 0.5}


@dataclass(frozen=True)
class SyntheticField:
    """One sparse field of a synthetic dataset.

    Args:
        name: field (column, KJT key) name.
        num_embeddings: table rows; ids are drawn from ``[1, num_embeddings)`` (0 = missing).
        min_length, max_length: list length per row, uniform in this range.
        present: probability that a row has the field at all (else an empty list).
    """

    name: str
    num_embeddings: int
    min_length: int = 1
    max_length: int = 1
    present: float = 1.0

    def validate(self) -> None:
        if self.num_embeddings < 2:
            raise ValueError(f"field {self.name}: need at least 2 rows (id 0 is reserved)")
        if not 0 <= self.min_length <= self.max_length:
            raise ValueError(
                f"field {self.name}: bad length range {self.min_length}..{self.max_length}"
            )
        if not 0.0 <= self.present <= 1.0:
            raise ValueError(f"field {self.name}: present must lie in [0, 1]")


def aliccp_like_fields(id_scale: float, history_scale: float) -> List[SyntheticField]:
    """The 23 Ali-CCP fields: reference vocabularies x ``id_scale`` (at least 100 rows, or the
    real size when smaller) and Ali-CCP list lengths, histories x ``history_scale``."""
    fields = []
    for name in ALICCP_FIELDS:
        vocab = ALICCP_VOCAB_LINES[name]
        rows = max(min(vocab, 100), round(vocab * id_scale)) + 1
        low, high = 1, 1
        if name in _HISTORY_LENGTHS:
            lo, hi = _HISTORY_LENGTHS[name]
            low, high = max(1, round(lo * history_scale)), max(1, round(hi * history_scale))
        elif name in _OTHER_LENGTHS:
            low, high = _OTHER_LENGTHS[name]
        fields.append(SyntheticField(name, rows, low, high, _PRESENT.get(name, 1.0)))
    return fields


def log_spaced_fields(count: int, smallest: int, largest: int, scale: int) -> List[SyntheticField]:
    """``count`` single-valued fields ``f00..`` with vocabularies log-spaced from ``smallest``
    to ``largest``, every table ``x scale`` rows (plus the reserved id 0)."""
    vocab = np.round(np.logspace(np.log10(smallest), np.log10(largest), count)).astype(np.int64)
    return [SyntheticField(f"f{i:02d}", int(v) * scale + 1) for i, v in enumerate(vocab)]


def _draw_ids(
    rng: np.random.Generator, n: int, rows: int, distribution: str, exponent: float
) -> np.ndarray:
    """``n`` ids in ``[1, rows)``: uniform, or Zipf (id 1 the most frequent, as a frequency-
    sorted vocabulary numbers them; the tail folds back modulo the table)."""
    if distribution == "uniform":
        return rng.integers(1, rows, size=n, dtype=np.int64)
    ranks = rng.zipf(exponent, size=n).astype(np.int64)
    return 1 + (ranks - 1) % (rows - 1)


def write_dataset(
    out_dir: str | os.PathLike,
    fields: Sequence[SyntheticField],
    rows: int,
    *,
    seed: int,
    ids: str,
    zipf_exponent: float = 1.1,
    rows_per_group: int = 8192,
) -> SchemaSpec:
    """Writes ``out_dir/train/part-00000.parquet`` and ``schema.json`` (labels click, conversion).

    Row groups hold ``rows_per_group`` rows (fewer when needed for at least 8 groups, so rank
    sharding has groups to split). ``cardinality`` in the schema is left 0 (not counted).
    """
    if ids not in ID_DISTRIBUTIONS:
        raise ValueError(f"ids must be one of {ID_DISTRIBUTIONS}, got {ids!r}")
    if rows < 1:
        raise ValueError(f"rows must be positive, got {rows}")
    for f in fields:
        f.validate()
    out = Path(out_dir)
    (out / TRAIN_SPLIT).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    group = max(1, min(rows_per_group, rows // 8))
    total_ids = {f.name: 0 for f in fields}
    longest = {f.name: 0 for f in fields}
    relative = f"{TRAIN_SPLIT}/part-00000.parquet"
    writer = None
    try:
        for start in range(0, rows, group):
            n = min(group, rows - start)
            columns: Dict[str, pa.Array] = {
                SAMPLE_ID_COLUMN: pa.array(np.arange(start, start + n, dtype=np.int64))
            }
            for f in fields:
                lengths = rng.integers(f.min_length, f.max_length + 1, size=n)
                if f.present < 1.0:
                    lengths[rng.random(n) >= f.present] = 0
                offsets = np.zeros(n + 1, dtype=np.int32)
                np.cumsum(lengths, out=offsets[1:])
                values = _draw_ids(rng, int(offsets[-1]), f.num_embeddings, ids, zipf_exponent)
                columns[f.name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
                total_ids[f.name] += int(offsets[-1])
                longest[f.name] = max(longest[f.name], int(lengths.max(initial=0)))
            click = rng.random(n) < _CLICK_RATE
            conversion = click & (rng.random(n) < _CONVERSION_GIVEN_CLICK)
            columns[ALICCP_LABELS[0]] = pa.array(click.astype(np.int8))
            columns[ALICCP_LABELS[1]] = pa.array(conversion.astype(np.int8))
            table = pa.table(columns)
            if writer is None:
                writer = pq.ParquetWriter(out / relative, table.schema)
            writer.write_table(table, row_group_size=group)
    finally:
        if writer is not None:
            writer.close()
    schema = SchemaSpec(
        fields=[
            FieldSpec(
                name=f.name,
                num_embeddings=f.num_embeddings,
                mean_length=total_ids[f.name] / rows,
                max_length=longest[f.name],
            )
            for f in fields
        ],
        labels=list(ALICCP_LABELS),
        splits={TRAIN_SPLIT: SplitSpec(rows=rows, files=[relative], rows_read=rows)},
        id_mapping="hash",
        source_format="benchmark-synthetic",
    )
    schema.save(out)
    return schema


def cached_dataset(
    root: str | os.PathLike,
    name: str,
    fields: Sequence[SyntheticField],
    rows: int,
    *,
    seed: int,
    ids: str,
) -> Path:
    """The dataset for these parameters under ``root``, written first if not there yet."""
    params = {"fields": [asdict(f) for f in fields], "rows": rows, "seed": seed, "ids": ids}
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    target = Path(root) / f"{name}-{digest}"
    if (target / "schema.json").is_file():
        return target
    Path(root).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}-"))
    try:
        write_dataset(tmp, fields, rows, seed=seed, ids=ids)
        (tmp / "benchmark_params.json").write_text(json.dumps(params, indent=1))
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass(frozen=True)
class PlantedLabels:
    """A known label model over single-valued fields, so test AUC means something.

    ``logit_t = bias_t + sum_f w_t,f[id_f] + sum_(a,b) <u_t,ab[id_a], v_t,ab[id_b]>``: per-id
    main effects of every field (Gaussian, ``main_std``) and ``crosses_per_task`` rank-``rank``
    crosses per task between pairs of fields. One cross per task uses fixed pairs (click crosses
    fields F-2 and F-4, conversion F-3 and F-4: a shared item-like field, task-specific
    partners); more are drawn per task by ``draw_cross_pairs`` from the dataset's seed.
    Conversion is drawn only on clicked rows (``P(conv) = P(click) P(conv | click)``).

    Args:
        main_std: std of each field's per-id effect.
        cross_std: std of the cross factors' entries.
        rank: cross rank.
        click_bias, conversion_bias: logit offsets (base rates of about 10% and 20% of clicks).
        crosses_per_task: pairwise crosses per task.
    """

    main_std: float = 0.35
    cross_std: float = 0.7
    rank: int = 4
    click_bias: float = -2.6
    conversion_bias: float = -1.8
    crosses_per_task: int = 1


FieldPair = Tuple[int, int]
# Stream of the pair draw, apart from the data's: the ids and labels keep their draws.
_PAIR_STREAM = 1


def draw_cross_pairs(
    num_fields: int, crosses_per_task: int, tasks: Sequence[str], seed: int
) -> Dict[str, List[FieldPair]]:
    """``crosses_per_task`` distinct field pairs ``(a, b)``, ``a < b``, per task, each task's
    drawn independently from all ``F (F - 1) / 2`` pairs: tasks share a pair only by chance
    (``k^2 / (F (F - 1) / 2)`` pairs expected: 0.34 for 8 crosses of 20 fields)."""
    candidates = [(a, b) for a in range(num_fields) for b in range(a + 1, num_fields)]
    if not 1 <= crosses_per_task <= len(candidates):
        raise ValueError(
            f"crosses_per_task must lie in 1..{len(candidates)} for {num_fields} fields, "
            f"got {crosses_per_task}"
        )
    rng = np.random.default_rng([seed, _PAIR_STREAM])
    return {
        t: [candidates[i] for i in sorted(rng.choice(len(candidates), crosses_per_task, False))]
        for t in tasks
    }


@dataclass(frozen=True, eq=False)
class PlantedModel:
    """The drawn parameters of ``PlantedLabels`` over a list of fields.

    Args:
        bias: logit offset per task.
        mains: per task, per field, the per-id effect ``[num_embeddings]``.
        crosses: per task, ``(a, b, u [rows_a, R], v [rows_b, R])`` per crossed pair.
    """

    bias: Dict[str, float]
    mains: Dict[str, List[np.ndarray]]
    crosses: Dict[str, List[Tuple[int, int, np.ndarray, np.ndarray]]]

    @classmethod
    def draw(
        cls,
        rng: np.random.Generator,
        fields: Sequence[SyntheticField],
        labels: PlantedLabels,
        seed: int,
    ) -> "PlantedModel":
        """Main effects, then the cross factors of every task's pairs, from ``rng``; pairs
        from ``seed`` (see ``PlantedLabels``)."""
        tasks = list(ALICCP_LABELS)
        mains = {
            t: [rng.normal(0.0, labels.main_std, f.num_embeddings) for f in fields] for t in tasks
        }
        if labels.crosses_per_task == 1:
            last = len(fields) - 1
            pairs = {tasks[0]: [(last - 1, last - 3)], tasks[1]: [(last - 2, last - 3)]}
        else:
            pairs = draw_cross_pairs(len(fields), labels.crosses_per_task, tasks, seed)
        crosses = {
            t: [
                (
                    a,
                    b,
                    rng.normal(0.0, labels.cross_std, (fields[a].num_embeddings, labels.rank)),
                    rng.normal(0.0, labels.cross_std, (fields[b].num_embeddings, labels.rank)),
                )
                for a, b in pairs[t]
            ]
            for t in tasks
        }
        bias = {tasks[0]: labels.click_bias, tasks[1]: labels.conversion_bias}
        return cls(bias=bias, mains=mains, crosses=crosses)

    def pairs(self) -> Dict[str, List[FieldPair]]:
        return {t: [(a, b) for a, b, _, _ in c] for t, c in self.crosses.items()}

    def logits(self, ids: Sequence[np.ndarray]) -> Dict[str, np.ndarray]:
        """Per task, ``[N]`` logits of rows whose field ``f`` holds ``ids[f]`` (``[N]`` each);
        click's is P(click), conversion's P(conversion | click)."""
        out = {}
        for t, mains in self.mains.items():
            logit = self.bias[t] + sum(m[i] for m, i in zip(mains, ids))
            for a, b, u, v in self.crosses[t]:
                logit = logit + np.einsum("nr,nr->n", u[ids[a]], v[ids[b]])
            out[t] = logit
        return out


def write_planted_dataset(
    out_dir: str | os.PathLike,
    fields: Sequence[SyntheticField],
    split_rows: Dict[str, int],
    *,
    seed: int,
    labels: PlantedLabels = PlantedLabels(),
    zipf_exponent: float = 1.1,
    valid_fraction: float = 0.0,
) -> SchemaSpec:
    """Writes ``out_dir/<split>/part-00000.parquet`` for each split, ``schema.json`` and
    ``truth.json`` (the oracle AUC of every split and task from the true probabilities, and the
    crossed field pairs per task).

    Fields must be single-valued (``max_length == 1``, always present); ids are Zipf.
    ``valid_fraction`` > 0 moves that share of the train rows to a ``valid`` split, chosen by
    ``dtn-prepare``'s hash of the sample id (its default seed), as its default run does.
    """
    import torch

    from dtn_torchrec.data.prepare import valid_mask
    from dtn_torchrec.train.metrics import binary_auc  # the same AUC as the trainer's

    if any(f.max_length != 1 or f.min_length != 1 or f.present < 1.0 for f in fields):
        raise ValueError("planted labels need single-valued fields that are always present")
    if len(fields) < 3:
        raise ValueError("planted labels need at least 3 fields (two crosses)")
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must lie in [0, 1), got {valid_fraction}")
    rng = np.random.default_rng(seed)
    tasks = list(ALICCP_LABELS)
    model = PlantedModel.draw(rng, fields, labels, seed)
    out = Path(out_dir)
    splits: Dict[str, SplitSpec] = {}
    oracle: Dict[str, Dict[str, float]] = {}
    start = 0
    for split, n in split_rows.items():
        ids = [_draw_ids(rng, n, f.num_embeddings, "zipf", zipf_exponent) for f in fields]
        prob = {t: 1.0 / (1.0 + np.exp(-logit)) for t, logit in model.logits(ids).items()}
        click = rng.random(n) < prob[tasks[0]]
        conversion = click & (rng.random(n) < prob[tasks[1]])
        sample_ids = np.arange(start, start + n, dtype=np.int64)
        truth = {tasks[0]: prob[tasks[0]], tasks[1]: prob[tasks[0]] * prob[tasks[1]]}
        observed = {tasks[0]: click, tasks[1]: conversion}
        parts = {split: np.ones(n, dtype=bool)}
        if split == TRAIN_SPLIT and valid_fraction > 0:
            in_valid = valid_mask(sample_ids, valid_fraction, seed=0)
            parts = {split: ~in_valid, "valid": in_valid}
        for name, rows in parts.items():
            (out / name).mkdir(parents=True, exist_ok=True)
            count = int(rows.sum())
            columns: Dict[str, pa.Array] = {SAMPLE_ID_COLUMN: pa.array(sample_ids[rows])}
            offsets = pa.array(np.arange(count + 1, dtype=np.int32))
            for f, values in zip(fields, ids):
                columns[f.name] = pa.ListArray.from_arrays(offsets, pa.array(values[rows]))
            for t in tasks:
                columns[t] = pa.array(observed[t][rows].astype(np.int8))
            relative = f"{name}/part-00000.parquet"
            group = max(1, min(8192, count // 8))
            pq.write_table(pa.table(columns), out / relative, row_group_size=group)
            splits[name] = SplitSpec(rows=count, files=[relative], rows_read=count)
            oracle[name] = {
                t: float(
                    binary_auc(
                        torch.from_numpy(truth[t][rows]),
                        torch.from_numpy(observed[t][rows].astype(np.float32)),
                    )
                )
                for t in tasks
            }
        start += n
    schema = SchemaSpec(
        fields=[
            FieldSpec(name=f.name, num_embeddings=f.num_embeddings, mean_length=1.0, max_length=1)
            for f in fields
        ],
        labels=tasks,
        splits=splits,
        id_mapping="hash",
        source_format="benchmark-synthetic-planted",
    )
    schema.save(out)
    pairs = {t: [[fields[a].name, fields[b].name] for a, b in p] for t, p in model.pairs().items()}
    (out / "truth.json").write_text(
        json.dumps(
            {"oracle_auc": oracle, "labels": asdict(labels), "crossed_fields": pairs}, indent=1
        )
    )
    return schema
