"""The synthetic Ali-CCP world: per-field id spaces, item and user attributes, and the planted
click / conversion model.

Everything here is a pure function of ``(seed, index)`` computed with counter-based hashing
(splitmix64), so an item always has the same category, a user the same profile and an id the
same latent vector, in every chunk and every split, without any table in memory: any number of
rows and any cardinality fit in constant memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Tuple

import numpy as np

from dtn_torchrec.data.schema import ALICCP_FIELDS

# Raw feature-id range of every field, inclusive (min/max of the FDN vocab files; see
# docs/data-formats.md, the 23 Ali-CCP fields).
ALICCP_FIELD_ID_RANGES: Dict[str, Tuple[int, int]] = {
    "101": (1, 444_860),
    "109_14": (444_862, 457_384),
    "110_14": (457_385, 3_438_657),
    "121": (3_438_658, 3_438_754),
    "122": (3_438_755, 3_438_767),
    "124": (3_438_768, 3_438_769),
    "125": (3_438_770, 3_438_776),
    "126": (3_438_777, 3_438_779),
    "127": (3_438_780, 3_438_782),
    "127_14": (3_438_783, 3_864_884),
    "128": (3_864_885, 3_864_886),
    "129": (3_864_887, 3_864_890),
    "150_14": (3_864_891, 3_964_446),
    "205": (3_964_447, 8_313_061),
    "206": (8_313_062, 8_322_053),
    "207": (8_322_056, 9_017_178),
    "210": (9_017_179, 9_116_784),
    "216": (9_116_785, 9_351_664),
    "301": (9_351_665, 9_351_667),
    "508": (9_351_668, 9_359_852),
    "509": (9_359_854, 9_832_206),
    "702": (9_832_207, 10_000_018),
    "853": (10_000_020, 10_091_377),
}

# Distinct raw ids per field over train and test (docs/data-formats.md). 110_14 and 205 have no
# published count: 110_14 (shop history) takes the item-shop count of 207, and 205 fills its
# whole raw range (ESMM reports 4.3M items).
ALICCP_FIELD_CARDINALITIES: Dict[str, int] = {
    "101": 276_022,
    "109_14": 12_126,
    "110_14": 516_905,
    "127_14": 387_969,
    "150_14": 99_203,
    "121": 97,
    "122": 13,
    "124": 2,
    "125": 7,
    "126": 3,
    "127": 3,
    "128": 2,
    "129": 4,
    "205": 4_348_615,
    "206": 8_292,
    "207": 516_905,
    "210": 98_758,
    "216": 181_697,
    "508": 7_403,
    "509": 319_982,
    "702": 123_442,
    "853": 84_476,
    "301": 3,
}

# Fields with at most this many ids are never shrunk by ``id_scale``; larger ones not below it.
ID_SCALE_FLOOR = 100

# Fields with one id per row (or per user): the only fields a planted cross may use.
SINGLE_VALUED_FIELDS: Tuple[str, ...] = (
    "101",
    "121",
    "122",
    "124",
    "125",
    "126",
    "127",
    "128",
    "129",
    "205",
    "206",
    "207",
    "216",
    "301",
)
USER_PROFILE_FIELDS: Tuple[str, ...] = ("121", "122", "124", "125", "126", "127", "128", "129")
HISTORY_FIELDS: Tuple[str, ...] = ("109_14", "110_14", "127_14", "150_14")
ITEM_ATTRIBUTE_FIELDS: Tuple[str, ...] = ("206", "207", "216")

# Popularity exponent of the bounded power law each field's ids are drawn from.
_DEFAULT_EXPONENT = 1.05
_EXPONENTS: Dict[str, float] = {
    "101": 0.8,
    "121": 1.0,
    "122": 1.0,
    "124": 0.6,
    "125": 0.8,
    "126": 0.8,
    "127": 0.8,
    "128": 0.6,
    "129": 0.8,
    "210": 0.9,
}

# Hash stream tags: one per kind of draw, so no two draws share a hash input.
_TAG_ATTRIBUTE = 1
_TAG_PROFILE = 2
_TAG_INTENTION = 3
_TAG_INTENTION_LENGTH = 4
_TAG_MAIN = 5
_TAG_LATENT = 6

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijection on uint64, applied elementwise (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = np.asarray(x, dtype=np.uint64) + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def hash_keys(*parts: object) -> np.ndarray:
    """Hash of a tuple of (broadcastable) non-negative integer arrays, uint64."""
    h = np.uint64(0)
    for part in parts:
        h = mix64(h ^ np.asarray(part, dtype=np.uint64))
    return np.asarray(h, dtype=np.uint64)


def hash_uniform(h: np.ndarray) -> np.ndarray:
    """uint64 hash -> float64 uniform in [0, 1) (top 53 bits)."""
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def hash_gaussian(h: np.ndarray) -> np.ndarray:
    """uint64 hash -> standard normal draw (Box-Muller on two derived uniforms)."""
    u1 = 1.0 - hash_uniform(h)
    u2 = hash_uniform(mix64(h))
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)


def power_law_rank(u: np.ndarray, n: int, exponent: float) -> np.ndarray:
    """Inverse CDF of a power law ``p(x) ~ x^-exponent`` on ``[1, n + 1)``: popularity ranks in
    ``[0, n)``, rank 0 the most popular (a Zipf law in continuous form)."""
    u = np.asarray(u, dtype=np.float64)
    if abs(exponent - 1.0) < 1e-9:
        x = np.exp(u * math.log(n + 1.0))
    else:
        e = 1.0 - exponent
        x = (1.0 + u * ((n + 1.0) ** e - 1.0)) ** (1.0 / e)
    return np.clip(np.floor(x).astype(np.int64) - 1, 0, n - 1)


@dataclass(frozen=True)
class FieldSpace:
    """The ids of one field: ``cardinality`` popularity ranks mapped into the raw range.

    Rank ``r`` becomes raw id ``low + (r * stride + shift) mod cardinality``: a fixed permutation,
    so popular ids are spread over the range instead of being its smallest ids.
    """

    name: str
    cardinality: int
    low: int
    high: int
    exponent: float
    stride: int
    shift: int

    def raw_ids(self, ranks: np.ndarray) -> np.ndarray:
        return (
            self.low
            + (np.asarray(ranks, dtype=np.int64) * self.stride + self.shift) % self.cardinality
        )

    def sample_ranks(self, u: np.ndarray) -> np.ndarray:
        return power_law_rank(u, self.cardinality, self.exponent)


def scaled_cardinality(field: str, id_scale: float) -> int:
    full = ALICCP_FIELD_CARDINALITIES[field]
    if full <= ID_SCALE_FLOOR:
        return full
    return int(min(full, max(ID_SCALE_FLOOR, round(full * id_scale))))


def build_field_spaces(id_scale: float) -> Dict[str, FieldSpace]:
    spaces = {}
    for code, name in enumerate(ALICCP_FIELDS):
        low, high = ALICCP_FIELD_ID_RANGES[name]
        card = scaled_cardinality(name, id_scale)
        stride = max(1, int(card * 0.6180339887))
        while math.gcd(stride, card) != 1:
            stride += 1
        spaces[name] = FieldSpace(
            name,
            card,
            low,
            high,
            _EXPONENTS.get(name, _DEFAULT_EXPONENT),
            stride,
            (code * 7919) % card,
        )
    return spaces


@dataclass(frozen=True)
class CrossSpec:
    """One planted cross ``<u(id_a), v(id_b)>`` of two single-valued fields ``(a, b)``: per-id
    ``rank``-dimensional latent vectors whose dot product has standard deviation ``std``.

    ``key`` selects the latent vectors: a cross that two tasks share has the same key (and
    fields) in both, so both logits get the same term; a task's own crosses have keys of their
    own.
    """

    fields: Tuple[str, str]
    rank: int
    std: float
    key: int


@dataclass(frozen=True)
class TaskSignal:
    """The planted logit of one task (before its intercept).

    ``logit = sum_f main_std[f] * g_f(id_f) + sum_f presence[f] * [f present]
    + sum_c cross_c`` with ``g`` standard normal per id and the crosses ``c`` of ``crosses``
    (``CrossSpec``). A missing field contributes nothing.
    """

    name: str
    crosses: Tuple[CrossSpec, ...]
    main_std: Mapping[str, float]
    presence: Mapping[str, float]


class SynthWorld:
    """Deterministic attributes and planted signals of one seed."""

    def __init__(self, seed: int, id_scale: float) -> None:
        self.key = int(hash_keys(seed, 0x5EED))
        self.spaces = build_field_spaces(id_scale)
        self._field_code = {name: i for i, name in enumerate(ALICCP_FIELDS)}

    def _hash(self, tag: int, field: str, *parts: object) -> np.ndarray:
        return hash_keys(self.key, tag, self._field_code[field], *parts)

    def item_attribute_ranks(self, field: str, items: np.ndarray) -> np.ndarray:
        """Category (206), shop (207) or brand (216) rank of each item rank."""
        return self.spaces[field].sample_ranks(
            hash_uniform(self._hash(_TAG_ATTRIBUTE, field, items))
        )

    def user_profile_ranks(self, field: str, users: np.ndarray) -> np.ndarray:
        """Profile field (121..129) rank of each user rank."""
        return self.spaces[field].sample_ranks(hash_uniform(self._hash(_TAG_PROFILE, field, users)))

    def item_intention_ranks(self, items: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Field 210 of each item: (lengths [n] in 3..14, distinct ranks [sum(lengths)] grouped
        by item). A repeated rank within an item is redrawn (next attempt number) until all differ."""
        items = np.asarray(items, dtype=np.int64)
        lengths = 3 + (self._hash(_TAG_INTENTION_LENGTH, "210", items) % np.uint64(12)).astype(
            np.int64
        )
        row = np.repeat(np.arange(len(items), dtype=np.int64), lengths)
        slot = np.arange(len(row), dtype=np.int64) - np.repeat(
            np.cumsum(lengths) - lengths, lengths
        )
        space = self.spaces["210"]

        def draw(rows: np.ndarray, slots: np.ndarray, attempt: int) -> np.ndarray:
            return space.sample_ranks(
                hash_uniform(self._hash(_TAG_INTENTION, "210", items[rows], slots, attempt))
            )

        ranks = draw(row, slot, 0)
        attempt = 0
        while True:
            key = row * space.cardinality + ranks
            order = np.lexsort((slot, key))
            repeated = np.zeros(len(key), dtype=bool)
            repeated[order[1:]] = key[order[1:]] == key[order[:-1]]
            if not repeated.any():
                return lengths, ranks
            attempt += 1
            ranks[repeated] = draw(row[repeated], slot[repeated], attempt)

    def session_keys(self, split_code: int, sessions: np.ndarray) -> np.ndarray:
        """Unique 64-bit common_feature_index of each (split, session number)."""
        x = (np.uint64(split_code) << np.uint64(40)) | np.asarray(sessions, dtype=np.uint64)
        return mix64(x ^ np.uint64(self.key))

    def main_effect(self, task_code: int, field: str, ranks: np.ndarray) -> np.ndarray:
        return hash_gaussian(self._hash(_TAG_MAIN, field, task_code, ranks))

    def latent(
        self, key: int, side: int, field: str, ranks: np.ndarray, rank: int, scale: float
    ) -> np.ndarray:
        """Latent vectors [n, rank] of the ids of one side of the cross with latent ``key``."""
        ranks = np.asarray(ranks, dtype=np.int64)[:, None]
        dims = np.arange(rank, dtype=np.int64)[None, :]
        return scale * hash_gaussian(self._hash(_TAG_LATENT, field, key, side, ranks, dims))

    def task_logit(
        self,
        task_code: int,
        signal: TaskSignal,
        ranks: Mapping[str, np.ndarray],
        present: Mapping[str, np.ndarray],
        with_cross: bool = True,
    ) -> np.ndarray:
        """Planted logit (no intercept) of every row.

        Args:
            ranks: single-valued field -> rank per row [n] (-1 where the field is missing).
            present: field -> bool [n], whether the row carries the field.
        """
        n = len(next(iter(ranks.values())))
        logit = np.zeros(n, dtype=np.float64)
        for field, std in signal.main_std.items():
            r = ranks[field]
            logit += np.where(
                r >= 0, std * self.main_effect(task_code, field, np.maximum(r, 0)), 0.0
            )
        for field, shift in signal.presence.items():
            logit += shift * present[field]
        for cross in signal.crosses if with_cross else ():
            a, b = cross.fields
            ra, rb = ranks[a], ranks[b]
            scale = (cross.std**2 / cross.rank) ** 0.25
            u = self.latent(cross.key, 0, a, np.maximum(ra, 0), cross.rank, scale)
            v = self.latent(cross.key, 1, b, np.maximum(rb, 0), cross.rank, scale)
            logit += np.where((ra >= 0) & (rb >= 0), np.einsum("nk,nk->n", u, v), 0.0)
        return logit
