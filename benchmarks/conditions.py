"""Measurement conditions: the machine's GEMM peak and the CPU that other processes took.

A throughput figure means something only next to the ceiling of the same machine at the same
moment, and only if nothing else was running. Every benchmark therefore measures the fp32 and
bf16 GEMM peak in the same run (seconds-long windows of large square ``torch.mm``) and watches
the CPU of every other process during each timed window: total busy CPU time of the machine
minus the CPU time of this benchmark's own process tree. A window in which other processes
took more than ``CONTENDED_CORES`` of a core marks the run "contended".
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import psutil
import torch

# Other processes' CPU above this share of one core (during a timed window) = contended.
CONTENDED_CORES = 0.10
# Rank processes read the benchmark's root process id from here (set by ``run_ranks``).
ROOT_PID_ENV = "DTN_BENCH_ROOT_PID"


def benchmark_root_pid() -> int:
    """The process whose tree is "this benchmark": the launching process for rank processes,
    else this process."""
    return int(os.environ.get(ROOT_PID_ENV, os.getpid()))


def _tree_cpu_seconds(root: psutil.Process) -> float:
    """User + system CPU seconds of ``root`` and its descendants, live or ended.

    A descendant that ended (a ``dtn-train`` run, a rank) leaves the tree, but once reaped its
    CPU time is in its parent's ``children_*`` times, so counting those for every live process
    keeps it: without them an ended child's work counted as another process's."""
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.Error:  # ended between listing and reading
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


def _machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (everything but idle and iowait)."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


class OtherCpuMonitor:
    """CPU that processes outside one process tree used over a window, in cores.

    ``start()`` then ``stop()`` returns ``(machine busy - tree busy) / wall seconds``: 0 on an
    idle machine, 1.0 when another process kept one core busy the whole window.

    Args:
        root_pid: the root of the tree that counts as "ours". Default: ``benchmark_root_pid()``.
    """

    def __init__(self, root_pid: Optional[int] = None) -> None:
        self._root = psutil.Process(root_pid if root_pid is not None else benchmark_root_pid())
        self._start: Optional[tuple] = None

    def start(self) -> None:
        self._start = (time.perf_counter(), _machine_busy_seconds(), _tree_cpu_seconds(self._root))

    def stop(self) -> float:
        """Other processes' CPU since ``start()``, in cores (never negative)."""
        if self._start is None:
            raise RuntimeError("OtherCpuMonitor.stop() before start()")
        wall0, busy0, tree0 = self._start
        wall = time.perf_counter() - wall0
        others = (_machine_busy_seconds() - busy0) - (_tree_cpu_seconds(self._root) - tree0)
        self._start = None
        return max(0.0, others) / max(wall, 1e-9)


def is_contended(other_cores: List[float], threshold: float = CONTENDED_CORES) -> bool:
    """True when any window's other-process CPU exceeds ``threshold`` cores."""
    return any(c > threshold for c in other_cores)


@dataclass(frozen=True)
class GemmPeak:
    """FLOP/s of a ``size``^3 ``torch.mm`` in one dtype, over seconds-long windows.

    Args:
        dtype: ``"fp32"`` or ``"bf16"``.
        size: square matrix size.
        threads: torch threads used.
        windows: FLOP/s of each window.
        other_cpu_cores: other processes' CPU during each window (cores).
    """

    dtype: str
    size: int
    threads: int
    windows: List[float]
    other_cpu_cores: List[float]

    @property
    def flops(self) -> float:
        """The peak: the best window (contention only ever lowers a window)."""
        return max(self.windows)

    def record(self) -> Dict[str, object]:
        return {
            "dtype": self.dtype,
            "size": self.size,
            "threads": self.threads,
            "flops": self.flops,
            "median_flops": statistics.median(self.windows),
            "windows": self.windows,
            "other_cpu_cores": self.other_cpu_cores,
            "contended": is_contended(self.other_cpu_cores),
        }


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def measure_gemm_peak(
    dtype: str, size: int = 2048, window_seconds: float = 2.0, windows: int = 3
) -> GemmPeak:
    """Runs ``size``^3 matmuls in ``dtype`` for ``windows`` windows of ``window_seconds`` each
    (after one untimed matmul), at the current torch thread count."""
    a = torch.randn(size, size).to(_DTYPES[dtype])
    b = torch.randn(size, size).to(_DTYPES[dtype])
    out = torch.empty(size, size, dtype=_DTYPES[dtype])
    torch.mm(a, b, out=out)
    flops_per_mm = 2.0 * size**3
    monitor = OtherCpuMonitor()
    rates, others = [], []
    for _ in range(windows):
        count = 0
        monitor.start()
        start = time.perf_counter()
        while True:
            torch.mm(a, b, out=out)
            count += 1
            elapsed = time.perf_counter() - start
            if elapsed >= window_seconds:
                break
        others.append(monitor.stop())
        rates.append(count * flops_per_mm / elapsed)
    return GemmPeak(dtype, size, torch.get_num_threads(), rates, others)


def measure_gemm_peaks(size: int = 2048, window_seconds: float = 2.0) -> Dict[str, GemmPeak]:
    """fp32 and bf16 GEMM peaks at the current thread count."""
    return {d: measure_gemm_peak(d, size, window_seconds) for d in ("fp32", "bf16")}


def probe_idle(seconds: float = 1.0, sleep: Callable[[float], None] = time.sleep) -> float:
    """Other processes' CPU (cores) while this process sleeps ``seconds``: the load that a
    measurement started now would compete with."""
    monitor = OtherCpuMonitor()
    monitor.start()
    sleep(seconds)
    return monitor.stop()
