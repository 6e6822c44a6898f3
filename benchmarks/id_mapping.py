"""Id mapping for an open id space: ``vocab`` vs ``hash`` vs ``mch`` on a stream of days.

    .venv/bin/python -m benchmarks.id_mapping --out runs/bench/id_mapping.json

The stream (per field, ``--fields`` single-valued fields): a popular head of ``rows / 2`` ids
(Zipf) seen every day, and every day a fresh long tail of new ids, each seen on its day and,
less often, the next; ``--days`` training days, then one test day (head + the last days'
tail). Distinct ids per field are ``--id-ratio`` (10) times the table rows of ``hash`` / ``mch``.
Each id has a latent click and conversion effect; a row's labels are drawn from the summed
effects of its ids (conversion only after a click), so a model scores well only by giving each
id its own row.

Mappings, each trained one pass in stream order in a fresh process (MMoE, DMP on one rank,
fused row-wise Adagrad):

* ``vocab``: a full pass over the training stream gives every id its own row (the upper bound;
  10x the table memory), unseen test ids row 0;
* ``hash``: ``1 + id mod (rows - 1)`` (``dtn-prepare --id-mapping hash``), ``rows`` rows;
* ``mch``: raw ids, a managed-collision table of ``rows`` rows (``--eviction`` LFU, every
  ``--eviction-interval`` steps).

Reported per mapping: test AUC per task, the share of test lookups that hit a row owned by
another id (hash: a row some other training id also maps to; mch: the shared row of ids
without a row of their own; vocab: 0), training samples/s (whole pass) and the process's peak
memory. Targets (reported, not asserted): mch AUC >= hash + 0.005 on both tasks and within 0.01
of vocab, mch samples/s >= 70% of hash's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Tuple

import torch

from benchmarks.common import (
    contention_mark,
    format_table,
    machine_info,
    peak_rss_bytes,
    run_ranks,
)
from benchmarks.conditions import OtherCpuMonitor, is_contended, measure_gemm_peaks
from dtn_torchrec.atomic_files import write_json_atomic

MAPPINGS = ("vocab", "hash", "mch")
TASKS = ("click", "conversion")


@dataclass(frozen=True)
class StreamSpec:
    """The synthetic stream (see the module docstring)."""

    fields: int = 4
    rows: int = 2000
    id_ratio: int = 10
    days: int = 5
    rows_per_day: int = 40_000
    head_share: float = 0.6
    seed: int = 0


@dataclass(frozen=True)
class TrainSpec:
    """Model and training of every mapping."""

    batch_size: int = 256
    embedding_dim: int = 8
    eviction: str = "lfu"
    eviction_interval: int = 5
    sparse_lr: float = 0.05
    dense_lr: float = 0.003


def _field_stream(spec: StreamSpec, g: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Raw ids ``[days + 1, rows_per_day]`` of one field (last day = test) and its distinct ids.

    Ids are random 63-bit values (unordered, as raw production ids are)."""
    head = spec.rows // 2
    distinct = spec.rows * spec.id_ratio
    tail_per_day = (distinct - head) // spec.days
    ids = torch.randint(1, 2**62, (distinct,), generator=g)
    head_ids, tail_ids = ids[:head], ids[head:]
    zipf = 1.0 / torch.arange(1, head + 1, dtype=torch.float64) ** 1.05
    days: List[torch.Tensor] = []
    for day in range(spec.days + 1):
        n = spec.rows_per_day
        n_head = int(n * spec.head_share)
        from_head = head_ids[torch.multinomial(zipf, n_head, replacement=True, generator=g)]
        # The tail: today's new ids (3/4) and yesterday's (1/4); the test day has no new ids.
        source_day = min(day, spec.days - 1)
        today = tail_ids[source_day * tail_per_day : (source_day + 1) * tail_per_day]
        yesterday = tail_ids[max(source_day - 1, 0) * tail_per_day : source_day * tail_per_day]
        pool = torch.cat([today, today, today, yesterday]) if yesterday.numel() else today
        from_tail = pool[torch.randint(0, pool.numel(), (n - n_head,), generator=g)]
        mixed = torch.cat([from_head, from_tail])
        days.append(mixed[torch.randperm(n, generator=g)])
    return torch.stack(days), ids


