"""Shared benchmark helpers: timed windows, rank launching, roofline probes, JSON and tables.

Measurement rules (README "Benchmarks: how we measure"): every number is the median of several
seconds-long timed windows after a warm-up, reported with its min-max; the CPU other processes
took during each window is recorded (``conditions.py``) and marks the run contended; ratios come
from one run on one machine, next to the GEMM peak measured in the same run; each configuration
runs in fresh processes so that its peak memory (``ru_maxrss``) is its own.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import yaml
from torch import nn

from benchmarks.conditions import (
    CONTENDED_CORES,
    ROOT_PID_ENV,
    OtherCpuMonitor,
    is_contended,
    measure_gemm_peaks,
    probe_idle,
)
from dtn_torchrec.data.schema import SchemaSpec
from dtn_torchrec.train.config import RunConfig, load_run_config

# Modules the forkserver imports once, so each rank process starts in well under a second.
_PRELOAD = [
    "torch",
    "torchrec",
    "torchrec.distributed.model_parallel",
    "pyarrow.parquet",
    "dtn_torchrec.distributed.parallel",
    "dtn_torchrec.models.builder",
]


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowSpec:
    """How a training loop is timed.

    Args:
        warmup_steps: untimed steps first (allocations, pipeline fill, caches).
        window_seconds: each timed window runs whole steps until this many seconds have passed.
        windows: timed windows; the result is their median, the spread their min-max.
    """

    warmup_steps: int
    window_seconds: float
    windows: int

    def validate(self) -> None:
        if self.warmup_steps < 0 or self.window_seconds <= 0 or self.windows < 1:
            raise ValueError(f"need warmup >= 0, window_seconds > 0, windows >= 1; got {self}")


@dataclass(frozen=True)
class WindowTimes:
    """What the timed windows measured.

    Args:
        rates: samples/s of each window.
        steps: steps in each window.
        other_cpu_cores: CPU other processes used during each window, in cores.
    """

    rates: List[float]
    steps: List[int]
    other_cpu_cores: List[float]


def timed_windows(step: Callable[[], int], spec: WindowSpec) -> WindowTimes:
    """Runs ``step`` (one training step, returns the samples it trained) for the warm-up, then
    ``spec.windows`` windows of at least ``spec.window_seconds`` each, watching the CPU other
    processes take meanwhile."""
    spec.validate()
    for _ in range(spec.warmup_steps):
        step()
    monitor = OtherCpuMonitor()
    rates, steps, others = [], [], []
    for _ in range(spec.windows):
        samples, count = 0, 0
        monitor.start()
        start = time.perf_counter()
        while True:
            samples += step()
            count += 1
            elapsed = time.perf_counter() - start
            if _window_over(elapsed >= spec.window_seconds):
                break
        others.append(monitor.stop())
        rates.append(samples / elapsed)
        steps.append(count)
    return WindowTimes(rates, steps, others)


def _window_over(over_here: bool) -> bool:
    """Whether the window ends after this step, agreed by every rank: each rank's clock would
    end it after a different number of steps, and a rank that stops early leaves the others
    waiting in the step's collectives."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return over_here
    flag = torch.tensor([1 if over_here else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------------------------
# one measured configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainRun:
    """What every rank of one measurement needs (picklable, sent to the rank processes).

    Args:
        config: run config file (model and optimisers); ``data.path`` is replaced by ``data``.
        overrides: ``dotted.key=value`` overrides of the config.
        data: dataset directory (schema.json + Parquet).
        batch_size: per-rank batch size.
        timing: warm-up and timed windows.
        sharding_types: sharding types for every table (ours); None = the planner's choice.
        table_precision: ``fp32`` or ``fp16`` embedding weights (ours).
    """

    config: str
    overrides: Tuple[str, ...]
    data: str
    batch_size: int
    timing: WindowSpec
    sharding_types: Optional[Tuple[str, ...]] = None
    table_precision: str = "fp32"

    def load(self) -> Tuple[RunConfig, SchemaSpec]:
        """The run config (data path and batch size applied) and the dataset's schema."""
        cfg = load_run_config(
            self.config,
            [*self.overrides, f"data.path={self.data}", f"data.batch_size={self.batch_size}"],
        )
        return cfg, SchemaSpec.load(self.data)


def rank_record(times: WindowTimes, setup_s: float, **extra: Any) -> Dict[str, Any]:
    """What a rank reports: its median samples/s, every window (rate, steps, other processes'
    CPU), whether any window was contended, setup time and peak memory."""
    return {
        "samples_per_s": statistics.median(times.rates),
        "windows": times.rates,
        "window_steps": times.steps,
        "other_cpu_cores": times.other_cpu_cores,
        "contended": is_contended(times.other_cpu_cores),
        "setup_s": setup_s,
        "peak_rss_bytes": peak_rss_bytes(),
        **extra,
    }


# ---------------------------------------------------------------------------------------------
# launching ranks
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    threads: int,
    quiet: bool,
    out_dir: str,
    root_pid: int,
    kwargs: Dict[str, Any],
) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        **{ROOT_PID_ENV: str(root_pid)},
    )
    torch.set_num_threads(threads)
    if quiet:
        # TorchRec warns per data-parallel table and per traced module on every run.
        logging.getLogger().setLevel(logging.ERROR)
        logging.getLogger("torch").setLevel(logging.ERROR)
        warnings.simplefilter("ignore")
    from dtn_torchrec.distributed.launch import init_distributed, shutdown_and_exit

    try:
        init_distributed()
        result = fn(**kwargs)
        with open(os.path.join(out_dir, f"result_{rank}.json"), "w") as f:
            json.dump(result, f)
    except BaseException:  # noqa: BLE001 - reported to the parent, then a hard exit
        Path(out_dir, f"error_{rank}.txt").write_text(traceback.format_exc())
        os._exit(1)
    # Barrier, destroy the group, os._exit: the fused kernels sometimes abort at normal exit.
    shutdown_and_exit(0)


