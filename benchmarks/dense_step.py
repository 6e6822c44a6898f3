"""The dense part's training step alone: fp32 vs bf16, fused vs module-by-module, compiled or not.

    .venv/bin/python -m benchmarks.dense_step --config configs/dtn_aliccp.yaml --threads 2

The model of ``--config`` is built on CPU over tiny tables (its dense shapes are those of the
real size: the field count and embedding dim set them), and one training step is timed on
random batches: forward, weighted BCE, backward, dense Adam. Every variant in its own windows
of seconds, one after the other in this process, with the fp32/bf16 GEMM peak and the CPU other
processes took. Achieved dense FLOP/s = samples/s x 3 x forward FLOPs of the dense arch.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import statistics
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from benchmarks.common import (
    WindowSpec,
    add_timing_arguments,
    contention_mark,
    format_table,
    machine_info,
    measure_roofline,
    refuse_if_busy,
    strict_status,
    timed_windows,
)
from benchmarks.conditions import is_contended
from benchmarks.reference import build_unfused_train_model
from dtn_torchrec.atomic_files import write_json_atomic
from dtn_torchrec.data.schema import SchemaSpec
from dtn_torchrec.models.builder import build_train_model
from dtn_torchrec.models.stats import aliccp_reference_schema, model_stats
from dtn_torchrec.train.config import load_run_config

VARIANTS = ("fp32-loop", "fp32-fused", "bf16-fused", "bf16-fused-compiled")


def random_batches(schema: SchemaSpec, batch_size: int, count: int, seed: int = 0) -> List[Any]:
    """``count`` random batches (one id per field, labels 0/1)."""
    from dtn_torchrec.data.batch import Batch

    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        values = torch.cat(
            [torch.randint(1, f.num_embeddings, (batch_size,), generator=g) for f in schema.fields]
        )
        kjt = KeyedJaggedTensor(
            keys=schema.field_names,
            values=values,
            lengths=torch.ones(batch_size * len(schema.fields), dtype=torch.int32),
        )
        labels = torch.randint(0, 2, (batch_size, len(schema.labels)), generator=g).float()
        batches.append(
            Batch(sparse_features=kjt, labels=labels, sample_ids=torch.arange(batch_size))
        )
    return batches


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="run config (model and batch size)")
    p.add_argument("--batch-size", type=int, help="default: the config's data.batch_size")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--smoke", action="store_true", help="tiny windows and GEMM probe")
    add_timing_arguments(p, warmup=3, window_seconds=5.0, windows=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = [v for v in args.variants.split(",") if v]
    if any(v not in VARIANTS for v in variants):
        raise SystemExit(
            f"--variants: expected a subset of {list(VARIANTS)}, got {args.variants!r}"
        )
    timing = WindowSpec(args.warmup, 0.05 if args.smoke else args.window_seconds, args.windows)
    idle_probe = refuse_if_busy(args.strict)

    cfg = load_run_config(args.config)
    batch_size = args.batch_size or cfg.data.batch_size
    full = aliccp_reference_schema()
    schema = dataclasses.replace(
        full, fields=[dataclasses.replace(f, num_embeddings=100, max_length=1) for f in full.fields]
    )
    forward_flops = model_stats(cfg.model, schema).forward_flops_per_sample
    batches = random_batches(schema, batch_size, 4)
    roofline = measure_roofline(
        *((256, 16 * 2**20, 0.1) if args.smoke else (2048, 256 * 2**20, 2.0))
    )

    torch.manual_seed(cfg.seed)
    base = build_train_model(cfg.model, schema, device=torch.device("cpu"))
    results: List[Dict[str, Any]] = []
    for variant in variants:
        model = copy.deepcopy(base)
        if variant == "fp32-loop":
            model = build_unfused_train_model(cfg.model, schema, device=torch.device("cpu"))
            model.load_state_dict(base.state_dict())
        if variant.startswith("bf16"):
            model.model.set_dense_precision("bf16", "cpu")
        if variant.endswith("compiled"):
            model.model.dense_arch.compile()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        cycle = itertools.cycle(batches)

        def step() -> int:
            optimizer.zero_grad()
            loss, _ = model(next(cycle))
            loss.backward()
            optimizer.step()
            return batch_size

        times = timed_windows(step, timing)
        rate = statistics.median(times.rates)
        results.append(
            {
                "variant": variant,
                "samples_per_s": rate,
                "windows": times.rates,
                "other_cpu_cores": times.other_cpu_cores,
                "contended": is_contended(times.other_cpu_cores),
                "dense_flops_per_s": 3 * forward_flops * rate,
            }
        )
        print(f"[dense_step] {variant}: {rate:,.0f} samples/s", file=sys.stderr, flush=True)

    print(
        f"dense forward {forward_flops / 1e6:,.2f} MFLOP/sample, batch {batch_size}, {args.threads} threads; "
        f"GEMM peak fp32 {roofline.gemm_peak_flops / 1e9:,.1f}, bf16 {roofline.gemm_peak_bf16_flops / 1e9:,.1f} "
        f"GFLOP/s ({contention_mark(roofline.contended)})"
    )
    print(
        format_table(
            (
                "variant",
                "samples/s",
                "(min-max)",
                "dense GFLOP/s",
                "x fp32 peak",
                "x bf16 peak",
                "conditions",
            ),
            [
                (
                    r["variant"],
                    f"{r['samples_per_s']:,.0f}",
                    f"{min(r['windows']):,.0f}-{max(r['windows']):,.0f}",
                    f"{r['dense_flops_per_s'] / 1e9:,.1f}",
                    f"{r['dense_flops_per_s'] / roofline.gemm_peak_flops:.2f}",
                    f"{r['dense_flops_per_s'] / roofline.gemm_peak_bf16_flops:.2f}",
                    contention_mark(r["contended"]),
                )
                for r in results
            ],
        )
    )
    contended = roofline.contended or any(r["contended"] for r in results)
    if args.out:
        write_json_atomic(
            args.out,
            {
                "benchmark": "dense_step",
                "machine": machine_info(),
                "args": vars(args),
                "forward_flops_per_sample": forward_flops,
                "batch_size": batch_size,
                "roofline": dataclasses.asdict(roofline),
                "idle_probe_other_cpu_cores": idle_probe,
                "contended": contended,
                "results": results,
            },
        )
    return strict_status(contended, args.strict)


if __name__ == "__main__":
    sys.exit(main())
