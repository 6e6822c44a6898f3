"""Model quality through the product: test AUC of each shipped config against the oracle, over
random task-specific structures, with parameter counts and samples/s beside it.

For each structure seed S: ``dtn-synth --structure random --structure-seed S --seed S`` (raw
Ali-CCP files whose click and conversion depend on crosses drawn from S, and the oracle AUC),
``dtn-prepare`` with its default flags (a valid split carved from train), then ``dtn-train`` on
``--nproc`` ranks (``torchrun``: sharded tables, fused sparse optimisers,
``TrainPipelineSparseDist``) for every config at the same ``--epochs``, plus the baseline, a plain
multi-task MLP over the pooled embeddings (``benchmarks/mlp_baseline.yaml``). Each run's
``summary.json`` gives the test AUC of the checkpoint ``dtn-train`` selected on the valid split.

    python -m benchmarks.model_quality --workdir /tmp/quality --seeds-report 0-4 \
        --train-rows 200000 --test-rows 40000 --epochs 3 \
        --out benchmarks/results/model_quality.json

Structure seeds are for reporting (``--seeds-report``, below 100) or for tuning configs
(``--seeds-tune``, 100 and above), never both: configs are tuned on structures that the
reported numbers never see.

The GEMM peak (one thread, as each rank runs) and the CPU other processes took during every run
are recorded; a run during which they took more than ``conditions.CONTENDED_CORES`` of a core is
marked contended (its samples/s are not publishable; its AUC is unaffected). ``--reuse`` keeps
a structure's data and every finished run found in ``--workdir`` instead of redoing them.

Prints a table (mean +- std over structures per model and task, mean gap to the oracle,
parameters, samples/s) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from benchmarks.common import contention_mark, format_table, machine_info
from benchmarks.conditions import OtherCpuMonitor, is_contended, measure_gemm_peaks, probe_idle
from dtn_torchrec.atomic_files import write_json_atomic
from dtn_torchrec.data.schema import SchemaSpec
from dtn_torchrec.distributed.library_warnings import quiet_harmless_log_lines
from dtn_torchrec.models.stats import model_stats
from dtn_torchrec.train.config import load_run_config

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIGS = [
    REPO / "configs" / f"{m}_demo.yaml" for m in ("dtn", "mmoe", "ple", "shared_bottom")
]
DEFAULT_BASELINE = REPO / "benchmarks" / "mlp_baseline.yaml"
# Structure seeds at or above this are for tuning, below it for reporting.
TUNE_SEED_MIN = 100
TEST_SPLIT = "test"


@dataclass(frozen=True)
class SynthSettings:
    """The ``dtn-synth`` flags every structure shares (the structure seed adds the rest).

    Small vocabularies (``id_scale``) and about ``rows_per_user`` rows per user: a few hundred
    thousand rows then hold enough of each planted cross cell to learn it.
    """

    train_rows: int = 200_000
    test_rows: int = 40_000
    id_scale: float = 0.002
    history_scale: float = 0.1
    rows_per_user: float = 10.0

    def flags(self) -> List[str]:
        return [
            "--train-rows",
            str(self.train_rows),
            "--test-rows",
            str(self.test_rows),
            "--id-scale",
            str(self.id_scale),
            "--history-scale",
            str(self.history_scale),
            "--rows-per-user",
            str(self.rows_per_user),
        ]


def parse_seeds(text: str) -> List[int]:
    """``"0-4"`` -> [0, 1, 2, 3, 4]; ``"0,3,7"`` -> [0, 3, 7]; ranges and lists mix."""
    seeds: List[int] = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        try:
            low, high = int(first), int(last or first)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"not a seed list like 0-4 or 0,3,7: {text!r}"
            ) from None
        if low < 0 or high < low:
            raise argparse.ArgumentTypeError(f"bad seed range {part!r} in {text!r}")
        seeds.extend(range(low, high + 1))
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"a seed appears twice in {text!r}")
    return seeds


def check_seed_purpose(seeds: Sequence[int], purpose: str) -> None:
    """Report seeds lie below ``TUNE_SEED_MIN``, tuning seeds at or above it."""
    wrong = [s for s in seeds if (s >= TUNE_SEED_MIN) != (purpose == "tune")]
    if wrong:
        side = f">= {TUNE_SEED_MIN}" if purpose == "tune" else f"< {TUNE_SEED_MIN}"
        raise SystemExit(
            f"--seeds-{purpose}: seeds must be {side} (tuning and reporting seeds "
            f"are kept apart), got {wrong}"
        )


def python_module(module: str, *args: str) -> List[str]:
    return [sys.executable, "-m", module, *args]


def run_logged(
    command: List[str], log: Path, env: Optional[Dict[str, str]] = None
) -> Dict[str, Any]:
    """Runs ``command`` with its output in ``log``; returns its wall seconds and the CPU other
    processes took meanwhile (cores). Exits naming the log when the command fails."""
    monitor = OtherCpuMonitor()  # counts the finished command's CPU as ours (children_* times)
    monitor.start()
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    seconds = time.perf_counter() - start
    other_cores = monitor.stop()
    if proc.returncode != 0:
        module = command[command.index("-m") + 1]
        raise SystemExit(f"{module} exited {proc.returncode}; see {log}")
    return {"seconds": seconds, "other_cpu_cores": other_cores}


def prepare_structure(
    seed: int, synth: SynthSettings, workdir: Path, reuse: bool
) -> Dict[str, Any]:
    """``dtn-synth`` (random structure ``seed``) then ``dtn-prepare`` (defaults) into
    ``workdir/s<seed>/{raw,data}``; returns the commands and ``truth.json``."""
    base = workdir / f"s{seed}"
    raw, data = base / "raw", base / "data"
    synth_cmd = python_module(
        "dtn_torchrec.cli.synth",
        "--output",
        str(raw),
        *synth.flags(),
        "--seed",
        str(seed),
        "--structure",
        "random",
        "--structure-seed",
        str(seed),
    )
    prepare_cmd = python_module(
        "dtn_torchrec.cli.prepare",
        "--format",
        "aliccp-raw",
        "--input",
        str(raw),
        "--output",
        str(data),
        "--quiet",
    )
    done = (raw / "truth.json").exists() and (data / "schema.json").exists()
    if not (reuse and done):
        if base.exists():
            raise SystemExit(f"{base} exists: pass --reuse to keep it, or choose a new --workdir")
        base.mkdir(parents=True)
        run_logged(synth_cmd, base / "synth.log")
        run_logged(prepare_cmd, base / "prepare.log")
    truth = json.loads((raw / "truth.json").read_text())
    return {
        "seed": seed,
        "data": str(data),
        "commands": [synth_cmd, prepare_cmd],
        "structure": truth.get("structure"),
        "oracle_test_auc": truth["oracle_auc"][TEST_SPLIT],
    }


def train_command(config: Path, data: str, run_dir: Path, args: argparse.Namespace) -> List[str]:
    """The ``torchrun ... dtn_torchrec.cli.train`` command of one config on one structure."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    return [
        torchrun,
        "--nproc_per_node",
        str(args.nproc),
        "-m",
        "dtn_torchrec.cli.train",
        "--config",
        str(config),
        f"data.path={data}",
        f"output.dir={run_dir}",
        f"train.epochs={args.epochs}",
        "output.tensorboard=false",
        *args.override,
    ]