def run_ranks(
    fn: Callable[..., Dict[str, Any]],
    world_size: int,
    threads: int,
    timeout_s: float,
    quiet: bool = True,
    **kwargs: Any,
) -> List[Dict[str, Any]]:
    """Runs ``fn(**kwargs)`` on ``world_size`` gloo ranks, each a fresh process with ``threads``
    torch threads, and returns each rank's (JSON-able) result, by rank. ``quiet`` silences
    library warnings in the ranks (errors still show).

    ``fn`` must be importable by module name (it is pickled to the ranks).

    Raises:
        RuntimeError: a rank raised (its traceback is in the message), died or timed out.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    out_dir = tempfile.mkdtemp(prefix="dtn_bench_")
    port = _free_port()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(fn, rank, world_size, port, threads, quiet, out_dir, os.getpid(), kwargs),
        )
        for rank in range(world_size)
    ]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        errors = sorted(Path(out_dir).glob("error_*.txt"))
        if errors:
            raise RuntimeError(f"{fn.__name__} failed on a rank:\n" + errors[0].read_text())
        for rank, p in enumerate(procs):
            if p.is_alive():
                raise RuntimeError(
                    f"{fn.__name__}: rank {rank} still running after {timeout_s:.0f} s"
                )
            if p.exitcode != 0:
                raise RuntimeError(f"{fn.__name__}: rank {rank} exited with code {p.exitcode}")
        return [
            json.loads(Path(out_dir, f"result_{r}.json").read_text()) for r in range(world_size)
        ]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(out_dir, ignore_errors=True)


def merge_processes(runs: List[List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """Per rank, one record of a measurement repeated in fresh processes (``runs[p][rank]``, as
    :func:`rank_record` wrote them): windows, their steps and other processes' CPU in run order,
    the median of all windows, whether any was contended, the largest peak memory, the setup
    time of each process."""
    merged = []
    for per_process in zip(*runs):
        first = per_process[0]
        windows = [w for r in per_process for w in r["windows"]]
        others = [c for r in per_process for c in r["other_cpu_cores"]]
        merged.append(
            {
                **first,
                "samples_per_s": statistics.median(windows),
                "windows": windows,
                "window_steps": [n for r in per_process for n in r["window_steps"]],
                "other_cpu_cores": others,
                "contended": any(r["contended"] for r in per_process),
                "setup_s": [r["setup_s"] for r in per_process],
                "peak_rss_bytes": max(r["peak_rss_bytes"] for r in per_process),
            }
        )
    return merged


def combine_ranks(results: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One record for a multi-rank measurement: samples/s summed over ranks (each rank's median),
    its min-max (summed per window), whether any window was contended, peak memory per rank, and
    each rank's own record."""
    per_window = [sum(w) for w in zip(*(r["windows"] for r in results))]
    return {
        "samples_per_s": sum(r["samples_per_s"] for r in results),
        "min_samples_per_s": min(per_window),
        "max_samples_per_s": max(per_window),
        "max_other_cpu_cores": max(c for r in results for c in r["other_cpu_cores"]),
        "contended": any(r["contended"] for r in results),
        "peak_rss_bytes_per_rank": [r["peak_rss_bytes"] for r in results],
        "ranks": results,
    }


