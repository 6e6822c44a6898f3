"""``dtn-synth``: synthetic raw Ali-CCP files with a planted, known click / conversion signal.

Output (``DIR``):

* ``sample_skeleton_{train,test}.csv``, ``common_features_{train,test}.csv``: the Tianchi raw
  layout (docs/data-formats.md), 23 fields, raw ids inside each field's real id range,
  skeleton rows grouped by user session (``rows_per_user`` rows per common key on average).
* ``truth_{train,test}.parquet``: per row ``sample_id``, ``p_click``, ``p_conversion``
  (entire space, ``p_click * p_conversion_given_click``), ``p_conversion_given_click`` and
  ``valid`` (False for injected (click=0, conversion=1) rows).
* ``truth.json``: the planted model (crosses per task, intercepts), rates, counts, and the exact
  oracle AUC of the true probabilities against the sampled labels per split and task
  (``truth["oracle_auc"][split]["click" | "conversion"]``, over valid rows).

The planted model (``SynthWorld.task_logit``): for each task a logit made of per-id main effects,
field-presence effects and rank-k latent dot products between pairs of single-valued fields (the
crosses). ``structure="planted"`` (default): one cross per task, different between click and
conversion (``click_cross``, ``conversion_cross``); ``structure="random"``: crosses, ranks,
strengths and a possibly shared cross drawn from ``structure_seed`` (``synth_structure``).
``truth.json["structure"]`` records them. ``click ~ Bernoulli(sigmoid(b_c + logit_c))``,
``conversion = click AND Bernoulli(sigmoid(b_v + logit_v))``. Logits are quantised to the grid of
``synth_auc`` so the oracle AUC is exact. Generation runs session chunk by session chunk with a
fresh generator per (seed, split, chunk): constant memory, byte-identical output per seed.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dtn_torchrec.data.synth_auc import BinnedAUC, grid_probabilities, quantize_logit
from dtn_torchrec.data.synth_structure import STRUCTURES, describe, planted_crosses, random_crosses
from dtn_torchrec.data.synth_text import (
    MAX_FEATURE_COUNT,
    count_values,
    decimal,
    feature_tokens,
    join_lines,
)
from dtn_torchrec.data.synth_world import (
    ALICCP_FIELD_ID_RANGES,
    HISTORY_FIELDS,
    ITEM_ATTRIBUTE_FIELDS,
    SINGLE_VALUED_FIELDS,
    USER_PROFILE_FIELDS,
    SynthWorld,
    TaskSignal,
)

SPLITS: Tuple[str, ...] = ("train", "test")
TRUTH_FILE = "truth.json"

# Realism constants (docs/data-formats.md: raw layout, the 23 Ali-CCP fields).
_SESSIONS_PER_CHUNK = 512
_USER_ID_MISSING = 0.10  # common rows without field 101
_HISTORY_MISSING = 0.03  # per history field and session
_HISTORY_MEAN_LENGTH = {"109_14": 120, "110_14": 260, "127_14": 200, "150_14": 110}
_HISTORY_LENGTH_SIGMA = 0.7  # log-normal spread of history lengths
_COUNT_P = 0.35  # geometric distribution of feature counts
_POSITION_P = (0.378, 0.0075, 0.6145)  # field 301 (Scenario-Wise-Rec domain sizes)
_COMBINATION_PRESENT = {"508": 0.55, "509": 0.15, "702": 0.35, "853": 0.5}
_MAX_853_LENGTH = 6
_PILOT_ROWS = 20_000
_CHUNK_FIELD_ORDER_SKELETON = ("210", "508", "509", "702", "853", "216", "301", "205", "206", "207")
_CHUNK_FIELD_ORDER_COMMON = ("101",) + USER_PROFILE_FIELDS + HISTORY_FIELDS

CLICK_MAIN_STD = {"206": 0.35, "121": 0.25, "301": 0.5}
CLICK_PRESENCE = {"508": 0.3}
CONVERSION_MAIN_STD = {"216": 0.35, "125": 0.25}
CONVERSION_PRESENCE = {"702": 0.4}


@dataclass
class SynthConfig:
    """Generator settings.

    Args:
        ctr: target click rate over impressions (the click intercept is calibrated to it).
        cvr: target P(conversion | click).
        id_scale: multiplies every field cardinality above 100 (never below 100): small tables
            for fast tests and small data.
        history_scale: multiplies the mean length of the 109_14/110_14/127_14/150_14 lists.
        rows_per_user: mean skeleton rows per common_feature_index (geometric).
        invalid_rows: (click=0, conversion=1) rows injected per split (excluded from the AUCs).
        click_cross, conversion_cross: the planted field pairs, single-valued fields.
        cross_rank, cross_std: latent dimension and standard deviation of the cross term.
        structure: ``planted`` (the four fields above) or ``random`` (drawn from
            ``structure_seed``; the four fields above must keep their defaults).
        structure_seed: seed of a random structure (independent of ``seed``, which draws ids
            and labels).
    """

    train_rows: int
    test_rows: int
    seed: int = 0
    ctr: float = 0.10
    cvr: float = 0.20
    id_scale: float = 1.0
    history_scale: float = 1.0
    rows_per_user: float = 58.0
    invalid_rows: int = 0
    click_cross: Tuple[str, str] = ("121", "206")
    conversion_cross: Tuple[str, str] = ("125", "206")
    cross_rank: int = 4
    cross_std: float = 1.2
    structure: str = "planted"
    structure_seed: int = 0

    def validate(self) -> None:
        if self.train_rows < 0 or self.test_rows < 0:
            raise ValueError("row counts must be >= 0")
        for name in ("ctr", "cvr"):
            rate = getattr(self, name)
            if not 0.0 < rate < 1.0:
                raise ValueError(f"{name} must lie in (0, 1), got {rate}")
        if not 0.0 < self.id_scale <= 1.0:
            raise ValueError(f"id_scale must lie in (0, 1], got {self.id_scale}")
        if self.history_scale < 0:
            raise ValueError(f"history_scale must be >= 0, got {self.history_scale}")
        if self.rows_per_user < 1:
            raise ValueError(f"rows_per_user must be >= 1, got {self.rows_per_user}")
        if self.cross_rank < 1 or self.cross_std < 0:
            raise ValueError("cross_rank must be >= 1 and cross_std >= 0")
        for rows in (self.train_rows, self.test_rows):
            if self.invalid_rows > rows:
                raise ValueError(
                    f"invalid_rows={self.invalid_rows} exceeds a split's rows ({rows})"
                )
        for task, cross in (("click", self.click_cross), ("conversion", self.conversion_cross)):
            if len(cross) != 2 or cross[0] == cross[1]:
                raise ValueError(f"{task} cross must be two different fields, got {cross}")
            for f in cross:
                if f not in SINGLE_VALUED_FIELDS:
                    raise ValueError(
                        f"{task} cross field {f!r} is not one of the single-valued "
                        f"fields {list(SINGLE_VALUED_FIELDS)}"
                    )
        if set(self.click_cross) == set(self.conversion_cross):
            raise ValueError("click and conversion must plant different crosses")
        if self.structure not in STRUCTURES:
            raise ValueError(
                f"structure must be one of {', '.join(STRUCTURES)}, got {self.structure!r}"
            )
        defaults = SynthConfig(train_rows=0, test_rows=0)
        planted = ("click_cross", "conversion_cross", "cross_rank", "cross_std")
        changed = [k for k in planted if getattr(self, k) != getattr(defaults, k)]
        if self.structure == "random" and changed:
            raise ValueError(
                f"{', '.join(changed)} apply to the planted structure only; a random "
                f"structure draws its crosses from structure_seed"
            )

    def crosses(self) -> Tuple[tuple, tuple]:
        """The crosses of click and of conversion (``synth_structure.CrossSpec`` tuples)."""
        if self.structure == "random":
            return random_crosses(self.structure_seed)
        return planted_crosses(
            self.click_cross, self.conversion_cross, self.cross_rank, self.cross_std
        )

    def signals(self) -> Tuple[TaskSignal, TaskSignal]:
        click_crosses, conversion_crosses = self.crosses()
        click = TaskSignal("click", click_crosses, CLICK_MAIN_STD, CLICK_PRESENCE)
        conversion = TaskSignal(
            "conversion", conversion_crosses, CONVERSION_MAIN_STD, CONVERSION_PRESENCE
        )
        return click, conversion


@dataclass
class _Sessions:
    users: np.ndarray  # user rank [S]
    has_user_id: np.ndarray  # bool [S]
    profile: Dict[str, np.ndarray]  # field -> rank [S]


@dataclass
class _Rows:
    session: np.ndarray  # session index within the chunk [n]
    ranks: Dict[str, np.ndarray]  # single-valued field -> rank [n] (-1 = missing)
    present: Dict[str, np.ndarray]  # field -> bool [n]
    intention_rows: np.ndarray  # 210: row of each id
    intention_ranks: np.ndarray


@dataclass
class _SplitTally:
    rows: int = 0
    sessions: int = 0
    valid_rows: int = 0
    clicks: int = 0
    conversions: int = 0
    invalid_rows: int = 0
    feature_tokens: int = 0
    common_feature_tokens: int = 0
    aucs: Dict[str, BinnedAUC] = field(default_factory=dict)


def _unique_per_group(
    groups: np.ndarray, ranks: np.ndarray, cardinality: int
) -> Tuple[np.ndarray, np.ndarray]:
    """Drop repeated ranks within a group; output sorted by (group, rank)."""
    keys = np.unique(groups.astype(np.int64) * cardinality + ranks)
    return keys // cardinality, keys % cardinality


class SyntheticAliCCP:
    """Generates one synthetic data set; see the module docstring."""

    def __init__(self, config: SynthConfig) -> None:
        config.validate()
        self.config = config
        self.world = SynthWorld(config.seed, config.id_scale)
        self.click_signal, self.conversion_signal = config.signals()
        self.p_grid = grid_probabilities()
        self.click_intercept, self.conversion_intercept = self._calibrate_intercepts()

    # ----------------------------------------------------------------------------- sampling
    def _sample_sessions(self, rng: np.random.Generator, n: int) -> _Sessions:
        users = self.world.spaces["101"].sample_ranks(rng.random(n))
        has_user_id = rng.random(n) >= _USER_ID_MISSING
        profile = {f: self.world.user_profile_ranks(f, users) for f in USER_PROFILE_FIELDS}
        return _Sessions(users, has_user_id, profile)

    def _sample_rows(
        self, rng: np.random.Generator, sessions: _Sessions, rows_per_session: np.ndarray
    ) -> _Rows:
        spaces = self.world.spaces
        session = np.repeat(np.arange(len(rows_per_session)), rows_per_session)
        n = len(session)
        items = spaces["205"].sample_ranks(rng.random(n))
        position = np.searchsorted(np.cumsum(_POSITION_P), rng.random(n), side="right")
        ranks = {
            "101": np.where(sessions.has_user_id[session], sessions.users[session], -1),
            "205": items,
            "301": np.minimum(position, 2),
        }
        for f in USER_PROFILE_FIELDS:
            ranks[f] = sessions.profile[f][session]
        for f in ITEM_ATTRIBUTE_FIELDS:
            ranks[f] = self.world.item_attribute_ranks(f, items)
        present = {f: r >= 0 for f, r in ranks.items()}
        for f, p in _COMBINATION_PRESENT.items():
            present[f] = rng.random(n) < p
        lengths, intention_ranks = self.world.item_intention_ranks(items)
        intention_rows = np.repeat(np.arange(n), lengths)
        present["210"] = np.ones(n, dtype=bool)
        return _Rows(session, ranks, present, intention_rows, intention_ranks)

    def _logits(self, rows: _Rows, with_cross: bool = True) -> Tuple[np.ndarray, np.ndarray]:
        click = self.world.task_logit(0, self.click_signal, rows.ranks, rows.present, with_cross)
        conversion = self.world.task_logit(
            1, self.conversion_signal, rows.ranks, rows.present, with_cross
        )
        return click, conversion

    def _calibrate_intercepts(self) -> Tuple[float, float]:
        """Intercepts that give the target CTR and CVR|click on a pilot sample (own stream)."""
        rng = np.random.default_rng([self.config.seed, 2, 0])
        n_sessions = max(1, int(np.ceil(_PILOT_ROWS / self.config.rows_per_user)))
        rows_per_session = rng.geometric(1.0 / self.config.rows_per_user, size=n_sessions)
        rows = self._sample_rows(rng, self._sample_sessions(rng, n_sessions), rows_per_session)
        click_logit, conversion_logit = self._logits(rows)

        def solve(logit: np.ndarray, weights: np.ndarray, target: float) -> float:
            low, high = -30.0, 30.0
            for _ in range(100):
                mid = 0.5 * (low + high)
                rate = np.dot(weights, 1.0 / (1.0 + np.exp(-(mid + logit)))) / weights.sum()
                low, high = (mid, high) if rate < target else (low, mid)
            return 0.5 * (low + high)

        b_click = solve(click_logit, np.ones_like(click_logit), self.config.ctr)
        p_click = 1.0 / (1.0 + np.exp(-(b_click + click_logit)))
        return b_click, solve(conversion_logit, p_click, self.config.cvr)

    def _history(
        self, rng: np.random.Generator, n_sessions: int
    ) -> Dict[str, Tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per history field: (session [m], rank [m], count [m]), grouped by session."""
        out = {}
        for f in HISTORY_FIELDS:
            mean = _HISTORY_MEAN_LENGTH[f] * self.config.history_scale
            z = rng.standard_normal(n_sessions)
            lengths = np.ceil(
                mean * np.exp(_HISTORY_LENGTH_SIGMA * z - 0.5 * _HISTORY_LENGTH_SIGMA**2)
            )
            lengths = np.where(rng.random(n_sessions) < _HISTORY_MISSING, 0, lengths).astype(
                np.int64
            )
            lengths = np.minimum(lengths, int(8 * mean) + 1)
            space = self.world.spaces[f]
            sessions, ranks = _unique_per_group(
                np.repeat(np.arange(n_sessions), lengths),
                space.sample_ranks(rng.random(int(lengths.sum()))),
                space.cardinality,
            )
            out[f] = (sessions, ranks, self._counts(rng, len(ranks)))
        return out

    @staticmethod
    def _counts(rng: np.random.Generator, n: int) -> np.ndarray:
        return np.minimum(rng.geometric(_COUNT_P, size=n), MAX_FEATURE_COUNT)

    # ----------------------------------------------------------------------------- writing
    def _common_lines(
        self,
        keys_hex: np.ndarray,
        sessions: _Sessions,
        history: Dict[str, Tuple[np.ndarray, np.ndarray, np.ndarray]],
    ) -> Tuple[bytes, int]:
        spaces = self.world.spaces
        n = len(keys_hex)
        all_sessions = np.arange(n)
        parts = []
        for f in _CHUNK_FIELD_ORDER_COMMON:
            if f == "101":
                rows = all_sessions[sessions.has_user_id]
                parts.append((rows, feature_tokens(f, spaces[f].raw_ids(sessions.users[rows]))))
            elif f in HISTORY_FIELDS:
                rows, ranks, counts = history[f]
                parts.append(
                    (rows, feature_tokens(f, spaces[f].raw_ids(ranks), count_values(counts)))
                )
            else:
                parts.append(
                    (all_sessions, feature_tokens(f, spaces[f].raw_ids(sessions.profile[f])))
                )
        feature_num = np.bincount(np.concatenate([r for r, _ in parts]), minlength=n)
        prefixes = np.strings.add(
            np.strings.add(np.strings.add(keys_hex, b","), decimal(feature_num)), b","
        )
        return join_lines(prefixes, parts), int(feature_num.sum())

    def _skeleton_lines(
        self,
        rng: np.random.Generator,
        sample_ids: np.ndarray,
        keys_hex: np.ndarray,
        rows: _Rows,
        click: np.ndarray,
        conversion: np.ndarray,
    ) -> Tuple[bytes, int]:
        spaces = self.world.spaces
        n = len(sample_ids)
        all_rows = np.arange(n)
        tokens: Dict[str, Tuple[np.ndarray, np.ndarray]] = {
            "210": (
                rows.intention_rows,
                feature_tokens("210", spaces["210"].raw_ids(rows.intention_ranks)),
            ),
        }
        for f in ("205", "206", "207", "216", "301"):
            tokens[f] = (all_rows, feature_tokens(f, spaces[f].raw_ids(rows.ranks[f])))
        for f in ("508", "509", "702", "853"):
            present_rows = all_rows[rows.present[f]]
            if f == "853":
                lengths = np.minimum(rng.geometric(0.6, size=len(present_rows)), _MAX_853_LENGTH)
                owners = np.repeat(present_rows, lengths)
                owners, ranks = _unique_per_group(
                    owners, spaces[f].sample_ranks(rng.random(len(owners))), spaces[f].cardinality
                )
            else:
                owners, ranks = present_rows, spaces[f].sample_ranks(rng.random(len(present_rows)))
            values = count_values(self._counts(rng, len(ranks)))
            tokens[f] = (owners, feature_tokens(f, spaces[f].raw_ids(ranks), values))
        parts = [tokens[f] for f in _CHUNK_FIELD_ORDER_SKELETON]
        feature_num = np.bincount(np.concatenate([r for r, _ in parts]), minlength=n)
        label_text = np.array([b"0,0,", b"1,0,", b"0,1,", b"1,1,"])[
            click.astype(np.int64) + 2 * conversion
        ]
        prefixes = np.strings.add(decimal(sample_ids), b",")
        prefixes = np.strings.add(prefixes, label_text)
        prefixes = np.strings.add(prefixes, keys_hex[rows.session])
        prefixes = np.strings.add(
            np.strings.add(np.strings.add(prefixes, b","), decimal(feature_num)), b","
        )
        return join_lines(prefixes, parts), int(feature_num.sum())

    # ----------------------------------------------------------------------------- driver
    def _new_tally(self) -> _SplitTally:
        p = self.p_grid
        tally = _SplitTally()
        tally.aucs = {
            "click": BinnedAUC(p),
            "conversion": BinnedAUC(np.outer(p, p)),
            "conversion_given_click": BinnedAUC(p),
            "click_no_cross": BinnedAUC(p),
            "conversion_no_cross": BinnedAUC(np.outer(p, p)),
        }
        return tally

    def write_split(
        self,
        split_code: int,
        n_rows: int,
        skeleton: BinaryIO,
        common: BinaryIO,
        truth: pq.ParquetWriter,
    ) -> _SplitTally:
        cfg = self.config
        tally = self._new_tally()
        levels = len(self.p_grid)
        invalid_ids = (
            np.sort(
                np.random.default_rng([cfg.seed, split_code, 1 << 30]).choice(
                    n_rows, size=cfg.invalid_rows, replace=False
                )
            )
            + 1
            if cfg.invalid_rows
            else np.zeros(0, np.int64)
        )
        chunk = 0
        while tally.rows < n_rows:
            rng = np.random.default_rng([cfg.seed, split_code, chunk])
            rows_per_session = rng.geometric(1.0 / cfg.rows_per_user, size=_SESSIONS_PER_CHUNK)
            ends = np.cumsum(rows_per_session)
            remaining = n_rows - tally.rows
            n_sessions = int(np.searchsorted(ends - rows_per_session, remaining, side="left"))
            rows_per_session = rows_per_session[:n_sessions]
            rows_per_session[-1] -= max(0, int(ends[n_sessions - 1]) - remaining)

            sessions = self._sample_sessions(rng, n_sessions)
            rows = self._sample_rows(rng, sessions, rows_per_session)
            n = len(rows.session)
            click_logit, conversion_logit = self._logits(rows)
            ic = quantize_logit(self.click_intercept + click_logit)
            iv = quantize_logit(self.conversion_intercept + conversion_logit)
            p_click, p_cvr = self.p_grid[ic], self.p_grid[iv]
            click = rng.random(n) < p_click
            conversion = click & (rng.random(n) < p_cvr)
            history = self._history(rng, n_sessions)

            sample_ids = np.arange(tally.rows + 1, tally.rows + n + 1, dtype=np.int64)
            invalid = np.isin(sample_ids, invalid_ids)
            click_out = np.where(invalid, False, click)
            conversion_out = np.where(invalid, True, conversion)
            valid = ~invalid

            keys = self.world.session_keys(
                split_code, np.arange(tally.sessions, tally.sessions + n_sessions)
            )
            keys_hex = np.array([b"%016x" % k for k in keys.tolist()], dtype="S16")
            common_text, common_tokens = self._common_lines(keys_hex, sessions, history)
            skeleton_text, skeleton_tokens = self._skeleton_lines(
                rng, sample_ids, keys_hex, rows, click_out, conversion_out
            )
            common.write(common_text)
            skeleton.write(skeleton_text)
            truth.write_table(
                pa.table(
                    {
                        "sample_id": sample_ids,
                        "p_click": p_click,
                        "p_conversion": p_click * p_cvr,
                        "p_conversion_given_click": p_cvr,
                        "valid": valid,
                    }
                )
            )

            nc_click, nc_conv = self._logits(rows, with_cross=False)
            ic_nc = quantize_logit(self.click_intercept + nc_click)
            iv_nc = quantize_logit(self.conversion_intercept + nc_conv)
            aucs = tally.aucs
            aucs["click"].update(ic[valid], click[valid])
            aucs["conversion"].update((ic * levels + iv)[valid], conversion[valid])
            aucs["conversion_given_click"].update(iv[valid & click], conversion[valid & click])
            aucs["click_no_cross"].update(ic_nc[valid], click[valid])
            aucs["conversion_no_cross"].update((ic_nc * levels + iv_nc)[valid], conversion[valid])

            tally.rows += n
            tally.sessions += n_sessions
            tally.valid_rows += int(valid.sum())
            tally.clicks += int(click[valid].sum())
            tally.conversions += int(conversion[valid].sum())
            tally.invalid_rows += int(invalid.sum())
            tally.feature_tokens += skeleton_tokens
            tally.common_feature_tokens += common_tokens
            chunk += 1
        return tally

    def truth(self, tallies: Dict[str, _SplitTally]) -> Dict[str, object]:
        cfg = self.config

        def auc(t: _SplitTally, name: str) -> Optional[float]:
            return t.aucs[name].compute()

        def rate(num: int, den: int) -> Optional[float]:
            return num / den if den else None

        structure = describe(
            cfg.structure,
            cfg.structure_seed,
            self.click_signal.crosses,
            self.conversion_signal.crosses,
        )
        return {
            "generator": "dtn-synth",
            "seed": cfg.seed,
            "config": asdict(cfg),
            # Each task's first own cross (the planted structure has exactly one per task).
            "planted_crosses": {
                "click": list(self.click_signal.crosses[0].fields),
                "conversion": list(self.conversion_signal.crosses[0].fields),
            },
            "structure": structure,
            "model": {
                "click": {
                    "intercept": self.click_intercept,
                    "crosses": structure["click"],
                    "main_std": CLICK_MAIN_STD,
                    "presence": CLICK_PRESENCE,
                },
                "conversion": {
                    "intercept": self.conversion_intercept,
                    "crosses": structure["conversion"],
                    "main_std": CONVERSION_MAIN_STD,
                    "presence": CONVERSION_PRESENCE,
                    "given": "click",
                },
                "formula": "p_click = sigmoid(q(b_c + logit_c)); p_conversion = p_click * "
                "sigmoid(q(b_v + logit_v)); q = round to 1/32, clip [-10, 10]",
            },
            "fields": {
                f: {"cardinality": s.cardinality, "id_range": list(ALICCP_FIELD_ID_RANGES[f])}
                for f, s in self.world.spaces.items()
            },
            "oracle_auc": {
                s: {"click": auc(t, "click"), "conversion": auc(t, "conversion")}
                for s, t in tallies.items()
            },
            "oracle_auc_conversion_given_click": {
                s: auc(t, "conversion_given_click") for s, t in tallies.items()
            },
            "no_cross_auc": {
                s: {"click": auc(t, "click_no_cross"), "conversion": auc(t, "conversion_no_cross")}
                for s, t in tallies.items()
            },
            "auc_method": "exact (Mann-Whitney, ties one half) over valid rows; true probabilities take "
            "finitely many values (quantised logits), counted per value while streaming",
            "rates": {
                s: {
                    "ctr": rate(t.clicks, t.valid_rows),
                    "conversion_given_click": rate(t.conversions, t.clicks),
                    "conversion": rate(t.conversions, t.valid_rows),
                }
                for s, t in tallies.items()
            },
            "counts": {
                s: {
                    "rows": t.rows,
                    "valid_rows": t.valid_rows,
                    "invalid_rows": t.invalid_rows,
                    "sessions": t.sessions,
                    "clicks": t.clicks,
                    "conversions": t.conversions,
                    "skeleton_features": t.feature_tokens,
                    "common_features": t.common_feature_tokens,
                }
                for s, t in tallies.items()
            },
            "truth_files": {s: f"truth_{s}.parquet" for s in tallies},
        }


