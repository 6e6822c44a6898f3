"""Process start-up and exit: 2-rank runs end with code 0, repeatedly, and so does one rank alone;
the device choice (DTN_DEVICE, --require-cuda, LOCAL_RANK against the host's GPUs, CUDA faked).

The ranks are started the way torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT in the environment of fresh interpreters), without the torchrun agent so the runs stay
short; a rank that aborts at exit (SIGABRT after destroy_process_group, which torchrun and TorchX
report as a failed job) shows up as exit code -6.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import torch.distributed as dist
from dist_utils import free_port

from dtn_torchrec.distributed.launch import DEVICE_ENV, LaunchError, allow_tf32, init_distributed

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


# -- device choice: DTN_DEVICE, --require-cuda, LOCAL_RANK vs the GPUs of the host -------------


class _FakeCuda:
    """torch.cuda as a host with ``count`` GPUs shows it (nothing is ever run on them)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, count: int) -> None:
        self.set_devices: List[object] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", self.set_devices.append)


def _as_rank(monkeypatch: pytest.MonkeyPatch, rank: int, world_size: int) -> None:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("LOCAL_RANK", str(rank))


def test_suite_is_pinned_to_cpu_and_gloo_on_a_cuda_host(monkeypatch: pytest.MonkeyPatch) -> None:
    assert os.environ[DEVICE_ENV] == "cpu"  # conftest.py's session fixture
    cuda = _FakeCuda(monkeypatch, count=8)
    ctx = init_distributed()
    try:
        assert (ctx.device, ctx.backend) == (torch.device("cpu"), "gloo")
        assert dist.get_backend() == "gloo"
        assert cuda.set_devices == []
    finally:
        dist.destroy_process_group()


def test_local_rank_beyond_the_hosts_gpus_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = _FakeCuda(monkeypatch, count=1)
    monkeypatch.setenv(DEVICE_ENV, "auto")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    _as_rank(monkeypatch, rank=1, world_size=2)
    with pytest.raises(LaunchError) as info:
        init_distributed()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("LOCAL_RANK=1 but this host shows 1 CUDA device(s)")
    assert "CUDA_VISIBLE_DEVICES=3" in message and "at most 1 rank(s) per host" in message
    assert cuda.set_devices == [] and not dist.is_initialized()


@pytest.mark.parametrize(
    "device, gpus, words",
    [
        ("auto", 0, "CUDA required (--require-cuda), but torch sees no CUDA device"),
        ("cuda", 0, "DTN_DEVICE=cuda, but torch sees no CUDA device"),
        ("cpu", 8, "CUDA required, but DTN_DEVICE=cpu pins this job to the CPU"),
    ],
)
def test_require_cuda_refuses_a_cpu_fallback(
    monkeypatch: pytest.MonkeyPatch, device: str, gpus: int, words: str
) -> None:
    _FakeCuda(monkeypatch, count=gpus)
    monkeypatch.setenv(DEVICE_ENV, device)
    with pytest.raises(LaunchError, match=re.escape(words)):
        init_distributed(require_cuda=device != "cuda")
    assert not dist.is_initialized()


def test_unknown_device_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEVICE_ENV, "tpu")
    expected = r"DTN_DEVICE='tpu': expected one of \['auto', 'cpu', 'cuda'\]"
    with pytest.raises(LaunchError, match=expected):
        init_distributed()


@pytest.mark.slow
def test_dtn_train_require_cuda_exits_with_one_line() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dtn_torchrec.cli.train",
            "--config",
            str(TESTS.parent / "configs" / "dtn_demo.yaml"),
            "--require-cuda",
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    # The suite pins DTN_DEVICE=cpu, so this refuses on a GPU host as well.
    assert last == "dtn-train: error: CUDA required, but DTN_DEVICE=cpu pins this job to the CPU"


@pytest.mark.cuda
def test_cuda_rank_uses_nccl_on_its_local_gpu() -> None:
    ctx = init_distributed("cuda", require_cuda=True)
    try:
        assert (ctx.device, ctx.backend) == (torch.device("cuda:0"), "nccl")
        assert torch.cuda.current_device() == 0
    finally:
        dist.destroy_process_group()


def test_tf32_only_where_the_dense_part_is_not_bf16() -> None:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for precision, tf32 in (("fp32", True), ("auto", True), ("bf16", False)):
            allow_tf32(torch.device("cuda:0"), precision)
            assert torch.backends.cuda.matmul.allow_tf32 is tf32, precision
            assert torch.backends.cudnn.allow_tf32 is tf32, precision
        allow_tf32(torch.device("cpu"), "fp32")  # CPU: left as it was
        assert torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
