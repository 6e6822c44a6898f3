"""Data path throughput: raw Ali-CCP -> Parquet (``dtn-prepare``) against a plain-Python line-by-line
reference parser (the way the original FDN/DTN reader works), Parquet -> KJT batches (the reader)
against the samples/s that training consumes, and the conversion's peak memory at two skeleton
sizes over the same common-features file (it must not grow with the skeleton rows).

    python -m benchmarks.data_pipeline --workdir /tmp/dtn_bench --rows 1000000 --out data_pipeline.json

Everything is measured in this one run, side by side; the ratios are what to read.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import yaml

from dtn_torchrec.atomic_files import write_json_atomic
from dtn_torchrec.data.prepare_reference import reference_parse_raw
from dtn_torchrec.data.reader import ParquetBatchReader
from dtn_torchrec.data.schema import ALICCP_FIELDS, SchemaSpec
from dtn_torchrec.data.synth import SynthConfig, generate

HASH_SIZE = 1_000_003
_PREPARE_CHILD = """
import json, resource, sys, time
from dtn_torchrec.data.prepare import PrepareOptions, prepare_dataset
start = time.perf_counter()
schema = prepare_dataset("aliccp-raw", sys.argv[1], sys.argv[2],
                         PrepareOptions(id_mapping="hash", hash_size={hash_size}, overwrite=True,
                                        valid_fraction=0.0))  # every row read back from train