_TRUTH_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int64()),
        ("p_click", pa.float64()),
        ("p_conversion", pa.float64()),
        ("p_conversion_given_click", pa.float64()),
        ("valid", pa.bool_()),
    ]
)


def generate(config: SynthConfig, output_dir: str | os.PathLike) -> Dict[str, object]:
    """Writes the data set into ``output_dir`` (created if needed; every file written to a
    temporary name and renamed when complete) and returns the contents of ``truth.json``."""
    gen = SyntheticAliCCP(config)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tallies: Dict[str, _SplitTally] = {}
    pending: List[Tuple[Path, Path]] = []  # (temporary, final)
    truth_tmp = out / f".{TRUTH_FILE}.tmp"
    try:
        for split_code, (split, n_rows) in enumerate(
            zip(SPLITS, (config.train_rows, config.test_rows))
        ):
            names = [
                f"sample_skeleton_{split}.csv",
                f"common_features_{split}.csv",
                f"truth_{split}.parquet",
            ]
            paths = [(out / f".{name}.tmp", out / name) for name in names]
            pending.extend(paths)
            with (
                open(paths[0][0], "wb") as skeleton,
                open(paths[1][0], "wb") as common,
                pq.ParquetWriter(paths[2][0], _TRUTH_SCHEMA) as truth,
            ):
                tallies[split] = gen.write_split(split_code, n_rows, skeleton, common, truth)
        for tmp, final in pending:
            os.replace(tmp, final)
        truth_obj = gen.truth(tallies)
        truth_tmp.write_text(json.dumps(truth_obj, indent=2) + "\n")
        os.replace(truth_tmp, out / TRUTH_FILE)
        return truth_obj
    finally:
        for tmp in [truth_tmp] + [tmp for tmp, _ in pending]:
            tmp.unlink(missing_ok=True)
