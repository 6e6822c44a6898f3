"""Training throughput of ours against a plain-PyTorch reference, per model and rank count,
with the machine's roofline measured in the same run.

    .venv/bin/python -m benchmarks.throughput --out runs/bench/throughput.json
    .venv/bin/python -m benchmarks.throughput --models mmoe,dtn --ranks 1,2 --window-seconds 5 --size demo

For every model (shared-bottom, MMoE, PLE, DTN; ``configs/<model>_demo.yaml`` or
``_aliccp.yaml``) and rank count, ours (``benchmarks/ours.py``: Parquet reader -> pipeline ->
DMP with fused sparse optimiser) and the reference (``benchmarks/reference.py``: nn.EmbeddingBag
+ dense Adam + DataLoader) train the same model on the same Parquet data with the same per-rank
batch and threads. Each is timed in fresh processes: warm-up, then ``--windows`` windows of
``--window-seconds`` each; a rank's rate is its median window, a run's rate the sum over its
ranks, shown with its min-max. The CPU other processes took during every window is recorded; a
run where it exceeded 0.1 core is marked CONTENDED (``--strict``: refused, exit status 3).

Roofline, measured in this process with one rank's threads: fp32 and bf16 GEMM FLOP/s of a
large square ``torch.mm`` (seconds-long windows), the fp32 GEMM FLOP/s of each model's own dense
layers at its batch size, and copy bandwidth. Each
model's dense training FLOPs per sample (3x the forward, counted by ``FlopCounterMode`` in
``dtn_torchrec.models.stats``) times one rank's samples/s is the achieved dense FLOP/s per rank,
reported as a multiple of the GEMM ceilings. The embedding bytes per sample (lookup + fused
update, ``common.update_bytes_per_id``) times samples/s is compared with the copy bandwidth.

On a shared or busy machine pass ``--threads 1``: OpenMP threads on oversubscribed cores make
every small operator orders of magnitude slower and the comparison meaningless.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from benchmarks.common import (
    Roofline,
    TrainRun,
    WindowSpec,
    add_timing_arguments,
    combine_ranks,
    contention_mark,
    format_table,
    linear_shapes,
    machine_info,
    measure_roofline,
    model_gemm_flops_per_s,
    rate_spread,
    refuse_if_busy,
    run_ranks,
    strict_status,
    update_bytes_per_id,
)
from benchmarks.ours import ours_rank
from benchmarks.reference import reference_rank
from benchmarks.synthetic import aliccp_like_fields, cached_dataset
from dtn_torchrec.atomic_files import write_json_atomic
from dtn_torchrec.data.schema import SchemaSpec
from dtn_torchrec.distributed.build import feature_ids_per_row
from dtn_torchrec.distributed.library_warnings import quiet_harmless_log_lines
from dtn_torchrec.distributed.planning import find_embedding_tables
from dtn_torchrec.distributed.sharders import embedding_sharders
from dtn_torchrec.models.builder import build_model
from dtn_torchrec.models.config import ModelConfig
from dtn_torchrec.models.stats import model_stats
from dtn_torchrec.train.config import load_run_config

MODELS = ("shared_bottom", "mmoe", "ple", "dtn")
CONFIG_SUFFIX = {"demo": "demo", "reference": "aliccp"}
# Ali-CCP vocabularies and list lengths x these factors, per --size (overridable by flags).
DATA_SCALES = {"demo": (0.01, 0.1), "reference": (1.0, 1.0)}
REPO = Path(__file__).resolve().parent.parent
# (square GEMM size, copy bytes, GEMM window seconds) of the roofline probes.
ROOFLINE_PROBES = {"full": (2048, 256 * 2**20, 2.0), "smoke": (256, 16 * 2**20, 0.1)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}"
    )
    p.add_argument("--ranks", default="1,2", help="comma-separated rank counts (default 1,2)")
    p.add_argument(
        "--size",
        choices=sorted(CONFIG_SUFFIX),
        default="demo",
        help="configs/<model>_demo.yaml or _aliccp.yaml",
    )
    p.add_argument(
        "--batch-size", type=int, help="per-rank batch size (default: the config's data.batch_size)"
    )
    add_timing_arguments(p, warmup=5, window_seconds=5.0, windows=3)
    p.add_argument("--rows", type=int, default=50_000, help="rows of the synthetic training split")
    p.add_argument(
        "--id-scale",
        type=float,
        help="Ali-CCP vocabularies x this (default: demo 0.01, reference 1)",
    )
    p.add_argument(
        "--history-scale",
        type=float,
        help="Ali-CCP history lengths x this (default: demo 0.1, reference 1)",
    )
    p.add_argument(
        "--ids", choices=("uniform", "zipf"), default="zipf", help="id distribution in each table"
    )
    p.add_argument(
        "--data",
        default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "dtn-bench-data"),
        help="cache directory of the synthetic datasets",
    )
    p.add_argument(
        "--dataset",
        metavar="DIR",
        help="train on this dtn-prepare dataset instead of a synthetic one (the reference reads "
        "its whole train split into memory)",
    )
    p.add_argument("--threads", type=int, help="torch threads per rank (default: cores / ranks)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds allowed per measurement")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny data and steps: checks the script runs, measures nothing",
    )
    return p


def _names(text: str, allowed: Sequence[str], flag: str) -> List[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if not names or unknown:
        raise SystemExit(
            f"{flag}: expected a comma-separated subset of {list(allowed)}, got {text!r}"
        )
    return names


def embedding_bytes_per_sample(
    model_config: ModelConfig, schema: SchemaSpec, optimizer: str
) -> float:
    """Embedding memory traffic of one training sample: every looked-up row read in forward,
    then read and written with its optimiser state by the fused update (fp32)."""
    model = build_model(model_config, schema, device=torch.device("meta"))
    ids = feature_ids_per_row(schema, model)
    total = 0.0
    for table in find_embedding_tables(model, embedding_sharders()):
        per_row = sum(ids.get(f, 1.0) for f in table.feature_names)
        total += per_row * (
            4 * table.embedding_dim + update_bytes_per_id(optimizer, table.embedding_dim)
        )
    return total


def model_layer_shapes(model_config: ModelConfig, schema: SchemaSpec) -> List[tuple]:
    """``(in, out)`` of the model's dense layers (built on CPU over 2-row tables)."""
    tiny = dataclasses.replace(
        schema,
        fields=[
            dataclasses.replace(f, num_embeddings=min(f.num_embeddings, 2)) for f in schema.fields
        ],
    )
    return linear_shapes(build_model(model_config, tiny, device=torch.device("cpu")).dense_arch)