def train_run(
    config: Path, structure: Dict[str, Any], workdir: Path, args: argparse.Namespace
) -> Dict[str, Any]:
    """Trains one config on one structure (or reads its finished run with ``--reuse``)."""
    base = workdir / f"s{structure['seed']}"
    run_dir = base / "runs" / config.stem
    summary_path = run_dir / "summary.json"
    command = train_command(config, structure["data"], run_dir, args)
    conditions: Dict[str, Any] = {"seconds": None, "other_cpu_cores": None}
    reused = args.reuse and summary_path.exists()
    if not reused:
        if run_dir.exists():
            raise SystemExit(
                f"{run_dir} exists: pass --reuse to keep it, or choose a new --workdir"
            )
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        conditions = run_logged(command, base / "runs" / f"{config.stem}.log", env)
    summary = json.loads(summary_path.read_text())
    if summary["epochs"] > args.epochs or summary["config"]["train"]["epochs"] != args.epochs:
        raise SystemExit(
            f"{summary_path}: trained for {summary['config']['train']['epochs']} "
            f"epochs, not --epochs {args.epochs}; use a new --workdir"
        )
    oracle = structure["oracle_test_auc"]
    test_auc = {t: m["auc"] for t, m in summary[TEST_SPLIT].items()}
    record = {
        "model": config.stem,
        "seed": structure["seed"],
        "command": command,
        "reused": reused,
        "test_auc": test_auc,
        "gap_to_oracle": {t: oracle[t] - v for t, v in test_auc.items()},
        "selected": {k: summary["selected"][k] for k in ("step", "epoch", "rule", "stopped_early")},
        "test_auc_history": [
            {"step": h["step"], **{t: m["auc"] for t, m in h["metrics"].items()}}
            for h in summary["history"]
            if h["split"] == TEST_SPLIT
        ],
        "steps": summary["steps"],
        "samples_per_s": summary["throughput"]["samples_per_s"],
        "world_size": summary["world_size"],
        **conditions,
        "contended": (
            conditions["other_cpu_cores"] is not None
            and is_contended([conditions["other_cpu_cores"]])
        ),
    }
    print(
        f"[quality] s{structure['seed']} {config.stem}: selected epoch "
        f"{record['selected']['epoch']}, "
        + ", ".join(f"{t} {v:.4f}" for t, v in test_auc.items())
        + f", {record['samples_per_s']:,.0f} samples/s",
        file=sys.stderr,
        flush=True,
    )
    return record


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def summarise(
    runs: List[Dict[str, Any]], structures: List[Dict[str, Any]], tasks: List[str], lead: str
) -> Dict[str, Dict[str, Any]]:
    """Per model: mean +- std over structures of the test AUC, the gap to the oracle, the paired
    difference to ``lead`` (the first config), samples/s and the selected epochs."""
    by_model: Dict[str, Dict[int, Dict[str, Any]]] = {}
    for run in runs:
        by_model.setdefault(run["model"], {})[run["seed"]] = run
    seeds = [s["seed"] for s in structures]
    summary = {}
    for model, per_seed in by_model.items():
        summary[model] = {
            "test_auc": {t: mean_std([per_seed[s]["test_auc"][t] for s in seeds]) for t in tasks},
            "gap_to_oracle": {
                t: mean_std([per_seed[s]["gap_to_oracle"][t] for s in seeds]) for t in tasks
            },
            f"{lead}_minus_this": {
                t: mean_std(
                    [by_model[lead][s]["test_auc"][t] - per_seed[s]["test_auc"][t] for s in seeds]
                )
                for t in tasks
            },
            "samples_per_s": mean_std([per_seed[s]["samples_per_s"] for s in seeds]),
            "selected_epochs": [per_seed[s]["selected"]["epoch"] for s in seeds],
        }
    return summary