print(json.dumps({{"seconds": time.perf_counter() - start,
                  "rows_read": sum(s.rows_read for s in schema.splits.values()),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def synthesise(workdir: Path, rows: int, test_rows: int, seed: int) -> Path:
    raw = workdir / f"raw_{rows}_{test_rows}_{seed}"
    if not (raw / "truth.json").is_file():
        generate(SynthConfig(train_rows=rows, test_rows=test_rows, seed=seed), raw)
    return raw


def skeleton_prefix(raw: Path, rows: int, target: Path) -> Path:
    """A copy of ``raw`` whose skeleton files keep only their first ``rows`` lines (common files
    unchanged), so the two conversions differ in skeleton rows only."""
    target.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        shutil.copyfile(
            raw / f"common_features_{split}.csv", target / f"common_features_{split}.csv"
        )
        with (
            open(raw / f"sample_skeleton_{split}.csv", "rb") as src,
            open(target / f"sample_skeleton_{split}.csv", "wb") as dst,
        ):
            for i, line in enumerate(src):
                if i >= rows:
                    break
                dst.write(line)
    return target


def convert(raw: Path, out: Path) -> Dict[str, float]:
    """``prepare_dataset`` in a fresh process, so its peak RSS is its own."""
    child = _PREPARE_CHILD.format(hash_size=HASH_SIZE)
    res = subprocess.run(
        [sys.executable, "-c", child, str(raw), str(out)],
        check=True,
        capture_output=True,
        text=True,
    )
    stats = json.loads(res.stdout.strip().splitlines()[-1])
    stats["rows_per_s"] = stats["rows_read"] / stats["seconds"]
    return stats


def reference_rows_per_s(raw: Path, rows: int) -> Dict[str, float]:
    """The line-by-line parser over the first ``rows`` train rows, timed from its first row (its
    common-features load is left out, which favours the reference)."""
    hash_sizes = {name: HASH_SIZE for name in ALICCP_FIELDS}
    parsed = reference_parse_raw(
        str(raw / "sample_skeleton_train.csv"),
        str(raw / "common_features_train.csv"),
        hash_sizes=hash_sizes,
    )
    next(parsed)
    start, n = time.perf_counter(), 1
    for _ in parsed:
        n += 1
        if n >= rows:
            break
    seconds = time.perf_counter() - start
    return {"rows": n, "seconds": seconds, "rows_per_s": (n - 1) / seconds}


def reader_rate(dataset: Path, batch_size: int, shuffle: bool) -> Dict[str, float]:
    reader = ParquetBatchReader(
        str(dataset),
        "train",
        batch_size,
        shuffle=shuffle,
        shuffle_buffer_rows=16 * batch_size if shuffle else 0,
        use_weights=True,
    )
    start, batches, samples, ids = time.perf_counter(), 0, 0, 0
    for batch in reader:
        batches += 1
        samples += batch.batch_size
        ids += batch.sparse_features.values().numel()
    seconds = time.perf_counter() - start
    return {
        "batches_per_s": batches / seconds,
        "samples_per_s": samples / seconds,
        "ids_per_s": ids / seconds,
        "batches": batches,
        "shuffle": shuffle,
    }


def training_rate(dataset: Path, config: str, batch_size: int, steps: int) -> Dict[str, float]:
    """Samples/s of the product's training step on one rank (DMP, fused row-wise Adagrad for the
    tables, dense Adam) over batches already in memory: what training consumes."""
    from dtn_torchrec.distributed.build import build_meta_train_model, build_sharded_model
    from dtn_torchrec.distributed.config import (
        DenseOptimizerConfig,
        ShardingConfig,
        SparseOptimizerConfig,
    )
    from dtn_torchrec.distributed.launch import init_distributed
    from dtn_torchrec.distributed.optimizers import build_dense_optimizer
    from dtn_torchrec.models.config import model_config_from_dict

    ctx = init_distributed()
    schema = SchemaSpec.load(dataset)
    with open(config) as f:
        model_cfg = model_config_from_dict(yaml.safe_load(f)["model"])
    model = build_meta_train_model(
        model_cfg, schema, SparseOptimizerConfig("rowwise_adagrad", lr=0.05)
    )
    dmp, _ = build_sharded_model(
        model, ShardingConfig(), schema, device=ctx.device, batch_size=batch_size
    )
    optimizer, _, _ = build_dense_optimizer(dmp, DenseOptimizerConfig(name="adam", lr=1e-3))
    batches: List = []
    for batch in ParquetBatchReader(str(dataset), "train", batch_size):
        batches.append(batch)
        if len(batches) == steps + 2:
            break
    times = []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        loss, _ = dmp(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if i >= 2:  # warm-up
            times.append(time.perf_counter() - start)
    times.sort()
    median = times[len(times) // 2]
    return {
        "config": config,
        "samples_per_s": batch_size / median,
        "median_step_s": median,
        "steps": len(times),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdir", default="/tmp/dtn_bench_data")
    p.add_argument(
        "--rows",
        type=int,
        default=1_000_000,
        help="train skeleton rows (>= 1M for the issue's protocol)",
    )
    p.add_argument("--test-rows", type=int, default=50_000)
    p.add_argument(
        "--reference-rows", type=int, default=30_000, help="rows timed for the reference parser"
    )
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--train-config", default="configs/dtn_demo.yaml")
    p.add_argument("--train-steps", type=int, default=8)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default=None, help="JSON output path")
    args = p.parse_args(argv)

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"synthesising {args.rows:,} + {args.test_rows:,} raw rows ...", file=sys.stderr, flush=True
    )
    raw = synthesise(workdir, args.rows, args.test_rows, args.seed)
    dataset = workdir / "prepared"
    full = convert(raw, dataset)
    quarter_rows = max(1, args.rows // 4)
    quarter = convert(
        skeleton_prefix(raw, quarter_rows, workdir / "raw_quarter"), workdir / "prepared_quarter"
    )
    reference = reference_rows_per_s(raw, args.reference_rows)
    plain = reader_rate(dataset, args.batch_size, shuffle=False)
    shuffled = reader_rate(dataset, args.batch_size, shuffle=True)
    training = training_rate(dataset, args.train_config, args.batch_size, args.train_steps)

    result = {
        "rows": args.rows,
        "batch_size": args.batch_size,
        "conversion": full,
        "conversion_quarter_skeleton": quarter,
        "reference_parser": reference,
        "conversion_speedup": full["rows_per_s"] / reference["rows_per_s"],
        "peak_rss_ratio_full_vs_quarter": full["peak_rss_mb"] / quarter["peak_rss_mb"],
        "reader": plain,
        "reader_shuffled": shuffled,
        "training": training,
        "reader_over_training": plain["samples_per_s"] / training["samples_per_s"],
        "reader_shuffled_over_training": shuffled["samples_per_s"] / training["samples_per_s"],
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    rows = [
        ("raw -> Parquet, dtn-prepare (rows/s)", f"{full['rows_per_s']:,.0f}"),
        ("raw, line-by-line reference (rows/s)", f"{reference['rows_per_s']:,.0f}"),
        ("  conversion speed-up", f"{result['conversion_speedup']:.1f}x"),
        (f"  peak RSS, {args.rows:,} skeleton rows (MB)", f"{full['peak_rss_mb']:,.0f}"),
        (f"  peak RSS, {quarter_rows:,} skeleton rows (MB)", f"{quarter['peak_rss_mb']:,.0f}"),
        ("Parquet -> KJT, in order (batches/s)", f"{plain['batches_per_s']:,.1f}"),
        ("Parquet -> KJT, in order (samples/s)", f"{plain['samples_per_s']:,.0f}"),
        ("Parquet -> KJT, shuffled (samples/s)", f"{shuffled['samples_per_s']:,.0f}"),
        (
            f"training consumes, {Path(args.train_config).stem}, 1 rank (samples/s)",
            f"{training['samples_per_s']:,.0f}",
        ),
        ("  reader / training", f"{result['reader_over_training']:.1f}x"),
        ("  shuffled reader / training", f"{result['reader_shuffled_over_training']:.1f}x"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v:>12}")
    if args.out:
        write_json_atomic(args.out, result)
    # Not shutdown_and_exit: a single process, no collective left to finish.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
