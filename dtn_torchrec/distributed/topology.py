"""The planner's view of the hardware: ranks, memory per rank, bandwidths."""

from __future__ import annotations

import os
from typing import Optional

import torch
from torchrec.distributed.planner.types import (
    HardwareConfig,
    KernelConfig,
    Topology,
    TopologyFactory,
    TrainerConfig,
)

from dtn_torchrec.distributed.config import ShardingConfig

_GIB = 1024**3
# TorchRec's bandwidth unit is bytes per millisecond, and its constants count 1 GB as 2**30 bytes
# (INTRA_NODE_BANDWIDTH = 600 * 1024**3 / 1000); so do we.
_GBPS_TO_BYTES_PER_MS = _GIB / 1000


def host_memory_bytes() -> int:
    """Physical RAM of this host."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _gib(value: Optional[float]) -> Optional[int]:
    return None if value is None else int(value * _GIB)


def _bandwidth(value: Optional[float]) -> Optional[float]:
    return None if value is None else value * _GBPS_TO_BYTES_PER_MS


def make_topology(
    *,
    world_size: int,
    local_world_size: int,
    compute_device: str,
    cfg: ShardingConfig,
    hbm_cap_bytes: Optional[int] = None,
    ddr_cap_bytes: Optional[int] = None,
) -> Topology:
    """Builds a ``Topology`` for any described cluster (no device needed; used by dtn-plan).

    Capacities from ``cfg`` (GiB) win over the ``*_bytes`` arguments (detected values); what is
    left unset falls back to TorchRec's defaults (HBM 32 GiB, host memory 128 GiB per rank).

    Args:
        world_size: total ranks.
        local_world_size: ranks per host.
        compute_device: ``"cpu"`` or ``"cuda"``.
        cfg: sharding configuration (capacities, bandwidths).
        hbm_cap_bytes: detected device memory per rank.
        ddr_cap_bytes: detected host memory per rank.
    """
    if world_size <= 0 or local_world_size <= 0 or world_size % local_world_size != 0:
        raise ValueError(
            f"world_size={world_size} must be a positive multiple of"
            f" local_world_size={local_world_size}"
        )
    cfg.validate()
    trainer = TrainerConfig(
        world_size=world_size,
        local_world_size=local_world_size,
        hbm_cap_bytes=_gib(cfg.hbm_cap_gb),
        ddr_cap_bytes=_gib(cfg.ddr_cap_gb),
    )
    hardware = HardwareConfig(
        hbm_cap_bytes=hbm_cap_bytes,
        ddr_cap_bytes=ddr_cap_bytes,
        intra_host_bw=_bandwidth(cfg.intra_host_bw_gbps),
        inter_host_bw=_bandwidth(cfg.inter_host_bw_gbps),
    )
    return TopologyFactory.create_topology(
        trainer_config=trainer,
        hardware_config=hardware,
        # use_hardware_based_bandwidth: take the bandwidths above (TorchRec's when None).
        kernel_config=KernelConfig(
            compute_device=compute_device, use_hardware_based_bandwidth=True
        ),
    )


def topology_from_env(compute_device: str, cfg: ShardingConfig) -> Topology:
    """The topology of the running job, from ``WORLD_SIZE`` / ``LOCAL_WORLD_SIZE`` (torchrun).

    Host memory per rank is this host's RAM divided by the ranks on it (TorchRec would assume
    128 GiB per rank); device memory is the current CUDA device's.

    Args:
        compute_device: ``"cpu"`` or ``"cuda"``.
        cfg: sharding configuration (explicit capacities override the detected ones).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    hbm = None
    if compute_device == "cuda":
        hbm = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return make_topology(
        world_size=world_size,
        local_world_size=local_world_size,
        compute_device=compute_device,
        cfg=cfg,
        hbm_cap_bytes=hbm,
        ddr_cap_bytes=host_memory_bytes() // local_world_size,
    )