def table(result: Dict[str, Any]) -> str:
    """Text table: per model, mean +- std test AUC and mean gap to the oracle per task."""
    tasks = result["tasks"]
    header = [
        "model",
        "params",
        *[c for t in tasks for c in (f"{t} AUC", "gap")],
        "samples/s",
        "selected epochs",
    ]
    rows = []
    for model, s in result["summary"].items():
        cells = [
            c
            for t in tasks
            for c in (
                f"{s['test_auc'][t]['mean']:.4f} ± {s['test_auc'][t]['std']:.4f}",
                f"{s['gap_to_oracle'][t]['mean']:.4f}",
            )
        ]
        rows.append(
            [
                model,
                f"{result['parameters'][model]['total_params']:,}",
                *cells,
                f"{s['samples_per_s']['mean']:,.0f}",
                " ".join(str(e) for e in s["selected_epochs"]),
            ]
        )
    oracle = result["oracle_test_auc"]
    rows.append(
        [
            "oracle (truth)",
            "",
            *[c for t in tasks for c in (f"{oracle[t]['mean']:.4f} ± {oracle[t]['std']:.4f}", "")],
            "",
            "",
        ]
    )
    return format_table(header, rows)


def add_run_arguments(
    p: argparse.ArgumentParser, epochs: int, configs: Sequence[Path] = tuple(DEFAULT_CONFIGS)
) -> None:
    """The ``dtn-train`` run flags every quality benchmark shares (configs, epochs, ranks...)."""
    p.add_argument(
        "--configs",
        nargs="+",
        type=Path,
        default=list(configs),
        help="the first is the model the others are compared with",
    )
    p.add_argument("--baseline", type=Path, default=DEFAULT_BASELINE)
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--nproc", type=int, default=2, help="ranks (torchrun --nproc_per_node)")
    p.add_argument(
        "--override", nargs="*", default=[], help="more dotted overrides for every dtn-train run"
    )
    p.add_argument(
        "--gemm-window-seconds", type=float, default=2.0, help="each GEMM peak window (3 per dtype)"
    )
    p.add_argument(
        "--reuse", action="store_true", help="keep the data and finished runs already in --workdir"
    )