def make_stream(spec: StreamSpec) -> Dict[str, Any]:
    """Ids ``[F, days + 1, rows_per_day]`` and labels ``[days + 1, rows_per_day, 2]``."""
    g = torch.Generator().manual_seed(spec.seed)
    fields, effects_click, effects_conv = [], [], []
    for _ in range(spec.fields):
        stream, ids = _field_stream(spec, g)
        effect = torch.randn(ids.numel(), 2, generator=g)
        order = torch.argsort(ids)
        position = torch.searchsorted(ids[order], stream)
        per_lookup = effect[order][position]  # [days + 1, n, 2]
        fields.append(stream)
        effects_click.append(per_lookup[..., 0])
        effects_conv.append(per_lookup[..., 1])
    scale = 1.2 / spec.fields**0.5
    click_logit = scale * torch.stack(effects_click).sum(0) - 1.0
    conv_logit = scale * torch.stack(effects_conv).sum(0) + 0.5
    click = torch.bernoulli(torch.sigmoid(click_logit), generator=g)
    conversion = click * torch.bernoulli(torch.sigmoid(conv_logit), generator=g)
    return {"ids": torch.stack(fields), "labels": torch.stack([click, conversion], dim=-1)}


def _map_ids(mapping: str, ids: torch.Tensor, rows: int) -> Tuple[torch.Tensor, List[int]]:
    """Ids ``[F, days + 1, n]`` as the mapping feeds them, and each field's table rows."""
    if mapping == "mch":
        return ids, [rows] * ids.shape[0]
    if mapping == "hash":
        return 1 + ids % (rows - 1), [rows] * ids.shape[0]
    mapped, sizes = torch.zeros_like(ids), []
    for f in range(ids.shape[0]):
        vocab = ids[f, :-1].unique()  # the full pass over the training days
        position = torch.searchsorted(vocab, ids[f]).clamp(max=vocab.numel() - 1)
        known = vocab[position] == ids[f]
        mapped[f] = torch.where(known, position + 1, torch.zeros_like(position))
        sizes.append(vocab.numel() + 1)
    return mapped, sizes


