"""Process start-up and exit: 2-rank runs end with code 0, repeatedly, and so does one rank alone.

The ranks are started the way torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT in the environment of fresh interpreters), without the torchrun agent so the runs stay
short; a rank that aborts at exit (SIGABRT after destroy_process_group, which torchrun and TorchX
report as a failed job) shows up as exit code -6.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

from dist_utils import free_port

TESTS = Path(__file__).resolve().parent
WORKER = str(TESTS / "exit_worker.py")
RUNS = 5
TIMEOUT_S = 120


def _env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(TESTS), **extra)
    return env


def _run_two_ranks() -> List[subprocess.CompletedProcess[str]]:
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER],
            env=_env(
                RANK=str(rank),
                WORLD_SIZE="2",
                LOCAL_RANK=str(rank),
                LOCAL_WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    results = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


@pytest.mark.slow
def test_two_rank_runs_exit_cleanly_every_time() -> None:
    for run in range(RUNS):
        for rank, result in enumerate(_run_two_ranks()):
            assert result.returncode == 0, (
                f"run {run} rank {rank}: exit {result.returncode}\n{result.stderr[-3000:]}"
            )
            assert f"rank {rank}/2 done" in result.stdout, result.stdout


@pytest.mark.slow
def test_single_process_without_launcher() -> None:
    result = subprocess.run(
        [sys.executable, WORKER], env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0/1 done" in result.stdout
