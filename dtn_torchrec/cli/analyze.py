"""``dtn-analyze``: per-task feature importance and DTN gate usage of a trained checkpoint.

::

    dtn-analyze --config FILE --checkpoint DIR --input DIR --output DIR [--split test]
                [--max-rows N] [--repeats R] [--seed S] [--rank-by {auc,logloss}]
                [--fields F,G,...] [--batch-size N] [--overwrite] [dotted.key=value ...]

Permutation importance of every field for every task (AUC drop, log-loss increase; mean and std
over R seeded permutations), the divergence of the importances between tasks, and for DTN the
mean softmax weight of every module in every task's gates. Writes CSV + JSON tables and PNG plots
into ``--output`` (all or nothing; see ``analysis.report``). Runs as one process. Exit status 0
on success, 2 for a bad command line or config, 1 otherwise, with a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import List, NoReturn, Optional

from dtn_torchrec.analysis.analyze import analyze
from dtn_torchrec.analysis.importance import RANK_BY, ImportanceConfig
from dtn_torchrec.cli.common import (
    add_allow_config_change_argument,
    add_overrides_argument,
    add_verbose_argument,
    apply_verbose,
    fail,
)
from dtn_torchrec.distributed.launch import init_distributed, shutdown_and_exit
from dtn_torchrec.train.config import ConfigError, load_run_config

PROG = "dtn-analyze"
_TOP = 5


def _csv_list(text: str) -> List[str]:
    return [item for item in text.split(",") if item]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Per-task permutation feature importance (and DTN gate usage) of a checkpoint.",
        epilog="example: dtn-analyze --config configs/dtn_demo.yaml --checkpoint runs/dtn_demo "
        "--input data/demo --output runs/dtn_demo/analysis --max-rows 20000",
    )
    parser.add_argument(
        "--config", required=True, help="YAML run config the checkpoint was trained with"
    )
    parser.add_argument(
        "--checkpoint", required=True, help="step_<n> dir, checkpoint dir (latest step) or run dir"
    )
    parser.add_argument("--input", required=True, help="dataset directory written by dtn-prepare")
    parser.add_argument("--output", required=True, help="directory to write the analysis to")
    parser.add_argument(
        "--split", default="test", help="split of --input to evaluate on (default: test)"
    )
    parser.add_argument(
        "--max-rows",
        type=int,
        default=20000,
        help="use the first N rows of the split (default: 20000)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="permutations per field (default: 3)"
    )
    parser.add_argument("--seed", type=int, default=0, help="permutation seed (default: 0)")
    parser.add_argument(
        "--rank-by",
        choices=sorted(RANK_BY),
        default="auc",
        help="importance to rank fields by (default: auc)",
    )
    parser.add_argument("--fields", type=_csv_list, help="only permute these fields (default: all)")
    parser.add_argument(
        "--batch-size", type=int, help="rows per forward (default: data.eval_batch_size)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier dtn-analyze output (never anything else)",
    )
    add_allow_config_change_argument(parser)
    add_verbose_argument(parser)
    add_overrides_argument(parser)
    return parser


def main(argv: Optional[List[str]] = None) -> NoReturn:
    args = build_parser().parse_intermixed_args(argv)
    apply_verbose(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        fail(PROG, 2, "dtn-analyze runs as one process, not under torchrun with several workers")
    if args.max_rows < 1:
        fail(PROG, 2, f"--max-rows must be >= 1, got {args.max_rows}")
    try:
        cfg = load_run_config(args.config, args.overrides)
        importance = ImportanceConfig(
            repeats=args.repeats,
            seed=args.seed,
            batch_size=args.batch_size or cfg.eval_batch_size,
            rank_by=args.rank_by,
        )
    except (ConfigError, ValueError) as e:
        fail(PROG, 2, str(e))
    init_distributed()
    try:
        outcome = analyze(
            cfg,
            args.checkpoint,
            args.input,
            args.output,
            split=args.split,
            max_rows=args.max_rows,
            importance=importance,
            fields=args.fields,
            overwrite=args.overwrite,
            allow_config_change=args.allow_config_change,
        )
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        fail(PROG, 1, str(e))
    except Exception as e:  # noqa: BLE001 - report, then leave with a failure code
        traceback.print_exc()
        fail(PROG, 1, f"{type(e).__name__}: {e}")
    result = outcome.importance
    print(
        f"[analyze] {result.rows} rows x {result.repeats} permutations per field -> {args.output}"
    )
    for task in result.tasks:
        top = ", ".join(
            f"{f} ({result.importance[f][task][result.rank_by]:.4f})"
            for f in result.ranking(task)[:_TOP]
        )
        print(f"[importance] {task}: {top}")
    for usage in outcome.gates or []:
        weights = ", ".join(f"{e}={m:.2f}" for e, m in zip(usage.experts, usage.mean))
        print(f"[gates] {usage.task} {usage.gate}: {weights}")
    sys.stdout.flush()
    shutdown_and_exit(0)


if __name__ == "__main__":
    main()