# ---------------------------------------------------------------------------------------------
# roofline probes
# ---------------------------------------------------------------------------------------------


def linear_shapes(module: nn.Module) -> List[Tuple[int, int]]:
    """``(in_features, out_features)`` of every ``nn.Linear`` in ``module`` (the experts' dense
    layers subclass it)."""
    shapes = []
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            shapes.append((sub.in_features, sub.out_features))
    return shapes


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm_flops_per_s(shapes: Iterable[Tuple[int, int, int]], repeats: int = 5) -> float:
    """Measured FLOP/s of ``torch.mm`` over ``(m, k, n)`` products, run one after the other
    (``2 m k n`` FLOPs each); the median time of ``repeats`` passes."""
    pairs = [(torch.randn(m, k), torch.randn(k, n)) for m, k, n in shapes]
    if not pairs:
        raise ValueError("no GEMM shapes to measure")
    flops = sum(2.0 * a.shape[0] * a.shape[1] * b.shape[1] for a, b in pairs)

    def run() -> None:
        for a, b in pairs:
            torch.mm(a, b)

    return flops / _median_seconds(run, repeats)


def copy_bandwidth_bytes_per_s(num_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Measured memory bandwidth of a large float32 tensor copy (read + write = 2x bytes)."""
    src = torch.randn(num_bytes // 4)
    dst = torch.empty_like(src)
    return 2.0 * src.numel() * 4 / _median_seconds(lambda: dst.copy_(src), repeats)


@dataclass
class Roofline:
    """The machine's measured ceilings (this process, all its torch threads).

    Args:
        gemm_peak_flops: FLOP/s of a large square fp32 ``torch.mm`` (best seconds-long window).
        gemm_peak_bf16_flops: the same in bf16.
        copy_bandwidth: bytes/s of a large tensor copy.
        threads: torch threads used.
        gemm_windows: each dtype's full record (every window and its other-process CPU).
    """

    gemm_peak_flops: float
    gemm_peak_bf16_flops: float
    copy_bandwidth: float
    threads: int
    gemm_windows: Dict[str, Dict[str, Any]]

    @property
    def contended(self) -> bool:
        return any(bool(r["contended"]) for r in self.gemm_windows.values())


def measure_roofline(
    square: int = 2048, copy_bytes: int = 256 * 2**20, window_seconds: float = 2.0
) -> Roofline:
    """Measures the ceilings: ``square``^3 GEMMs in fp32 and bf16 (windows of
    ``window_seconds``) and a ``copy_bytes`` tensor copy."""
    peaks = measure_gemm_peaks(square, window_seconds)
    return Roofline(
        gemm_peak_flops=peaks["fp32"].flops,
        gemm_peak_bf16_flops=peaks["bf16"].flops,
        copy_bandwidth=copy_bandwidth_bytes_per_s(copy_bytes),
        threads=torch.get_num_threads(),
        gemm_windows={d: p.record() for d, p in peaks.items()},
    )


def model_gemm_flops_per_s(batch_size: int, layer_shapes: Sequence[Tuple[int, int]]) -> float:
    """FLOP/s of ``torch.mm`` over a model's dense layers, each once, at its batch size: the
    ceiling of its dense compute at these shapes, per-call overheads included."""
    return gemm_flops_per_s([(batch_size, k, n) for k, n in layer_shapes])


def update_bytes_per_id(optimizer: str, dim: int) -> int:
    """Bytes a fused sparse update moves per looked-up id (fp32): the row read and written,
    plus the optimiser state read and written (Adam 2 x dim, Adagrad dim, row-wise Adagrad 1)."""
    state = {"sgd": 0, "rowwise_adagrad": 1, "adagrad": dim, "adam": 2 * dim}
    if optimizer not in state:
        raise ValueError(f"unknown sparse optimizer {optimizer!r}")
    return 4 * (2 * dim + 2 * state[optimizer])


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    """A plain text table; the first ``left`` columns left-aligned, the rest right-aligned."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in cells
    )


