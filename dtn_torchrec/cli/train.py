"""``dtn-train --config FILE [dotted.key=value ...]``: train a multi-task model.

Runs as one process, or as every worker of a ``torchrun`` / TorchX job (``RANK``,
``WORLD_SIZE``, ... in the environment). Writes ``<output.dir>/summary.json`` (rank 0), the
sharding plan, the resolved config, TensorBoard scalars and checkpoints. A worker restarted by
torchrun (``TORCHELASTIC_RESTART_COUNT`` > 0) resumes from the latest checkpoint by itself.

Exit status 0 on success; otherwise 1 (2 for a bad command line or config) with a one-line
reason as the last line on stderr.
"""

from __future__ import annotations

import argparse
import logging
import traceback
from typing import List, NoReturn, Optional

from dtn_torchrec.cli.common import (
    add_allow_config_change_argument,
    add_overrides_argument,
    add_verbose_argument,
    apply_verbose,
    fail,
)
from dtn_torchrec.distributed.launch import (
    LaunchError,
    allow_tf32,
    init_distributed,
    shutdown_and_exit,
)
from dtn_torchrec.train.config import ConfigError, load_run_config
from dtn_torchrec.train.session import restarted_by_launcher, run_training

PROG = "dtn-train"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train DTN / MMoE / PLE / shared-bottom on a Parquet dataset (dtn-prepare).",
        epilog="example: dtn-train --config configs/dtn_demo.yaml data.path=data/demo "
        "train.epochs=2 output.dir=runs/demo",
    )
    parser.add_argument("--config", required=True, help="YAML run config")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in <output.dir>/checkpoints (same as "
        "train.resume=true)",
    )
    add_allow_config_change_argument(parser)
    parser.add_argument(
        "--require-cuda",
        action="store_true",
        help="refuse to start without a CUDA device for every rank instead of falling back to "
        "gloo on CPU (DTN_DEVICE=cpu|cuda|auto picks the device; default auto)",
    )
    add_verbose_argument(parser)
    add_overrides_argument(parser, "train.max_steps=100 model.tower.hidden_dims=[64,32]")
    return parser


def main(argv: Optional[List[str]] = None) -> NoReturn:
    # Intermixed: overrides may come before and after --resume.
    args = build_parser().parse_intermixed_args(argv)
    apply_verbose(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_run_config(args.config, args.overrides)
    except ConfigError as e:
        fail(PROG, 2, str(e))
    resume = args.resume or cfg.train.resume or restarted_by_launcher()
    try:
        ctx = init_distributed(require_cuda=args.require_cuda)
    except LaunchError as e:
        fail(PROG, 1, str(e))
    allow_tf32(ctx.device, cfg.train.precision)
    try:
        run_training(cfg, ctx, resume=resume, allow_config_change=args.allow_config_change)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        fail(PROG, 1, f"rank {ctx.rank}: {e}")
    except Exception as e:  # noqa: BLE001 - report, then leave the job with a failure code
        traceback.print_exc()
        fail(PROG, 1, f"rank {ctx.rank}: {type(e).__name__}: {e}")
    shutdown_and_exit(0)


if __name__ == "__main__":
    main()
