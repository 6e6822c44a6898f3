"""The planner's view of the hardware: ranks, memory per rank, bandwidths.

One builder, :class:`ClusterSpec`, for both a described cluster (``dtn-plan``) and the running
job (:func:`topology_from_env`), so both plan against the same ``Topology`` for the same numbers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
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

GIB = 1024**3
# TorchRec's bandwidth unit is bytes per millisecond, and its constants count 1 GB as 2**30 bytes
# (INTRA_NODE_BANDWIDTH = 600 * 1024**3 / 1000); GB/s values use the same convention.
_GBPS_TO_BYTES_PER_MS = GIB / 1000


def host_memory_bytes() -> int:
    """Physical RAM of this host."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class ClusterSpec:
    """A described cluster: ranks, memory per rank, bandwidths. None = TorchRec's default.

    Args:
        world_size: total ranks.
        local_world_size: ranks per host.
        compute_device: ``cuda`` (tables in HBM, UVM possible) or ``cpu`` (tables in DDR).
        hbm_gb: device memory per rank, GiB (default 32).
        ddr_gb: host memory per rank, GiB (default 128).
        intra_host_bw_gbps: rank-to-rank bandwidth inside a host, GB/s (default 600).
        inter_host_bw_gbps: bandwidth between hosts per rank, GB/s (default 12.5).
        hbm_bw_gbps: device memory bandwidth, GB/s (default 897).
        ddr_bw_gbps: host memory bandwidth, GB/s (default 51).
    """

    world_size: int
    local_world_size: int
    compute_device: str = "cuda"
    hbm_gb: Optional[float] = None
    ddr_gb: Optional[float] = None
    intra_host_bw_gbps: Optional[float] = None
    inter_host_bw_gbps: Optional[float] = None
    hbm_bw_gbps: Optional[float] = None
    ddr_bw_gbps: Optional[float] = None

    def validate(self) -> None:
        if self.world_size <= 0 or self.local_world_size <= 0:
            raise ValueError(
                f"world size ({self.world_size}) and local world size ({self.local_world_size})"
                " must be positive"
            )
        if self.world_size % self.local_world_size != 0:
            raise ValueError(
                f"world size {self.world_size} is not a multiple of the local world size"
                f" {self.local_world_size} (ranks per host)"
            )
        if self.compute_device not in ("cuda", "cpu"):
            raise ValueError(f"compute device must be cuda or cpu, got {self.compute_device!r}")
        for name in (
            "hbm_gb",
            "ddr_gb",
            "intra_host_bw_gbps",
            "inter_host_bw_gbps",
            "hbm_bw_gbps",
            "ddr_bw_gbps",
        ):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")

    def topology(self) -> Topology:
        """The planner's ``Topology`` of this cluster (built without any device)."""
        self.validate()

        def gib(value: Optional[float]) -> Optional[int]:
            return None if value is None else int(value * GIB)

        def bandwidth(value: Optional[float]) -> Optional[float]:
            return None if value is None else value * _GBPS_TO_BYTES_PER_MS

        return TopologyFactory.create_topology(
            trainer_config=TrainerConfig(
                world_size=self.world_size,
                local_world_size=self.local_world_size,
                hbm_cap_bytes=gib(self.hbm_gb),
                ddr_cap_bytes=gib(self.ddr_gb),
            ),
            hardware_config=HardwareConfig(
                intra_host_bw=bandwidth(self.intra_host_bw_gbps),
                inter_host_bw=bandwidth(self.inter_host_bw_gbps),
                hbm_mem_bw=bandwidth(self.hbm_bw_gbps),
                ddr_mem_bw=bandwidth(self.ddr_bw_gbps),
            ),
            # use_hardware_based_bandwidth: take the bandwidths above (TorchRec's when None).
            kernel_config=KernelConfig(
                compute_device=self.compute_device, use_hardware_based_bandwidth=True
            ),
        )


def make_topology(
    *,
    world_size: int,
    local_world_size: int,
    compute_device: str,
    cfg: ShardingConfig,
    hbm_cap_bytes: Optional[int] = None,
    ddr_cap_bytes: Optional[int] = None,
) -> Topology:
    """The ``Topology`` of a cluster described by ``cfg`` (no device needed).

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
    cfg.validate()

    def gib(configured: Optional[float], detected: Optional[int]) -> Optional[float]:
        if configured is not None:
            return configured
        return None if detected is None else detected / GIB

    return ClusterSpec(
        world_size=world_size,
        local_world_size=local_world_size,
        compute_device=compute_device,
        hbm_gb=gib(cfg.hbm_cap_gb, hbm_cap_bytes),
        ddr_gb=gib(cfg.ddr_cap_gb, ddr_cap_bytes),
        intra_host_bw_gbps=cfg.intra_host_bw_gbps,
        inter_host_bw_gbps=cfg.inter_host_bw_gbps,
    ).topology()


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
