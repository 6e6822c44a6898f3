"""Which feature crosses drive click and conversion in `dtn-synth`: the planted structure (one
fixed cross per task, the default the demo and tests rely on) or a random one chosen by a seed.

A random structure (``random_crosses``) draws, from ``structure_seed`` alone:

* per task 1 or 2 task-specific crosses, each a user-profile field (121..129) times an item or
  context field (206, 207, 216, 301), no pair used twice;
* with probability 1/2 one more cross that both tasks share (same fields, same latent vectors);
* per cross a rank in 1..4 and a strength (standard deviation of its logit term): 0.6..1.3 for
  a task's own crosses, 0.4..0.9 for the shared one.

``describe`` turns the crosses into the JSON ``truth.json`` records, including how much of each
task's cross variance the shared cross carries.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np

from dtn_torchrec.data.synth_world import ITEM_ATTRIBUTE_FIELDS, USER_PROFILE_FIELDS, CrossSpec

STRUCTURES = ("planted", "random")
USER_SIDE: Tuple[str, ...] = USER_PROFILE_FIELDS
ITEM_SIDE: Tuple[str, ...] = ITEM_ATTRIBUTE_FIELDS + ("301",)
# Latent keys: tasks 0 and 1 use their task code for their first own cross (the planted
# structure's keys), SHARED_KEY for a shared cross, OWN_KEY_BASE + 8 * task + i for the others.
SHARED_KEY = 2
OWN_KEY_BASE = 16
_SHARE_PROBABILITY = 0.5
_OWN_STD = (0.6, 1.3)
_SHARED_STD = (0.4, 0.9)
_MAX_RANK = 4


def planted_crosses(
    click_cross: Tuple[str, str], conversion_cross: Tuple[str, str], rank: int, std: float
) -> Tuple[Tuple[CrossSpec, ...], Tuple[CrossSpec, ...]]:
    """One cross per task, nothing shared: ``(click crosses, conversion crosses)``."""
    return (
        (CrossSpec(tuple(click_cross), rank, std, key=0),),  # type: ignore[arg-type]
        (CrossSpec(tuple(conversion_cross), rank, std, key=1),),
    )  # type: ignore[arg-type]


def random_crosses(structure_seed: int) -> Tuple[Tuple[CrossSpec, ...], Tuple[CrossSpec, ...]]:
    """A random structure (see the module docstring): ``(click crosses, conversion crosses)``."""
    rng = np.random.default_rng([structure_seed, 0x57C7])
    pairs = [(u, i) for u in USER_SIDE for i in ITEM_SIDE]
    own_counts = rng.integers(1, 3, size=2)
    shared = bool(rng.random() < _SHARE_PROBABILITY)
    chosen = rng.choice(len(pairs), size=int(own_counts.sum()) + int(shared), replace=False)
    picks = iter(pairs[int(k)] for k in chosen)
    tasks: List[List[CrossSpec]] = []
    for task, count in enumerate(own_counts):
        crosses = []
        for i in range(int(count)):
            key = task if i == 0 else OWN_KEY_BASE + 8 * task + i
            crosses.append(
                CrossSpec(
                    next(picks),
                    int(rng.integers(1, _MAX_RANK + 1)),
                    float(round(rng.uniform(*_OWN_STD), 3)),
                    key,
                )
            )
        tasks.append(crosses)
    if shared:
        common = CrossSpec(
            next(picks),
            int(rng.integers(1, _MAX_RANK + 1)),
            float(round(rng.uniform(*_SHARED_STD), 3)),
            SHARED_KEY,
        )
        for crosses in tasks:
            crosses.append(common)
    return tuple(tasks[0]), tuple(tasks[1])


def describe(
    kind: str, seed: int, click: Tuple[CrossSpec, ...], conversion: Tuple[CrossSpec, ...]
) -> Dict[str, object]:
    """The structure as JSON: per task its crosses (fields, rank, std, shared) and the share of
    its cross variance (sum of std^2) that the crosses shared with the other task carry."""
    shared_keys = {c.key for c in click} & {c.key for c in conversion}
    out: Dict[str, object] = {"kind": kind, "seed": seed if kind == "random" else None}
    share: Dict[str, float] = {}
    for name, crosses in (("click", click), ("conversion", conversion)):
        out[name] = [
            {"fields": list(c.fields), "rank": c.rank, "std": c.std, "shared": c.key in shared_keys}
            for c in crosses
        ]
        total = sum(c.std**2 for c in crosses)
        share[name] = (
            sum(c.std**2 for c in crosses if c.key in shared_keys) / total if total else 0.0
        )
    out["shared_variance_fraction"] = share
    return out
