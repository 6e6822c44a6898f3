"""Runs a function on N gloo ranks, each in a fresh process, and returns what each rank returned.

Children are forked from a ``forkserver`` that has torch / torchrec imported already (a child
starts in well under a second instead of importing torchrec again), join the job through
``dtn_torchrec.distributed.launch.init_distributed`` exactly as under torchrun, and leave through
``shutdown_and_exit``. A child's exception is re-raised in the test process with the child's
traceback.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

_GRACE_S = 10.0
_PRELOAD = [
    "torch",
    "torchrec",
    "dtn_torchrec.distributed.parallel",
    "dtn_torchrec.distributed.checkpoint",
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _child(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    out_dir: str,
    kwargs: Dict[str, Any],
) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    # Two ranks share the machine's cores; one thread each avoids oversubscription.
    torch.set_num_threads(1)
    from dtn_torchrec.distributed.launch import init_distributed, shutdown_and_exit

    try:
        init_distributed()
        result = fn(**kwargs)
        torch.save(result, os.path.join(out_dir, f"result_{rank}.pt"))
    except BaseException:  # noqa: BLE001 - reported to the parent, then a hard exit
        Path(out_dir, f"error_{rank}.txt").write_text(traceback.format_exc())
        os._exit(1)
    shutdown_and_exit(0)


def run_on_ranks(
    fn: Callable[..., Any], world_size: int, timeout_s: float = 120.0, **kwargs: Any
) -> List[Any]:
    """Calls ``fn(**kwargs)`` on ``world_size`` ranks; returns the per-rank results by rank.

    ``fn`` must be a module-level function (it is pickled) and its result picklable.

    Raises:
        AssertionError: a rank raised (with its traceback), exited non-zero or timed out.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    out_dir = tempfile.mkdtemp(prefix="dist_utils_")
    port = free_port()
    procs = [
        ctx.Process(target=_child, args=(fn, rank, world_size, port, out_dir, kwargs))
        for rank in range(world_size)
    ]
    try:
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + timeout_s
        while any(proc.is_alive() for proc in procs) and time.monotonic() < deadline:
            failed = any(proc.exitcode not in (None, 0) for proc in procs)
            if failed:
                # The others are probably stuck in a collective with the failed rank.
                deadline = min(deadline, time.monotonic() + _GRACE_S)
            time.sleep(0.05)
        hung = [rank for rank, proc in enumerate(procs) if proc.is_alive()]
        for rank in hung:
            procs[rank].kill()
            procs[rank].join()
        errors: List[str] = []
        for rank, proc in enumerate(procs):
            error_file = Path(out_dir, f"error_{rank}.txt")
            if error_file.exists():
                errors.append(f"rank {rank} raised:\n{error_file.read_text()}")
            elif rank in hung:
                errors.append(f"rank {rank} timed out after {timeout_s} s")
            elif proc.exitcode != 0:
                errors.append(f"rank {rank} exited with code {proc.exitcode}")
        if errors:
            raise AssertionError("\n".join(errors))
        return [
            torch.load(os.path.join(out_dir, f"result_{rank}.pt"), weights_only=False)
            for rank in range(world_size)
        ]
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        shutil.rmtree(out_dir, ignore_errors=True)
