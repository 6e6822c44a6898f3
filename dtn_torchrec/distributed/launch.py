"""Process-group start-up and a clean exit, under torchrun / TorchX or as a single process."""

from __future__ import annotations

import logging
import os
import sys
from typing import NamedTuple, NoReturn, Optional

import torch
import torch.distributed as dist

from dtn_torchrec.distributed.library_warnings import quiet_harmless_log_lines

logger: logging.Logger = logging.getLogger(__name__)


class DistributedContext(NamedTuple):
    """This process's place in the job (unpacks as ``rank, world_size, local_rank, device,
    backend``)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


DEVICE_ENV = "DTN_DEVICE"
DEVICE_CHOICES = ("auto", "cpu", "cuda")


class LaunchError(RuntimeError):
    """This process cannot join the job on the device it was asked for (one-line reason)."""


def _use_cuda(device: str, require_cuda: bool) -> bool:
    if device not in DEVICE_CHOICES:
        raise LaunchError(f"{DEVICE_ENV}={device!r}: expected one of {list(DEVICE_CHOICES)}")
    available = torch.cuda.is_available()
    if device == "cpu":
        if require_cuda:
            raise LaunchError(f"CUDA required, but {DEVICE_ENV}=cpu pins this job to the CPU")
        return False
    if not available and (device == "cuda" or require_cuda):
        why = f"{DEVICE_ENV}=cuda" if device == "cuda" else "CUDA required (--require-cuda)"
        raise LaunchError(
            f"{why}, but torch sees no CUDA device (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda}); refusing to fall back to the CPU"
        )
    return available


def _check_ordinal(local_rank: int) -> None:
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise LaunchError(
            f"LOCAL_RANK={local_rank} but this host shows {count} CUDA device(s)"
            f" (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}): run at"
            f" most {count} rank(s) per host (torchrun --nproc_per_node, TorchX -j NxP with"
            " P <= GPUs per host), and under Slurm give every task all its host's GPUs"
        )


def init_distributed(
    device: Optional[str] = None, *, require_cuda: bool = False
) -> DistributedContext:
    """Initialises the default process group.

    Under torchrun (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``
    set) joins the job through ``env://``; otherwise starts a one-rank group on an in-memory
    store (no port, no file). ``nccl`` on ``cuda:<local_rank>`` or ``gloo`` on CPU.

    Args:
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``; None = the ``DTN_DEVICE``
            environment variable, else ``auto``. The test suite pins ``cpu`` through it.
        require_cuda: refuse to start without CUDA instead of falling back to gloo on CPU.

    Also drops the library log lines known to be harmless
    (``library_warnings.HARMLESS_LOG_LINES``; the CLIs' ``--verbose`` keeps them).

    Raises:
        LaunchError: CUDA asked for but absent, or ``LOCAL_RANK`` has no CUDA device.
    """
    if dist.is_initialized():
        raise RuntimeError("the default process group is already initialised")
    quiet_harmless_log_lines()
    use_cuda = _use_cuda(device or os.environ.get(DEVICE_ENV, "auto"), require_cuda)
    backend = "nccl" if use_cuda else "gloo"
    if "RANK" in os.environ:
        rank = int(os.environ["RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    else:
        rank, world_size, local_rank = 0, 1, 0
    if use_cuda:
        _check_ordinal(local_rank)
        torch_device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(torch_device)
    else:
        torch_device = torch.device("cpu")
    if "RANK" in os.environ:
        dist.init_process_group(backend=backend, init_method="env://")
    else:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistributedContext(rank, world_size, local_rank, torch_device, backend)


def allow_tf32(device: torch.device, precision: str) -> None:
    """Lets CUDA run fp32 GEMMs / convolutions in TF32 unless the dense part is bf16.

    Args:
        device: this rank's device (nothing changes on CPU).
        precision: ``train.precision`` (``fp32`` | ``bf16`` | ``auto``).
    """
    if device.type != "cuda":
        return
    tf32 = precision != "bf16"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def shutdown_and_exit(code: int = 0) -> NoReturn:
    """Leaves the job and ends the process with ``code``, skipping interpreter teardown.

    On success all ranks meet at a barrier first, so none tears down while another still talks
    to it. The process then ends through ``os._exit``: ranks that used the fused FBGEMM kernels
    sometimes abort with "terminate called without an active exception" during normal
    interpreter exit (``docs/sharding.md``, process exit), which turns a finished job into a
    failed one.
    """
    try:
        if dist.is_initialized():
            if code == 0:
                dist.barrier()
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - we are leaving anyway; report and keep the exit code
        logger.exception("error while leaving the process group")
        code = code or 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
