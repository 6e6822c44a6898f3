"""Process-group start-up and a clean exit, under torchrun / TorchX or as a single process."""

from __future__ import annotations

import logging
import os
import sys
from typing import NamedTuple, NoReturn

import torch
import torch.distributed as dist

logger: logging.Logger = logging.getLogger(__name__)


class DistributedContext(NamedTuple):
    """This process's place in the job (unpacks as ``rank, world_size, local_rank, device,
    backend``)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def init_distributed() -> DistributedContext:
    """Initialises the default process group.

    Under torchrun (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``
    set) joins the job through ``env://``; otherwise starts a one-rank group on an in-memory
    store (no port, no file). ``nccl`` on ``cuda:<local_rank>`` when CUDA is available, else
    ``gloo`` on CPU.
    """
    if dist.is_initialized():
        raise RuntimeError("the default process group is already initialised")
    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if "RANK" in os.environ:
        rank = int(os.environ["RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    else:
        rank, world_size, local_rank = 0, 1, 0
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if "RANK" in os.environ:
        dist.init_process_group(backend=backend, init_method="env://")
    else:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistributedContext(rank, world_size, local_rank, device, backend)


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
