"""Same-process A/B of our training path under config variants, timed in interleaved windows.

    .venv/bin/python -m benchmarks.ab_step --model dtn --size reference \
        --variant off: --variant compiled:train.compile=true

Every variant is ``benchmarks.ours.ours_step`` (reader -> ``TrainPipelineSparseDist`` -> DMP, as
``dtn-train`` runs it) built in ONE rank process with its own ``dotted.key=value`` overrides.
After the warm-up the variants take turns, one window of ``--window-seconds`` each, round after
round, so outside load hits all of them alike: the per-round ratios to the first variant are
meaningful on a busy machine, where absolute samples/s are not. Use it for A/B decisions; the
published figures come from the idle-machine benchmarks.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from benchmarks.common import TrainRun, WindowSpec, format_table, run_ranks
from benchmarks.ours import ours_step
from benchmarks.profile_step import CONFIG_SUFFIX, step_inputs
from dtn_torchrec.atomic_files import write_json_atomic


def parse_variant(text: str) -> Tuple[str, Tuple[str, ...]]:
    """``name:key=value,key=value`` -> ``(name, overrides)``; ``name:`` has none."""
    name, sep, rest = text.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"variant {text!r}: expected NAME:[key=value,...]")
    return name, tuple(o for o in rest.split(",") if o)


def ab_rank(
    runs: Dict[str, TrainRun], window_seconds: float, rounds: int
) -> Dict[str, List[float]]:
    """Builds every variant's step, warms each up, then ``rounds`` rounds of one window per
    variant. Returns samples/s per window, by variant."""
    steps = {name: ours_step(run).step for name, run in runs.items()}
    for name, step in steps.items():
        for _ in range(runs[name].timing.warmup_steps):
            step()
    rates: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            samples, start = 0, time.perf_counter()
            while time.perf_counter() - start < window_seconds:
                samples += step()
            rates[name].append(samples / (time.perf_counter() - start))
    return rates


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="dtn", choices=("shared_bottom", "mmoe", "ple", "dtn"))
    p.add_argument("--size", choices=sorted(CONFIG_SUFFIX), default="reference")
    p.add_argument(
        "--variant",
        action="append",
        type=parse_variant,
        required=True,
        help="NAME:[key=value,...] (repeat; the first is the baseline of the ratios)",
    )
    p.add_argument("--id-scale", type=float, default=0.01)
    p.add_argument("--history-scale", type=float, default=0.1)
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--batch-size", type=int, help="default: the config's data.batch_size")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--window-seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--data", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "dtn-bench-data")
    )
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--out", help="write the windows and ratios as JSON here")
    args = p.parse_args(argv)

    config, batch, data = step_inputs(args, [])
    timing = WindowSpec(args.warmup, args.window_seconds, args.rounds)
    runs = {
        name: TrainRun(
            config=config, overrides=overrides, data=str(data), batch_size=batch, timing=timing
        )
        for name, overrides in args.variant
    }
    (rates,) = run_ranks(
        ab_rank,
        1,
        args.threads,
        args.timeout,
        runs=runs,
        window_seconds=args.window_seconds,
        rounds=args.rounds,
    )
    baseline = rates[args.variant[0][0]]
    ratios = {name: [r / b for r, b in zip(windows, baseline)] for name, windows in rates.items()}
    print(
        format_table(
            ("variant", "overrides", "samples/s per round", "ratio per round", "median ratio"),
            [
                (
                    name,
                    " ".join(overrides) or "-",
                    " ".join(f"{r:,.0f}" for r in rates[name]),
                    " ".join(f"{x:.2f}" for x in ratios[name]),
                    f"{statistics.median(ratios[name]):.2f}",
                )
                for name, overrides in args.variant
            ],
        )
    )
    if args.out:
        write_json_atomic(
            args.out,
            {
                "benchmark": "ab_step",
                "args": {**vars(args), "variant": [list(v) for v in args.variant]},
                "samples_per_s": rates,
                "ratios": ratios,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
