"""dtn-synth: raw layout parsed by hand, reproducibility, id ranges, grouping, oracle AUC."""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pyarrow.parquet as pq
import pytest

from dtn_torchrec.cli.synth import main as synth_main
from dtn_torchrec.data.schema import ALICCP_USER_FIELDS
from dtn_torchrec.data.synth import SynthConfig, SyntheticAliCCP, generate
from dtn_torchrec.data.synth_auc import LOGIT_GRID_STEPS_PER_UNIT, quantize_logit
from dtn_torchrec.data.synth_world import ALICCP_FIELD_ID_RANGES, SINGLE_VALUED_FIELDS

SKELETON_FIELDS = {"205", "206", "207", "210", "216", "508", "509", "702", "853", "301"}
ONE_HOT = {
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
    "210",
    "216",
    "301",
}
ROWS = {"train": 4000, "test": 1500}
SMALL = dict(
    train_rows=ROWS["train"],
    test_rows=ROWS["test"],
    seed=11,
    id_scale=0.01,
    history_scale=0.05,
    rows_per_user=20.0,
    invalid_rows=3,
)

Features = List[Tuple[str, int, str]]


def parse_features(text: str, where: str) -> Features:
    out = []
    for token in text.split("\x01") if text else []:
        field, rest = token.split("\x02")
        fid, value = rest.split("\x03")
        out.append((field, int(fid), value))
    return out


def read_skeleton(path: Path) -> List[dict]:
    rows = []
    for line_no, line in enumerate(path.read_text().split("\n")[:-1], 1):
        sid, click, conv, key, num, feats = line.split(",", 5)
        features = parse_features(feats, f"{path}:{line_no}")
        assert int(num) == len(features), f"line {line_no}"
        rows.append(
            dict(
                sample_id=int(sid),
                click=int(click),
                conversion=int(conv),
                key=key,
                features=features,
            )
        )
    return rows


def read_common(path: Path) -> Dict[str, Features]:
    out = {}
    for line in path.read_text().split("\n")[:-1]:
        key, num, feats = line.split(",", 2)
        features = parse_features(feats, str(path))
        assert int(num) == len(features)
        assert key not in out
        out[key] = features
    return out


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(SynthConfig(**SMALL), out)
    return out


@pytest.fixture(scope="module")
def parsed(synth_dir: Path) -> Dict[str, Tuple[List[dict], Dict[str, Features]]]:
    return {
        s: (
            read_skeleton(synth_dir / f"sample_skeleton_{s}.csv"),
            read_common(synth_dir / f"common_features_{s}.csv"),
        )
        for s in ROWS
    }


