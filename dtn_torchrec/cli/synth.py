"""``dtn-synth``: write a synthetic raw Ali-CCP data set with a planted signal.

    dtn-synth --output DIR --train-rows N --test-rows M [--seed S]
              [--structure random --structure-seed K]

-> DIR/sample_skeleton_{train,test}.csv, DIR/common_features_{train,test}.csv,
   DIR/truth_{train,test}.parquet, DIR/truth.json (oracle AUC per split and task).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional, Tuple

from dtn_torchrec.data.synth import SynthConfig, generate
from dtn_torchrec.data.synth_structure import STRUCTURES


def _pair(text: str) -> Tuple[str, str]:
    parts = tuple(p.strip() for p in text.split(","))
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected two fields 'A,B', got {text!r}")
    return parts  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    defaults = SynthConfig(train_rows=0, test_rows=0)
    p = argparse.ArgumentParser(
        prog="dtn-synth", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--output", required=True, help="output directory (created if missing)")
    p.add_argument("--train-rows", type=int, required=True, help="skeleton rows of the train split")
    p.add_argument("--test-rows", type=int, required=True, help="skeleton rows of the test split")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--ctr", type=float, default=defaults.ctr, help="target click rate")
    p.add_argument("--cvr", type=float, default=defaults.cvr, help="target P(conversion | click)")
    p.add_argument(
        "--id-scale",
        type=float,
        default=defaults.id_scale,
        help="multiply field cardinalities above 100 by this (never below 100)",
    )
    p.add_argument(
        "--history-scale",
        type=float,
        default=defaults.history_scale,
        help="multiply the mean length of the *_14 history lists by this",
    )
    p.add_argument(
        "--rows-per-user",
        type=float,
        default=defaults.rows_per_user,
        help="mean skeleton rows per common_feature_index",
    )
    p.add_argument(
        "--invalid-rows",
        type=int,
        default=defaults.invalid_rows,
        help="(click=0, conversion=1) rows injected into each split",
    )
    p.add_argument(
        "--click-cross",
        type=_pair,
        default=defaults.click_cross,
        help="planted click cross 'A,B' (single-valued fields)",
    )
    p.add_argument(
        "--conversion-cross",
        type=_pair,
        default=defaults.conversion_cross,
        help="planted conversion cross 'A,B' (single-valued fields)",
    )
    p.add_argument("--cross-rank", type=int, default=defaults.cross_rank)
    p.add_argument(
        "--cross-std",
        type=float,
        default=defaults.cross_std,
        help="standard deviation of each planted cross term (logit units)",
    )
    p.add_argument(
        "--structure",
        choices=STRUCTURES,
        default=defaults.structure,
        help="planted: the two crosses above (default); random: crosses, ranks, "
        "strengths and a possibly shared cross drawn from --structure-seed (recorded in "
        "truth.json)",
    )
    p.add_argument(
        "--structure-seed",
        type=int,
        default=defaults.structure_seed,
        help="seed of a random structure (default: 0)",
    )
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    config = SynthConfig(
        train_rows=args.train_rows,
        test_rows=args.test_rows,
        seed=args.seed,
        ctr=args.ctr,
        cvr=args.cvr,
        id_scale=args.id_scale,
        history_scale=args.history_scale,
        rows_per_user=args.rows_per_user,
        invalid_rows=args.invalid_rows,
        click_cross=args.click_cross,
        conversion_cross=args.conversion_cross,
        cross_rank=args.cross_rank,
        cross_std=args.cross_std,
        structure=args.structure,
        structure_seed=args.structure_seed,
    )
    try:
        truth = generate(config, args.output)
    except (ValueError, OSError) as e:
        print(f"dtn-synth: {e}", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {
                "output": args.output,
                "oracle_auc": truth["oracle_auc"],
                "counts": truth["counts"],
                "structure": truth["structure"],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