def _auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC by ranks (ties get their mean rank)."""
    order = torch.argsort(scores)
    ranks = torch.empty_like(scores, dtype=torch.float64)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=torch.float64)
    # Mean rank for ties.
    uniq, inverse = torch.unique(scores, return_inverse=True)
    sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(
        0, inverse, torch.ones_like(ranks)
    )
    ranks = (sums / counts)[inverse]
    pos = labels > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def mapping_rank(mapping: str, stream: StreamSpec, train: TrainSpec) -> Dict[str, Any]:
    """One mapping, trained and tested in this (fresh) process on one gloo rank."""
    import torch.distributed as dist
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from dtn_torchrec.data.batch import Batch
    from dtn_torchrec.data.schema import FieldSpec, SchemaSpec
    from dtn_torchrec.distributed.config import (
        DenseOptimizerConfig,
        ShardingConfig,
        SparseOptimizerConfig,
    )
    from dtn_torchrec.distributed.optimizers import apply_sparse_optimizer, build_dense_optimizer
    from dtn_torchrec.distributed.parallel import shard_model
    from dtn_torchrec.distributed.planning import plan_model
    from dtn_torchrec.distributed.topology import topology_from_env
    from dtn_torchrec.models.builder import build_train_model
    from dtn_torchrec.models.config import model_config_from_dict

    data = make_stream(stream)
    ids, sizes = _map_ids(mapping, data["ids"], stream.rows)
    names = [f"f{f}" for f in range(stream.fields)]
    schema = SchemaSpec(
        fields=[FieldSpec(n, 0 if mapping == "mch" else s) for n, s in zip(names, sizes)],
        labels=list(TASKS),
        id_mapping="raw" if mapping == "mch" else "vocab",
    )
    embedding: Dict[str, Any] = {"embedding_dim": train.embedding_dim}
    if mapping == "mch":
        embedding["tables"] = {
            "*": {
                "collision": "mch",
                "size": stream.rows,
                "eviction": train.eviction,
                "eviction_interval": train.eviction_interval,
            }
        }
    cfg = model_config_from_dict(
        {"name": "mmoe", "embedding": embedding, "tower": {"hidden_dims": [16]}}
    )
    torch.manual_seed(stream.seed)
    module = build_train_model(cfg, schema, device=torch.device("meta"))
    apply_sparse_optimizer(module, SparseOptimizerConfig(lr=train.sparse_lr))
    sharding = ShardingConfig()
    plan = plan_model(
        module,
        sharding,
        topology=topology_from_env("cpu", sharding),
        batch_size=train.batch_size,
        pg=dist.group.WORLD,
    )
    dmp = shard_model(module, device=torch.device("cpu"), plan=plan)
    optimizer = build_dense_optimizer(
        dmp, DenseOptimizerConfig(name="adam", lr=train.dense_lr)
    ).optimizer

    def batch(day: int, lo: int, hi: int) -> Batch:
        values = ids[:, day, lo:hi]
        n = hi - lo
        kjt = KeyedJaggedTensor(
            keys=names,
            values=values.reshape(-1),
            lengths=torch.ones(values.numel(), dtype=torch.int32),
            stride=n,
        )
        return Batch(kjt, data["labels"][day, lo:hi], torch.arange(n))

    n, b = stream.rows_per_day, train.batch_size
    monitor = OtherCpuMonitor()
    monitor.start()
    start = time.perf_counter()
    samples = 0
    for day in range(stream.days):
        for lo in range(0, n - b + 1, b):
            loss, _ = dmp(batch(day, lo, lo + b))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            samples += b
    elapsed = time.perf_counter() - start
    other_cores = monitor.stop()

    dmp.eval()
    scores: List[torch.Tensor] = []
    with torch.no_grad():
        for lo in range(0, n, 4096):
            _, (_, logits, _) = dmp(batch(stream.days, lo, min(n, lo + 4096)))
            scores.append(logits)
    logits = torch.cat(scores)
    labels = data["labels"][stream.days]
    auc = {task: _auc(logits[:, t], labels[:, t]) for t, task in enumerate(TASKS)}
    return {
        "mapping": mapping,
        "auc": auc,
        "collision_share": _test_collision_share(mapping, dmp, data["ids"], stream.rows),
        "samples_per_s": samples / elapsed,
        "other_cpu_cores": other_cores,
        "contended": is_contended([other_cores]),
        "peak_rss_bytes": peak_rss_bytes(),
        "table_rows": sum(sizes),
    }


def _test_collision_share(mapping: str, dmp: Any, raw: torch.Tensor, rows: int) -> float:
    """Share of test lookups that hit a row owned by another id: hash, a row that another
    training or test id also maps to; mch, the shared row of ids without a row; vocab, none."""
    if mapping == "vocab":
        return 0.0
    from torchrec.sparse.jagged_tensor import JaggedTensor

    hits, total = 0, 0
    for f in range(raw.shape[0]):
        test_raw = raw[f, -1]
        if mapping == "hash":
            seen = raw[f].flatten().unique()
            ids_per_row = torch.bincount(1 + seen % (rows - 1), minlength=rows)
            hits += int((ids_per_row[1 + test_raw % (rows - 1)] > 1).sum())
        else:
            mcc = dmp.module.model.sparse_arch.mch_bags._managed_collision_collection
            module = mcc._managed_collision_modules[f"t_f{f}"]
            jt = JaggedTensor(
                values=test_raw, lengths=torch.ones(test_raw.numel(), dtype=torch.int32)
            )
            mapped = module({"t": jt})["t"].values()  # eval mode: no profiling
            hits += int((mapped == module.output_size() - 1).sum())
        total += test_raw.numel()
    return hits / total


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench/id_mapping.json", help="JSON report path")
    parser.add_argument("--fields", type=int, default=StreamSpec.fields)
    parser.add_argument(
        "--rows", type=int, default=StreamSpec.rows, help="table rows per field for hash and mch"
    )
    parser.add_argument(
        "--id-ratio", type=int, default=StreamSpec.id_ratio, help="distinct ids per field / rows"
    )
    parser.add_argument("--days", type=int, default=StreamSpec.days)
    parser.add_argument("--rows-per-day", type=int, default=StreamSpec.rows_per_day)
    parser.add_argument("--eviction", choices=("lru", "lfu"), default=TrainSpec.eviction)
    parser.add_argument("--eviction-interval", type=int, default=TrainSpec.eviction_interval)
    parser.add_argument(
        "--mappings",
        default=",".join(MAPPINGS),
        help="comma-separated subset of vocab,hash,mch (targets need all three)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the process")
    args = parser.parse_args(argv)
    stream = StreamSpec(args.fields, args.rows, args.id_ratio, args.days, args.rows_per_day)
    train = TrainSpec(eviction=args.eviction, eviction_interval=args.eviction_interval)
    mappings = [m for m in args.mappings.split(",") if m]
    unknown = sorted(set(mappings) - set(MAPPINGS))
    if unknown:
        parser.error(f"--mappings: unknown {unknown}; known: {list(MAPPINGS)}")
    results = []
    for mapping in mappings:
        (record,) = run_ranks(
            mapping_rank,
            1,
            args.threads,
            timeout_s=1800.0,
            mapping=mapping,
            stream=stream,
            train=train,
        )
        results.append(record)
        print(f"[bench] {mapping}: {record}", file=sys.stderr)
    by = {r["mapping"]: r for r in results}
    contended = any(r["contended"] for r in results)
    rows = [
        [
            r["mapping"],
            f"{r['table_rows']:,}",
            f"{r['auc']['click']:.4f}",
            f"{r['auc']['conversion']:.4f}",
            f"{100 * r['collision_share']:.1f}%",
            f"{r['samples_per_s']:,.0f}",
            f"{r['peak_rss_bytes'] / 2**20:,.0f}",
            contention_mark(r["contended"]),
        ]
        for r in results
    ]
    table = format_table(
        [
            "mapping",
            "table rows",
            "click AUC",
            "conv AUC",
            "test lookups on another id's row",
            "samples/s",
            "peak MiB",
            "machine",
        ],
        rows,
    )
    targets = (
        {}
        if set(by) != set(MAPPINGS)
        else {
            "mch_auc_ge_hash_plus_0.005": all(
                by["mch"]["auc"][t] >= by["hash"]["auc"][t] + 0.005 for t in TASKS
            ),
            "mch_auc_within_0.01_of_vocab": all(
                by["mch"]["auc"][t] >= by["vocab"]["auc"][t] - 0.01 for t in TASKS
            ),
            "mch_rate_ge_70pct_of_hash": by["mch"]["samples_per_s"]
            >= 0.7 * by["hash"]["samples_per_s"],
        }
    )
    # The machine's dense peak in the same run, so the rates above can be read against it.
    peaks = {dtype: peak.record() for dtype, peak in measure_gemm_peaks().items()}
    contended = contended or any(peak["contended"] for peak in peaks.values())
    print(table)
    print(
        "GEMM peak: "
        + ", ".join(f"{d} {p['flops'] / 1e9:.0f} GFLOP/s" for d, p in peaks.items())
        + f" ({torch.get_num_threads()} threads)"
    )
    print("targets: " + ", ".join(f"{k}={'met' if v else 'NOT met'}" for k, v in targets.items()))
    if contended:
        print(
            "[bench] CONTENDED: other processes used the CPU during a run; rates are not "
            "publishable",
            file=sys.stderr,
        )
    report = {
        "stream": asdict(stream),
        "train": asdict(train),
        "machine": machine_info(),
        "gemm_peak": peaks,
        "results": results,
        "targets": targets,
        "contended": contended,
        "table": table,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_json_atomic(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