def test_same_seed_gives_identical_bytes(synth_dir: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate(SynthConfig(**SMALL), again)
    names = sorted(p.name for p in synth_dir.iterdir())
    assert (
        names
        == sorted(p.name for p in again.iterdir())
        == [
            "common_features_test.csv",
            "common_features_train.csv",
            "sample_skeleton_test.csv",
            "sample_skeleton_train.csv",
            "truth.json",
            "truth_test.parquet",
            "truth_train.parquet",
        ]
    )
    for name in names:
        assert (synth_dir / name).read_bytes() == (again / name).read_bytes(), name
    other = tmp_path / "other"
    generate(SynthConfig(**{**SMALL, "seed": 12}), other)
    assert (other / "sample_skeleton_train.csv").read_bytes() != (
        synth_dir / "sample_skeleton_train.csv"
    ).read_bytes()


def test_raw_layout(parsed) -> None:
    for split, (skeleton, common) in parsed.items():
        assert [r["sample_id"] for r in skeleton] == list(range(1, ROWS[split] + 1))
        for r in skeleton:
            assert re.fullmatch(r"[0-9a-f]{16}", r["key"])
            assert r["key"] in common
            assert (r["click"], r["conversion"]) in {(0, 0), (1, 0), (1, 1), (0, 1)}
            for field, _, value in r["features"]:
                assert field in SKELETON_FIELDS
                if field in ONE_HOT:
                    assert value == "1.0"
                else:
                    assert re.fullmatch(r"\d+\.\d{5}", value) and float(value) >= round(
                        math.log(2), 5
                    )
        for features in common.values():
            for field, _, value in features:
                assert field in ALICCP_USER_FIELDS
                if field in ONE_HOT:
                    assert value == "1.0"
                else:
                    assert re.fullmatch(r"\d+\.\d{5}", value)


def test_field_multiplicities_and_id_ranges(synth_dir: Path, parsed) -> None:
    truth = json.loads((synth_dir / "truth.json").read_text())
    distinct: Dict[str, set] = defaultdict(set)
    for skeleton, common in parsed.values():
        for r in skeleton:
            c = Counter(f for f, _, _ in r["features"])
            assert all(c[f] == 1 for f in ("205", "206", "207", "216", "301"))
            assert (
                3 <= c["210"] <= 14
                and c["853"] <= 6
                and all(c[f] <= 1 for f in ("508", "509", "702"))
            )
            ids_210 = [i for f, i, _ in r["features"] if f == "210"]
            assert len(ids_210) == len(set(ids_210))
        for features in common.values():
            c = Counter(f for f, _, _ in features)
            assert all(c[f] == 1 for f in ("121", "122", "124", "125", "126", "127", "128", "129"))
            assert c["101"] <= 1
            history = [i for f, i, _ in features if f == "110_14"]
            assert len(history) == len(set(history))
        for features in [r["features"] for r in skeleton] + list(common.values()):
            for field, fid, _ in features:
                lo, hi = ALICCP_FIELD_ID_RANGES[field]
                assert lo <= fid <= hi, (field, fid)
                distinct[field].add(fid)
    assert set(distinct) == set(ALICCP_FIELD_ID_RANGES)
    for field, ids in distinct.items():
        assert len(ids) <= truth["fields"][field]["cardinality"]
    # history lists are long (hundreds of ids at history_scale 1; here scaled by 0.05)
    lengths = [
        sum(1 for f, _, _ in feats if f == "110_14")
        for _, common in parsed.values()
        for feats in common.values()
    ]
    assert 5 < np.mean(lengths) < 40


def test_items_have_fixed_attributes(parsed) -> None:
    seen: Dict[int, tuple] = {}
    for skeleton, _ in parsed.values():
        for r in skeleton:
            f = {
                field: fid
                for field, fid, _ in r["features"]
                if field in ("205", "206", "207", "216")
            }
            attrs = (
                f["206"],
                f["207"],
                f["216"],
                tuple(sorted(i for x, i, _ in r["features"] if x == "210")),
            )
            assert seen.setdefault(f["205"], attrs) == attrs


def test_rows_grouped_by_user_session(synth_dir: Path, parsed) -> None:
    truth = json.loads((synth_dir / "truth.json").read_text())
    for split, (skeleton, common) in parsed.items():
        keys = [r["key"] for r in skeleton]
        runs = 1 + sum(a != b for a, b in zip(keys, keys[1:]))
        assert runs == len(set(keys)) == len(common) == truth["counts"][split]["sessions"]
        assert 10 < len(keys) / runs < 40  # rows_per_user = 20


def _mann_whitney_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Independent reference: average ranks of tied scores, U statistic."""
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    ranks = np.empty(len(s))
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    pos = labels.astype(bool)
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_oracle_auc_matches_an_independent_computation(synth_dir: Path, parsed) -> None:
    truth = json.loads((synth_dir / "truth.json").read_text())
    for split, (skeleton, _) in parsed.items():
        t = pq.read_table(synth_dir / f"truth_{split}.parquet").to_pydict()
        assert t["sample_id"] == [r["sample_id"] for r in skeleton]
        valid = np.array(t["valid"])
        click = np.array([r["click"] for r in skeleton])
        conversion = np.array([r["conversion"] for r in skeleton])
        assert ((click == 0) & (conversion == 1)).sum() == (~valid).sum() == 3
        assert not (((click == 0) & (conversion == 1)) & valid).any()
        p_click, p_conv = np.array(t["p_click"]), np.array(t["p_conversion"])
        np.testing.assert_array_equal(p_conv, p_click * np.array(t["p_conversion_given_click"]))
        for task, p, y in (("click", p_click, click), ("conversion", p_conv, conversion)):
            expected = _mann_whitney_auc(p[valid], y[valid])
            assert truth["oracle_auc"][split][task] == pytest.approx(expected, abs=1e-12)
        counts = truth["counts"][split]
        assert counts["rows"] == ROWS[split] and counts["invalid_rows"] == 3
        assert (
            counts["clicks"] == click[valid].sum()
            and counts["conversions"] == conversion[valid].sum()
        )


def test_signal_strength_and_rates(synth_dir: Path) -> None:
    truth = json.loads((synth_dir / "truth.json").read_text())
    crosses = truth["planted_crosses"]
    assert set(crosses["click"]) != set(crosses["conversion"])
    assert all(f in SINGLE_VALUED_FIELDS for c in crosses.values() for f in c)
    for split in ROWS:
        for task in ("click", "conversion"):
            oracle = truth["oracle_auc"][split][task]
            assert 0.7 < oracle < 0.92
            assert oracle - truth["no_cross_auc"][split][task] > 0.08  # the crosses matter
        assert 0.07 < truth["rates"][split]["ctr"] < 0.13
        assert 0.12 < truth["rates"][split]["conversion_given_click"] < 0.28


def _invert(space, raw: int) -> int:
    """Popularity rank of a raw id (inverse of FieldSpace.raw_ids)."""
    return (
        (raw - space.low - space.shift) * pow(space.stride, -1, space.cardinality)
    ) % space.cardinality


def test_true_probabilities_follow_the_written_features(synth_dir: Path, parsed) -> None:
    """p_click / p_conversion_given_click recomputed from the features on disk (raw ids mapped
    back to ranks) through the planted formula equal the stored truth."""
    gen = SyntheticAliCCP(SynthConfig(**SMALL))
    spaces = gen.world.spaces
    skeleton, common = parsed["test"]
    t = pq.read_table(synth_dir / "truth_test.parquet").to_pydict()
    sample = skeleton[::37]
    ranks = {f: [] for f in SINGLE_VALUED_FIELDS}
    present = {f: [] for f in ("508", "509", "702", "853", "210")}
    for r in sample:
        feats = {
            f: fid for f, fid, _ in r["features"] + common[r["key"]] if f in SINGLE_VALUED_FIELDS
        }
        for f in SINGLE_VALUED_FIELDS:
            ranks[f].append(_invert(spaces[f], feats[f]) if f in feats else -1)
        names = {f for f, _, _ in r["features"]}
        for f in present:
            present[f].append(f in names)
    ranks_np = {f: np.array(v, dtype=np.int64) for f, v in ranks.items()}
    present_np = {f: np.array(v) for f, v in present.items()}
    present_np.update({f: r >= 0 for f, r in ranks_np.items()})
    click_logit = gen.world.task_logit(0, gen.click_signal, ranks_np, present_np)
    conv_logit = gen.world.task_logit(1, gen.conversion_signal, ranks_np, present_np)
    rows = [r["sample_id"] - 1 for r in sample]
    want_click = np.array(t["p_click"])[rows]
    want_cvr = np.array(t["p_conversion_given_click"])[rows]
    np.testing.assert_array_equal(
        gen.p_grid[quantize_logit(gen.click_intercept + click_logit)], want_click
    )
    np.testing.assert_array_equal(
        gen.p_grid[quantize_logit(gen.conversion_intercept + conv_logit)], want_cvr
    )
    # grid: every probability is sigmoid(k / 32)
    k = np.log(want_click / (1 - want_click)) * LOGIT_GRID_STEPS_PER_UNIT
    np.testing.assert_allclose(k, np.round(k), atol=1e-6)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    rc = synth_main(
        [
            "--output",
            str(out),
            "--train-rows",
            "300",
            "--test-rows",
            "0",
            "--seed",
            "3",
            "--id-scale",
            "0.01",
            "--history-scale",
            "0.02",
            "--click-cross",
            "122,206",
            "--conversion-cross",
            "124,301",
        ]
    )
    assert rc == 0
    truth = json.loads((out / "truth.json").read_text())
    assert truth["planted_crosses"] == {"click": ["122", "206"], "conversion": ["124", "301"]}
    assert truth["counts"]["test"]["rows"] == 0 and truth["oracle_auc"]["test"]["click"] is None
    assert (out / "sample_skeleton_test.csv").read_bytes() == b""
    assert len((out / "sample_skeleton_train.csv").read_text().split("\n")) == 301
    capsys.readouterr()
    rc = synth_main(
        [
            "--output",
            str(tmp_path / "bad"),
            "--train-rows",
            "10",
            "--test-rows",
            "10",
            "--click-cross",
            "121,206",
            "--conversion-cross",
            "206,121",
        ]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different crosses" in err
    assert (
        synth_main(
            [
                "--output",
                str(tmp_path / "bad2"),
                "--train-rows",
                "10",
                "--test-rows",
                "10",
                "--click-cross",
                "121,210",
            ]
        )
        == 1
    )
    assert "'210' is not one of the single-valued" in capsys.readouterr().err


# --- random structures ---------------------------------------------------------------------------


def test_random_structures_are_chosen_by_seed() -> None:
    from dtn_torchrec.data.synth_structure import ITEM_SIDE, USER_SIDE, random_crosses

    structures = [random_crosses(seed) for seed in range(12)]
    assert random_crosses(3) == structures[3]  # a pure function of the seed
    assert len({tuple(c.fields for t in s for c in t) for s in structures}) == 12
    shared_count = 0
    for click, conversion in structures:
        for crosses in (click, conversion):
            assert 1 <= len(crosses) <= 3
            assert all(
                c.fields[0] in USER_SIDE and c.fields[1] in ITEM_SIDE and 1 <= c.rank <= 4
                for c in crosses
            )
        shared = set(click) & set(conversion)
        assert len(shared) <= 1
        shared_count += len(shared)
        own = [c.fields for c in click + conversion if c not in shared]
        assert len(own) == len(set(own))  # no field pair planted twice
        assert {c.key for c in click if c not in shared}.isdisjoint({c.key for c in conversion})
    assert 0 < shared_count < 12  # some structures share a cross, some do not


def test_random_structure_truth_and_exact_oracle(tmp_path: Path) -> None:
    rows = dict(
        train_rows=3000, test_rows=0, seed=2, id_scale=0.01, history_scale=0.02, rows_per_user=10.0
    )
    config = SynthConfig(**rows, structure="random", structure_seed=1)
    truth = generate(config, tmp_path)
    click, conversion = config.crosses()
    assert set(click) & set(conversion)  # structure seed 1 shares one cross
    structure = truth["structure"]
    assert structure["kind"] == "random" and structure["seed"] == 1
    for task, crosses in (("click", click), ("conversion", conversion)):
        assert structure[task] == [
            {
                "fields": list(c.fields),
                "rank": c.rank,
                "std": c.std,
                "shared": c in conversion and c in click,
            }
            for c in crosses
        ]
        shared_var = sum(c.std**2 for c in crosses if c in click and c in conversion)
        assert structure["shared_variance_fraction"][task] == pytest.approx(
            shared_var / sum(c.std**2 for c in crosses)
        )
    assert truth["planted_crosses"] == {
        "click": list(click[0].fields),
        "conversion": list(conversion[0].fields),
    }
    skeleton = read_skeleton(tmp_path / "sample_skeleton_train.csv")
    t = pq.read_table(tmp_path / "truth_train.parquet").to_pydict()
    labels = {task: np.array([r[task] for r in skeleton]) for task in ("click", "conversion")}
    for task, p in (("click", np.array(t["p_click"])), ("conversion", np.array(t["p_conversion"]))):
        assert truth["oracle_auc"]["train"][task] == pytest.approx(
            _mann_whitney_auc(p, labels[task]), abs=1e-12
        )
        assert truth["oracle_auc"]["train"][task] - truth["no_cross_auc"]["train"][task] > 0.03


def test_cli_random_structure(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = [
        "--train-rows",
        "200",
        "--test-rows",
        "50",
        "--id-scale",
        "0.01",
        "--history-scale",
        "0.02",
    ]
    assert (
        synth_main(
            [
                "--output",
                str(tmp_path / "r"),
                *base,
                "--structure",
                "random",
                "--structure-seed",
                "4",
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert (
        printed["structure"] == json.loads((tmp_path / "r" / "truth.json").read_text())["structure"]
    )
    assert printed["structure"]["kind"] == "random" and printed["structure"]["seed"] == 4
    assert (
        synth_main(
            [
                "--output",
                str(tmp_path / "bad"),
                *base,
                "--structure",
                "random",
                "--click-cross",
                "122,206",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "click_cross apply to the planted structure only" in err
