"""The product end to end against the oracle: each config trained by ``dtn-train`` on 2 ranks
(``torchrun``, gloo on CPU, sharded tables, ``TrainPipelineSparseDist``) on raw dtn-synth data,
its final test AUC per task next to the oracle AUC of the same rows.

    dtn-synth --output SYN --train-rows 1200000 --test-rows 50000 --seed 29 \
        --id-scale 0.002 --history-scale 0.1 --rows-per-user 10
    dtn-prepare --format aliccp-raw --input SYN --output DATA --valid-fraction 0.04 --quiet
    python -m benchmarks.cli_quality --data DATA --truth SYN --runs RUNS --epochs 2 \
        --configs configs/dtn_demo.yaml configs/mmoe_demo.yaml configs/ple_demo.yaml \
        --out benchmarks/results/cli_quality.json

Every config gets the same overrides: ``--epochs``, evaluation every ``--eval-every`` steps and
the ESMM relation (pCTCVR = pCTR x pCVR, the way Ali-CCP's conversions are generated: only after a
click) unless ``--no-esmm``. The reported AUC is the run's last evaluation (``summary.json``
``test``), no selection on the test split. With ``--reuse``, a config whose run directory already
holds a finished ``summary.json`` with the same epochs is read instead of trained again.

Prints a table (AUC, gap to the oracle, within ``--max-gap`` or not) and writes JSON.
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
from typing import Any, Dict, List, Sequence

from benchmarks.common import format_table, machine_info

from dtn_torchrec.atomic_files import write_json_atomic

ESMM_OVERRIDES = ["model.loss.relation=esmm", "model.loss.product_of={conversion: [click]}"]
TEST_SPLIT = "test"


def train_command(config: Path, data: Path, run_dir: Path, args: argparse.Namespace) -> List[str]:
    """The ``torchrun ... dtn_torchrec.cli.train`` command line of one config."""
    overrides = [
        f"data.path={data}",
        f"output.dir={run_dir}",
        f"train.epochs={args.epochs}",
        f"train.eval_every_steps={args.eval_every}",
        "train.log_every_steps=100",
        "output.tensorboard=false",
        *([] if args.no_esmm else ESMM_OVERRIDES),
        *args.override,
    ]
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    return [torchrun, "--nproc_per_node", str(args.nproc), "-m", "dtn_torchrec.cli.train",
            "--config", str(config), *overrides]


def run_config(config: Path, data: Path, runs: Path, args: argparse.Namespace) -> Dict[str, Any]:
    """Trains one config (or reads its finished run with ``--reuse``); returns its record."""
    run_dir = runs / config.stem
    summary_path = run_dir / "summary.json"
    command = train_command(config, data, run_dir, args)
    reused = False
    if args.reuse and summary_path.exists():
        summary = json.loads(summary_path.read_text())
        reused = summary.get("epochs") == args.epochs
    if not reused:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        start = time.perf_counter()
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        log = run_dir.parent / f"{config.stem}.log"
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as out:
            proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"{config}: dtn-train exited {proc.returncode}; see {log}")
        print(f"{config.stem}: trained in {time.perf_counter() - start:.0f} s", flush=True)
        summary = json.loads(summary_path.read_text())
    history = [
        {"step": h["step"], **{t: m["auc"] for t, m in h["metrics"].items()}}
        for h in summary["history"] if h["split"] == TEST_SPLIT
    ]
    return {
        "config": str(config),
        "command": command,
        "reused": reused,
        "test_auc": {t: m["auc"] for t, m in summary[TEST_SPLIT].items()},
        "test_calibration": {t: m["calibration"] for t, m in summary[TEST_SPLIT].items()},
        "test_auc_history": history,
        "steps": summary["steps"],
        "samples_per_s": summary["throughput"]["samples_per_s"],
        "world_size": summary["world_size"],
    }


def table(result: Dict[str, Any]) -> str:
    """Markdown table: test AUC per task, gap to the oracle, within the allowed gap."""
    tasks, oracle, max_gap = result["tasks"], result["oracle_test_auc"], result["max_gap"]
    header = ["model", *[f"{t} AUC (gap)" for t in tasks], f"all within {max_gap}", "samples/s"]
    rows = []
    for run in result["runs"]:
        cells = [f"{run['test_auc'][t]:.4f} ({oracle[t] - run['test_auc'][t]:+.4f})" for t in tasks]
        rows.append([Path(run["config"]).stem, *cells, "yes" if run["within_max_gap"] else "NO",
                     f"{run['samples_per_s']:,.0f}"])
    rows.append(["oracle (truth)", *[f"{oracle[t]:.4f}" for t in tasks], "", ""])
    return format_table(header, rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="dataset written by dtn-prepare")
    p.add_argument("--truth", required=True, type=Path, help="dtn-synth output dir (truth.json)")
    p.add_argument("--runs", required=True, type=Path, help="directory for the run directories and logs")
    p.add_argument("--configs", nargs="+", type=Path,
                   default=[Path("configs/dtn_demo.yaml"), Path("configs/mmoe_demo.yaml"), Path("configs/ple_demo.yaml")])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (0 = epoch ends)")
    p.add_argument("--nproc", type=int, default=2, help="ranks (torchrun --nproc_per_node)")
    p.add_argument("--no-esmm", action="store_true", help="train conversion directly, without pCTR x pCVR")
    p.add_argument("--override", nargs="*", default=[], help="more dotted overrides for every config")
    p.add_argument("--max-gap", type=float, default=0.03)
    p.add_argument("--reuse", action="store_true", help="read finished runs instead of training again")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/cli_quality.json"))
    args = p.parse_args(argv)

    truth = json.loads((args.truth / "truth.json").read_text())
    oracle = truth["oracle_auc"][TEST_SPLIT]
    runs = [run_config(c, args.data, args.runs, args) for c in args.configs]
    tasks = list(runs[0]["test_auc"])
    for run in runs:
        run["gap_to_oracle"] = {t: oracle[t] - run["test_auc"][t] for t in tasks}
        run["within_max_gap"] = all(g <= args.max_gap for g in run["gap_to_oracle"].values())
    result = {
        "benchmark": "cli_quality",
        "machine": machine_info(),
        "data": str(args.data),
        "synth_config": truth.get("config"),
        "tasks": tasks,
        "oracle_test_auc": oracle,
        "max_gap": args.max_gap,
        "epochs": args.epochs,
        "esmm": not args.no_esmm,
        "runs": runs,
    }
    print(table(result))
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
