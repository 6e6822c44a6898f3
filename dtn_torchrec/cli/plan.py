"""``dtn-plan``: TorchRec's sharding plan for a described cluster, without the cluster.

    dtn-plan --config configs/dtn_aliccp.yaml --world-size 64 --hbm-gb 80 --table-scale 1000
    dtn-plan --config configs/dtn_aliccp.yaml --world-size 8 --hbm-gb 16 \
        --table-scale 1000  # refused

The model is built on the ``meta`` device (no table is allocated, so tables of 10^10 rows are
fine), its sparse optimiser is applied so the planner counts the optimiser state, and
``EmbeddingShardingPlanner.plan`` runs for a ``Topology`` made from the flags. Prints the
sharding of every table, the planner's memory estimate per rank (weights, optimiser state,
caches, I/O buffers) and the all-to-all traffic per batch; ``--json`` writes it all.
A cluster that cannot hold the tables is refused (exit 1) with what to add.

Without ``--schema`` the tables take the Ali-CCP reference sizes. ``--table-scale X`` multiplies
the rows of every table, MemoNet codebooks included. Trailing ``dotted.key=value`` arguments
override the config as for ``dtn-train``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from typing import Any, Dict, List, Optional, Sequence

from dtn_torchrec.atomic_files import write_json_atomic
from dtn_torchrec.data.schema import SchemaSpec
from dtn_torchrec.dataclass_config import ConfigError
from dtn_torchrec.distributed.build import build_meta_train_model
from dtn_torchrec.distributed.library_warnings import (
    quiet_harmless_log_lines,
    show_library_warnings,
)
from dtn_torchrec.distributed.plan_report import (
    PlanDoesNotFit,
    PlanReport,
    build_report,
    plan_sharding,
)
from dtn_torchrec.distributed.planning import plan_to_json
from dtn_torchrec.distributed.topology import GIB, ClusterSpec
from dtn_torchrec.models.config import ModelConfig
from dtn_torchrec.models.stats import aliccp_reference_schema, count_parameters
from dtn_torchrec.train.config import load_run_config

PROG = "dtn-plan"
DEFAULT_LOCAL_WORLD_SIZE = 8


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Run TorchRec's sharding planner for a described cluster (no GPU needed) and "
        "report the plan, per-rank memory and all-to-all traffic.",
    )
    p.add_argument(
        "--config", required=True, metavar="FILE", help="run config (model, train, sharding)"
    )
    p.add_argument("--world-size", type=int, required=True, metavar="N", help="total ranks")
    p.add_argument(
        "--local-world-size",
        type=int,
        metavar="N",
        help=f"ranks per host (default: min({DEFAULT_LOCAL_WORLD_SIZE}, world size))",
    )
    p.add_argument("--compute-device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument(
        "--hbm-gb",
        type=float,
        help="device memory per rank, GiB (default: sharding.hbm_cap_gb or 32)",
    )
    p.add_argument(
        "--ddr-gb",
        type=float,
        help="host memory per rank, GiB (default: sharding.ddr_cap_gb or 128)",
    )
    p.add_argument(
        "--intra-host-bw",
        type=float,
        metavar="GB/S",
        help="bandwidth between ranks of a host (default 600)",
    )
    p.add_argument(
        "--inter-host-bw", type=float, metavar="GB/S", help="bandwidth between hosts (default 12.5)"
    )
    p.add_argument(
        "--hbm-bw", type=float, metavar="GB/S", help="device memory bandwidth (default 897)"
    )
    p.add_argument(
        "--ddr-bw", type=float, metavar="GB/S", help="host memory bandwidth (default 51)"
    )
    p.add_argument("--batch-size", type=int, help="per-rank batch size (default: data.batch_size)")
    p.add_argument(
        "--table-scale",
        type=float,
        default=1.0,
        metavar="X",
        help="multiply every table's rows by X",
    )
    p.add_argument(
        "--schema",
        metavar="DIR",
        help="dataset with schema.json (default: Ali-CCP reference sizes)",
    )
    p.add_argument(
        "--uvm-caching",
        action="store_true",
        help="allow tables in host memory with an HBM cache (fused_uvm_caching) where the config "
        "names no kernel (same as sharding.uvm_caching=true)",
    )
    p.add_argument("--json", metavar="OUT", help="write the report as JSON")
    p.add_argument(
        "--show-ranks",
        type=int,
        default=64,
        metavar="N",
        help="print every rank up to N ranks, else the N most loaded (default 64)",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="also log the planner's own stats table and the library warnings known to be harmless",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. train.sparse_optimizer.name=adam",
    )
    return p


def scale_tables(schema: SchemaSpec, model: ModelConfig, scale: float) -> SchemaSpec:
    """Multiplies every field table's rows (and MemoNet codebook rows, in ``model``) by
    ``scale``."""
    if scale <= 0:
        raise ValueError(f"--table-scale must be positive, got {scale}")
    for expert in model.expert_configs():
        if expert.kind == "memonet":
            expert.num_buckets = max(1, round(expert.num_buckets * scale))
    fields = [
        replace(f, num_embeddings=max(1, round(f.num_embeddings * scale))) for f in schema.fields
    ]
    return replace(schema, fields=fields)


def _gib(value: float) -> str:
    return f"{value / GIB:,.2f}"


def _table(header: Sequence[str], rows: List[Sequence[str]], left: int = 1) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            str(c).ljust(w) if i < left else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(r, widths))
        )
        for r in [header, *rows]
    )


def _layout(shards: List[Dict[str, Any]], sharding_type: str) -> str:
    if sharding_type == "data_parallel":
        return "replicated on every rank"
    if len(shards) == 1:
        s = shards[0]
        return f"rank {s['rank']}"
    sizes = sorted({(s["sizes"][0], s["sizes"][1]) for s in shards})
    ranks = sorted(s["rank"] for s in shards)
    span = (
        f"ranks {ranks[0]}-{ranks[-1]}"
        if ranks == list(range(ranks[0], ranks[-1] + 1))
        else f"{len(ranks)} ranks"
    )
    pieces = ", ".join(f"{r:,}x{c}" for r, c in sizes[:2]) + (" ..." if len(sizes) > 2 else "")
    return f"{len(shards)} shards of {pieces} on {span}"


def format_report(report: PlanReport, show_ranks: int) -> str:
    """The plan, per-rank memory and traffic as text tables."""
    c = report.cluster
    lines = [
        f"cluster: {c['world_size']} ranks ({c['local_world_size']} per host), "
        f"{c['compute_device']}; "
        f"per-rank batch {report.batch_size}; sparse optimizer {report.optimizer}; "
        f"storage reservation {report.storage_reservation:.0%}",
        f"tables: {len(report.tables)}, {sum(t.rows for t in report.tables):,} rows, "
        f"{_gib(report.table_bytes)} GiB of weights; dense parameters {report.dense_params:,}",
        "",
        "sharding plan",
        _table(
            ("table", "rows", "dim", "ids/row", "sharding", "kernel", "placement"),
            [
                (
                    t.name,
                    f"{t.rows:,}",
                    t.dim,
                    f"{t.ids_per_row:g}",
                    t.sharding_type,
                    t.compute_kernel,
                    _layout(t.shards, t.sharding_type),
                )
                for t in report.tables
            ],
            left=1,
        ),
        "",
    ]
    ranks = report.ranks
    on_gpu = c["compute_device"] == "cuda"
    used = [(r.hbm if on_gpu else r.ddr) for r in ranks]
    capacity = (ranks[0].hbm_capacity if on_gpu else ranks[0].ddr_capacity) if ranks else 0
    shown = ranks
    if len(ranks) > show_ranks:
        shown = sorted(ranks, key=lambda r: -(r.hbm if on_gpu else r.ddr))[:show_ranks]
    title = "per-rank memory, GiB (planner estimates)"
    if len(shown) < len(ranks):
        title += f": the {len(shown)} most loaded of {len(ranks)} ranks"
    lines += [
        title,
        _table(
            ("rank", "HBM", "DDR", "weights", "optimizer", "cache", "io", "tables"),
            [
                (
                    r.rank,
                    _gib(r.hbm),
                    _gib(r.ddr),
                    _gib(r.weights),
                    _gib(r.optimizer),
                    _gib(r.cache),
                    _gib(r.io),
                    len(r.tables),
                )
                for r in sorted(shown, key=lambda r: r.rank)
            ],
        ),
        f"{'HBM' if on_gpu else 'DDR'} used per rank: min {_gib(min(used))}, "
        f"mean {_gib(sum(used) / len(used))}, "
        f"max {_gib(max(used))} of {_gib(capacity)} GiB "
        f"({_gib(report.usable_bytes)} usable for tables"
        f"{' after the dense model, batches and the reserve' if on_gpu else ''})",
        "",
    ]
    cm = report.comms
    mb = 1e6
    lines += [
        "traffic per rank and batch (estimate, averaged over ranks)",
        f"  input ids all-to-all   {cm.input_ids / mb:12,.2f} MB",
        f"  embeddings forward     {cm.embeddings_fwd / mb:12,.2f} MB",
        f"  gradients backward     {cm.gradients_bwd / mb:12,.2f} MB",
        f"  dense all-reduce       {cm.dense_allreduce / mb:12,.2f} MB",
        f"  total {cm.total / mb:,.2f} MB (intra-host {cm.intra_host / mb:,.2f}, "
        f"inter-host {cm.inter_host / mb:,.2f}): "
        f"~{cm.seconds * 1e3:,.2f} ms at the given bandwidths; "
        "planner's comms estimate, busiest rank: "
        f"{cm.planner_comms_ms_max:,.3f} ms",
    ]
    return "\n".join(lines)


def _fail(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s")
    if args.verbose:
        show_library_warnings()
    quiet_harmless_log_lines()
    try:
        cfg = load_run_config(args.config, args.overrides)
        batch_size = args.batch_size if args.batch_size is not None else cfg.data.batch_size
        if batch_size <= 0:
            raise ValueError(f"--batch-size must be positive, got {batch_size}")
        if args.uvm_caching and args.compute_device != "cuda":
            raise ValueError("--uvm-caching needs --compute-device cuda (UVM is a CUDA feature)")
        if args.uvm_caching:
            cfg.sharding.uvm_caching = True
        schema = SchemaSpec.load(args.schema) if args.schema else aliccp_reference_schema()
        schema = scale_tables(schema, cfg.model, args.table_scale)
        sharding = cfg.sharding
        cluster = ClusterSpec(
            world_size=args.world_size,
            local_world_size=args.local_world_size
            or min(DEFAULT_LOCAL_WORLD_SIZE, args.world_size),
            compute_device=args.compute_device,
            hbm_gb=args.hbm_gb if args.hbm_gb is not None else sharding.hbm_cap_gb,
            ddr_gb=args.ddr_gb if args.ddr_gb is not None else sharding.ddr_cap_gb,
            intra_host_bw_gbps=args.intra_host_bw
            if args.intra_host_bw is not None
            else sharding.intra_host_bw_gbps,
            inter_host_bw_gbps=args.inter_host_bw
            if args.inter_host_bw is not None
            else sharding.inter_host_bw_gbps,
            hbm_bw_gbps=args.hbm_bw,
            ddr_bw_gbps=args.ddr_bw,
        )
        topology = cluster.topology()
        model = build_meta_train_model(cfg.model, schema, cfg.train.sparse_optimizer)
        optimizer = cfg.train.sparse_optimizer.name
        planned = plan_sharding(
            model,
            sharding,
            schema,
            topology=topology,
            batch_size=batch_size,
            optimizer=optimizer,
        )
        _, dense_params = count_parameters(model)
        report = build_report(
            planned.options,
            cluster=cluster,
            topology=topology,
            batch_size=batch_size,
            optimizer=optimizer,
            storage_reservation=sharding.storage_reservation,
            usable_bytes=planned.usable_bytes,
            dense_params=dense_params,
        )
    except PlanDoesNotFit as e:
        if args.json:
            write_json_atomic(args.json, {"fits": False, "reason": str(e)})
        return _fail(str(e))
    except (ConfigError, OSError, ValueError) as e:
        return _fail(str(e))
    scale = f", tables x{args.table_scale:g}" if args.table_scale != 1 else ""
    source = f"schema {args.schema}" if args.schema else "Ali-CCP reference sizes"
    print(f"{PROG}: {args.config} (model {cfg.model.name}; {source}{scale})")
    print(format_report(report, args.show_ranks))
    if args.json:
        write_json_atomic(
            args.json,
            {
                "config": args.config,
                "table_scale": args.table_scale,
                **report.to_json(),
                # The same layout as dtn-train's <output.dir>/plan.json.
                "plan": plan_to_json(planned.plan),
            },
        )
    memory = "HBM" if args.compute_device == "cuda" else "host memory"
    print(f"fits: yes, every rank within its {memory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