def roofline_row(result: Dict[str, Any], roofline: Roofline) -> Dict[str, Any]:
    """Achieved dense FLOP/s and embedding bandwidth of one rank of ours against the ceilings
    measured with that rank's threads."""
    rate = result["ours"]["samples_per_s"] / result["ranks"]
    flops = result["train_flops_per_sample"] * rate
    bandwidth = result["embedding_bytes_per_sample"] * rate
    return {
        "achieved_dense_flops_per_rank": flops,
        "fraction_of_gemm_peak": flops / roofline.gemm_peak_flops,
        "fraction_of_bf16_gemm_peak": flops / roofline.gemm_peak_bf16_flops,
        "fraction_of_model_shape_gemm": flops / result["model_shape_gemm_flops"],
        "embedding_bytes_per_s_per_rank": bandwidth,
        "fraction_of_copy_bandwidth": bandwidth / roofline.copy_bandwidth,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    quiet_harmless_log_lines()  # the models' KJTs (torch.fx's deprecation line)
    models = _names(args.models, MODELS, "--models")
    ranks = [int(r) for r in _names(args.ranks, ("1", "2", "4", "8"), "--ranks")]
    id_scale, history_scale = DATA_SCALES[args.size]
    timing = WindowSpec(args.warmup, args.window_seconds, args.windows)
    rows = args.rows
    if args.smoke:
        id_scale, history_scale, rows = 0.001, 0.02, 2048
        timing = WindowSpec(1, 0.05, 3)
    id_scale = args.id_scale if args.id_scale is not None else id_scale
    history_scale = args.history_scale if args.history_scale is not None else history_scale
    timing.validate()
    idle_probe = refuse_if_busy(args.strict)

    if args.dataset:
        data = Path(args.dataset)
        schema = SchemaSpec.load(data)
        rows = schema.splits["train"].rows
    else:
        fields = aliccp_like_fields(id_scale, history_scale)
        data = cached_dataset(
            args.data, f"aliccp-like-{args.size}", fields, rows, seed=0, ids=args.ids
        )
        schema = SchemaSpec.load(data)
    print(
        f"[throughput] data {data}: {rows:,} rows, {len(schema.fields)} fields, "
        f"{sum(f.num_embeddings for f in schema.fields):,} table rows",
        file=sys.stderr,
        flush=True,
    )

    configs = {m: str(REPO / "configs" / f"{m}_{CONFIG_SUFFIX[args.size]}.yaml") for m in models}
    loaded = {m: load_run_config(path) for m, path in configs.items()}
    batch_size = 32 if args.smoke else args.batch_size
    ceilings: Dict[int, Roofline] = {}

    results: List[Dict[str, Any]] = []
    for name in models:
        cfg = loaded[name]
        batch = batch_size or cfg.data.batch_size
        stats = model_stats(cfg.model, schema)
        emb_bytes = embedding_bytes_per_sample(cfg.model, schema, cfg.train.sparse_optimizer.name)
        layers = model_layer_shapes(cfg.model, schema)
        for world in ranks:
            threads = args.threads or max(1, (os.cpu_count() or 1) // world)
            # Ceilings with one rank's threads, measured here before the ranks start.
            torch.set_num_threads(threads)
            if threads not in ceilings:
                ceilings[threads] = measure_roofline(
                    *ROOFLINE_PROBES["smoke" if args.smoke else "full"]
                )
            gemm_ceiling = model_gemm_flops_per_s(batch, layers)
            run = TrainRun(
                config=configs[name], overrides=(), data=str(data), batch_size=batch, timing=timing
            )
            ours = combine_ranks(run_ranks(ours_rank, world, threads, args.timeout, run=run))
            reference = combine_ranks(
                run_ranks(reference_rank, world, threads, args.timeout, run=run)
            )
            result = {
                "model": name,
                "ranks": world,
                "threads_per_rank": threads,
                "batch_size_per_rank": batch,
                "ours": ours,
                "reference": reference,
                "ratio": ours["samples_per_s"] / reference["samples_per_s"],
                "contended": ours["contended"] or reference["contended"],
                "train_flops_per_sample": stats.train_flops_per_sample,
                "embedding_bytes_per_sample": emb_bytes,
                "model_shape_gemm_flops": gemm_ceiling,
                "sparse_optimizer": cfg.train.sparse_optimizer.name,
            }
            result.update(roofline_row(result, ceilings[threads]))
            results.append(result)
            print(
                f"[throughput] {name} x{world}: ours {ours['samples_per_s']:,.0f}/s, reference "
                f"{reference['samples_per_s']:,.0f}/s, ratio {result['ratio']:.2f}",
                file=sys.stderr,
                flush=True,
            )

    print(
        format_table(
            (
                "model",
                "ranks",
                "ours samples/s",
                "(min-max)",
                "reference samples/s",
                "(min-max)",
                "ours/ref",
                "other CPU (cores, max)",
                "conditions",
            ),
            [
                (
                    r["model"],
                    r["ranks"],
                    f"{r['ours']['samples_per_s']:,.0f}",
                    rate_spread(r["ours"]),
                    f"{r['reference']['samples_per_s']:,.0f}",
                    rate_spread(r["reference"]),
                    f"{r['ratio']:.2f}",
                    f"{max(r['ours']['max_other_cpu_cores'], r['reference']['max_other_cpu_cores']):.2f}",
                    contention_mark(r["contended"]),
                )
                for r in results
            ],
        )
    )
    print()
    for threads, roofline in sorted(ceilings.items()):
        print(
            f"roofline with {threads} thread(s): GEMM peak fp32 {roofline.gemm_peak_flops / 1e9:,.1f}, "
            f"bf16 {roofline.gemm_peak_bf16_flops / 1e9:,.1f} GFLOP/s (square, best window; "
            f"{contention_mark(roofline.contended)}), copy bandwidth {roofline.copy_bandwidth / 1e9:,.1f} GB/s"
        )
    print(
        format_table(
            (
                "model",
                "ranks",
                "train MFLOP/sample",
                "GFLOP/s per rank",
                "x fp32 peak",
                "x bf16 peak",
                "model GEMM GFLOP/s",
                "% model GEMM",
                "emb KB/sample",
                "emb GB/s per rank",
                "% copy bw",
            ),
            [
                (
                    r["model"],
                    r["ranks"],
                    f"{r['train_flops_per_sample'] / 1e6:,.2f}",
                    f"{r['achieved_dense_flops_per_rank'] / 1e9:,.2f}",
                    f"{r['fraction_of_gemm_peak']:.2f}",
                    f"{r['fraction_of_bf16_gemm_peak']:.2f}",
                    f"{r['model_shape_gemm_flops'] / 1e9:,.1f}",
                    f"{100 * r['fraction_of_model_shape_gemm']:.1f}",
                    f"{r['embedding_bytes_per_sample'] / 1e3:,.1f}",
                    f"{r['embedding_bytes_per_s_per_rank'] / 1e9:,.2f}",
                    f"{100 * r['fraction_of_copy_bandwidth']:.1f}",
                )
                for r in results
            ],
        )
    )
    contended = any(r["contended"] for r in results) or any(c.contended for c in ceilings.values())
    if args.out:
        write_json_atomic(
            args.out,
            {
                "benchmark": "throughput",
                "machine": machine_info(),
                "args": vars(args),
                "data": {
                    "path": str(data),
                    "rows": rows,
                    "synthetic": not args.dataset,
                    "id_scale": id_scale,
                    "history_scale": history_scale,
                    "ids": args.ids,
                    "table_rows": sum(f.num_embeddings for f in schema.fields),
                    "ids_per_row": sum(f.mean_length for f in schema.fields),
                },
                "timing": dataclasses.asdict(timing),
                "roofline": {str(t): dataclasses.asdict(r) for t, r in sorted(ceilings.items())},
                "idle_probe_other_cpu_cores": idle_probe,
                "contended": contended,
                "results": results,
            },
        )
    return strict_status(contended, args.strict)


if __name__ == "__main__":
    sys.exit(main())
