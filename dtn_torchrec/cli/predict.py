"""``dtn-predict``: score a Parquet dataset with a trained checkpoint, or export it for serving.

Scoring (one process, or every worker of a ``torchrun`` / TorchX job; each rank scores its shard
of the rows)::

    dtn-predict --config FILE --checkpoint DIR --input DIR --output DIR [--split test]
                [--batch-size N] [--overwrite] [dotted.key=value ...]

writes ``DIR/part-*.parquet`` (``sample_id``, ``p_<task>``..., labels), ``DIR/metrics.json`` (when
the data has labels) and ``DIR/predict.json`` (rows, rows/s, checkpoint), all or nothing.

Export (one process)::

    dtn-predict --config FILE --checkpoint DIR --input DIR --export PATH [--quantize int8]

writes the TorchScript module ``PATH`` and ``PATH.json`` (file size, latency per batch, checked
difference to the trained model on the first ``--batch-size`` rows of ``--split``).

``--checkpoint`` is a ``step_<n>`` directory, a checkpoint directory (latest step) or the
``output.dir`` of ``dtn-train``; any world size may have written it. Exit status 0 on success,
2 for a bad command line or config, 1 otherwise, with a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import traceback
from typing import List, NoReturn, Optional

from dtn_torchrec.cli.common import (
    add_allow_config_change_argument,
    add_overrides_argument,
    add_verbose_argument,
    apply_verbose,
    fail,
)
from dtn_torchrec.data.reader import ParquetBatchReader
from dtn_torchrec.data.schema import SchemaSpec
from dtn_torchrec.distributed.launch import DistributedContext, init_distributed, shutdown_and_exit
from dtn_torchrec.serving.export import (
    QUANTIZATIONS,
    check_export_path,
    export_model,
    report_path,
)
from dtn_torchrec.serving.loading import (
    check_run_config,
    load_unsharded_model,
    model_schema,
    resolve_checkpoint,
)
from dtn_torchrec.serving.scoring import predict
from dtn_torchrec.train.config import ConfigError, RunConfig, load_run_config

PROG = "dtn-predict"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Score a dtn-prepare dataset with a trained checkpoint (any world size), or "
        "export the model as TorchScript for serving.",
        epilog="example: dtn-predict --config configs/dtn_demo.yaml --checkpoint runs/dtn_demo "
        "--input data/demo --output runs/dtn_demo/predictions",
    )
    parser.add_argument(
        "--config", required=True, help="YAML run config the checkpoint was trained with"
    )
    parser.add_argument(
        "--checkpoint", required=True, help="step_<n> dir, checkpoint dir (latest step) or run dir"
    )
    parser.add_argument("--input", required=True, help="dataset directory written by dtn-prepare")
    parser.add_argument(
        "--output", help="directory to write the predictions to (created atomically)"
    )
    parser.add_argument("--split", default="test", help="split of --input to score (default: test)")
    parser.add_argument(
        "--batch-size", type=int, help="rows per batch and rank (default: data.eval_batch_size)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier dtn-predict output or export (never anything else)",
    )
    add_allow_config_change_argument(parser)
    parser.add_argument(
        "--export", metavar="PATH", help="write a TorchScript export instead of scoring"
    )
    parser.add_argument(
        "--quantize",
        choices=QUANTIZATIONS,
        default="none",
        help="--export: embedding tables as fp32 (none) or int8 rows (default: none)",
    )
    add_verbose_argument(parser)
    add_overrides_argument(parser, "data.eval_batch_size=4096")
    return parser


def _export(cfg: RunConfig, args: argparse.Namespace) -> None:
    """Exports on this single process and prints the report's numbers."""
    check_export_path(args.export, overwrite=args.overwrite)
    data = SchemaSpec.load(args.input)
    ref = resolve_checkpoint(args.checkpoint)
    check_run_config(cfg, ref, allow_change=args.allow_config_change)
    schema = model_schema(cfg, data, args.input)
    model = load_unsharded_model(cfg, schema, ref, args.input)
    batch_size = args.batch_size or cfg.eval_batch_size
    reader = ParquetBatchReader(
        args.input,
        args.split,
        batch_size,
        use_weights=cfg.data.use_weights,
        prefetch_batches=0,
        fields=schema.field_names,
    )
    if reader.total_rows == 0:
        raise ValueError(f"{args.input}: split {args.split!r} has no rows to check the export on")
    sample = next(iter(reader)).sparse_features
    report = export_model(
        model,
        schema.field_names,
        args.export,
        sample,
        quantization=args.quantize,
        weighted=cfg.data.use_weights,
        provenance={"checkpoint": os.fspath(ref.path.resolve()), "step": ref.step},
    )
    latency = report["latency_ms_per_batch"]
    print(
        f"[export] {args.export}: {report['file_bytes'] / 2**20:.2f} MiB, {args.quantize} tables; "
        f"{latency['median']:.2f} ms per batch of {latency['batch_size']} rows (median); "
        f"max |p - p_trained| = {report['check']['max_abs_diff']:.2e}; "
        f"report {report_path(args.export)}",
        flush=True,
    )


def _score(cfg: RunConfig, args: argparse.Namespace, ctx: DistributedContext) -> None:
    summary = predict(
        cfg,
        args.checkpoint,
        args.input,
        args.output,
        ctx,
        split=args.split,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        allow_config_change=args.allow_config_change,
    )
    if ctx.rank != 0:
        return
    print(
        f"[predict] {summary.rows} rows of {summary.split!r} scored on {summary.world_size} "
        f"rank(s) in {summary.seconds:.2f} s ({summary.rows_per_s:.0f} rows/s) -> {args.output}",
        flush=True,
    )
    for task, metrics in (summary.metrics or {}).items():
        print(f"[metrics] {task}: auc={metrics['auc']} logloss={metrics['logloss']}", flush=True)


def main(argv: Optional[List[str]] = None) -> NoReturn:
    args = build_parser().parse_intermixed_args(argv)
    apply_verbose(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if (args.output is None) == (args.export is None):
        fail(PROG, 2, "give exactly one of --output (score) and --export (export for serving)")
    if args.batch_size is not None and args.batch_size < 1:
        fail(PROG, 2, f"--batch-size must be >= 1, got {args.batch_size}")
    if args.export is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        fail(PROG, 2, "--export runs as one process, not under torchrun with several workers")
    try:
        cfg = load_run_config(args.config, args.overrides)
    except ConfigError as e:
        fail(PROG, 2, str(e))
    ctx = init_distributed()
    try:
        if args.export is not None:
            _export(cfg, args)
        else:
            _score(cfg, args, ctx)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        fail(PROG, 1, str(e))
    except Exception as e:  # noqa: BLE001 - report, then leave the job with a failure code
        traceback.print_exc()
        fail(PROG, 1, f"rank {ctx.rank}: {type(e).__name__}: {e}")
    shutdown_and_exit(0)


if __name__ == "__main__":
    main()