def checked_configs(p: argparse.ArgumentParser, args: argparse.Namespace) -> List[Path]:
    """The configs to train (``--configs`` then ``--baseline``); exits on bad run flags."""
    if args.epochs < 1 or args.nproc < 1:
        p.error("--epochs and --nproc must be >= 1")
    configs = [*args.configs, args.baseline]
    names = [c.stem for c in configs]
    if len(set(names)) != len(names):
        p.error(f"config file names must differ (run directories are named by them): {names}")
    return configs


def measure_conditions(gemm_window_seconds: float) -> Tuple[float, Dict[str, Any]]:
    """Other processes' CPU before the runs and the 1-thread GEMM peaks (each rank's threads)."""
    idle_probe = probe_idle(1.0)
    torch.set_num_threads(1)  # what each rank runs with (OMP_NUM_THREADS=1)
    peaks = measure_gemm_peaks(1024, gemm_window_seconds)
    return idle_probe, {d: peak.record() for d, peak in peaks.items()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--workdir",
        required=True,
        type=Path,
        help="raw data, datasets, run directories and logs, one folder per structure",
    )
    seeds = p.add_mutually_exclusive_group(required=True)
    seeds.add_argument(
        "--seeds-report",
        type=parse_seeds,
        help=f"structure seeds to report on (< {TUNE_SEED_MIN}), e.g. 0-4",
    )
    seeds.add_argument(
        "--seeds-tune",
        type=parse_seeds,
        help=f"structure seeds to tune configs on (>= {TUNE_SEED_MIN}), e.g. 100-104",
    )
    add_run_arguments(p, epochs=3)
    p.add_argument("--train-rows", type=int, default=SynthSettings.train_rows)
    p.add_argument("--test-rows", type=int, default=SynthSettings.test_rows)
    p.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "model_quality.json"
    )
    args = p.parse_args(argv)
    quiet_harmless_log_lines()  # model_stats builds KJTs (torch.fx's deprecation line)
    purpose = "report" if args.seeds_report is not None else "tune"
    structure_seeds = args.seeds_report if purpose == "report" else args.seeds_tune
    check_seed_purpose(structure_seeds, purpose)
    configs = checked_configs(p, args)
    synth = SynthSettings(train_rows=args.train_rows, test_rows=args.test_rows)
    idle_probe, gemm = measure_conditions(args.gemm_window_seconds)

    structures, runs = [], []
    for seed in structure_seeds:
        structure = prepare_structure(seed, synth, args.workdir, args.reuse)
        structures.append(structure)
        runs.extend(train_run(c, structure, args.workdir, args) for c in configs)

    tasks = list(runs[0]["test_auc"])
    schema = SchemaSpec.load(structures[0]["data"])
    parameters = {
        c.stem: model_stats(load_run_config(str(c)).model, schema).to_dict() for c in configs
    }
    contended = any(r["contended"] for r in runs) or any(g["contended"] for g in gemm.values())
    result = {
        "benchmark": "model_quality",
        "purpose": purpose,
        "structure_seeds": structure_seeds,
        "machine": machine_info(),
        "synth": asdict(synth),
        "epochs": args.epochs,
        "nproc": args.nproc,
        "overrides": args.override,
        "configs": [str(c) for c in args.configs],
        "baseline": args.baseline.stem,
        "tasks": tasks,
        "oracle_test_auc": {
            t: mean_std([s["oracle_test_auc"][t] for s in structures]) for t in tasks
        },
        "parameters": parameters,
        "parameters_on": f"structure {structures[0]['seed']}'s schema (table sizes from its data)",
        "summary": summarise(runs, structures, tasks, args.configs[0].stem),
        "gemm_peak_one_thread": gemm,
        "idle_probe_other_cpu_cores": idle_probe,
        "contended": contended,
        "structures": structures,
        "runs": runs,
    }
    print(table(result))
    print(
        f"GEMM peak, 1 thread: fp32 {gemm['fp32']['flops'] / 1e9:,.1f}, bf16 "
        f"{gemm['bf16']['flops'] / 1e9:,.1f} GFLOP/s; conditions: {contention_mark(contended)}"
    )
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