def machine_info() -> Dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "platform": os.uname().machine,
        "load_average": list(os.getloadavg()),
    }


def rate_spread(record: Dict[str, Any]) -> str:
    """``min-max`` samples/s over a measurement's windows (summed over ranks)."""
    if record.get("samples_per_s") is None:
        return "-"
    return f"{record['min_samples_per_s']:,.0f}-{record['max_samples_per_s']:,.0f}"


def contention_mark(contended: bool) -> str:
    """The table cell of a measurement's contention flag."""
    return "CONTENDED" if contended else "idle"


# ---------------------------------------------------------------------------------------------
# command line: timing and contention
# ---------------------------------------------------------------------------------------------


def add_timing_arguments(
    parser: argparse.ArgumentParser, warmup: int, window_seconds: float, windows: int
) -> None:
    """``--warmup``, ``--window-seconds``, ``--windows`` and ``--strict``."""
    parser.add_argument(
        "--warmup", type=int, default=warmup, help="untimed steps before the windows"
    )
    parser.add_argument(
        "--window-seconds",
        type=float,
        default=window_seconds,
        help="length of each timed window in seconds (whole steps)",
    )
    parser.add_argument(
        "--windows",
        type=int,
        default=windows,
        help="timed windows (median reported, min-max shown)",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help=f"refuse to start when other processes use more than {CONTENDED_CORES:g} of a core, "
        "and exit with status 3 when any timed window was contended",
    )


def refuse_if_busy(strict: bool) -> float:
    """Other processes' CPU (cores) over one idle second; with ``strict``, exits (status 3)
    when it is above the contention threshold."""
    others = probe_idle(1.0)
    if strict and others > CONTENDED_CORES:
        raise SystemExit(
            f"--strict: other processes use {others:.2f} cores (> {CONTENDED_CORES:g}); "
            "run on an idle machine"
        )
    return others


def strict_status(contended: bool, strict: bool) -> int:
    """The exit status of a finished run: 3 when ``strict`` and any window was contended."""
    if contended:
        print(
            f"[bench] CONTENDED: other processes used more than {CONTENDED_CORES:g} of a core "
            "during a timed window; these figures are not publishable",
            file=sys.stderr,
        )
    return 3 if contended and strict else 0


def memonet_overrides(config: str | os.PathLike, field_names: Sequence[str]) -> List[str]:
    """The override that points every MemoNet method of a DTN ``config`` at ``field_names``;
    none for other models or a DTN without MemoNet."""
    model = yaml.safe_load(Path(config).read_text()).get("model", {})
    if model.get("name") != "dtn":
        return []
    names = json.dumps(list(field_names), separators=(",", ":"))
    return [
        f"model.dtn.methods.{i}.fields={names}"
        for i, method in enumerate(model.get("dtn", {}).get("methods", []))
        if method.get("kind") == "memonet"
    ]
