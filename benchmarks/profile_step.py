"""Where a training step's time goes: ``torch.profiler`` over ours and the plain reference.

    .venv/bin/python -m benchmarks.profile_step --model dtn --size reference --threads 2

Both sides train the same model on the same synthetic Ali-CCP-like data as
``benchmarks.throughput`` (one rank each, a fresh process each): ours is the product path
(reader -> ``TrainPipelineSparseDist`` -> DMP, fused sparse optimiser, dense precision from the
config), the reference plain PyTorch (``nn.EmbeddingBag``, dense Adam over everything, the
dense part module by module in fp32). After the warm-up, ``--steps`` steps are profiled; the
table lists each side's operators by self CPU time per step, grouped into GEMMs, embedding
lookup + update, optimiser, and the rest.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from benchmarks.common import TrainRun, WindowSpec, format_table, run_ranks
from benchmarks.ours import ours_step
from benchmarks.reference import reference_step
from benchmarks.synthetic import aliccp_like_fields, cached_dataset
from dtn_torchrec.atomic_files import write_json_atomic
from dtn_torchrec.train.config import load_run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_SUFFIX = {"demo": "demo", "reference": "aliccp"}
# Operator name -> group, first match wins.
GROUPS = (
    (
        "gemm",
        ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "mkldnn", "aten::_weight_int8"),
    ),
    ("embedding", ("fbgemm", "aten::embedding", "aten::_embedding_bag")),
    (
        "optimizer",
        ("aten::_foreach", "Optimizer", "aten::_fused_adam", "aten::addcdiv", "aten::lerp"),
    ),
)


def step_inputs(args: argparse.Namespace, overrides: Sequence[str]) -> Tuple[str, int, Path]:
    """The shipped config of ``args.model`` at ``args.size``, its batch size (or
    ``--batch-size``) and the cached Ali-CCP-like dataset: ``(config, batch, data dir)``."""
    config = os.path.join(REPO, "configs", f"{args.model}_{CONFIG_SUFFIX[args.size]}.yaml")
    batch = args.batch_size or load_run_config(config, overrides).data.batch_size
    data = cached_dataset(
        args.data,
        f"aliccp-like-{args.size}",
        aliccp_like_fields(args.id_scale, args.history_scale),
        args.rows,
        seed=0,
        ids="zipf",
    )
    return config, batch, data


def operator_group(name: str) -> str:
    """``gemm``, ``embedding``, ``optimizer`` or ``other`` for a profiler operator name."""
    for group, prefixes in GROUPS:
        if any(name.startswith(p) for p in prefixes):
            return group
    return "other"


def profile_rank(run: TrainRun, side: str, steps: int, top: int) -> Dict[str, Any]:
    """Builds ``side`` (``ours`` / ``reference``), warms up, profiles ``steps`` steps."""
    step = ours_step(run).step if side == "ours" else reference_step(run)
    for _ in range(run.timing.warmup_steps):
        step()
    samples = 0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            samples += step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total_us = sum(e.self_cpu_time_total for e in events)
    groups: Dict[str, float] = {}
    for e in events:
        groups[operator_group(e.key)] = (
            groups.get(operator_group(e.key), 0.0) + e.self_cpu_time_total
        )
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return {
        "side": side,
        "steps": steps,
        "samples": samples,
        "self_cpu_ms_per_step": total_us / steps / 1e3,
        "groups_ms_per_step": {g: us / steps / 1e3 for g, us in sorted(groups.items())},
        "top": [
            {
                "op": e.key,
                "ms_per_step": e.self_cpu_time_total / steps / 1e3,
                "calls_per_step": e.count / steps,
                "share": e.self_cpu_time_total / total_us,
            }
            for e in events[:top]
        ],
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="dtn", choices=("shared_bottom", "mmoe", "ple", "dtn"))
    p.add_argument("--size", choices=sorted(CONFIG_SUFFIX), default="reference")
    p.add_argument("--id-scale", type=float, default=0.01)
    p.add_argument("--history-scale", type=float, default=0.1)
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--batch-size", type=int, help="default: the config's data.batch_size")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="profiled steps")
    p.add_argument("--top", type=int, default=15, help="operators listed per side")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--data", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "dtn-bench-data")
    )
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", help="write the profiles as JSON here")
    p.add_argument(
        "overrides", nargs="*", help="dotted.key=value config overrides (e.g. train.precision=fp32)"
    )
    args = p.parse_args(argv)

    config, batch, data = step_inputs(args, args.overrides)
    run = TrainRun(
        config=config,
        overrides=tuple(args.overrides),
        data=str(data),
        batch_size=batch,
        timing=WindowSpec(args.warmup, 1.0, 1),
    )
    profiles: List[Dict[str, Any]] = []
    for side in ("ours", "reference"):
        (profile,) = run_ranks(
            profile_rank,
            1,
            args.threads,
            args.timeout,
            run=run,
            side=side,
            steps=args.steps,
            top=args.top,
        )
        profiles.append(profile)
    groups = sorted({g for prof in profiles for g in prof["groups_ms_per_step"]})
    print(
        format_table(
            ("group (ms / step)", *[prof["side"] for prof in profiles]),
            [
                (g, *[f"{prof['groups_ms_per_step'].get(g, 0.0):,.1f}" for prof in profiles])
                for g in groups
            ]
            + [("total self CPU", *[f"{prof['self_cpu_ms_per_step']:,.1f}" for prof in profiles])],
        )
    )
    for prof in profiles:
        print(f"\n{prof['side']}: top operators by self CPU time")
        print(
            format_table(
                ("operator", "ms / step", "calls / step", "share"),
                [
                    (
                        t["op"],
                        f"{t['ms_per_step']:,.2f}",
                        f"{t['calls_per_step']:,.0f}",
                        f"{100 * t['share']:.1f}%",
                    )
                    for t in prof["top"]
                ],
            )
        )
    if args.out:
        write_json_atomic(
            args.out, {"benchmark": "profile_step", "args": vars(args), "profiles": profiles}
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
