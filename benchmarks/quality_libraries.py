"""Model quality on the public libraries' kind of data: each shipped demo config, 1 epoch.

    python -m benchmarks.quality_libraries --workdir /tmp/quality-libraries --seeds 0 \
        --out benchmarks/results/quality_libraries.json

The data (issue 15): 20 single-valued fields with vocabularies log-spaced 10..100 (``--largest-vocab``)
and Zipf ids, labels from a planted model (``synthetic.PlantedLabels``)
with 8 rank-4 pairwise crosses per task, the pairs drawn by the seed independently per task (so
the tasks mostly cross different pairs); a cross factor std of 0.6 puts the oracle near the
0.90 / 0.93 the issue reports for this setting. 200k train rows, of which 10% move to a valid
split by ``dtn-prepare``'s seeded hash of the sample id (its default), and 50k test rows,
written straight into the Parquet layout ``dtn-train`` reads (``synthetic.write_planted_dataset``,
``truth.json`` beside it holds the oracle AUC and the crossed fields).

Each config (default ``configs/{dtn,mmoe,ple}_demo.yaml``) and the plain multi-task MLP baseline
(``benchmarks/mlp_baseline.yaml``) is trained by the product exactly as
``benchmarks.model_quality`` does (its ``train_run``: ``torchrun`` on ``--nproc`` ranks, one
thread each, sharded tables, fused sparse optimisers), for ``--epochs`` (1); the reported test
AUC is that of the checkpoint ``dtn-train`` selected on the valid split.

MemoNet's fields: ``dtn_demo.yaml`` pins the fields MemoNet crosses by their Ali-CCP names, which
this data does not have. A DTN config's run therefore gets one more override,
``model.dtn.methods.<i>.fields=["f00", ..., "f19"]`` with ``<i>`` the index of its ``memonet``
method read from the file: all 20 fields, as the reference crosses every single-valued field.
The config files are not changed.

Prints a table (per model: mean +- std over seeds of the test AUC per task, mean gap to the
oracle, parameters, samples/s) and the ordering checks (DTN >= MMoE and PLE + 0.005 on both
tasks; every config above the MLP baseline); writes JSON with the CPU other processes took during
every run (a contended run's samples/s are not publishable; its AUC is unaffected).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from benchmarks.common import contention_mark, machine_info, memonet_overrides
from benchmarks.model_quality import (
    REPO,
    TEST_SPLIT,
    add_run_arguments,
    checked_configs,
    mean_std,
    measure_conditions,
    parse_seeds,
    summarise,
    table,
    train_run,
)
from benchmarks.synthetic import (
    PlantedLabels,
    SyntheticField,
    log_spaced_fields,
    write_planted_dataset,
)
from dtn_torchrec.atomic_files import write_json_atomic
from dtn_torchrec.data.prepare import DEFAULT_VALID_FRACTION
from dtn_torchrec.data.schema import SchemaSpec
from dtn_torchrec.distributed.library_warnings import quiet_harmless_log_lines
from dtn_torchrec.models.stats import model_stats
from dtn_torchrec.train.config import load_run_config

DEFAULT_CONFIGS = [REPO / "configs" / f"{m}_demo.yaml" for m in ("dtn", "mmoe", "ple")]
LABELS = PlantedLabels(cross_std=0.6, rank=4, crosses_per_task=8)
# Vocabularies up to 100, not the 100k of ``benchmarks.mmoe_libraries`` (a speed setting): in the
# libraries' set the issue measured, their MMoE reached 0.818 / 0.843 against an oracle of
# 0.90 / 0.93 in one epoch, so its crosses were learnable. With vocabularies up to 100k and Zipf
# ids most crossed ids are rare: every model lands ~0.2 below the oracle and the MLP-expert models
# (MMoE, PLE, the MLP baseline) tie. Up to 100 is the closest of 100 / 300 / 1k / 10k / 100k to the
# issue's levels (README, model quality on the libraries' kind of data, has the sweep).
NUM_FIELDS, SMALLEST_VOCAB, LARGEST_VOCAB = 20, 10, 100
# The lead must beat every other config by this much test AUC on every task.
LEAD_MARGIN = 0.005


def prepare_data(
    seed: int, fields: Sequence[SyntheticField], rows: Dict[str, int], workdir: Path, reuse: bool
) -> Dict[str, Any]:
    """Writes the planted dataset of ``seed`` into ``workdir/s<seed>/data`` (or keeps it with
    ``reuse``); returns it as a ``model_quality`` structure record."""
    base = workdir / f"s{seed}"
    data = base / "data"
    if not (reuse and (data / "truth.json").is_file()):
        if base.exists():
            raise SystemExit(f"{base} exists: pass --reuse to keep it, or choose a new --workdir")
        write_planted_dataset(
            data,
            fields,
            {"train": rows["train"], TEST_SPLIT: rows[TEST_SPLIT]},
            seed=seed,
            labels=LABELS,
            valid_fraction=DEFAULT_VALID_FRACTION,
        )
    truth = json.loads((data / "truth.json").read_text())
    return {
        "seed": seed,
        "data": str(data),
        "splits": {s: v.rows for s, v in SchemaSpec.load(data).splits.items()},
        "structure": {"labels": truth["labels"], "crossed_fields": truth["crossed_fields"]},
        "oracle_test_auc": truth["oracle_auc"][TEST_SPLIT],
    }


def ordering_checks(
    summary: Dict[str, Dict[str, Any]], lead: str, others: Sequence[str], baseline: str
) -> List[Dict[str, Any]]:
    """The lead's mean test AUC >= each other config's + ``LEAD_MARGIN``, and every config's
    mean above the baseline's, per task."""
    checks = []
    for model in others:
        for task, diff in summary[model][f"{lead}_minus_this"].items():
            checks.append(
                {
                    "check": f"{lead} >= {model} + {LEAD_MARGIN} ({task})",
                    "value": diff["mean"],
                    "met": diff["mean"] >= LEAD_MARGIN,
                }
            )
    for model in [lead, *others]:
        for task, auc in summary[model]["test_auc"].items():
            margin = auc["mean"] - summary[baseline]["test_auc"][task]["mean"]
            checks.append(
                {"check": f"{model} > {baseline} ({task})", "value": margin, "met": margin > 0}
            )
    return checks


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path("/tmp/quality-libraries"),
        help="datasets, run directories and logs, one folder per seed",
    )
    p.add_argument("--seeds", type=parse_seeds, default=[0], help="data seeds, e.g. 0-2")
    add_run_arguments(p, epochs=1, configs=DEFAULT_CONFIGS)
    p.add_argument("--train-rows", type=int, default=200_000, help="before the valid carve")
    p.add_argument("--test-rows", type=int, default=50_000)
    p.add_argument("--largest-vocab", type=int, default=LARGEST_VOCAB)
    p.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "quality_libraries.json"
    )
    args = p.parse_args(argv)
    quiet_harmless_log_lines()  # model_stats builds KJTs (torch.fx's deprecation line)
    configs = checked_configs(p, args)
    fields = log_spaced_fields(NUM_FIELDS, SMALLEST_VOCAB, args.largest_vocab, 1)
    field_names = [f.name for f in fields]
    overrides = {c.stem: [*args.override, *memonet_overrides(c, field_names)] for c in configs}

    idle_probe, gemm = measure_conditions(args.gemm_window_seconds)

    rows = {"train": args.train_rows, TEST_SPLIT: args.test_rows}
    structures, runs = [], []
    for seed in args.seeds:
        structure = prepare_data(seed, fields, rows, args.workdir, args.reuse)
        structures.append(structure)
        for c in configs:
            run_args = argparse.Namespace(**{**vars(args), "override": overrides[c.stem]})
            runs.append(train_run(c, structure, args.workdir, run_args))

    tasks = list(runs[0]["test_auc"])
    schema = SchemaSpec.load(structures[0]["data"])
    parameters = {
        c.stem: model_stats(load_run_config(str(c), overrides[c.stem]).model, schema).to_dict()
        for c in configs
    }
    lead = args.configs[0].stem
    summary = summarise(runs, structures, tasks, lead)
    checks = ordering_checks(summary, lead, [c.stem for c in args.configs[1:]], args.baseline.stem)
    contended = any(r["contended"] for r in runs) or any(g["contended"] for g in gemm.values())
    result = {
        "benchmark": "quality_libraries",
        "seeds": args.seeds,
        "machine": machine_info(),
        "data": {
            "fields": NUM_FIELDS,
            "vocabularies": f"log-spaced {SMALLEST_VOCAB}..{args.largest_vocab}, Zipf ids",
            "train_rows_before_valid": args.train_rows,
            "test_rows": args.test_rows,
            "valid_fraction": DEFAULT_VALID_FRACTION,
            "labels": asdict(LABELS),
        },
        "epochs": args.epochs,
        "nproc": args.nproc,
        "overrides": overrides,
        "configs": [str(c) for c in args.configs],
        "baseline": args.baseline.stem,
        "tasks": tasks,
        "oracle_test_auc": {
            t: mean_std([s["oracle_test_auc"][t] for s in structures]) for t in tasks
        },
        "parameters": parameters,
        "summary": summary,
        "ordering": checks,
        "ordering_holds": all(c["met"] for c in checks),
        "gemm_peak_one_thread": gemm,
        "idle_probe_other_cpu_cores": idle_probe,
        "contended": contended,
        "structures": structures,
        "runs": runs,
    }
    print(table(result))
    for c in checks:
        print(f"{'met ' if c['met'] else 'MISS'} {c['check']}: {c['value']:+.4f}")
    print(
        f"GEMM peak, 1 thread: fp32 {gemm['fp32']['flops'] / 1e9:,.1f}, bf16 "
        f"{gemm['bf16']['flops'] / 1e9:,.1f} GFLOP/s; conditions: {contention_mark(contended)}"
    )
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
