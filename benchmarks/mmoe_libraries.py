"""MMoE in the setting of the public PyTorch multi-task libraries, trained by ``dtn-train``.

    .venv/bin/python -m benchmarks.mmoe_libraries --out mmoe_libraries.json

The setting (issue 12; deepctr-torch and torch-rechub were measured in it): 20 single-valued
fields with vocabularies log-spaced 10..100k, Zipf ids, 200k train rows (+ a 50k-row test
split), embedding dim 16, 4 MLP experts 256 -> 128, towers [64], softmax gates, dense Adam 1e-3,
batch 2048, 1 epoch, 2 threads. Labels come from a planted model (``synthetic.PlantedLabels``),
so the test AUC is measured against a known oracle.

Ours is the product: ``dtn-train`` in a child process (``OMP_NUM_THREADS``), the config written
next to its run, tables with the fused sparse optimiser (row-wise Adagrad; FBGEMM has no fused
CPU Adam), ``train.precision`` as given (default ``auto``). The timed windows are the trainer's
own log windows (``train.log_every_steps``), the first one (warm-up) left out; the run's rate is
the median window, shown with the min-max. The CPU other processes took during the run and the
fp32/bf16 GEMM peak at the same thread count are measured here, around the child.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import yaml

from benchmarks.common import (
    contention_mark,
    format_table,
    machine_info,
    measure_roofline,
    refuse_if_busy,
    strict_status,
)
from benchmarks.conditions import CONTENDED_CORES, OtherCpuMonitor
from benchmarks.synthetic import log_spaced_fields, write_planted_dataset
from dtn_torchrec.atomic_files import write_json_atomic

# Measured by the lead on an idle 2-core machine (issue 12): samples/s and test AUC
# (click / conversion) of the fastest library in this setting.
LIBRARIES = {
    "deepctr-torch": {"samples_per_s": 23_000.0},
    "torch-rechub (prebatched tensors)": {"samples_per_s": 27_300.0},
}
LIBRARY_TEST_AUC = {"click": 0.818, "conversion": 0.843}
SPEED_TARGET = 1.2
AUC_TOLERANCE = 0.005
_WINDOW = re.compile(r"^\[train\] epoch \d+ step (\d+): .*samples/s=(\d+)")


def run_config(data: Path, out_dir: Path, args: argparse.Namespace) -> Dict[str, Any]:
    """The dtn-train config of this setting."""
    return {
        "seed": 0,
        "data": {
            "path": str(data),
            "batch_size": args.batch_size,
            "eval_batch_size": 8192,
            "valid_split": None,
        },
        "model": {
            "name": "mmoe",
            "tasks": ["click", "conversion"],
            "embedding": {"embedding_dim": 16, "pooling": "sum"},
            "tower": {"hidden_dims": [64]},
            "mmoe": {
                "num_experts": 4,
                "gate_activation": "none",
                "combine": "sum",
                "expert": {"kind": "mlp", "hidden_dims": [256], "output_dim": 128},
            },
        },
        "train": {
            "epochs": 1,
            "log_every_steps": args.log_every_steps,
            "checkpoint_every_steps": 0,
            "dense_optimizer": {"name": "adam", "lr": 1.0e-3},
            "sparse_optimizer": {"name": "rowwise_adagrad", "lr": 0.05},
            "precision": args.precision,
            "compile": args.compile,
        },
        "output": {"dir": str(out_dir), "tensorboard": False},
    }


def log_windows(stderr: str) -> List[float]:
    """samples/s of every ``[train]`` log window, in order."""
    return [float(m.group(2)) for line in stderr.splitlines() if (m := _WINDOW.match(line))]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rows", type=int, default=200_000, help="train rows")
    p.add_argument("--test-rows", type=int, default=50_000)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="auto")
    p.add_argument("--compile", action="store_true", help="train.compile=true")
    p.add_argument(
        "--log-every-steps",
        type=int,
        default=20,
        help="steps per timed window (the trainer's log window)",
    )
    p.add_argument(
        "--data",
        default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "dtn-bench-data"),
        help="cache directory of the synthetic dataset",
    )
    p.add_argument(
        "--runs",
        default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "dtn-bench-runs"),
        help="the dtn-train run is written to a new directory under this one",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help=f"refuse a busy machine (> {CONTENDED_CORES:g} core of other processes) "
        "and exit 3 when the run was contended",
    )
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--smoke", action="store_true", help="tiny data: checks the command runs")
    args = p.parse_args(argv)
    rows, test_rows, largest = args.rows, args.test_rows, 100_000
    if args.smoke:
        rows, test_rows, largest, args.batch_size, args.log_every_steps = 4096, 2048, 1000, 256, 4
    idle_probe = refuse_if_busy(args.strict)

    torch.set_num_threads(args.threads)
    roofline = measure_roofline(
        *((256, 16 * 2**20, 0.1) if args.smoke else (2048, 256 * 2**20, 2.0))
    )

    fields = log_spaced_fields(20, 10, largest, 1)
    data = Path(args.data) / f"mmoe-libraries-{rows}-{test_rows}-{largest}"
    if not (data / "truth.json").is_file():
        write_planted_dataset(data, fields, {"train": rows, "test": test_rows}, seed=0)
    oracle = json.loads((data / "truth.json").read_text())["oracle_auc"]["test"]

    Path(args.runs).mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(dir=args.runs, prefix="mmoe_libraries-"))  # a fresh run
    config_path = run_dir / "benchmark_config.yaml"
    config_path.write_text(yaml.safe_dump(run_config(data, run_dir, args), sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    monitor = OtherCpuMonitor()
    monitor.start()
    proc = subprocess.run(
        [sys.executable, "-m", "dtn_torchrec.cli.train", "--config", str(config_path)],
        capture_output=True,
        text=True,
        env=env,
    )
    other_cores = monitor.stop()
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"dtn-train failed with status {proc.returncode}")
    summary = json.loads((run_dir / "summary.json").read_text())
    windows = log_windows(proc.stderr)[1:] or [summary["throughput"]["samples_per_s"]]
    precision = re.search(r"dense precision (\w+)", proc.stderr)
    ours = statistics.median(windows)
    fastest = max(v["samples_per_s"] for v in LIBRARIES.values())
    auc = {t: summary["test"][t]["auc"] for t in ("click", "conversion")}
    contended = other_cores > CONTENDED_CORES or roofline.contended
    result = {
        "benchmark": "mmoe_libraries",
        "machine": machine_info(),
        "args": vars(args),
        "data": {
            "path": str(data),
            "train_rows": rows,
            "test_rows": test_rows,
            "oracle_test_auc": oracle,
        },
        "roofline": dataclasses.asdict(roofline),
        "idle_probe_other_cpu_cores": idle_probe,
        "other_cpu_cores_during_run": other_cores,
        "contended": contended,
        "ours": {
            "samples_per_s": ours,
            "min_samples_per_s": min(windows),
            "max_samples_per_s": max(windows),
            "windows": windows,
            "epoch_samples_per_s": summary["throughput"]["samples_per_s"],
            "test_auc": auc,
            "dense_precision": precision.group(1) if precision else None,
        },
        "libraries": LIBRARIES,
        "library_test_auc": LIBRARY_TEST_AUC,
        "speed_ratio_to_fastest": ours / fastest,
        "targets": [
            {
                "target": f"ours >= {SPEED_TARGET}x the fastest library",
                "value": ours / fastest,
                "met": ours / fastest >= SPEED_TARGET,
            },
            *(
                {
                    "target": f"{t} test AUC >= library - {AUC_TOLERANCE}",
                    "value": auc[t],
                    "met": auc[t] >= LIBRARY_TEST_AUC[t] - AUC_TOLERANCE,
                }
                for t in auc
            ),
        ],
    }
    print(
        format_table(
            ("trainer", "samples/s", "(min-max)", "test AUC click", "conversion", "conditions"),
            [
                (
                    "ours (dtn-train, " + str(result["ours"]["dense_precision"]) + ")",
                    f"{ours:,.0f}",
                    f"{min(windows):,.0f}-{max(windows):,.0f}",
                    f"{auc['click']:.4f}",
                    f"{auc['conversion']:.4f}",
                    f"{contention_mark(contended)} ({other_cores:.2f} cores other)",
                )
            ]
            + [
                (
                    name + " [issue 12, idle]",
                    f"{v['samples_per_s']:,.0f}",
                    "-",
                    f"{LIBRARY_TEST_AUC['click']:.3f}",
                    f"{LIBRARY_TEST_AUC['conversion']:.3f}",
                    "their data",
                )
                for name, v in LIBRARIES.items()
            ],
        )
    )
    print(
        f"oracle test AUC {oracle['click']:.4f} / {oracle['conversion']:.4f}; GEMM peak with {args.threads} "
        f"threads: fp32 {roofline.gemm_peak_flops / 1e9:,.1f}, bf16 {roofline.gemm_peak_bf16_flops / 1e9:,.1f} "
        f"GFLOP/s; ours / fastest library {ours / fastest:.2f} (target {SPEED_TARGET})"
    )
    if args.out:
        write_json_atomic(args.out, result)
    return strict_status(contended, args.strict)


if __name__ == "__main__":
    sys.exit(main())
